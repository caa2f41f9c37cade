//! Metrics: per-shard atomic counters written only by their shard, read by the admin thread,
//! rendered in the Prometheus text exposition format (0.0.4).
//!
//! Each shard owns one [`ShardMetrics`]; only that shard's thread writes it (relaxed atomics:
//! no lock, no contention, no cache line shared with another writer). The admin endpoint
//! ([`crate::admin`]) runs on its own thread, off the shards' cores, and reads them when scraped.
//!
//! Every exported family is one row of [`FAMILIES`] (name, help, type, how to read its
//! samples), so each gets exactly one `# HELP` and one `# TYPE` line and a new metric cannot be
//! forgotten by the renderer. The shard counters stay relaxed atomics rather than
//! `prometheus-client` types because many are copies of the state machine's own counters, set
//! (not incremented) every tick, and because that crate writes OpenMetrics (counter families
//! named without `_total`, `le="1.0"` for `le="1"`), which would change the names and labels
//! this endpoint has always served.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use protocol::ErrorCode;

/// Upper bounds (µs) of the fsync latency histogram buckets.
pub const FSYNC_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// Upper bounds (records) of the group-commit batch size histogram.
pub const BATCH_BUCKETS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024];

/// A fixed-bucket histogram of relaxed atomics.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    buckets: [AtomicU64; N],
    overflow: AtomicU64,
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [u64; N]) -> Self {
        Self {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: u64) {
        match self.bounds.iter().position(|&b| v <= b) {
            Some(i) => {
                if let Some(b) = self.buckets.get(i) {
                    b.fetch_add(1, Relaxed);
                }
            }
            None => {
                self.overflow.fetch_add(1, Relaxed);
            }
        }
        self.sum.fetch_add(v, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, shard: usize, scale: f64) {
        let mut cum = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cum += n.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{}\"}} {cum}",
                *b as f64 / scale
            );
        }
        cum += self.overflow.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum{{shard=\"{shard}\"}} {}",
            self.sum.load(Relaxed) as f64 / scale
        );
        let _ = writeln!(
            out,
            "{name}_count{{shard=\"{shard}\"}} {}",
            self.count.load(Relaxed)
        );
    }
}

