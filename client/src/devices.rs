//! Multi-device accounts: link strings, verified device lists, sync copies, per-device
//! receipts.
//!
//! An account (a user id) has a primary device (0) and up to a few linked companions
//! (1, 2, …; capability `MULTI_DEVICE`). This module holds the pieces of the SDK's
//! multi-device support that need no connection; [`crate::Session`] and
//! [`crate::Connection`] use them:
//!
//! * [`LinkString`]: the printable text a new device shows (code, Noise static key, e2ee
//!   identity) and the primary types or scans, parsed with typed [`LinkStringError`]s.
//! * [`DeviceList`] / [`DeviceListCache`]: a user's devices as the server published them,
//!   each companion's signature checked against the primary's identity signing key
//!   ([`switchboard_e2ee::verify_device_signature`]); entries that fail are kept but flagged
//!   (`verified == false`) and never encrypted to.
//! * [`wrap_sync`] / [`unwrap_sync`]: the inner plaintext of a sent-message sync copy.
//! * [`ReceiptTracker`] / [`MessageReceipts`]: which devices delivered and read each message.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use protocol::frame::DeviceEntry;
use protocol::{DeviceAddr, DeviceId, UserId};
use switchboard_e2ee::{verify_device_signature, IdentityPublic};

// ----- link strings -----

/// Prefix of every link string.
pub const LINK_STRING_PREFIX: &str = "swb-link";

/// The link string version this build writes (and the only one it reads).
pub const LINK_STRING_VERSION: u32 = 1;

/// Bytes of a version-1 link string body: `code u64 BE ‖ static_key [32] ‖ identity_dh [32]
/// ‖ identity_sign [32] ‖ crc32 u32 BE` (the CRC-32/ISO-HDLC of the 104 bytes before it).
pub const LINK_STRING_BODY_BYTES: usize = 8 + 32 + 32 + 32 + 4;

/// What a new device shows so its primary can approve it: the server's link code, the new
/// device's Noise static public key (the server checks it against the connection the code was
/// issued to) and its end-to-end identity keys (the primary signs them; the new device must
/// later upload exactly these with `PrekeyUpload`).
///
/// Text form (version 1): `swb-link:1:<body>`, where `<body>` is the unpadded base64url
/// (RFC 4648 §5) of [`LINK_STRING_BODY_BYTES`] bytes: `code u64 BE ‖ static_key ‖
/// identity_dh ‖ identity_sign ‖ crc32`. The checksum catches a mistyped string before the
/// primary signs wrong keys. 155 characters, no spaces: fits a QR code or one line of
/// copy-paste. [`LinkString::parse`] ignores surrounding whitespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkString {
    /// The single-use code from `LinkCode`.
    pub code: u64,
    /// The new device's Noise static public key.
    pub static_key: [u8; 32],
    /// The new device's end-to-end identity (X25519 and Ed25519 public keys).
    pub identity: IdentityPublic,
}

impl fmt::Debug for LinkString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkString")
            .field("code", &self.code)
            .field("static_key", &hex::encode(self.static_key))
            .field("identity", &self.identity)
            .finish()
    }
}

/// Why a text is not a valid link string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkStringError {
    /// It does not start with `swb-link:`.
    #[error("not a link string (expected it to start with \"swb-link:\")")]
    MissingPrefix,
    /// The version field is not one this build reads.
    #[error("unsupported link string version {0:?} (this client reads version 1)")]
    UnsupportedVersion(String),
    /// The body is not unpadded base64url.
    #[error("the link string contains characters that are not base64url")]
    BadEncoding,
    /// The body decodes to the wrong number of bytes (truncated or extended).
    #[error("the link string is {found} bytes long, expected {expected} (truncated?)")]
    WrongLength {
        /// Decoded length.
        found: usize,
        /// Expected length.
        expected: usize,
    },
    /// The checksum does not match: a character was mistyped.
    #[error("the link string checksum does not match (mistyped?)")]
    ChecksumMismatch,
}

