//! Who a frame is for: users, their devices, and (later) groups.

use crate::codec::Field;

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

wire_struct! {
    /// A recipient: 11 bytes on the wire (`kind: u8, id: u64 BE, device: u16 BE`). What a client
    /// addresses a `Send` or `Read` to; the kind byte leaves room for users and groups.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Address {
        /// Raw kind byte (kept raw so unknown kinds survive decoding and get a per-message
        /// error).
        kind: u8,
        /// User id, or group id for groups.
        id: u64,
        /// Device id for [`AddressKind::Device`]; 0 otherwise.
        device: DeviceId,
    }
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

    /// Address of a group (capability `GROUPS`; the client SDK's outbox uses it for
    /// `GroupSend`s).
    pub fn group(group: u64) -> Self {
        Self {
            kind: AddressKind::Group as u8,
            id: group,
            device: 0,
        }
    }

    /// The parsed kind, if known.
    pub fn kind(&self) -> Option<AddressKind> {
        AddressKind::from_u8(self.kind)
    }

    /// The device this address names, when it names exactly one ([`AddressKind::Device`]).
    pub fn device_addr(&self) -> Option<DeviceAddr> {
        (self.kind() == Some(AddressKind::Device)).then_some(DeviceAddr::new(self.id, self.device))
    }
}

impl From<DeviceAddr> for Address {
    fn from(a: DeviceAddr) -> Self {
        Address::device(a.user, a.device)
    }
}

wire_struct! {
    /// One device of one user: who sent a message, who a receipt is from, who logs in. 10 bytes
    /// on the wire (`user: u64 BE, device: u16 BE`). `Display` writes `user.device`
    /// (`14155550100.0`).
    ///
    /// Unlike [`Address`] it has no kind byte: it always names exactly one device, so it is the
    /// key the server routes, stores and deduplicates by.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct DeviceAddr {
        /// The user (E.164 number as an integer).
        user: UserId,
        /// Which of the user's devices.
        device: DeviceId,
    }
}

impl DeviceAddr {
    /// Bytes on the wire.
    pub const WIRE_BYTES: usize = 10;

    /// Device `device` of `user`.
    pub const fn new(user: UserId, device: DeviceId) -> Self {
        Self { user, device }
    }

    /// The 10-byte wire form (`user: u64 BE, device: u16 BE`), as inside frames.
    pub fn to_bytes(self) -> [u8; Self::WIRE_BYTES] {
        zerocopy::transmute!(self.to_wire())
    }

    /// Back from [`DeviceAddr::to_bytes`]. Every 10 bytes are an address.
    pub fn from_bytes(bytes: [u8; Self::WIRE_BYTES]) -> Self {
        let wire: <Self as Field>::Wire = zerocopy::transmute!(bytes);
        Self {
            user: wire.user.get(),
            device: wire.device.get(),
        }
    }
}

impl std::fmt::Display for DeviceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.user, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_addr_is_ten_big_endian_bytes() {
        let a = DeviceAddr::new(0x0102_0304_0506_0708, 0x090A);
        assert_eq!(a.to_bytes(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(DeviceAddr::from_bytes(a.to_bytes()), a);
        assert_eq!(
            std::mem::size_of::<<DeviceAddr as Field>::Wire>(),
            DeviceAddr::WIRE_BYTES
        );
        assert_eq!(DeviceAddr::new(14155550100, 3).to_string(), "14155550100.3");
        assert_eq!(Address::from(a).device_addr(), Some(a));
        assert_eq!(std::mem::size_of::<<Address as Field>::Wire>(), 11);
    }
}