macro_rules! shard_metrics {
    ($( $(#[doc = $doc:expr])* $name:ident : $kind:literal; )*) => {
        /// One shard's metrics.
        #[derive(Debug)]
        pub struct ShardMetrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
            /// fsync (fdatasync) latency per group commit, µs.
            pub fsync_latency_us: Histogram<14>,
            /// Records per group commit.
            pub commit_batch_records: Histogram<10>,
            /// Errors sent or observed, by code (indexed like `ErrorCode::ALL`).
            pub errors: Vec<AtomicU64>,
            /// Mesh backlog depth per peer shard (indexed by peer).
            pub mesh_backlog_peer: Vec<AtomicU64>,
        }

        impl ShardMetrics {
            /// Zeroed metrics for a shard in a mesh of `peers` shards.
            pub fn new(peers: usize) -> Self {
                Self {
                    $( $name: AtomicU64::new(0), )*
                    fsync_latency_us: Histogram::new(&FSYNC_BUCKETS_US),
                    commit_batch_records: Histogram::new(&BATCH_BUCKETS),
                    errors: ErrorCode::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
                    mesh_backlog_peer: (0..peers).map(|_| AtomicU64::new(0)).collect(),
                }
            }

        }

        /// Every exported family, in page order.
        pub const FAMILIES: &[Family] = &[
            Family { name: "switchboard_build_info", help: "Build information.", kind: "gauge", samples: Samples::Custom(build_info) },
            Family { name: "switchboard_shards", help: "Number of shards.", kind: "gauge", samples: Samples::Custom(shard_count) },
            $( Family {
                name: concat!("switchboard_", stringify!($name)),
                help: concat!($($doc),*),
                kind: $kind,
                samples: Samples::PerShard(|m| &m.$name),
            }, )*
            Family { name: "switchboard_errors_total", help: "Errors by code (sent to clients or observed).", kind: "counter", samples: Samples::Custom(errors) },
            Family { name: "switchboard_mesh_backlog_msgs", help: "Mesh messages waiting for a full channel, per peer shard (bounded by mesh_backlog_msgs_max).", kind: "gauge", samples: Samples::Custom(mesh_backlog_per_peer) },
            Family { name: "switchboard_fsync_seconds", help: "fdatasync latency per group commit.", kind: "histogram", samples: Samples::Custom(fsync_seconds) },
            Family { name: "switchboard_commit_batch_records", help: "Records made durable per group commit.", kind: "histogram", samples: Samples::Custom(commit_batch_records) },
            Family { name: "switchboard_admin_connections", help: "Connections open on the admin endpoint.", kind: "gauge", samples: Samples::Admin(|a| &a.connections) },
            Family { name: "switchboard_admin_refused_total", help: "Admin connections closed at accept because admin_connections_max were open.", kind: "counter", samples: Samples::Admin(|a| &a.refused_total) },
            Family { name: "switchboard_admin_timeouts_total", help: "Admin connections closed because their request and response took longer than admin_request_timeout_ms.", kind: "counter", samples: Samples::Admin(|a| &a.timeouts_total) },
            Family { name: "switchboard_media_blobs", help: "Complete media blobs stored.", kind: "gauge", samples: Samples::Media(|m| &m.blobs) },
            Family { name: "switchboard_media_bytes_stored", help: "Bytes of complete media blobs stored.", kind: "gauge", samples: Samples::Media(|m| &m.bytes_stored) },
            Family { name: "switchboard_media_uploads_total", help: "Media uploads completed (length and SHA-256 checked, fsync'd).", kind: "counter", samples: Samples::Media(|m| &m.uploads_total) },
            Family { name: "switchboard_media_upload_bytes_total", help: "Bytes received in media PUT bodies.", kind: "counter", samples: Samples::Media(|m| &m.upload_bytes_total) },
            Family { name: "switchboard_media_upload_seconds_total", help: "Time spent receiving media PUT bodies (throughput = upload bytes / this).", kind: "counter", samples: Samples::Custom(media_upload_seconds) },
            Family { name: "switchboard_media_downloads_total", help: "Media GETs answered with a body (200 or 206).", kind: "counter", samples: Samples::Media(|m| &m.downloads_total) },
            Family { name: "switchboard_media_download_bytes_total", help: "Bytes sent in media GET bodies.", kind: "counter", samples: Samples::Media(|m| &m.download_bytes_total) },
            Family { name: "switchboard_media_expired_total", help: "Media blobs deleted because media_ttl_s passed.", kind: "counter", samples: Samples::Media(|m| &m.expired_total) },
            Family { name: "switchboard_media_expired_bytes_total", help: "Bytes reclaimed by media_ttl_s.", kind: "counter", samples: Samples::Media(|m| &m.expired_bytes_total) },
            Family { name: "switchboard_media_connections", help: "Connections open on the media endpoint (at most media_connections_max).", kind: "gauge", samples: Samples::Media(|m| &m.connections) },
            Family { name: "switchboard_media_refused_total", help: "Media HTTP requests refused, by reason.", kind: "counter", samples: Samples::Custom(media_refused) },
            Family { name: "process_resident_memory_bytes", help: "Resident set size.", kind: "gauge", samples: Samples::Custom(resident_memory) },
            // Open descriptors are not counted by listing /proc/self/fd: at 2M connections that
            // is a 2M-entry walk per scrape and ~1.8 GB of proc inodes and dentries. `FDSize`
            // (the fd table's size) is free to read and bounds the count; connections per shard
            // are exported as `switchboard_connections`.
            Family { name: "process_fd_table_size", help: "Size of the file descriptor table (bounds open fds).", kind: "gauge", samples: Samples::Custom(fd_table_size) },
        ];
    };
}

shard_metrics! {
    /// Connections open on this shard (pre-auth and logged in).
    connections: "gauge";
    /// Connections logged in on this shard.
    connections_logged_in: "gauge";
    /// TCP connections accepted.
    accepted_total: "counter";
    /// Connections refused because max_connections was reached.
    refused_overload_total: "counter";
    /// Connections refused because their address already held max_preauth_per_ip
    /// unauthenticated connections on this shard.
    refused_per_ip_total: "counter";
    /// Noise handshakes completed.
    handshakes_total: "counter";
    /// Noise handshakes that failed (bad preamble, bad message, timeout).
    handshake_failures_total: "counter";
    /// Connections handed to another shard after login.
    handoffs_out_total: "counter";
    /// Connections received from another shard.
    handoffs_in_total: "counter";
    /// Ring core: multishot receives that ended and were armed again (mostly `ENOBUFS`: the
    /// shard's provided buffers ran out; raise `uring_buffers` if this climbs with traffic).
    uring_recv_rearms_total: "counter";
    /// Ring core: `io_uring_enter` calls made by the connection ring (one per loop turn with
    /// work, plus one whenever the submission queue filled).
    uring_enters_total: "counter";
    /// Frames received from clients.
    frames_in_total: "counter";
    /// Frames sent to clients.
    frames_out_total: "counter";
    /// Bytes received from clients.
    bytes_in_total: "counter";
    /// Bytes sent to clients.
    bytes_out_total: "counter";
    /// send() calls (write coalescing: frames_out / writes is frames per send).
    writes_total: "counter";
    /// Messages routed to a recipient on the sender's shard.
    routed_local_total: "counter";
    /// Messages routed to another shard.
    routed_cross_shard_total: "counter";
    /// Messages stored in mailboxes here.
    stored_total: "counter";
    /// Duplicate sends absorbed by dedup.
    dedup_hits_total: "counter";
    /// Deliver frames sent.
    delivered_total: "counter";
    /// Receipts stored.
    receipts_total: "counter";
    /// Mailbox entries acknowledged.
    acked_total: "counter";
    /// Mailbox entries pruned by the per-device cap.
    pruned_total: "counter";
    /// Mailbox entries expired by TTL.
    expired_total: "counter";
    /// Entries queued in this shard's mailboxes.
    mailbox_depth: "gauge";
    /// Records appended to the log.
    log_appends_total: "counter";
    /// Group commits (each one fdatasync per touched segment).
    log_commits_total: "counter";
    /// Bytes written to the log.
    log_bytes_total: "counter";
    /// 1 when the log is poisoned (an fsync failed) and writes are refused.
    log_poisoned: "gauge";
    /// Log segments deleted.
    segments_deleted_total: "counter";
    /// Log segments compacted.
    segments_compacted_total: "counter";
    /// Mesh messages sent to other shards.
    mesh_sent_total: "counter";
    /// Mesh messages waiting because a peer channel was full (all peers; per peer in
    /// switchboard_mesh_backlog_msgs).
    mesh_backlog: "gauge";
    /// Requests and hand-offs refused because the backlog to their peer held
    /// mesh_backlog_msgs_max messages (the originating connection is closed with Overloaded).
    mesh_backlog_refused_total: "counter";
    /// Replies and other follow-ups dropped because the backlog to their peer held twice
    /// mesh_backlog_msgs_max messages.
    mesh_backlog_dropped_total: "counter";
    /// Logins accepted.
    logins_total: "counter";
    /// Registrations completed.
    registrations_total: "counter";
    /// Push notifications requested.
    pushes_total: "counter";
    /// Prekey uploads accepted.
    prekey_uploads_total: "counter";
    /// Prekey uploads refused (bad signature, over the cap, invalid key).
    prekey_uploads_refused_total: "counter";
    /// Prekey bundles fetched.
    prekey_fetches_total: "counter";
    /// One-time prekeys handed out (each exactly once).
    prekeys_consumed_total: "counter";
    /// Bundles handed out without a one-time prekey (the owner ran out).
    prekey_bundles_without_one_time_total: "counter";
    /// Prekey fetches refused by the per-requester rate limit.
    prekey_fetches_rate_limited_total: "counter";
    /// One-time prekeys stored on this shard.
    prekeys_stored: "gauge";
    /// Messages the sender dedup window remembers (at most dedup_window_entries).
    dedup_entries: "gauge";
    /// Mailbox entries whose content is held in memory (as of the last tick); the rest are
    /// read back from the log when delivered.
    mailbox_hot_entries: "gauge";
    /// Mailbox records read back from the log.
    mailbox_records_read_total: "counter";
    /// Mailbox record reads that failed (IO error or a record that is not the entry's; the
    /// entry stays queued and is read again on a later tick).
    mailbox_record_read_failures_total: "counter";
    /// Batches of mailbox record reads outstanding (at most record_reads_inflight_max).
    mailbox_record_reads_inflight: "gauge";
    /// Compactions abandoned because a record read failed (retried on a later tick).
    compactions_abandoned_total: "counter";
    /// Companion devices linked to accounts homed on this shard.
    devices_linked: "gauge";
    /// Devices linked (LinkApprove completed, durable).
    device_links_total: "counter";
    /// Devices removed (Unlink, durable).
    device_unlinks_total: "counter";
    /// LinkApprove refused (not primary, bad signature, device limit, bad code, storage).
    device_links_refused_total: "counter";
    /// Link codes issued (LinkRequest).
    link_codes_issued_total: "counter";
    /// Link codes this shard keeps (at most link_codes_max).
    link_codes: "gauge";
    /// Device lists sent for DeviceListFetch.
    device_list_fetches_total: "counter";
    /// SendMulti refused because its device set was not the current list.
    sends_stale_total: "counter";
    /// SendMulti accepted for routing (sender side).
    sends_multi_total: "counter";
    /// Device-list watchers forgotten because the list had device_list_watchers_max already
    /// (they learn of changes at their next send, from a STALE refusal).
    device_list_watchers_evicted_total: "counter";
    /// Presence subscriptions held for users homed on this shard.
    presence_subscriptions: "gauge";
    /// PresenceSubscribe refused at presence_subscriptions_per_conn_max.
    presence_subscription_limit_total: "counter";
    /// PresenceSubscribe refused at presence_subscribers_per_user_max.
    presence_subscriber_limit_total: "counter";
    /// Presence subscriptions that expired (TTL).
    presence_subscriptions_expired_total: "counter";
    /// Presence changes (login, last disconnect, settings change) of users with subscribers.
    presence_changes_total: "counter";
    /// Presence frames sent for changes (one per subscriber whose view changed).
    presence_change_frames_total: "counter";
    /// Typing notices relayed to at least one device.
    presence_typing_relayed_total: "counter";
    /// Typing notices refused at typing_per_device_per_s.
    presence_typing_rate_limited_total: "counter";
    /// ContactsEdit refused at contacts_per_user_max / blocked_per_user_max.
    presence_contact_limit_total: "counter";
    /// LastSeen batch records written (one per tick with disconnects at most per 1024 users).
    presence_last_seen_records_total: "counter";
    /// Messages, receipts and typing notices dropped because the recipient blocked the sender.
    presence_blocked_drops_total: "counter";
    /// Calls held on this shard (ringing or answered).
    call_active: "gauge";
    /// Call offers that rang.
    call_offers_total: "counter";
    /// Calls answered.
    call_answered_total: "counter";
    /// Rings that timed out into missed calls.
    call_missed_total: "counter";
    /// Offers answered busy by the server (the callee was in another call).
    call_busy_total: "counter";
    /// Offers refused at calls_max.
    call_limit_total: "counter";
    /// TURN credentials issued.
    turn_credentials_total: "counter";
    /// TURN requests refused at turn_requests_per_user_per_minute.
    turn_rate_limited_total: "counter";
    /// TURN requests refused because no turn_secret is configured.
    turn_unavailable_total: "counter";
    /// Groups homed on this shard.
    group_groups: "gauge";
    /// Groups created (durable).
    group_created_total: "counter";
    /// Group changes recorded (membership, admins, settings, blobs).
    group_changes_total: "counter";
    /// Group messages accepted (one upload each, durable on the group's home).
    group_messages_total: "counter";
    /// Group fan-outs pending on this shard as home (at most group_fanouts_pending_max).
    group_fanouts_pending: "gauge";
    /// Fan-out messages sent to destination shards (one per destination per message).
    group_fanouts_sent_total: "counter";
    /// Fan-out messages sent again (restart, destination restart, group_fanout_retry_ms).
    group_fanouts_redriven_total: "counter";
    /// GroupCreate / ADD refused at group_members_max (GroupFull).
    group_refused_full_total: "counter";
    /// GroupSend refused at group_fanouts_pending_max (GroupBacklog).
    group_refused_backlog_total: "counter";
    /// Fan-outs stored on this shard as destination (one log record each).
    group_copies_stored_total: "counter";
    /// Per-device mailbox entries those made.
    group_copy_entries_total: "counter";
    /// Fan-outs dropped as already stored (re-drives).
    group_copies_duplicate_total: "counter";
    /// Users refused a membership at groups_per_user_max (on their home shard).
    group_joins_refused_total: "counter";
    /// Fan-outs dropped because they overtook an earlier one not applied yet (sent again).
    group_copies_out_of_order_total: "counter";
    /// Aggregated GroupReceipt frames sent to senders (pushed per tick, or fetched).
    group_receipts_sent_total: "counter";
    /// SMS/push side effects dropped because the provider queue was full.
    side_effects_dropped_total: "counter";
    /// Media upload slots granted (MediaSlot sent).
    media_slots_granted_total: "counter";
    /// Bytes of media upload slots granted.
    media_slot_bytes_granted_total: "counter";
    /// Media slot requests refused (MediaTooLarge, MediaQuotaExceeded, MediaRateLimited,
    /// MediaUnavailable; by code in switchboard_errors_total).
    media_slots_refused_total: "counter";
    /// Media download URLs granted (MediaDownload sent).
    media_downloads_granted_total: "counter";
    /// Status posts published (durable).
    status_published_total: "counter";
    /// Status posts deleted early by their poster.
    status_deleted_total: "counter";
    /// Status posts expired (status_ttl_s).
    status_expired_total: "counter";
    /// Live status posts homed on this shard (at most status_posts_per_user_max per user).
    status_posts: "gauge";
}

impl ShardMetrics {
    /// Counts one error code.
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|&c| c == code) {
            if let Some(c) = self.errors.get(i) {
                c.fetch_add(1, Relaxed);
            }
        }
    }

    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Sets a gauge.
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }
}

