//! The shard: a deterministic state machine, one per core.
//!
//! Inputs are [`Event`]s handed to [`Shard::handle`] with the current time; outputs are
//! [`Action`]s taken with [`Shard::drain_actions`] after each call, plus appends made through the
//! [`storage::Journal`] passed in. The shard never does IO, never reads a clock, and never draws
//! randomness except from the seeded RNG it was built with, so the simulator can replay any run
//! from its seed. The gateway (glommio) drives it in production.
//!
//! Call order, for every event: `handle(now_ms, event, journal)`, then `drain_actions()` until
//! empty, then carry out each action in order.
#![forbid(unsafe_code)]
#![deny(clippy::too_many_arguments, missing_docs)]

use std::net::IpAddr;

use protocol::frame::{DeviceKeys, OneTimePrekey};
use protocol::{DeviceAddr, DeviceId, ErrorCode, Frame, Message, MsgType, ReceiptInfo, UserId};

/// Index of a shard (0-based, < `Config::shards`).
pub type ShardId = u16;

/// A connection id, unique within the process for its lifetime (never reused).
pub type ConnId = u64;

/// A connection on some shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The shard that holds the connection.
    pub shard: ShardId,
    /// The connection.
    pub conn: ConnId,
}

/// `hash(user) % shards`: the home shard of a user. A fixed function (SplitMix64 finaliser),
/// stable across builds and platforms, because it decides where data lives on disk.
pub fn home_shard(user: UserId, shards: u16) -> ShardId {
    let mut z = user.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(shards.max(1))) as ShardId
}

/// The shard that owns the reverse index entry of a static key.
pub fn key_shard(static_key: &[u8; 32], shards: u16) -> ShardId {
    let mut first = [0u8; 8];
    first.copy_from_slice(&static_key[..8]);
    home_shard(u64::from_le_bytes(first), shards)
}