impl LinkString {
    /// The text form (see the type documentation).
    pub fn encode(&self) -> String {
        let mut body = Vec::with_capacity(LINK_STRING_BODY_BYTES);
        body.extend_from_slice(&self.code.to_be_bytes());
        body.extend_from_slice(&self.static_key);
        body.extend_from_slice(&self.identity.dh);
        body.extend_from_slice(&self.identity.sign);
        let crc = crc32(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        format!(
            "{LINK_STRING_PREFIX}:{LINK_STRING_VERSION}:{}",
            base64url_encode(&body)
        )
    }

    /// Parses the text form; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, LinkStringError> {
        let t = text.trim();
        let rest = t
            .strip_prefix(LINK_STRING_PREFIX)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or(LinkStringError::MissingPrefix)?;
        let (version, body) = rest
            .split_once(':')
            .ok_or_else(|| LinkStringError::UnsupportedVersion(rest.chars().take(8).collect()))?;
        if version != LINK_STRING_VERSION.to_string() {
            return Err(LinkStringError::UnsupportedVersion(
                version.chars().take(8).collect(),
            ));
        }
        let bytes = base64url_decode(body).ok_or(LinkStringError::BadEncoding)?;
        if bytes.len() != LINK_STRING_BODY_BYTES {
            return Err(LinkStringError::WrongLength {
                found: bytes.len(),
                expected: LINK_STRING_BODY_BYTES,
            });
        }
        let (data, crc) = bytes.split_at(LINK_STRING_BODY_BYTES - 4);
        if crc != crc32(data).to_be_bytes() {
            return Err(LinkStringError::ChecksumMismatch);
        }
        let arr32 = |at: usize| -> [u8; 32] {
            let mut a = [0u8; 32];
            if let Some(s) = data.get(at..at + 32) {
                a.copy_from_slice(s);
            }
            a
        };
        let mut code = [0u8; 8];
        if let Some(s) = data.get(..8) {
            code.copy_from_slice(s);
        }
        Ok(Self {
            code: u64::from_be_bytes(code),
            static_key: arr32(8),
            identity: IdentityPublic {
                dh: arr32(40),
                sign: arr32(72),
            },
        })
    }
}

impl fmt::Display for LinkString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for LinkString {
    type Err = LinkStringError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn base64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Unpadded base64url, canonical only (nonzero leftover bits are refused).
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// CRC-32 (ISO-HDLC, the zlib one).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

// ----- device lists -----

/// One device of a user, as the SDK sees it after checking the server's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id (0 = primary).
    pub device: DeviceId,
    /// When it was linked (registered, for the primary), ms since the Unix epoch.
    pub linked_at_ms: u64,
    /// Its end-to-end identity keys as the server published them.
    pub identity: IdentityPublic,
    /// For a companion: the primary's signature over its identity verifies. For the primary:
    /// it has published an identity (nonzero keys). Unverified devices are never encrypted to
    /// (a send to their user fails with [`crate::Error::UnverifiedDevice`]).
    pub verified: bool,
}

/// A user's device list at one version: primary first, in increasing device id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceList {
    /// Whose.
    pub user: UserId,
    /// The server's list version (grows with every link and removal).
    pub version: u32,
    /// The devices, each flagged verified or not.
    pub devices: Vec<DeviceInfo>,
}

impl DeviceList {
    /// Builds the SDK's view of a `DeviceList` frame: every companion's signature is checked
    /// with [`verify_device_signature`] against device 0's `identity_sign`.
    pub fn from_entries(user: UserId, version: u32, entries: &[DeviceEntry]) -> Self {
        let primary_sign = entries
            .iter()
            .find(|e| e.device == 0)
            .map(|e| e.identity_sign);
        let devices = entries
            .iter()
            .map(|e| {
                let identity = IdentityPublic {
                    dh: e.identity_dh,
                    sign: e.identity_sign,
                };
                let verified = if e.device == 0 {
                    identity.dh != [0u8; 32] && identity.sign != [0u8; 32]
                } else {
                    primary_sign.is_some_and(|ps| {
                        verify_device_signature(
                            &ps,
                            user,
                            (&e.identity_dh, &e.identity_sign),
                            &e.signature,
                        )
                        .is_ok()
                    })
                };
                if !verified && e.device != 0 {
                    tracing::warn!(
                        user,
                        device = e.device,
                        "device list entry with a bad primary signature: not trusted"
                    );
                }
                DeviceInfo {
                    device: e.device,
                    linked_at_ms: e.linked_at_ms,
                    identity,
                    verified,
                }
            })
            .collect();
        Self {
            user,
            version,
            devices,
        }
    }