/// Process-wide metrics of the admin endpoint (written by the admin thread only).
#[derive(Debug, Default)]
pub struct AdminMetrics {
    /// Connections open.
    pub connections: AtomicU64,
    /// Connections refused past `admin_connections_max`.
    pub refused_total: AtomicU64,
    /// Connections closed by `admin_request_timeout_ms`.
    pub timeouts_total: AtomicU64,
}

/// Why the media endpoint refused a request (the `reason` label of
/// `switchboard_media_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum MediaRefusal {
    /// Token malformed or its MAC does not verify (401).
    BadToken,
    /// Token expired (403).
    Expired,
    /// Download token on the upload path or the other way round (403).
    WrongOp,
    /// Second upload to a completed slot, or a concurrent one (409).
    AlreadyUploaded,
    /// Content-Length (or a range) past the slot's size, refused before the body (413).
    Oversize,
    /// Body length not the slot's size (400), or no Content-Length (411).
    SizeMismatch,
    /// SHA-256 of the body not the slot's (422).
    HashMismatch,
    /// A resumed PUT that does not start at the server's offset (409).
    OffsetMismatch,
    /// Range not satisfiable (416).
    Range,
    /// No such blob (404), or an unknown path or method.
    NotFound,
    /// The filesystem is full (507).
    DiskFull,
    /// Other IO failure (500).
    Io,
    /// The body stopped arriving (broken connection or media_idle_timeout_ms).
    Incomplete,
    /// media_connections_max connections were open (closed at accept).
    Connections,
    /// The blob belongs to a status post whose audience does not include the user (403).
    NotAudience,
}