/// Shard configuration: every limit is named with its unit.
#[derive(Clone, Debug)]
pub struct Config {
    /// This shard's index.
    pub shard: ShardId,
    /// Number of shards in the process.
    pub shards: u16,
    /// Largest `Send` payload accepted.
    pub max_payload_bytes: usize,
    /// Per-device mailbox cap; past it the lowest-priority oldest entries are pruned.
    pub mailbox_cap_msgs: usize,
    /// Mailbox entries older than this are dropped (30 days by default).
    pub message_ttl_ms: u64,
    /// How many `(sender, device, client_msg_id)` keys the dedup window remembers per shard.
    pub dedup_window_entries: usize,
    /// Most unacknowledged `Deliver`/`Receipt` frames in flight per connection.
    pub delivery_window_msgs: usize,
    /// Registration code lifetime.
    pub registration_code_ttl_ms: u64,
    /// Most registration requests per number per hour.
    pub register_per_number_per_hour: u32,
    /// Most registration requests per source address per hour (enforced by the accepting shard).
    pub register_per_ip_per_hour: u32,
    /// Most wrong codes per number before the pending code is burnt.
    pub register_verify_attempts_max: u32,
    /// Keepalive interval told to clients in `Welcome`.
    pub keepalive_ms: u32,
    /// Largest record body accepted, told to clients in `Welcome`.
    pub max_frame_bytes: u32,
    /// A sealed segment whose live fraction is below this is compacted (re-appended and deleted).
    pub compaction_live_ratio: f64,
    /// Most entries each registration table of a shard holds: per-number and per-address rate
    /// windows, outstanding codes, verifications waiting for the key registry, and key bindings
    /// waiting to become durable. When a table is full, new registrations are refused with
    /// `RegisterRateLimited` (fail closed) until `Tick` sweeps out stale entries.
    pub register_table_max_entries: usize,
    /// When a device holds fewer one-time prekeys than this, its owner is told to upload more
    /// (`PrekeyStatus`, now if online, else at its next login).
    pub prekey_low_water: u32,
    /// Most one-time prekeys stored per device; an upload that would pass it is refused whole
    /// with `PrekeyLimit`.
    pub prekeys_per_device_max: usize,
    /// Most `PrekeyFetch`es per requesting device per minute (counted on the requester's home
    /// shard); more get `PrekeyFetchRateLimited`.
    pub prekey_fetches_per_requester_per_minute: u32,
    /// Most requesters the prekey fetch limiter tracks per shard; when full, fetches from new
    /// requesters are refused (fail closed) until `Tick` sweeps out ended windows.
    pub prekey_rate_table_max_entries: usize,
    /// Most `Action::ReadRecords` batches outstanding at once (each at most
    /// `delivery_window_msgs` records). A device whose next entries are cold waits for a free
    /// slot (it is pumped again when a batch completes).
    pub record_reads_inflight_max: usize,
    /// Most devices per account, the primary included (at most 32); a `LinkApprove` past it
    /// gets `DeviceLimit`.
    pub devices_per_account_max: usize,
    /// Lifetime of a link code.
    pub link_code_ttl_ms: u64,
    /// Most link codes a shard keeps (issued, and recently used or expired); when full a
    /// `LinkRequest` is refused with `Overloaded` until `Tick` sweeps out old codes.
    pub link_codes_max: usize,
    /// Most connections told about changes of one user's device list (the latest fetchers).
    pub device_list_watchers_max: usize,
    /// Media slots and URLs (limits and the token secret).
    pub media: media::MediaConfig,
    /// How long a status post lives (24 h by default).
    pub status_ttl_ms: u64,
    /// Most live status posts per poster (`StatusLimit`).
    pub status_posts_per_user_max: usize,
    /// Most users in one status post's audience (`StatusLimit`).
    pub status_audience_max: usize,
    /// Most live presence subscriptions per connection (`PresenceSubscriptionLimit`).
    pub presence_subscriptions_per_conn_max: usize,
    /// Most live subscribers of one user (`PresenceSubscriberLimit`).
    pub presence_subscribers_per_user_max: usize,
    /// Longest presence subscription TTL granted (longer requests are cut to it).
    pub presence_subscription_ttl_s_max: u32,
    /// Most users on one contact list (`ContactLimit`).
    pub contacts_per_user_max: usize,
    /// Most users on one block list (`ContactLimit`).
    pub blocked_per_user_max: usize,
    /// Most typing notices per device per second (`TypingRateLimited`).
    pub typing_per_device_per_s: u32,
    /// Most keys each presence rate table (typing per device, TURN per user) holds per shard;
    /// when full, new keys are refused (fail closed) until `Tick` sweeps out ended windows.
    pub presence_rate_table_max_entries: usize,
    /// How long an offer rings before it becomes a missed call.
    pub call_ring_timeout_ms: u64,
    /// Longest an answered call is kept before the server hangs it up.
    pub call_max_ms: u64,
    /// Most calls (ringing or answered) a shard holds (`CallLimit`).
    pub calls_max: usize,
    /// coturn `static-auth-secret` for TURN credentials; empty disables them
    /// (`TurnUnavailable`).
    pub turn_secret: String,
    /// TURN URIs handed out with the credentials (at most 8).
    pub turn_uris: Vec<String>,
    /// Lifetime of TURN credentials.
    pub turn_ttl_s: u32,
    /// Most TURN credential requests per user per minute (`TurnRateLimited`).
    pub turn_requests_per_user_per_minute: u32,
    /// Most members of a group (at most `protocol::group::GROUP_USERS_MAX`); a create or add
    /// past it gets `GroupFull`.
    pub group_members_max: usize,
    /// Most group fan-outs a shard keeps pending (not yet stored by every destination shard);
    /// a `GroupSend` past it gets `GroupBacklog`.
    pub group_fanouts_pending_max: usize,
    /// A fan-out a destination has not acknowledged for this long is sent to it again.
    pub group_fanout_retry_ms: u64,
    /// How many `(device, client_msg_id)` of recent group sends a shard remembers to answer
    /// retries with their first ✓ (older retries are stored again; devices dedup on the id).
    pub group_send_dedup_entries: usize,
    /// Most groups a user belongs to (counted on the user's home shard); a create or add that
    /// would pass it for any of its users gets `GroupsPerUserLimit`.
    pub groups_per_user_max: usize,
    /// Most group messages whose receipts a shard aggregates (as destination and as home);
    /// past it the oldest are forgotten (their receipts are no longer counted).
    pub group_receipts_tracked_max: usize,
}