    /// Every device id, primary first.
    pub fn ids(&self) -> Vec<DeviceId> {
        self.devices.iter().map(|d| d.device).collect()
    }

    /// The entry for `device`.
    pub fn get(&self, device: DeviceId) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.device == device)
    }

    /// The devices whose entry did not verify (companions with a bad signature, or a primary
    /// without a published identity).
    pub fn unverified(&self) -> Vec<DeviceId> {
        self.devices
            .iter()
            .filter(|d| !d.verified)
            .map(|d| d.device)
            .collect()
    }
}

/// What changed between two versions of a user's list (a device id whose identity changed,
/// because it was removed and its id reused, is in both).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceListUpdate {
    /// Devices that are new (or have new identity keys).
    pub added: Vec<DeviceId>,
    /// Devices that are gone (or had other identity keys): their sessions must be dropped.
    pub removed: Vec<DeviceId>,
}

impl DeviceListUpdate {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Users whose device lists a [`DeviceListCache`] keeps by default.
pub const DEVICE_LIST_CACHE_DEFAULT: usize = 1024;

/// The device lists the session knows, per user (its own account included), updated by every
/// `DeviceList` frame (fetched, stale, changed). Bounded: past its capacity the least
/// recently updated user is forgotten (and fetched again when needed).
#[derive(Clone, Debug)]
pub struct DeviceListCache {
    capacity: usize,
    lists: HashMap<UserId, DeviceList>,
    order: VecDeque<UserId>,
}

impl Default for DeviceListCache {
    fn default() -> Self {
        Self::new(DEVICE_LIST_CACHE_DEFAULT)
    }
}

impl DeviceListCache {
    /// An empty cache holding at most `capacity` users (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            lists: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The list known for `user`.
    pub fn get(&self, user: UserId) -> Option<&DeviceList> {
        self.lists.get(&user)
    }

    /// Users known.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    /// Whether no list is known.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// Forgets `user`'s list.
    pub fn remove(&mut self, user: UserId) -> Option<DeviceList> {
        self.order.retain(|u| *u != user);
        self.lists.remove(&user)
    }