impl MediaRefusal {
    /// Every reason, in label order.
    pub const ALL: [MediaRefusal; 15] = [
        MediaRefusal::BadToken,
        MediaRefusal::Expired,
        MediaRefusal::WrongOp,
        MediaRefusal::AlreadyUploaded,
        MediaRefusal::Oversize,
        MediaRefusal::SizeMismatch,
        MediaRefusal::HashMismatch,
        MediaRefusal::OffsetMismatch,
        MediaRefusal::Range,
        MediaRefusal::NotFound,
        MediaRefusal::DiskFull,
        MediaRefusal::Io,
        MediaRefusal::Incomplete,
        MediaRefusal::Connections,
        MediaRefusal::NotAudience,
    ];

    /// The label value (also sent in the `Media-Error` response header).
    pub fn name(self) -> &'static str {
        match self {
            MediaRefusal::BadToken => "bad_token",
            MediaRefusal::Expired => "expired",
            MediaRefusal::WrongOp => "wrong_op",
            MediaRefusal::AlreadyUploaded => "already_uploaded",
            MediaRefusal::Oversize => "oversize",
            MediaRefusal::SizeMismatch => "size_mismatch",
            MediaRefusal::HashMismatch => "hash_mismatch",
            MediaRefusal::OffsetMismatch => "offset_mismatch",
            MediaRefusal::Range => "range_not_satisfiable",
            MediaRefusal::NotFound => "not_found",
            MediaRefusal::DiskFull => "disk_full",
            MediaRefusal::Io => "io_error",
            MediaRefusal::Incomplete => "incomplete",
            MediaRefusal::Connections => "connections",
            MediaRefusal::NotAudience => "not_audience",
        }
    }
}