impl Config {
    /// Defaults for one shard of `shards`.
    pub fn new(shard: ShardId, shards: u16) -> Self {
        Self {
            shard,
            shards,
            max_payload_bytes: 16 * 1024 - 64,
            mailbox_cap_msgs: 10_000,
            message_ttl_ms: 30 * 24 * 3600 * 1000,
            dedup_window_entries: 1 << 20,
            delivery_window_msgs: 256,
            registration_code_ttl_ms: 10 * 60 * 1000,
            register_per_number_per_hour: 5,
            register_per_ip_per_hour: 20,
            register_verify_attempts_max: 5,
            keepalive_ms: 30_000,
            max_frame_bytes: 16 * 1024,
            compaction_live_ratio: 0.25,
            register_table_max_entries: 100_000,
            prekey_low_water: 10,
            prekeys_per_device_max: 500,
            prekey_fetches_per_requester_per_minute: 60,
            prekey_rate_table_max_entries: 100_000,
            record_reads_inflight_max: 64,
            devices_per_account_max: 5,
            link_code_ttl_ms: 60_000,
            link_codes_max: 100_000,
            device_list_watchers_max: 256,
            media: media::MediaConfig::default(),
            status_ttl_ms: 24 * 3600 * 1000,
            status_posts_per_user_max: 100,
            status_audience_max: 1024,
            presence_subscriptions_per_conn_max: 64,
            presence_subscribers_per_user_max: 256,
            presence_subscription_ttl_s_max: 600,
            contacts_per_user_max: 2000,
            blocked_per_user_max: 1000,
            typing_per_device_per_s: 5,
            presence_rate_table_max_entries: 100_000,
            call_ring_timeout_ms: 45_000,
            call_max_ms: 6 * 3600 * 1000,
            calls_max: 100_000,
            turn_secret: String::new(),
            turn_uris: Vec::new(),
            turn_ttl_s: 86_400,
            turn_requests_per_user_per_minute: 10,
            group_members_max: 1024,
            group_fanouts_pending_max: 65_536,
            group_fanout_retry_ms: 5_000,
            group_send_dedup_entries: 1 << 16,
            groups_per_user_max: 1024,
            group_receipts_tracked_max: 65_536,
        }
    }
}

/// What the client said in `Login`, plus what the handshake proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginInfo {
    /// Claimed device.
    pub addr: DeviceAddr,
    /// Client revision.
    pub revision: u16,
    /// Client capabilities.
    pub capabilities: u64,
    /// Static key proven by the Noise handshake.
    pub static_key: [u8; 32],
    /// Peer address.
    pub peer_ip: IpAddr,
}

/// A prekey bundle on its way back to the requester's shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedBundle {
    /// Whose bundle.
    pub addr: DeviceAddr,
    /// Identity keys and signed prekey (boxed: keeps `MeshMsg` small for the hot kinds).
    pub keys: Box<DeviceKeys>,
    /// The one-time prekey consumed for this requester (durably), if any was left.
    pub one_time: Option<OneTimePrekey>,
}

/// `MeshMsg::Store`: store `message` in the mailbox of `to`; answer `SendResult` to `reply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    /// The sender's connection.
    pub reply: ConnRef,
    /// The recipient device.
    pub to: DeviceAddr,
    /// The message as it will be delivered. The sender's shard fills `from` (the logged-in
    /// device) and leaves `server_ts_ms` 0: the home shard sets it to its clock when it
    /// stores the message (a duplicate keeps the time it was first stored with).
    pub message: Message,
}

/// `MeshMsg::StoreMulti`: store one message for several devices homed on the receiving shard
/// (a `SendMulti`'s copies for this shard), all or nothing; answer one `SendResult` to `reply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreMulti {
    /// The sender's connection.
    pub reply: ConnRef,
    /// The message, payload empty (each copy has its own); `from` filled by the sender's
    /// shard, `server_ts_ms` by this one.
    pub message: Message,
    /// One payload per device.
    pub copies: Vec<(DeviceAddr, bytes::Bytes)>,
    /// For each user named here, the device the set excludes (the sending device for the
    /// sender's own account): the copies of that user must name exactly its current devices
    /// minus that one, or the send is refused as stale.
    pub expect: Vec<(UserId, Option<DeviceId>)>,
}

/// `MeshMsg::LinkClaim`: claim a link code, at the shard that issued it (the code's low 16
/// bits); answer `LinkClaimed` to `reply_shard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkClaim {
    /// The account's home shard.
    pub reply_shard: ShardId,
    /// Correlates the answer.
    pub token: u64,
    /// The code.
    pub code: u64,
    /// The new device's static key, as the primary saw it.
    pub static_key: [u8; 32],
}

