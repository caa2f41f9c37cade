//! Who a frame is for: users, their devices, and (later) groups.

/// A user is named by their phone number in E.164 form without the `+`, as an integer
/// (`+1 415 555 0100` is `14155550100`). E.164 numbers have at most 15 digits, so they fit a
/// `u64` with room to spare and need no global id allocator.
pub type UserId = u64;

/// A device of a user. Device 0 is the primary (the phone that registered the number).
pub type DeviceId = u16;

/// Largest valid [`UserId`]: 15 decimal digits.
pub const USER_ID_MAX: UserId = 999_999_999_999_999;

/// Is `id` a plausible E.164 number (1 to 15 digits, no leading zero)?
pub fn is_valid_user_id(id: UserId) -> bool {
    (1..=USER_ID_MAX).contains(&id)
}

/// What kind of recipient an [`Address`] names. The byte is on the wire, so new kinds can be
/// added without a new framing; a server answers an unknown kind with
/// `ErrorCode::UnsupportedAddress` for that message only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AddressKind {
    /// One device of one user (`device` is meaningful). The only kind routed in revision 1.
    Device = 1,
    /// Every device of a user (multi-device fan-out; reserved).
    User = 2,
    /// A group; `id` is the group id (reserved).
    Group = 3,
}

impl AddressKind {
    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Device),
            2 => Some(Self::User),
            3 => Some(Self::Group),
            _ => None,
        }
    }
}

/// A recipient: 11 bytes on the wire (`kind: u8, id: u64 BE, device: u16 BE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// Raw kind byte (kept raw so unknown kinds survive decoding and get a per-message error).
    pub kind: u8,
    /// User id, or group id for groups.
    pub id: u64,
    /// Device id for [`AddressKind::Device`]; 0 otherwise.
    pub device: DeviceId,
}

impl Address {
    /// Address of one device.
    pub fn device(user: UserId, device: DeviceId) -> Self {
        Self {
            kind: AddressKind::Device as u8,
            id: user,
            device,
        }
    }

    /// The parsed kind, if known.
    pub fn kind(&self) -> Option<AddressKind> {
        AddressKind::from_u8(self.kind)
    }
}