/// Process-wide metrics of the media endpoint (written by the media thread only).
#[derive(Debug, Default)]
pub struct MediaMetrics {
    /// Complete blobs stored.
    pub blobs: AtomicU64,
    /// Bytes of complete blobs stored.
    pub bytes_stored: AtomicU64,
    /// Uploads completed (verified, durable).
    pub uploads_total: AtomicU64,
    /// Bytes received in PUT bodies.
    pub upload_bytes_total: AtomicU64,
    /// Time spent receiving PUT bodies, µs (upload throughput = bytes / this).
    pub upload_us_total: AtomicU64,
    /// GET requests answered with a body (200 or 206).
    pub downloads_total: AtomicU64,
    /// Bytes sent in GET bodies.
    pub download_bytes_total: AtomicU64,
    /// Blobs deleted by media_ttl_s.
    pub expired_total: AtomicU64,
    /// Bytes reclaimed by media_ttl_s.
    pub expired_bytes_total: AtomicU64,
    /// Connections open.
    pub connections: AtomicU64,
    /// Refusals by reason (indexed like [`MediaRefusal::ALL`]).
    pub refused: [AtomicU64; 15],
}

impl MediaMetrics {
    /// Counts one refusal.
    pub fn refused(&self, why: MediaRefusal) {
        if let Some(c) = self.refused.get(why as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Refusals of one reason so far.
    pub fn refused_count(&self, why: MediaRefusal) -> u64 {
        self.refused
            .get(why as usize)
            .map_or(0, |c| c.load(Relaxed))
    }
}

/// What a scrape reads.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    /// Every shard's metrics, indexed by shard.
    pub shards: &'a [Arc<ShardMetrics>],
    /// The admin endpoint's.
    pub admin: &'a AdminMetrics,
    /// The media endpoint's.
    pub media: &'a MediaMetrics,
}

/// How a family's samples are read.
#[derive(Clone, Copy)]
pub enum Samples {
    /// One sample per shard, `{shard="i"}`.
    PerShard(fn(&ShardMetrics) -> &AtomicU64),
    /// One unlabelled process-wide sample from the admin metrics.
    Admin(fn(&AdminMetrics) -> &AtomicU64),
    /// One unlabelled process-wide sample from the media metrics.
    Media(fn(&MediaMetrics) -> &AtomicU64),
    /// Written by a function (labels beyond `shard`, histograms, process metrics).
    Custom(fn(Sources<'_>, &str, &mut String)),
}

/// One exported metric family.
#[derive(Clone, Copy)]
pub struct Family {
    /// Full name.
    pub name: &'static str,
    /// `# HELP` text (doc comments of the field, for shard scalars).
    pub help: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Where its samples come from.
    pub samples: Samples,
}

impl Family {
    fn render(&self, src: Sources<'_>, out: &mut String) {
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}", self.help.trim());
        let _ = writeln!(out, "# TYPE {name} {}", self.kind);
        match self.samples {
            Samples::PerShard(get) => {
                for (i, m) in src.shards.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(m).load(Relaxed));
                }
            }
            Samples::Admin(get) => {
                let _ = writeln!(out, "{name} {}", get(src.admin).load(Relaxed));
            }
            Samples::Media(get) => {
                let _ = writeln!(out, "{name} {}", get(src.media).load(Relaxed));
            }
            Samples::Custom(f) => f(src, name, out),
        }
    }
}