/// `MeshMsg::LinkClaimed`: the new device's connection, or why the code cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkClaimed {
    /// From `LinkClaim`.
    pub token: u64,
    /// The new device's connection, or `LinkCodeUnknown` / `LinkCodeExpired` / `LinkCodeUsed`.
    pub result: Result<ConnRef, ErrorCode>,
}

/// `MeshMsg::DeviceListFetch`: send `user`'s device list to `reply`, at `user`'s home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceListFetch {
    /// The requester's connection (it becomes a watcher of the list).
    pub reply: ConnRef,
    /// Echoed in the answer.
    pub request_id: u64,
    /// Whose list.
    pub user: UserId,
}

/// `MeshMsg::SendResult`: the outcome of a `Store`, `Ok(server_ts_ms)` once durable (send ✓),
/// or an error code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendResult {
    /// The sender's connection (on the receiving shard).
    pub conn: ConnId,
    /// The message.
    pub client_msg_id: u64,
    /// ✓ time or error.
    pub result: Result<u64, ErrorCode>,
}

/// `MeshMsg::StoreReceipt`: queue a receipt for the original sender (on its home shard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreReceipt {
    /// The original sender's device (gets the receipt).
    pub to: DeviceAddr,
    /// The receipt as it will be delivered (an unknown kind is dropped by the home shard).
    pub receipt: ReceiptInfo,
    /// When the message it is about was stored (its `server_ts_ms`), or 0 when not known (a
    /// `Read` names only the message id). A receipt for a message stored before `to` was
    /// linked is about a removed device that had the same id, and is dropped.
    pub sent_at_ms: u64,
}

/// `MeshMsg::RegisterVerify`: registration step 2, at the number's home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterVerify {
    /// Where to answer.
    pub reply: ConnRef,
    /// The number.
    pub phone: UserId,
    /// The code.
    pub code: u32,
    /// The key to bind.
    pub static_key: [u8; 32],
}

/// `MeshMsg::ClaimKey`: bind `static_key` to a device in the reverse index (at `key_shard`),
/// answering `KeyClaimed` to `reply_shard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimKey {
    /// Who asked.
    pub reply_shard: ShardId,
    /// Correlates the answer.
    pub token: u64,
    /// The key.
    pub static_key: [u8; 32],
    /// The device to bind it to.
    pub addr: DeviceAddr,
}

/// `MeshMsg::KeyClaimed`: the answer to `ClaimKey`: `Ok` when bound (now durably, or already to
/// the same user and device), `Err(owner)` when bound to someone else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyClaimed {
    /// From `ClaimKey`.
    pub token: u64,
    /// Outcome.
    pub result: Result<(), UserId>,
}

/// `MeshMsg::PrekeyFetch`: hand out the bundle of a device, at its user's home shard;
/// answer `PrekeyFetchResult` to `reply` once the consumption of its one-time prekey is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyFetch {
    /// The requester's connection.
    pub reply: ConnRef,
    /// The requester's id for the fetch.
    pub request_id: u64,
    /// Whose bundle.
    pub addr: DeviceAddr,
}

/// `MeshMsg::PrekeyFetchResult`: the bundle, or an error code (`NoSuchRecipient`,
/// `StorageUnavailable`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyFetchResult {
    /// The requester's connection (on the receiving shard).
    pub conn: ConnId,
    /// The requester's id for the fetch.
    pub request_id: u64,
    /// Bundle or error.
    pub result: Result<FetchedBundle, ErrorCode>,
}