    /// Stores `list` unless an older version than the one known; returns what changed
    /// (`None` when the list was older and ignored). A user seen for the first time has every
    /// device in `added`.
    pub fn update(&mut self, list: DeviceList) -> Option<DeviceListUpdate> {
        let user = list.user;
        let mut update = DeviceListUpdate::default();
        match self.lists.get(&user) {
            Some(old) if old.version > list.version => return None,
            Some(old) => {
                for d in &old.devices {
                    if list.get(d.device).is_none_or(|n| n.identity != d.identity) {
                        update.removed.push(d.device);
                    }
                }
                for d in &list.devices {
                    if old.get(d.device).is_none_or(|o| o.identity != d.identity) {
                        update.added.push(d.device);
                    }
                }
            }
            None => update.added = list.ids(),
        }
        self.order.retain(|u| *u != user);
        self.order.push_back(user);
        self.lists.insert(user, list);
        while self.lists.len() > self.capacity {
            match self.order.pop_front() {
                Some(u) => {
                    self.lists.remove(&u);
                }
                None => break,
            }
        }
        Some(update)
    }
}

// ----- sync copies -----

/// Magic at the start of a sync copy's inner plaintext.
pub const SYNC_MAGIC: &[u8; 8] = b"SWB-sync";

/// The sync copy wrapper version this build writes (and the only one it reads).
pub const SYNC_VERSION: u8 = 1;

/// Bytes the sync wrapper adds to a payload: magic, version, `to_user`.
pub const SYNC_OVERHEAD: usize = SYNC_MAGIC.len() + 1 + 8;

/// The inner plaintext of a sent-message sync copy: what a sending device puts (before
/// encryption) into the `own = 1` copies of a `SendMulti` for the other devices of its own
/// account, so they can show the message as sent by this account to `to_user`.
///
/// Version 1, byte-exact: `"SWB-sync" (8 bytes) ‖ version u8 = 1 ‖ to_user u64 BE ‖
/// payload` (the caller's plaintext, unchanged). A note to self (`to_user` is the sender's own
/// user) is wrapped the same way. A receiver recognises a sync copy by `message.from.user`
/// being its own user, then unwraps it with [`unwrap_sync`]; a payload from its own user that
/// does not unwrap is handed out as an ordinary message.
pub fn wrap_sync(to_user: UserId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SYNC_OVERHEAD + payload.len());
    out.extend_from_slice(SYNC_MAGIC);
    out.push(SYNC_VERSION);
    out.extend_from_slice(&to_user.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads a [`wrap_sync`] plaintext: the user the message was sent to and the payload.
/// `None` when `bytes` is not a version-1 sync wrapper.
pub fn unwrap_sync(bytes: &[u8]) -> Option<(UserId, &[u8])> {
    let rest = bytes.strip_prefix(SYNC_MAGIC.as_slice())?;
    let (&version, rest) = rest.split_first()?;
    if version != SYNC_VERSION {
        return None;
    }
    let to: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    Some((UserId::from_be_bytes(to), rest.get(8..)?))
}

// ----- receipts per device -----

/// Messages a [`ReceiptTracker`] remembers by default.
pub const RECEIPT_TRACKER_DEFAULT: usize = 4096;

/// Which devices of the recipient delivered and read one message this device sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageReceipts {
    /// Devices that acknowledged the message (✓✓), with the server's time of each receipt.
    pub delivered: BTreeMap<DeviceAddr, u64>,
    /// Devices on which it was read (blue ✓✓), with the time.
    pub read: BTreeMap<DeviceAddr, u64>,
}

impl MessageReceipts {
    /// ✓✓: at least one device has it.
    pub fn is_delivered(&self) -> bool {
        !self.delivered.is_empty() || !self.read.is_empty()
    }