/// Renders every family of [`FAMILIES`] in the Prometheus text format.
pub fn render(shards: &[Arc<ShardMetrics>], admin: &AdminMetrics, media: &MediaMetrics) -> String {
    let src = Sources {
        shards,
        admin,
        media,
    };
    let mut out = String::with_capacity(24 * 1024);
    for f in FAMILIES {
        f.render(src, &mut out);
    }
    out
}

fn media_upload_seconds(src: Sources<'_>, name: &str, out: &mut String) {
    let us = src.media.upload_us_total.load(Relaxed);
    let _ = writeln!(out, "{name} {}", us as f64 / 1e6);
}

fn media_refused(src: Sources<'_>, name: &str, out: &mut String) {
    for why in MediaRefusal::ALL {
        let n = src.media.refused_count(why);
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", why.name());
    }
}

fn build_info(_: Sources<'_>, name: &str, out: &mut String) {
    let _ = writeln!(out, "{name}{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
}

fn shard_count(src: Sources<'_>, name: &str, out: &mut String) {
    let _ = writeln!(out, "{name} {}", src.shards.len());
}

fn errors(src: Sources<'_>, name: &str, out: &mut String) {
    for (i, m) in src.shards.iter().enumerate() {
        for (code, c) in ErrorCode::ALL.iter().zip(&m.errors) {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",code=\"{}\"}} {}",
                code.name(),
                c.load(Relaxed)
            );
        }
    }
}