/// Messages between shards (over the gateway's lock-free channel mesh).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshMsg {
    /// Store a message in the recipient's mailbox.
    Store(Store),
    /// The outcome of a `Store`.
    SendResult(SendResult),
    /// Queue a receipt for the original sender.
    StoreReceipt(StoreReceipt),
    /// Send a frame to a connection on the receiving shard (registration replies).
    ToConn {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// Registration step 1, at the number's home shard.
    RegisterRequest {
        /// Where to answer.
        reply: ConnRef,
        /// The number.
        phone: UserId,
    },
    /// Registration step 2, at the number's home shard.
    RegisterVerify(RegisterVerify),
    /// Bind a static key in the reverse index.
    ClaimKey(ClaimKey),
    /// Answer to `ClaimKey`.
    KeyClaimed(KeyClaimed),
    /// Hand out a prekey bundle.
    PrekeyFetch(PrekeyFetch),
    /// The outcome of a `PrekeyFetch`.
    PrekeyFetchResult(PrekeyFetchResult),
    /// Store a message for several devices (boxed: keeps `MeshMsg`, and so `Event` and
    /// `Action`, small for the hot kinds).
    StoreMulti(Box<StoreMulti>),
    /// Claim a link code.
    LinkClaim(LinkClaim),
    /// The outcome of a `LinkClaim`.
    LinkClaimed(LinkClaimed),
    /// Send a device list.
    DeviceListFetch(DeviceListFetch),
    /// Presence: subscriptions, their answers, typing notices (boxed: see `StoreMulti`).
    Presence(Box<social::PresenceMsg>),
    /// Call signalling between the caller's and the callee's home shards (boxed).
    Call(Box<social::CallMsg>),
    /// A group request, at the group's home shard (boxed).
    GroupRequest(Box<GroupRequest>),
    /// One group event or message for the members homed on the receiving shard (boxed).
    GroupFanout(Box<GroupFanout>),
    /// The receiving shard (a group's home) hears that a fan-out is stored durably.
    GroupFanoutAck(GroupFanoutAck),
    /// Reserve group memberships for users homed on the receiving shard (boxed).
    GroupJoin(Box<GroupJoin>),
    /// The answer to `GroupJoin`.
    GroupJoined(Box<GroupJoined>),
    /// Release memberships reserved by a `GroupJoin` whose change was refused (boxed).
    GroupRelease(Box<GroupRelease>),
    /// A destination shard's receipt counts for one group message, to the group's home.
    GroupReceipts(Box<GroupReceipts>),
    /// Aggregated receipts for the sending device, at its home shard (boxed).
    GroupReceiptNotice(Box<GroupReceiptNotice>),
}

/// `MeshMsg::GroupReceipts`: of the devices shard `shard` stored group message `gseq` of
/// `group` for, how many acknowledged and read it (totals so far, not increments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupReceipts {
    /// The destination shard.
    pub shard: ShardId,
    /// The group.
    pub group: u64,
    /// The message.
    pub gseq: u64,
    /// Devices it was stored for on that shard.
    pub devices: u32,
    /// Of those, how many acknowledged it.
    pub delivered: u32,
    /// Of those, how many marked it read.
    pub read: u32,
}

/// `MeshMsg::GroupReceiptNotice`: send `frame` to device `to` if it is online with `GROUPS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupReceiptNotice {
    /// The sending device.
    pub to: DeviceAddr,
    /// The aggregated receipt.
    pub frame: protocol::frame::GroupReceipt,
}

/// `MeshMsg::GroupJoin`: at the users' home shard, count `group` for every one of `users`
/// (all or nothing); answer `GroupJoined` to `reply_shard` once durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupJoin {
    /// The group's home shard.
    pub reply_shard: ShardId,
    /// Correlates the answer.
    pub token: u64,
    /// The group.
    pub group: u64,
    /// Users homed on the receiving shard.
    pub users: Vec<UserId>,
}

/// `MeshMsg::GroupJoined`: the outcome of a `GroupJoin` at shard `shard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupJoined {
    /// From the `GroupJoin`.
    pub token: u64,
    /// The answering shard.
    pub shard: ShardId,
    /// `Ok` once recorded durably; `Err(users)` for the users at `groups_per_user_max`
    /// (nothing recorded), `Err(empty)` when the log refuses writes.
    pub result: Result<(), Vec<UserId>>,
}

/// `MeshMsg::GroupRelease`: `users` (homed on the receiving shard) are not members of `group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRelease {
    /// The group.
    pub group: u64,
    /// The users.
    pub users: Vec<UserId>,
}

/// `MeshMsg::GroupFanout`: store group event or message `gseq` of `group` once for the devices
/// of `users` (all homed on the receiving shard); answer `GroupFanoutAck` to `home` once durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFanout {
    /// The group's home shard.
    pub home: ShardId,
    /// The group.
    pub group: u64,
    /// Its place in the group's order.
    pub gseq: u64,
    /// The group's previous fan-out to the receiving shard that it had not acknowledged when
    /// this was sent (0: none): stored only once that one is applied, else dropped (it comes
    /// again, in order).
    pub after: u64,
    /// The message as delivered (`msg_type` `GROUP` or `GROUP_EVENT`, the envelope as payload).
    pub message: Message,
    /// The member users homed on the receiving shard.
    pub users: Vec<UserId>,
}