    /// Blue ✓✓: it was read on at least one device.
    pub fn is_read(&self) -> bool {
        !self.read.is_empty()
    }
}

/// Per-message receipt detail for the messages this device sent, bounded (oldest forgotten
/// first).
#[derive(Clone, Debug)]
pub struct ReceiptTracker {
    capacity: usize,
    map: HashMap<u64, MessageReceipts>,
    order: VecDeque<u64>,
}

impl Default for ReceiptTracker {
    fn default() -> Self {
        Self::new(RECEIPT_TRACKER_DEFAULT)
    }
}

impl ReceiptTracker {
    /// An empty tracker remembering at most `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records a receipt; returns whether it is the first of its kind for the message (the
    /// moment to show ✓✓ or blue ✓✓). A repeat from the same device keeps the first time.
    pub fn record(&mut self, client_msg_id: u64, by: DeviceAddr, read: bool, ts_ms: u64) -> bool {
        if !self.map.contains_key(&client_msg_id) {
            self.order.push_back(client_msg_id);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
        let entry = self.map.entry(client_msg_id).or_default();
        let set = if read {
            &mut entry.read
        } else {
            &mut entry.delivered
        };
        let first = set.is_empty();
        set.entry(by).or_insert(ts_ms);
        first
    }

    /// The detail for `client_msg_id`, if any receipt arrived for it (and it is still
    /// remembered).
    pub fn get(&self, client_msg_id: u64) -> Option<&MessageReceipts> {
        self.map.get(&client_msg_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_e2ee::{sign_device, IdentityKeyPair};

    const ALICE: UserId = 14155550100;

    fn sample() -> LinkString {
        LinkString {
            code: 0x0123_4567_89ab_0001,
            static_key: [7u8; 32],
            identity: IdentityPublic {
                dh: [8u8; 32],
                sign: [9u8; 32],
            },
        }
    }

    #[test]
    fn link_string_round_trip() {
        let l = sample();
        let text = l.encode();
        assert!(text.starts_with("swb-link:1:"), "{text}");
        assert_eq!(text.len(), 11 + 144);
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(LinkString::parse(&text), Ok(l));
        assert_eq!(LinkString::parse(&format!("  {text}\n")), Ok(l));
        assert_eq!(text.parse::<LinkString>(), Ok(l));
        assert_eq!(l.to_string(), text);
        // Every byte value survives the encoding.
        let mut odd = l;
        odd.static_key = std::array::from_fn(|i| (i * 37 + 255) as u8);
        odd.code = u64::MAX;
        assert_eq!(LinkString::parse(&odd.encode()), Ok(odd));
    }

    #[test]
    fn malformed_link_strings_are_refused() {
        let text = sample().encode();
        assert_eq!(
            LinkString::parse("hello"),
            Err(LinkStringError::MissingPrefix)
        );
        assert_eq!(LinkString::parse(""), Err(LinkStringError::MissingPrefix));
        assert_eq!(
            LinkString::parse(&text.replacen(":1:", ":2:", 1)),
            Err(LinkStringError::UnsupportedVersion("2".into()))
        );
        assert!(matches!(
            LinkString::parse("swb-link:1"),
            Err(LinkStringError::UnsupportedVersion(_))
        ));
        assert_eq!(
            LinkString::parse(&format!("{text}+")),
            Err(LinkStringError::BadEncoding)
        );
        assert!(matches!(
            LinkString::parse(text.get(..text.len() - 4).unwrap()),
            Err(LinkStringError::WrongLength {
                found: 105,
                expected: 108
            })
        ));
        // One mistyped character.
        let mut chars: Vec<char> = text.chars().collect();
        let i = 40;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(
            LinkString::parse(&typo),
            Err(LinkStringError::ChecksumMismatch)
        );
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url_encode(raw.as_bytes()), enc);
            assert_eq!(base64url_decode(enc).unwrap(), raw.as_bytes());
        }
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url_decode("Zh"), None, "non-canonical trailing bits");
        assert_eq!(base64url_decode("Z"), None);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    fn entry(device: DeviceId, id: &IdentityPublic, signature: [u8; 64]) -> DeviceEntry {
        DeviceEntry {
            device,
            linked_at_ms: 1000 + u64::from(device),
            identity_dh: id.dh,
            identity_sign: id.sign,
            signature,
        }
    }

    #[test]
    fn device_list_checks_companion_signatures() {
        let primary = IdentityKeyPair::generate(&mut rand::rngs::OsRng);
        let good = IdentityKeyPair::generate(&mut rand::rngs::OsRng).public();
        let bad = IdentityKeyPair::generate(&mut rand::rngs::OsRng).public();
        let good_sig = sign_device(&primary, ALICE, &good.dh, &good.sign);
        // Signed for another user: must not verify for ALICE.
        let bad_sig = sign_device(&primary, ALICE + 1, &bad.dh, &bad.sign);
        let entries = [
            entry(0, &primary.public(), [0u8; 64]),
            entry(1, &good, good_sig),
            entry(2, &bad, bad_sig),
        ];
        let list = DeviceList::from_entries(ALICE, 3, &entries);
        assert_eq!(list.ids(), vec![0, 1, 2]);
        assert!(list.get(0).unwrap().verified);
        assert!(list.get(1).unwrap().verified);
        assert!(!list.get(2).unwrap().verified);
        assert_eq!(list.unverified(), vec![2]);
        assert_eq!(list.get(1).unwrap().linked_at_ms, 1001);

        // A primary that has not published: nothing verifies.
        let zero = IdentityPublic {
            dh: [0; 32],
            sign: [0; 32],
        };
        let list = DeviceList::from_entries(
            ALICE,
            1,
            &[entry(0, &zero, [0; 64]), entry(1, &good, good_sig)],
        );
        assert_eq!(list.unverified(), vec![0, 1]);
    }

    fn list(version: u32, devices: &[(DeviceId, u8)]) -> DeviceList {
        DeviceList {
            user: ALICE,
            version,
            devices: devices
                .iter()
                .map(|&(device, k)| DeviceInfo {
                    device,
                    linked_at_ms: 0,
                    identity: IdentityPublic {
                        dh: [k; 32],
                        sign: [k; 32],
                    },
                    verified: true,
                })
                .collect(),
        }
    }

    #[test]
    fn cache_reports_added_and_removed_devices() {
        let mut c = DeviceListCache::new(2);
        let u = c.update(list(1, &[(0, 1)])).unwrap();
        assert_eq!(u.added, vec![0]);
        assert!(u.removed.is_empty());
        let u = c.update(list(2, &[(0, 1), (1, 2)])).unwrap();
        assert_eq!((u.added, u.removed), (vec![1], vec![]));
        // An older version is ignored.
        assert_eq!(c.update(list(1, &[(0, 1)])), None);
        assert_eq!(c.get(ALICE).unwrap().version, 2);
        // Same version again (a STALE answer repeating what we know): no change.
        assert!(c.update(list(2, &[(0, 1), (1, 2)])).unwrap().is_empty());
        // Device 1 removed and its id reused by another device, device 2 linked.
        let u = c.update(list(4, &[(0, 1), (1, 3), (2, 4)])).unwrap();
        assert_eq!(u.added, vec![1, 2]);
        assert_eq!(u.removed, vec![1]);
        // Bounded: the least recently updated user goes first.
        let mut other = list(1, &[(0, 9)]);
        other.user = ALICE + 1;
        c.update(other.clone());
        other.user = ALICE + 2;
        c.update(other);
        assert_eq!(c.len(), 2);
        assert!(c.get(ALICE).is_none());
    }

    #[test]
    fn sync_wrapper_round_trip() {
        let w = wrap_sync(14155550101, b"hello");
        assert_eq!(w.len(), SYNC_OVERHEAD + 5);
        assert_eq!(unwrap_sync(&w), Some((14155550101, &b"hello"[..])));
        assert_eq!(unwrap_sync(&wrap_sync(1, b"")), Some((1, &b""[..])));
        assert_eq!(unwrap_sync(b"hello"), None);
        assert_eq!(unwrap_sync(b"SWB-sync"), None);
        let mut v2 = w.clone();
        v2[8] = 2;
        assert_eq!(unwrap_sync(&v2), None);
        assert_eq!(unwrap_sync(&w[..12]), None, "truncated user id");
    }

    #[test]
    fn receipts_per_device() {
        let mut t = ReceiptTracker::new(2);
        let d0 = DeviceAddr::new(ALICE, 0);
        let d1 = DeviceAddr::new(ALICE, 1);
        assert!(t.record(5, d1, false, 10), "first ✓✓");
        assert!(!t.record(5, d0, false, 11));
        assert!(!t.record(5, d1, false, 12), "repeat");
        assert!(t.record(5, d0, true, 13), "first read");
        let r = t.get(5).unwrap();
        assert!(r.is_delivered() && r.is_read());
        assert_eq!(r.delivered.get(&d1), Some(&10));
        assert_eq!(r.delivered.len(), 2);
        assert_eq!(r.read.keys().copied().collect::<Vec<_>>(), vec![d0]);
        t.record(6, d0, false, 1);
        t.record(7, d0, false, 1);
        assert!(t.get(5).is_none(), "bounded");
        assert!(t.get(7).is_some());
    }
}