fn mesh_backlog_per_peer(src: Sources<'_>, name: &str, out: &mut String) {
    for (i, m) in src.shards.iter().enumerate() {
        for (peer, g) in m.mesh_backlog_peer.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",peer=\"{peer}\"}} {}",
                g.load(Relaxed)
            );
        }
    }
}

fn fsync_seconds(src: Sources<'_>, name: &str, out: &mut String) {
    for (i, m) in src.shards.iter().enumerate() {
        m.fsync_latency_us.render(out, name, i, 1e6);
    }
}

fn commit_batch_records(src: Sources<'_>, name: &str, out: &mut String) {
    for (i, m) in src.shards.iter().enumerate() {
        m.commit_batch_records.render(out, name, i, 1.0);
    }
}

/// A `Key:   value` line of /proc/self/status.
fn proc_status(key: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
}

fn resident_memory(_: Sources<'_>, name: &str, out: &mut String) {
    if let Some(v) = proc_status("VmRSS:") {
        let kb: u64 = v.trim_end_matches("kB").trim().parse().unwrap_or(0);
        let _ = writeln!(out, "{name} {}", kb * 1024);
    }
}

fn fd_table_size(_: Sources<'_>, name: &str, out: &mut String) {
    if let Some(v) = proc_status("FDSize:") {
        let _ = writeln!(out, "{name} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Arc::new(ShardMetrics::new(2));
        m.frames_in_total.fetch_add(3, Relaxed);
        m.fsync_latency_us.observe(700);
        m.fsync_latency_us.observe(5_000_000);
        m.error(ErrorCode::RateLimited);
        let text = render(&[m], &AdminMetrics::default(), &MediaMetrics::default());
        assert!(text.contains("switchboard_frames_in_total{shard=\"0\"} 3"));
        assert!(text.contains("switchboard_fsync_seconds_bucket{shard=\"0\",le=\"0.001\"} 1"));
        assert!(text.contains("switchboard_fsync_seconds_bucket{shard=\"0\",le=\"+Inf\"} 2"));
        assert!(text.contains("switchboard_errors_total{shard=\"0\",code=\"RateLimited\"} 1"));
    }
}
