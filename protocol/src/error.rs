//! Error codes carried in `Error` and `GoAway` frames.
//!
//! Every code says whether the server closes the connection after sending it ([`ErrorCode::is_fatal`]).
//! Codes are `u16` on the wire; a client must treat an unknown code as fatal if the server
//! closes the connection and as a per-request failure otherwise.

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $val:expr, $fatal:expr; )*) => {
        /// A typed protocol error code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $val, )*
        }

        impl ErrorCode {
            /// Every code, in wire order (used by metrics to pre-register one counter each).
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$name, )* ];

            /// Parses a wire code.
            pub fn from_u16(v: u16) -> Option<Self> {
                match v {
                    $( $val => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// Whether the server closes the connection after sending this code.
            pub fn is_fatal(self) -> bool {
                match self {
                    $( ErrorCode::$name => $fatal, )*
                }
            }

            /// Stable name (the variant's name, CamelCase), used in logs and metric labels.
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )*
                }
            }
        }
    };
}

error_codes! {
    /// The first four bytes were not `SWB` + a version byte.
    BadPreamble = 1, true;
    /// The preamble names a protocol version this server does not speak (counted; closed), or a
    /// `Login` announces a revision/capabilities this server cannot serve (sent, then closed).
    VersionUnsupported = 2, true;
    /// A Noise handshake message failed to parse or authenticate.
    HandshakeFailed = 3, true;
    /// The preamble and Noise handshake did not finish within `handshake_timeout_ms` (counted;
    /// the socket is closed, there is no channel to send it on).
    HandshakeTimeout = 4, true;
    /// A record's length prefix exceeds `max_frame_bytes`.
    FrameTooLarge = 5, true;
    /// A frame's bytes do not match its kind's layout.
    MalformedFrame = 6, true;
    /// A frame kind this server does not know.
    UnknownKind = 7, true;
    /// A transport record failed AEAD authentication.
    DecryptFailed = 8, true;
    /// The connection sent frames faster than `rate_limit_frames_per_s` allows (burst
    /// `rate_limit_burst`).
    RateLimited = 9, true;
    /// Nothing arrived for `idle_timeout_ms`.
    IdleTimeout = 10, true;
    /// A frame that needs a logged-in session arrived before `Login`, or `Login` arrived twice.
    NotAuthenticated = 11, true;
    /// `Login` with a static key that is not bound to the claimed user and device.
    UnknownKey = 12, true;
    /// `RegisterVerify` with a static key already bound to another number.
    KeyBoundToOtherUser = 13, false;
    /// `RegisterVerify` with a wrong code.
    WrongCode = 14, false;
    /// `RegisterVerify` after the code's lifetime (`registration_code_ttl_s`).
    CodeExpired = 15, false;
    /// `RegisterVerify` for a number with no outstanding code (never requested, or already used).
    NoPendingCode = 16, false;
    /// Too many registration attempts for this number or source address.
    RegisterRateLimited = 17, false;
    /// The recipient is not a registered user/device. Refers to one `Send`.
    NoSuchRecipient = 18, false;
    /// A `Send` payload exceeds `max_payload_bytes`.
    PayloadTooLarge = 19, false;
    /// The recipient address kind is not supported by this server revision.
    UnsupportedAddress = 20, false;
    /// The shard's log is poisoned (an fsync failed): writes are refused until an operator
    /// restarts the daemon. Refers to one `Send`.
    StorageUnavailable = 21, false;
    /// The server is draining; reconnect after the `GoAway` delay.
    ShuttingDown = 22, true;
    /// The client did not read fast enough and its outbound queue passed
    /// `outbound_queue_bytes_max`.
    SlowConsumer = 23, true;
    /// Another connection logged in as the same device; this one is closed.
    Replaced = 24, true;
    /// A phone number that is not a valid E.164 number.
    InvalidNumber = 25, false;
    /// An internal error; the server logs the detail.
    Internal = 26, true;
    /// The server has reached `max_connections` (counted; the socket is closed at accept), or a
    /// request of this connection found the queue to another shard full
    /// (`mesh_backlog_msgs_max`): reconnect with back-off and resend.
    Overloaded = 27, true;
    /// `PrekeyUpload` whose signed prekey signature does not verify (Ed25519, strict) under the
    /// uploaded identity signing key, or whose identity signing key is not a valid Ed25519
    /// point. Nothing was stored.
    BadPrekeySignature = 28, false;
    /// `PrekeyFetch` beyond `prekey_fetches_per_requester_per_minute`; `ref_id` is the
    /// fetch's `request_id`. No prekey was consumed.
    PrekeyFetchRateLimited = 29, false;
    /// `PrekeyUpload` whose one-time prekeys would take the device past
    /// `prekeys_per_device_max` stored keys. Nothing was stored (never truncated).
    PrekeyLimit = 30, false;
    /// `PrekeyUpload` with a key that is not a canonical X25519 public key, or with the same
    /// one-time prekey id twice. Nothing was stored.
    InvalidPrekey = 31, false;
    /// A `SendMulti` whose device set is not the current list of the recipient (or of the
    /// sender's own other devices); the `DeviceList { reason: STALE }` just before it carries
    /// the current list. Nothing was stored.
    DeviceListStale = 32, false;
    /// `LinkApprove` with a code this server never issued, issued to another static key, or
    /// whose device has disconnected.
    LinkCodeUnknown = 33, false;
    /// `LinkApprove` with a code past its lifetime (`link_code_ttl_ms`).
    LinkCodeExpired = 34, false;
    /// `LinkApprove` with a code that was already approved (each code links one device once).
    LinkCodeUsed = 35, false;
    /// `LinkApprove` whose signature does not verify (Ed25519, strict) under the primary's
    /// published identity signing key, or sent before the primary published one.
    LinkSignatureInvalid = 36, false;
    /// The account already has `devices_per_account_max` devices (primary included).
    DeviceLimit = 37, false;
    /// `LinkApprove` from a device other than the primary, or `Unlink` of a device other
    /// than itself from a companion, or of the primary.
    NotPrimary = 38, false;
    /// `Unlink` of a device the account does not have.
    NoSuchDevice = 39, false;
    /// This device was removed from its account (sent before the connection closes).
    DeviceRemoved = 40, true;
    /// `PrekeyUpload` from a companion whose identity keys are not the ones its primary
    /// signed when it was linked. Nothing was stored.
    IdentityMismatch = 41, false;
    /// `MediaSlotRequest` whose size exceeds its class's limit (`media_image_bytes_max`,
    /// `media_video_bytes_max`, `media_audio_bytes_max`, `media_document_bytes_max`), or is 0.
    /// No slot was granted; nothing may be uploaded.
    MediaTooLarge = 64, false;
    /// `MediaSlotRequest` that would take the user past `media_quota_bytes_per_day` bytes of
    /// slots granted in the current day window. No slot was granted.
    MediaQuotaExceeded = 65, false;
    /// `MediaSlotRequest` or `MediaDownloadRequest` beyond `media_requests_per_minute` for this
    /// user. Nothing was granted.
    MediaRateLimited = 66, false;
    /// A media request on a connection that did not announce the `MEDIA` capability, or to a
    /// server whose media endpoint is off.
    MediaUnavailable = 67, false;
    /// `StatusPublish` past `status_posts_per_user_max` live posts of this user, or with an
    /// audience over `status_audience_max`. Nothing was stored.
    StatusLimit = 68, false;
    /// `StatusDelete` of a post this user does not have (never published, expired or deleted).
    NoSuchStatus = 69, false;
    /// `PresenceSubscribe` past `presence_subscriptions_per_conn_max` live subscriptions on
    /// this connection (renewals do not count). `ref_id` is the request's. Nothing changed.
    PresenceSubscriptionLimit = 80, false;
    /// `PresenceSubscribe` for a user who already has `presence_subscribers_per_user_max`
    /// subscribers. `ref_id` is the request's; retry later (subscriptions expire).
    PresenceSubscriberLimit = 81, false;
    /// `ContactsEdit` that would take the contact list past `contacts_per_user_max` or the
    /// block list past `blocked_per_user_max`. Nothing changed.
    ContactLimit = 82, false;
    /// `Typing` faster than `typing_per_device_per_s`; the notice was dropped.
    TypingRateLimited = 83, false;
    /// `CallSignal` for a call the server does not know (never offered, over, expired, or
    /// forgotten by a restart: calls are volatile). `ref_id` is the `call_id`. The client
    /// treats the call as ended.
    CallUnknown = 84, false;
    /// `CallSignal { OFFER }` while the callee's home shard holds `calls_max` calls. `ref_id`
    /// is the `call_id`.
    CallLimit = 85, false;
    /// `TurnRequest` past `turn_requests_per_user_per_minute`. `ref_id` is the request's.
    TurnRateLimited = 86, false;
    /// `TurnRequest` to a server without `turn_secret` configured.
    TurnUnavailable = 87, false;
    /// `CallSignal` that makes no sense: a kind only the server says, a call to oneself, an
    /// `OFFER` reusing a live `call_id`, or a step from a device that is not in the call.
    /// `ref_id` is the `call_id`.
    CallInvalid = 88, false;
    /// A presence or call frame from a connection that did not announce the capability at
    /// `Login` (the server would have nowhere to send the answers).
    CapabilityNotAnnounced = 89, true;
    /// A group request for a group that does not exist (never created, or every member left).
    NoSuchGroup = 48, false;
    /// A group request from a user who is not a member of the group.
    NotGroupMember = 49, false;
    /// A group change only admins may make, from a member who is not one.
    NotGroupAdmin = 50, false;
    /// The change would take the group past `group_members_max` members. Nothing changed.
    GroupFull = 51, false;
    /// A `GroupCreate` or `ADD` one of whose users (the creator included) already belongs to
    /// `groups_per_user_max` groups. Nothing changed.
    GroupsPerUserLimit = 52, false;
    /// A `GroupSetBlob` blob longer than its kind allows. Nothing changed.
    GroupBlobTooLarge = 53, false;
    /// A `GroupChange` that is not valid for the group as it is: an event-only op, adding a
    /// member or removing a non-member, a list where none belongs, demoting the last admin.
    /// Nothing changed.
    GroupOpInvalid = 54, false;
    /// A `GroupSend` while the group's home shard has `group_fanouts_pending_max` fan-outs
    /// not yet stored by every destination. Nothing stored; send again later.
    GroupBacklog = 55, false;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert!(seen.insert(c as u16), "duplicate code {c:?}");
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(9999), None);
    }
}