/// `MeshMsg::GroupFanoutAck`: shard `shard` stored fan-out `(group, gseq)` durably (or had).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupFanoutAck {
    /// The destination shard.
    pub shard: ShardId,
    /// The group.
    pub group: u64,
    /// The event or message.
    pub gseq: u64,
}

/// Inputs.
#[derive(Clone, Debug)]
pub enum Event {
    /// A connection finished the Noise handshake on this (accepting) shard.
    Connected {
        /// New connection.
        conn: ConnId,
        /// Peer address.
        peer_ip: IpAddr,
        /// Client static key from the handshake.
        static_key: [u8; 32],
    },
    /// A decoded frame from a connection on this shard.
    Frame {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// A connection arrived by hand-off (or from this shard's own pre-auth state) with its
    /// `Login`. This shard is the user's home shard.
    Login {
        /// The connection (new id on this shard).
        conn: ConnId,
        /// Login data.
        info: LoginInfo,
    },
    /// A connection ended (peer closed, IO error, timeout, or after an `Action::Close`).
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// A message from another shard (or this one, for local routing).
    Mesh {
        /// Sender shard.
        from: ShardId,
        /// The message.
        msg: MeshMsg,
    },
    /// Every append with `append_id <= up_to` is durable.
    Durable {
        /// Highest durable append id.
        up_to: u64,
    },
    /// The log is poisoned; refuse writes from now on.
    StorageFailed {
        /// Why, for logs and errors.
        reason: String,
    },
    /// Periodic timer (about once a second): TTL, code expiry, compaction.
    Tick,
    /// Shard `shard` lost its volatile state (it crashed and recovered from its log), so every
    /// mesh message in flight to or from it is gone. This shard closes (`Internal`) each
    /// logged-in connection that still waits for a `SendResult` from it, so the client
    /// reconnects and resends its unacknowledged messages in order (a later `Send` must not be
    /// stored ahead of an earlier one that was lost), and fails registrations waiting on it.
    ///
    /// The in-process gateway never needs this (its shards live and die together); the
    /// simulator, which crashes one shard at a time, and any future multi-process mesh do.
    PeerRestarted {
        /// The shard that restarted.
        shard: ShardId,
    },
    /// The answer to `Action::ReadRecords`: one result per requested record, in order, each
    /// the record's tag and body (CRCs checked) or why it could not be read.
    RecordsRead {
        /// From the request.
        token: u64,
        /// One per `RecordRef`, in order.
        results: Vec<Result<(u8, bytes::Bytes), storage::ReadError>>,
    },
}

/// A record to read back: where its header is in the log (from its append's `Lsn`, or from
/// recovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef {
    /// The segment.
    pub segment: storage::SegmentId,
    /// Byte offset of the record's header in it.
    pub offset: u32,
}

/// Outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write a frame to a connection on this shard.
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// Send `Error{code}` then close the connection. The shard has already forgotten it.
    Close {
        /// The connection.
        conn: ConnId,
        /// Why.
        code: ErrorCode,
        /// Detail.
        text: String,
    },
    /// Move the connection to `to` (its user's home shard) and deliver `Event::Login` there.
    /// The shard has already forgotten it.
    Handoff {
        /// The connection.
        conn: ConnId,
        /// Destination shard.
        to: ShardId,
        /// Login data.
        info: LoginInfo,
    },
    /// Send a mesh message to another shard (never this one: those are handled inside).
    ToShard {
        /// Destination.
        shard: ShardId,
        /// The message.
        msg: MeshMsg,
    },
    /// The connection logged in as device `addr` on this shard: the driver stops treating it
    /// as unauthenticated (pre-auth limits and deadline). Comes just before its `Welcome`.
    LoggedIn {
        /// The connection.
        conn: ConnId,
        /// The device.
        addr: DeviceAddr,
    },
    /// Deliver a registration code out of band.
    SendSms {
        /// The number.
        phone: UserId,
        /// The code.
        code: u32,
    },
    /// Tell the push provider an offline device has something waiting (no content).
    Push {
        /// Recipient device.
        to: DeviceAddr,
        /// Sender.
        from_user: UserId,
        /// Message type.
        msg_type: MsgType,
    },
    /// Read these records back from the log (they are durable) and answer with
    /// `Event::RecordsRead` carrying the same token. The shard does not depend on when (or,
    /// across a crash, whether) the answer comes.
    ReadRecords {
        /// Echoed in the answer.
        token: u64,
        /// At most `delivery_window_msgs` records.
        reads: Vec<RecordRef>,
    },
    /// Let only `users` download these blobs (a status post's poster and audience), until
    /// `expires_at_ms`. Idempotent; re-announced after every restart.
    MediaAcl {
        /// SHA-256 of each blob.
        blobs: Vec<[u8; 32]>,
        /// Who may download them.
        users: Vec<UserId>,
        /// When the post expires.
        expires_at_ms: u64,
    },
    /// Delete these blobs (a status post expired or was deleted). Idempotent.
    MediaDelete {
        /// SHA-256 of each blob.
        blobs: Vec<[u8; 32]>,
    },
}

