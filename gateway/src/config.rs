//! Daemon configuration: embedded defaults, then a TOML file, then command-line flags.
//!
//! Every key is a field of [`Config`]; every field can be set in the TOML file under the same
//! name and overridden by `--<name-with-dashes> VALUE` on the command line. Names carry their
//! unit (`_ms`, `_bytes`, `_msgs`, …). `switchboard --print-config` shows the merged result.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

macro_rules! config {
    ($( $(#[doc = $doc:expr])* $name:ident : $ty:ty = $default:expr; )*) => {
        /// The merged configuration. See the module doc.
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Command-line overrides: one optional flag per key.
        #[derive(Clone, Debug, Default, clap::Args)]
        pub struct Overrides {
            $(
                $(#[doc = $doc])*
                #[arg(long)]
                pub $name: Option<$ty>,
            )*
        }

        impl Config {
            /// Applies every flag that was given.
            pub fn apply(&mut self, o: &Overrides) {
                $( if let Some(v) = &o.$name { self.$name = v.clone(); } )*
            }
        }
    };
}

config! {
    /// Client listener address; every shard binds it with SO_REUSEPORT.
    listen_addr: SocketAddr = "127.0.0.1:7300".parse().unwrap_or_else(|_| unreachable!());
    /// Accept queue length requested with listen(2) on every shard's listener (the kernel caps
    /// it at net.core.somaxconn). glommio binds with 1024; we raise it after binding.
    listen_backlog: u32 = 65_535;
    /// Admin listener (Prometheus text at /metrics, /healthz).
    admin_addr: SocketAddr = "127.0.0.1:7301".parse().unwrap_or_else(|_| unreachable!());
    /// Most connections the admin endpoint holds at once; past it new ones are closed at accept
    /// and counted (`switchboard_admin_refused_total`). Each connection is served on its own, so
    /// a slow scraper delays nobody else until this many are open.
    admin_connections_max: usize = 16;
    /// Time an admin connection has to send its request and read the response; past it the
    /// connection is closed and counted (`switchboard_admin_timeouts_total`).
    admin_request_timeout_ms: u64 = 10_000;
    /// Data directory: one `shard-N/` log directory per shard, the server key, dev SMS codes.
    data_dir: PathBuf = PathBuf::from("./switchboard-data");
    /// Allow generating a new `server.key` when it is missing although the data directory
    /// already holds shard data (`SHARDS` or log segments). Off by default: the start is then
    /// refused, because a new key silently gives the server a new identity and every client
    /// that pinned the old `server.pub` refuses it. Set it (`--new-server-key true`) for the one
    /// start after deciding to re-key; with `server.key` present it changes nothing.
    new_server_key: bool = false;
    /// Number of shards (pinned executors); 0 means one per online CPU.
    shards: usize = 0;
    /// Pin shard i to CPU `cpus[i % len]`; empty means CPU i. Ignored when `pin_cpus` is false.
    cpus: Vec<usize> = Vec::new();
    /// Pin each shard's executor to a CPU.
    pin_cpus: bool = true;
    /// Most connections from one source address that may be unauthenticated at once (in the
    /// handshake or not yet logged in) on each shard; past it new ones from that address are
    /// closed at accept and counted. Bounds what one address can pin without an account while
    /// leaving room for carrier-grade NAT. 0 disables the check.
    max_preauth_per_ip: u32 = 4_096;
    /// Largest record body accepted from a client (bytes, <= 65535).
    max_frame_bytes: u32 = 16 * 1024;
    /// Largest `Send` payload (bytes).
    max_payload_bytes: usize = 16 * 1024 - 64;
    /// Time allowed for preamble + Noise handshake.
    handshake_timeout_ms: u64 = 10_000;
    /// A connection that has not logged in this long after its handshake is closed with
    /// NotAuthenticated (pings do not extend it), so unauthenticated sockets cannot be held
    /// open indefinitely. Long enough to request and type a registration code.
    preauth_timeout_ms: u64 = 120_000;
    /// A connection that sends nothing for this long is closed with IdleTimeout.
    idle_timeout_ms: u64 = 90_000;
    /// Keepalive interval announced to clients in Welcome.
    keepalive_ms: u32 = 30_000;
    /// Sustained frames per second allowed per connection.
    rate_limit_frames_per_s: u32 = 500;
    /// Burst of frames allowed above the sustained rate.
    rate_limit_burst: u32 = 1_000;
    /// A connection whose unsent output exceeds this is closed with SlowConsumer.
    outbound_queue_bytes_max: usize = 4 * 1024 * 1024;
    /// Most connections the process holds (split evenly across shards); past it new
    /// connections are closed at once and counted.
    max_connections: usize = 2_000_000;
    /// Size of each shard's receive buffer (shared by all its connections; task core).
    read_buffer_bytes: usize = 64 * 1024;
    /// How client connections are driven after their handshake: `uring` (the shard's own
    /// io_uring ring: multishot receive into shared provided buffers, sends gathered per loop
    /// turn, no task per connection; needs Linux >= 6.0, and the start is refused without it),
    /// `task` (one glommio task and stream per connection, the earlier core), or `auto` (`uring`
    /// when the kernel has what it needs, else `task` with a warning naming the missing feature).
    connection_core: String = "auto".to_owned();
    /// Receive buffers in each shard's provided-buffer ring (ring core; rounded up to a power of
    /// two, at most 32768). Shared by all the shard's connections.
    uring_buffers: u16 = 1024;
    /// Size of each receive buffer of the ring core (bytes).
    uring_buffer_bytes: usize = 2 * 1024;
    /// Submission queue entries of each shard's connection ring (ring core).
    uring_entries: u32 = 4096;
    /// How the kernel runs the connection ring's completion work (ring core): `defer`
    /// (`IORING_SETUP_DEFER_TASKRUN`, Linux >= 6.1: only when the shard enters its ring, once per
    /// loop turn, so packets arriving on other CPUs never interrupt the shard), `coop`
    /// (`COOP_TASKRUN`, Linux >= 5.19: at the shard's next kernel entry) or `signal` (the kernel
    /// interrupts the shard for each completion: the behaviour before this key). A mode the
    /// kernel refuses falls back to the next one with a warning.
    uring_task_work: String = "defer".to_owned();
    /// Let the kernel back the process's memory with transparent huge pages (where the host's
    /// `transparent_hugepage` setting allows them). Off by default: the allocator asks for huge
    /// pages on its arenas, so memory then grows in 2 MiB steps, which at 19,000 connections
    /// moved the measured RSS per idle connection by ±440 B from run to run; without them the
    /// heap is paid in 4 KiB pages as used (hardware.md §9).
    heap_huge_pages: bool = false;
    /// Receive gather window (µs, ring core): when client bytes wake a shard that had gone idle
    /// (a low rate: at high rates the loop never sleeps), it waits this long before its loop
    /// turn, so the packets arriving meanwhile share one wake-up, one turn and one enter.
    /// Trades up to this much latency for CPU at low rates; 0 turns at once.
    uring_gather_us: u64 = 0;
    /// Group commit gather window (µs): once an append is pending, the committer waits this
    /// long before its `fdatasync`, so appends arriving meanwhile share it. 0 commits at once.
    /// Trades up to this much ✓ latency for fewer commits (and their CPU) at low rates;
    /// durability is unchanged (✓ still follows the `fdatasync`).
    commit_gather_us: u64 = 0;
    /// SO_RCVBUF for client sockets; 0 keeps the kernel default (tcp_rmem).
    socket_rcvbuf_bytes: usize = 0;
    /// SO_SNDBUF for client sockets; 0 keeps the kernel default (tcp_wmem).
    socket_sndbuf_bytes: usize = 0;
    /// Capacity of each shard-to-shard channel (messages).
    mesh_channel_capacity: usize = 4096;
    /// Most messages queued for one peer shard while its channel is full (the per-peer mesh
    /// backlog, drained by one task per peer; gauge `switchboard_mesh_backlog_msgs`). When it is
    /// full, a request made for one of this shard's connections (a send, a registration step, a
    /// prekey fetch) is refused and that connection is closed with Overloaded, so the client
    /// reconnects after a back-off and resends in order; a hand-off is refused the same way
    /// (`switchboard_mesh_backlog_refused_total`). Replies and receipts, which finish work the
    /// peer already did, may use a reserve of as many again and are dropped only past twice
    /// this (`switchboard_mesh_backlog_dropped_total`).
    mesh_backlog_msgs_max: usize = 65_536;
    /// Log segment size before rotation.
    segment_bytes_max: u64 = 64 * 1024 * 1024;
    /// Start even if log segments are missing from the middle of a shard's log (their records
    /// are lost for good). Off: such a shard refuses to start and says which ids are gone.
    /// Set it once, after deciding the files cannot be restored.
    accept_segment_loss: bool = false;
    /// Per-device mailbox cap (priority pruning past it).
    mailbox_cap_msgs: usize = 10_000;
    /// Mailbox entry lifetime (30 days).
    message_ttl_s: u64 = 30 * 24 * 3600;
    /// Dedup keys remembered per shard.
    dedup_window_entries: usize = 1 << 20;
    /// Unacknowledged deliveries in flight per connection.
    delivery_window_msgs: usize = 256;
    /// Sealed segments with a live fraction below this are compacted.
    compaction_live_ratio: f64 = 0.25;
    /// Registration code lifetime.
    registration_code_ttl_s: u64 = 600;
    /// Registration requests allowed per number per hour.
    register_per_number_per_hour: u32 = 5;
    /// Registration requests allowed per source address per hour (per accepting shard).
    register_per_ip_per_hour: u32 = 20;
    /// Wrong codes allowed before the pending code is burnt.
    register_verify_attempts_max: u32 = 5;
    /// Most entries each registration table (rate windows, pending codes, pending verifications
    /// and key bindings) holds per shard; when full, new registrations get RegisterRateLimited.
    register_table_max_entries: usize = 100_000;
    /// When a device holds fewer one-time prekeys than this, its owner is told to upload more.
    prekey_low_water: u32 = 10;
    /// Most one-time prekeys stored per device; an upload past it is refused whole (PrekeyLimit).
    prekeys_per_device_max: usize = 500;
    /// Prekey bundle fetches allowed per requesting device per minute (PrekeyFetchRateLimited).
    prekey_fetches_per_requester_per_minute: u32 = 60;
    /// Most requesters the prekey fetch limiter tracks per shard.
    prekey_rate_table_max_entries: usize = 100_000;
    /// Most batches of mailbox record reads outstanding per shard (cold entries are read back
    /// from the log when delivered; each batch is at most delivery_window_msgs records).
    record_reads_inflight_max: usize = 64;
    /// Most devices per account, the primary included (1..=32); a LinkApprove past it gets
    /// DeviceLimit.
    devices_per_account_max: usize = 5;
    /// Lifetime of a link code (LinkRequest → LinkCode), in ms.
    link_code_ttl_ms: u64 = 60_000;
    /// Most link codes a shard keeps (issued, recently used or expired); when full a
    /// LinkRequest is closed with Overloaded.
    link_codes_max: usize = 100_000;
    /// Most connections per user told about changes of its device list (the latest fetchers).
    device_list_watchers_max: usize = 256;
    /// Most live presence subscriptions per connection; past it PresenceSubscribe gets
    /// PresenceSubscriptionLimit (switchboard_presence_subscription_limit_total).
    presence_subscriptions_per_conn_max: usize = 64;
    /// Most live presence subscribers per watched user; past it PresenceSubscribe gets
    /// PresenceSubscriberLimit (switchboard_presence_subscriber_limit_total).
    presence_subscribers_per_user_max: usize = 256;
    /// Longest presence subscription TTL granted (s); longer requests are cut to it.
    presence_subscription_ttl_s_max: u32 = 600;
    /// Most users on one contact list; past it ContactsEdit gets ContactLimit
    /// (switchboard_presence_contact_limit_total).
    contacts_per_user_max: usize = 2_000;
    /// Most users on one block list; past it ContactsEdit gets ContactLimit.
    blocked_per_user_max: usize = 1_000;
    /// Most typing notices per device per second; more get TypingRateLimited
    /// (switchboard_presence_typing_rate_limited_total).
    typing_per_device_per_s: u32 = 5;
    /// Most keys each presence rate table (typing per device, TURN per user) holds per shard;
    /// when full, new keys are refused until the tick sweeps out ended windows.
    presence_rate_table_max_entries: usize = 100_000;
    /// How long a call offer rings before it becomes a missed call (ms).
    call_ring_timeout_ms: u64 = 45_000;
    /// Longest an answered call is kept before the server hangs it up (ms).
    call_max_ms: u64 = 6 * 3600 * 1000;
    /// Most calls (ringing or answered) per shard; past it an offer gets CallLimit
    /// (switchboard_call_limit_total).
    calls_max: usize = 100_000;
    /// coturn static-auth-secret (use-auth-secret) for TURN credentials; empty disables
    /// them (TurnUnavailable).
    turn_secret: String = String::new();
    /// TURN URIs handed out with the credentials (at most 8), e.g. `turn:turn.example:3478`.
    turn_uris: Vec<String> = Vec::new();
    /// Lifetime of TURN credentials (s).
    turn_ttl_s: u32 = 86_400;
    /// Most TURN credential requests per user per minute; more get TurnRateLimited
    /// (switchboard_turn_rate_limited_total).
    turn_requests_per_user_per_minute: u32 = 10;
    /// Most members of a group (1..=1024); a GroupCreate or GroupChange ADD past it gets
    /// GroupFull (metric switchboard_group_refused_full_total).
    group_members_max: usize = 1024;
    /// Most group fan-outs a shard keeps pending as a group's home (not yet stored by every
    /// destination shard); a GroupSend past it gets GroupBacklog (metric
    /// switchboard_group_refused_backlog_total).
    group_fanouts_pending_max: usize = 65_536;
    /// A destination shard that has not acknowledged a group fan-out for this long gets it
    /// again (it drops what it already has), in ms.
    group_fanout_retry_ms: u64 = 5_000;
    /// Recent GroupSends remembered per shard to answer retries with their first ✓.
    group_send_dedup_entries: usize = 65_536;
    /// Most groups a user belongs to (counted on the user's home shard); a GroupCreate or
    /// ADD that would pass it for one of its users gets GroupsPerUserLimit (metric
    /// switchboard_group_joins_refused_total).
    groups_per_user_max: usize = 1024;
    /// Most group messages whose receipts a shard aggregates (as destination and as home);
    /// older ones read as zeros (metric switchboard_group_receipts_sent_total counts the
    /// aggregated GroupReceipt frames).
    group_receipts_tracked_max: usize = 65_536;
    /// `file` (codes appended to `<data_dir>/sms/<phone>.txt` and logged) or `webhook`.
    sms_provider: String = "file".to_owned();
    /// URL the webhook SMS provider POSTs `{"phone":..,"code":..}` to.
    sms_webhook_url: String = String::new();
    /// `log` (push requests are logged) or `webhook`.
    push_provider: String = "log".to_owned();
    /// URL the webhook push provider POSTs `{"user":..,"device":..,"from":..,"msg_type":..}` to
    /// (never message content).
    push_webhook_url: String = String::new();
    /// Media endpoint (HTTP/1.1: upload slots' PUT, blob GET; docs/protocol.md §19), served by
    /// its own thread off the shards' cores. Empty: media is off (slot requests get
    /// MediaUnavailable).
    media_addr: String = String::new();
    /// Base of the media URLs handed to clients (`MediaSlot`, `MediaDownload`), e.g.
    /// `https://media.example.com` behind a proxy. Empty: `http://<media_addr as bound>`.
    media_public_url: String = String::new();
    /// Largest image a slot is granted for (MediaTooLarge past it).
    media_image_bytes_max: u64 = 16 * 1024 * 1024;
    /// Largest video a slot is granted for (MediaTooLarge past it).
    media_video_bytes_max: u64 = 100 * 1024 * 1024;
    /// Largest audio file a slot is granted for (MediaTooLarge past it).
    media_audio_bytes_max: u64 = 16 * 1024 * 1024;
    /// Largest document a slot is granted for (MediaTooLarge past it).
    media_document_bytes_max: u64 = 100 * 1024 * 1024;
    /// Bytes of upload slots one user may be granted per 24-hour window (MediaQuotaExceeded;
    /// counted on the user's home shard, in memory).
    media_quota_bytes_per_day: u64 = 2 * 1024 * 1024 * 1024;
    /// Media requests (slots and download URLs) per user per minute (MediaRateLimited).
    media_requests_per_minute: u32 = 60;
    /// Most users each media limiter table tracks per shard; when full, requests from new
    /// users get MediaRateLimited until the tick sweeps ended windows.
    media_table_entries_max: usize = 100_000;
    /// Lifetime of an upload or download URL (its token), seconds.
    media_url_ttl_s: u64 = 3_600;
    /// Lifetime of a stored blob (30 days), seconds; the sweep deletes it after that.
    media_ttl_s: u64 = 30 * 24 * 3600;
    /// How often the media endpoint looks for expired blobs and stale partial uploads.
    media_sweep_ms: u64 = 60_000;
    /// Most connections the media endpoint holds at once; past it new ones are closed at
    /// accept (`switchboard_media_refused_total{reason="connections"}`).
    media_connections_max: usize = 256;
    /// A media connection on which no byte moves for this long is closed (an interrupted
    /// upload stays resumable; `reason="incomplete"`).
    media_idle_timeout_ms: u64 = 30_000;
    /// Lifetime of a status post (24 h), seconds: then the server deletes it and its blobs.
    status_ttl_s: u64 = 24 * 3600;
    /// Most live status posts per user (StatusLimit past it).
    status_posts_per_user_max: usize = 100;
    /// Most users in one status post's audience (StatusLimit past it).
    status_audience_max: usize = 1_024;
    /// Reconnect delay announced in GoAway when draining.
    drain_reconnect_after_ms: u32 = 5_000;
    /// Longest time a drain waits for output to flush before closing sockets.
    drain_timeout_ms: u64 = 5_000;
    /// Shard timer period (TTL, compaction, idle scan).
    tick_ms: u64 = 1_000;
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `switchboard=debug`.
    log_filter: String = "info".to_owned();
    /// Log format: `text` or `json`.
    log_format: String = "text".to_owned();
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`].
    #[error("parsing {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid {key}: {why}")]
    Invalid {
        /// Key.
        key: &'static str,
        /// Why.
        why: String,
    },
}

impl Config {
    /// Defaults, then `file` if given.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        match file {
            None => Ok(Self::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Checks ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError::Invalid { key, why });
        if self.max_frame_bytes < 64 || self.max_frame_bytes > u32::from(u16::MAX) {
            return bad(
                "max_frame_bytes",
                format!("{} not in 64..=65535", self.max_frame_bytes),
            );
        }
        let frame_room = self.max_frame_bytes as usize
            - protocol::wire::TAG_BYTES
            - 1
            - protocol::frame::sizes::DELIVER_HEADER;
        if self.max_payload_bytes > frame_room {
            return bad(
                "max_payload_bytes",
                format!(
                    "{} does not fit a Deliver frame within max_frame_bytes (at most {frame_room})",
                    self.max_payload_bytes
                ),
            );
        }
        if self.read_buffer_bytes < self.max_frame_bytes as usize + 2 {
            return bad(
                "read_buffer_bytes",
                "must hold at least one whole record".into(),
            );
        }
        if !matches!(self.connection_core.as_str(), "task" | "uring" | "auto") {
            return bad(
                "connection_core",
                format!(
                    "`{}`: expected `auto`, `uring` or `task`",
                    self.connection_core
                ),
            );
        }
        if crate::uring::TaskWork::parse(&self.uring_task_work).is_none() {
            return bad(
                "uring_task_work",
                format!(
                    "`{}`: expected `defer`, `coop` or `signal`",
                    self.uring_task_work
                ),
            );
        }
        if self.uring_buffers == 0
            || self.uring_buffers > 32_768
            || self.uring_buffer_bytes < 64
            || self.uring_entries == 0
        {
            return bad(
                "uring_buffers",
                "uring_buffers (1..=32768), uring_buffer_bytes (>= 64) and uring_entries \
                 must be positive"
                    .into(),
            );
        }
        if self.idle_timeout_ms <= u64::from(self.keepalive_ms) {
            return bad("idle_timeout_ms", "must exceed keepalive_ms".into());
        }
        if self.rate_limit_frames_per_s == 0 || self.rate_limit_burst == 0 {
            return bad(
                "rate_limit_frames_per_s",
                "rate and burst must be positive".into(),
            );
        }
        if self.admin_connections_max == 0 || self.admin_request_timeout_ms == 0 {
            return bad(
                "admin_connections_max",
                "admin_connections_max and admin_request_timeout_ms must be positive".into(),
            );
        }
        if self.turn_uris.len() > protocol::presence::TURN_URIS_MAX
            || self.turn_uris.iter().any(|u| u.len() > 255)
            || self.turn_secret.len() > 1024
        {
            return bad(
                "turn_uris",
                "at most 8 URIs of at most 255 bytes (and a secret of at most 1024)".into(),
            );
        }
        if self.shards > 1024 {
            return bad("shards", "at most 1024".into());
        }
        if self.mesh_channel_capacity == 0
            || self.mesh_backlog_msgs_max == 0
            || self.delivery_window_msgs == 0
            || self.tick_ms == 0
        {
            return bad(
                "mesh_channel_capacity",
                "mesh_channel_capacity, mesh_backlog_msgs_max, delivery_window_msgs and tick_ms \
                 must be positive"
                    .into(),
            );
        }
        self.validate_media()?;
        if self.group_members_max == 0 || self.group_members_max > protocol::group::GROUP_USERS_MAX
        {
            return bad(
                "group_members_max",
                format!("{} not in 1..=1024", self.group_members_max),
            );
        }
        if self.group_fanouts_pending_max == 0
            || self.group_fanout_retry_ms == 0
            || self.group_send_dedup_entries == 0
            || self.groups_per_user_max == 0
            || self.group_receipts_tracked_max == 0
        {
            return bad(
                "group_fanouts_pending_max",
                "group_fanouts_pending_max, group_fanout_retry_ms, group_send_dedup_entries, \
                 groups_per_user_max and group_receipts_tracked_max must be positive"
                    .into(),
            );
        }
        self.validate_providers()
    }

    /// Checks the media keys.
    fn validate_media(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError::Invalid { key, why });
        if !self.media_addr.is_empty() && self.media_socket_addr().is_none() {
            return bad(
                "media_addr",
                format!("{:?} is not ip:port", self.media_addr),
            );
        }
        if self.media_addr.ends_with(":0") && self.media_public_url.is_empty() {
            return bad(
                "media_public_url",
                "required when media_addr has port 0".into(),
            );
        }
        if self.media_url_ttl_s == 0
            || self.media_ttl_s == 0
            || self.media_sweep_ms == 0
            || self.media_connections_max == 0
            || self.media_idle_timeout_ms == 0
        {
            return bad(
                "media_url_ttl_s",
                "media_url_ttl_s, media_ttl_s, media_sweep_ms, media_connections_max and \
                 media_idle_timeout_ms must be positive"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks the SMS/push providers and the log format.
    fn validate_providers(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError::Invalid { key, why });
        if !matches!(self.sms_provider.as_str(), "file" | "webhook") {
            return bad(
                "sms_provider",
                format!("{:?} is not file or webhook", self.sms_provider),
            );
        }
        if self.sms_provider == "webhook" && self.sms_webhook_url.is_empty() {
            return bad(
                "sms_webhook_url",
                "required by sms_provider = webhook".into(),
            );
        }
        if !matches!(self.push_provider.as_str(), "log" | "webhook") {
            return bad(
                "push_provider",
                format!("{:?} is not log or webhook", self.push_provider),
            );
        }
        if self.push_provider == "webhook" && self.push_webhook_url.is_empty() {
            return bad(
                "push_webhook_url",
                "required by push_provider = webhook".into(),
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format", "text or json".into());
        }
        Ok(())
    }

    /// Shards to run: `shards`, or the number of online CPUs.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// Whether connections run on the ring core (after `auto` was resolved at start).
    pub fn uring_core(&self) -> bool {
        self.connection_core == "uring"
    }

    /// The shard state machine's configuration for shard `i`.
    pub fn shard_config(&self, i: usize) -> shards::Config {
        let n = self.shard_count() as u16;
        let mut c = shards::Config::new(i as u16, n);
        c.max_payload_bytes = self.max_payload_bytes;
        c.mailbox_cap_msgs = self.mailbox_cap_msgs;
        c.message_ttl_ms = self.message_ttl_s.saturating_mul(1000);
        c.dedup_window_entries = self.dedup_window_entries;
        c.delivery_window_msgs = self.delivery_window_msgs;
        c.registration_code_ttl_ms = self.registration_code_ttl_s.saturating_mul(1000);
        c.register_per_number_per_hour = self.register_per_number_per_hour;
        c.register_per_ip_per_hour = self.register_per_ip_per_hour;
        c.register_verify_attempts_max = self.register_verify_attempts_max;
        c.keepalive_ms = self.keepalive_ms;
        c.max_frame_bytes = self.max_frame_bytes;
        c.compaction_live_ratio = self.compaction_live_ratio;
        c.register_table_max_entries = self.register_table_max_entries;
        c.prekey_low_water = self.prekey_low_water;
        c.prekeys_per_device_max = self.prekeys_per_device_max;
        c.prekey_fetches_per_requester_per_minute = self.prekey_fetches_per_requester_per_minute;
        c.prekey_rate_table_max_entries = self.prekey_rate_table_max_entries;
        c.record_reads_inflight_max = self.record_reads_inflight_max;
        c.devices_per_account_max = self.devices_per_account_max;
        c.link_code_ttl_ms = self.link_code_ttl_ms;
        c.link_codes_max = self.link_codes_max;
        c.device_list_watchers_max = self.device_list_watchers_max;
        c.status_ttl_ms = self.status_ttl_s.saturating_mul(1000);
        c.status_posts_per_user_max = self.status_posts_per_user_max;
        c.status_audience_max = self.status_audience_max;
        c.media = shards::media::MediaConfig {
            // The secret is read from the data directory by the shard's executor.
            secret: shards::media::MediaSecret::default(),
            public_url: self.media_url_base(),
            image_bytes_max: self.media_image_bytes_max,
            video_bytes_max: self.media_video_bytes_max,
            audio_bytes_max: self.media_audio_bytes_max,
            document_bytes_max: self.media_document_bytes_max,
            quota_bytes_per_day: self.media_quota_bytes_per_day,
            requests_per_minute: self.media_requests_per_minute,
            url_ttl_ms: self.media_url_ttl_s.saturating_mul(1000),
            table_entries_max: self.media_table_entries_max,
        };
        c.presence_subscriptions_per_conn_max = self.presence_subscriptions_per_conn_max;
        c.presence_subscribers_per_user_max = self.presence_subscribers_per_user_max;
        c.presence_subscription_ttl_s_max = self.presence_subscription_ttl_s_max;
        c.contacts_per_user_max = self.contacts_per_user_max;
        c.blocked_per_user_max = self.blocked_per_user_max;
        c.typing_per_device_per_s = self.typing_per_device_per_s;
        c.presence_rate_table_max_entries = self.presence_rate_table_max_entries;
        c.call_ring_timeout_ms = self.call_ring_timeout_ms;
        c.call_max_ms = self.call_max_ms;
        c.calls_max = self.calls_max;
        c.turn_secret = self.turn_secret.clone();
        c.turn_uris = self.turn_uris.clone();
        c.turn_ttl_s = self.turn_ttl_s;
        c.turn_requests_per_user_per_minute = self.turn_requests_per_user_per_minute;
        c.group_members_max = self.group_members_max;
        c.group_fanouts_pending_max = self.group_fanouts_pending_max;
        c.group_fanout_retry_ms = self.group_fanout_retry_ms;
        c.group_send_dedup_entries = self.group_send_dedup_entries;
        c.groups_per_user_max = self.groups_per_user_max;
        c.group_receipts_tracked_max = self.group_receipts_tracked_max;
        c
    }

    /// The media endpoint's address, when media is on.
    pub fn media_socket_addr(&self) -> Option<SocketAddr> {
        self.media_addr.parse().ok()
    }

    /// The base of media URLs: `media_public_url`, or `http://<media_addr>`; empty when off.
    pub fn media_url_base(&self) -> String {
        if self.media_addr.is_empty() {
            return String::new();
        }
        if self.media_public_url.is_empty() {
            format!("http://{}", self.media_addr)
        } else {
            self.media_public_url.trim_end_matches('/').to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "idle_timeout_ms = 1234567\nshards = 3\n").unwrap();
        let mut c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.shards, 3);
        c.apply(&Overrides {
            shards: Some(5),
            ..Default::default()
        });
        assert_eq!(c.shards, 5);
        assert_eq!(c.idle_timeout_ms, 1234567);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
        let c = Config {
            max_frame_bytes: 70_000,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            sms_provider: "carrier-pigeon".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