/// Counters a shard keeps; the gateway exports them as metrics.
#[derive(Clone, Debug, Default)]
pub struct ShardStats {
    /// Messages whose recipient is on this shard (sender side).
    pub routed_local: u64,
    /// Messages sent to another shard (sender side).
    pub routed_cross_shard: u64,
    /// Messages stored in a mailbox here.
    pub stored: u64,
    /// Duplicate `Send`s absorbed by dedup.
    pub dedup_hits: u64,
    /// `Deliver` frames sent.
    pub delivered: u64,
    /// Receipts stored.
    pub receipts_stored: u64,
    /// Entries acked and tombstoned.
    pub acked: u64,
    /// Entries pruned by the per-device cap.
    pub pruned: u64,
    /// Entries dropped by TTL.
    pub expired: u64,
    /// Records appended to the journal.
    pub appends: u64,
    /// Entries currently queued in mailboxes on this shard.
    pub mailbox_depth: u64,
    /// Devices currently connected (logged in) on this shard.
    pub connections_logged_in: u64,
    /// Logins accepted.
    pub logins: u64,
    /// Registrations completed.
    pub registrations: u64,
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Segments compacted.
    pub segments_compacted: u64,
    /// Push notifications requested.
    pub pushes: u64,
    /// `PrekeyUpload`s accepted (home side).
    pub prekey_uploads: u64,
    /// `PrekeyUpload`s refused (bad signature, invalid key, over the limit, storage).
    pub prekey_uploads_refused: u64,
    /// Bundles handed out (home side).
    pub prekey_fetches: u64,
    /// One-time prekeys consumed (each handed out once).
    pub prekeys_consumed: u64,
    /// Bundles handed out without a one-time prekey (the device had none left).
    pub prekey_bundles_without_one_time: u64,
    /// `PrekeyFetch`es refused by the per-requester limit (requester side).
    pub prekey_fetches_rate_limited: u64,
    /// One-time prekeys currently stored on this shard (gauge).
    pub prekeys_stored: u64,
    /// Messages the sender dedup window remembers (gauge, at most `dedup_window_entries`).
    pub dedup_entries: u64,
    /// Mailbox entries whose content is held in memory (gauge; the rest are read back from the
    /// log when delivered).
    pub mailbox_hot: u64,
    /// Mailbox records read back from the log.
    pub records_read: u64,
    /// Record reads that failed (IO error, or a record that is not the entry's): the entry
    /// stays queued and is read again on a later Tick.
    pub record_read_failures: u64,
    /// `ReadRecords` batches outstanding (gauge, at most `record_reads_inflight_max`).
    pub record_reads_inflight: u64,
    /// Compactions abandoned because a record read failed (retried on a later Tick).
    pub compactions_abandoned: u64,
    /// Companion devices linked to accounts homed here (gauge).
    pub devices_linked: u64,
    /// Links completed.
    pub links: u64,
    /// Devices removed.
    pub unlinks: u64,
    /// `LinkApprove`s refused (any reason).
    pub links_refused: u64,
    /// Link codes issued.
    pub link_codes_issued: u64,
    /// Link codes known (gauge, at most `link_codes_max`).
    pub link_codes: u64,
    /// Device lists sent for `DeviceListFetch`.
    pub device_list_fetches: u64,
    /// `SendMulti`s refused because their device set was stale.
    pub sends_stale: u64,
    /// `SendMulti`s accepted for routing (sender side).
    pub sends_multi: u64,
    /// Device-list watchers forgotten at `device_list_watchers_max` (oldest first).
    pub device_list_watchers_evicted: u64,
    /// Media upload slots granted.
    pub media_slots_granted: u64,
    /// Bytes of media upload slots granted.
    pub media_slot_bytes_granted: u64,
    /// Media slot requests refused (class limit, quota, rate, unavailable).
    pub media_slots_refused: u64,
    /// Media download URLs granted.
    pub media_downloads_granted: u64,
    /// Status posts published.
    pub status_published: u64,
    /// Status posts deleted early by their poster.
    pub status_deleted: u64,
    /// Status posts expired (`status_ttl_ms`).
    pub status_expired: u64,
    /// Live status posts homed here (gauge).
    pub status_live: u64,
    /// Presence subscriptions held for users homed here (gauge).
    pub presence_subscriptions: u64,
    /// `PresenceSubscribe`s refused at `presence_subscriptions_per_conn_max`.
    pub presence_subscription_limit: u64,
    /// `PresenceSubscribe`s refused at `presence_subscribers_per_user_max`.
    pub presence_subscriber_limit: u64,
    /// Presence subscriptions that expired.
    pub presence_subscriptions_expired: u64,
    /// Presence changes (login, last disconnect, settings) of users with subscribers.
    pub presence_changes: u64,
    /// `Presence` frames sent for changes (one per subscriber whose view changed).
    pub presence_change_frames: u64,
    /// Typing notices relayed to at least one device.
    pub presence_typing_relayed: u64,
    /// Typing notices refused at `typing_per_device_per_s`.
    pub presence_typing_rate_limited: u64,
    /// `ContactsEdit`s refused at `contacts_per_user_max` / `blocked_per_user_max`.
    pub presence_contact_limit: u64,
    /// `LastSeen` batch records written.
    pub presence_last_seen_records: u64,
    /// Messages, receipts and typing notices dropped because the recipient blocked the sender.
    pub presence_blocked_drops: u64,
    /// Calls held on this shard, ringing or answered (gauge).
    pub calls_active: u64,
    /// Offers that rang (a call started).
    pub call_offers: u64,
    /// Calls answered.
    pub calls_answered: u64,
    /// Rings that timed out.
    pub calls_missed: u64,
    /// Offers answered busy by the server.
    pub calls_busy: u64,
    /// Offers refused at `calls_max`.
    pub call_limit: u64,
    /// TURN credentials issued.
    pub turn_credentials: u64,
    /// TURN requests refused at `turn_requests_per_user_per_minute`.
    pub turn_rate_limited: u64,
    /// TURN requests refused because no `turn_secret` is configured.
    pub turn_unavailable: u64,
    /// Groups homed on this shard (gauge).
    pub groups: u64,
    /// Groups created here.
    pub groups_created: u64,
    /// Group changes (membership, admins, settings, blobs) recorded here.
    pub group_changes: u64,
    /// Group messages accepted here (one upload each).
    pub group_messages: u64,
    /// Group fan-outs pending on this shard as home (gauge, at most `group_fanouts_pending_max`).
    pub group_fanouts_pending: u64,
    /// Fan-out messages sent to destination shards (first sends).
    pub group_fanouts_sent: u64,
    /// Fan-out messages sent again (restart, destination restart, retry timer).
    pub group_fanouts_redriven: u64,
    /// Creates and adds refused at `group_members_max`.
    pub group_refused_full: u64,
    /// Group sends refused at `group_fanouts_pending_max`.
    pub group_refused_backlog: u64,
    /// Fan-outs stored here as destination (one record each).
    pub group_copies_stored: u64,
    /// Mailbox entries those made (one per member device).
    pub group_copy_entries: u64,
    /// Fan-outs dropped here as already stored (re-drives).
    pub group_copies_duplicate: u64,
    /// Users refused a group membership at `groups_per_user_max` (on their home shard).
    pub group_joins_refused: u64,
    /// Fan-outs dropped here because they overtook an earlier one not applied yet (sent again).
    pub group_copies_out_of_order: u64,
    /// Aggregated `GroupReceipt` frames sent to senders (pushed and fetched).
    pub group_receipts_sent: u64,
}

mod accounts;
mod calls;
mod compaction;
mod dedup;
mod devices;
mod fanout;
pub mod groups;
mod ledger;
mod limits;
mod mailbox;
mod mailboxes;
pub mod media;
mod memberships;
mod multidevice;
mod out;
mod prekeys;
mod presence;
mod privacy;
pub mod record;
mod recover;
mod registration;
mod registry;
mod sender;
mod shard;
pub mod social;
mod status;
mod types;
mod waiter;

pub use calls::{turn_auth, turn_password};
pub use groups::{GroupReq, GroupRequest};
pub use recover::{decode_log, DecodedLog};
pub use shard::Shard;
