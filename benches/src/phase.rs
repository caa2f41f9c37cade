//! What the controller and its workers say to each other: one [`Cmd`] per phase step, answered
//! by [`Report`]s. Between processes they travel as JSON lines (commands on the worker's stdin,
//! reports on its stdout); in-process they go through channels unchanged.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::accounts::Account;
use crate::stats::Lat;
use crate::sysmem::ProcMem;

/// Everything a worker needs to know, sent once at start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// This worker's index.
    pub index: usize,
    /// Number of workers.
    pub workers: usize,
    /// Server address.
    pub target: SocketAddr,
    /// Source addresses to bind, chosen by global account index (empty: let the kernel pick).
    pub source_ips: Vec<IpAddr>,
    /// Phone numbers of every account in the run (recipients may live in other workers).
    pub phones: Vec<u64>,
    /// Global index of this worker's first account.
    pub base: usize,
    /// This worker's accounts (keys), `base..base + len`.
    pub accounts: Vec<Account>,
    /// Makes `client_msg_id`s unique across runs against the same data directory (the server's
    /// dedup window survives restarts).
    pub run_id: u32,
    /// Ping interval; 0 uses the server's `Welcome.keepalive_ms`.
    pub keepalive_ms: u64,
    /// Give up on a handshake + login that takes longer than this.
    pub connect_timeout_ms: u64,
    /// Attempts per connection within one phase before giving up on it.
    pub max_attempts: u32,
    /// The daemon's data directory (registration codes from the file SMS provider).
    pub data_dir: Option<PathBuf>,
    /// Absolute `CLOCK_MONOTONIC` time after which the worker stops by itself.
    pub hard_deadline_ns: u64,
    /// Connections (devices) per account: account `u` of the run owns the global slots
    /// `u * devices .. (u + 1) * devices`, the primary first, then its companions in the order
    /// of [`Account::companions`]. `phones` has one entry per slot.
    #[serde(default = "one")]
    pub devices: usize,
    /// The device id of every global slot (empty: all 0, one device per account).
    #[serde(default)]
    pub slot_devices: Vec<u16>,
    /// Messaging sends `SendMulti` (one copy per recipient device, sync copies for the
    /// sender's other devices) instead of the legacy `Send` to device 0.
    #[serde(default)]
    pub multi: bool,
    /// Messaging in groups of this many accounts (0: 1:1 messaging). The accounts are cut into
    /// consecutive groups; each group's first account creates it (`GroupCreate`) when messaging
    /// starts and is its only sender (`GroupSend`); every member device receives.
    #[serde(default)]
    pub group_size: usize,
    /// Link step: one-time prekeys each device uploads with its identity keys.
    #[serde(default)]
    pub setup_prekeys: u32,
}

fn one() -> usize {
    1
}

/// How recipients are drawn in the messaging phase.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub enum Dist {
    /// Every other connected account equally likely.
    Uniform,
    /// Zipf with exponent `s` over account index (index 0 is the hottest).
    Zipf(f64),
}

impl std::str::FromStr for Dist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "uniform" {
            return Ok(Dist::Uniform);
        }
        if let Some(x) = s.strip_prefix("zipf:") {
            let e: f64 = x.parse().map_err(|_| format!("bad zipf exponent {x:?}"))?;
            if e.is_finite() && e > 0.0 {
                return Ok(Dist::Zipf(e));
            }
        }
        Err(format!(
            "{s:?}: expected uniform or zipf:<exponent>, e.g. zipf:1.1"
        ))
    }
}

/// The messaging phase.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MsgParams {
    /// When sending starts (absolute monotonic ns, the same for all workers).
    pub start_ns: u64,
    /// Measurement window start (after warm-up).
    pub measure_from_ns: u64,
    /// Measurement window end; sending stops here.
    pub measure_to_ns: u64,
    /// After sending stops, wait at most this long for outstanding acks and deliveries.
    pub grace_ns: u64,
    /// Closed loop: most un-✓'d sends per connection.
    pub window: usize,
    /// Payload bytes (at least 20: scheduled and actual send time and sender are carried in it).
    pub payload: usize,
    /// Recipient distribution.
    pub dist: Dist,
    /// Open loop: total offered messages/s across all connections of all workers.
    pub offered_rate: Option<f64>,
    /// Connections sending across all workers (sets the per-connection schedule).
    pub senders_total: usize,
    /// Open loop: a connection with this many un-✓'d sends skips its slot (counted).
    pub max_inflight: usize,
}

/// The queue step of the drain phase: online senders fill offline recipients' mailboxes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueParams {
    /// Senders: global indexes `senders.0..senders.1`.
    pub senders: (usize, usize),
    /// Recipients (offline): global indexes `rcpts.0..rcpts.1`.
    pub rcpts: (usize, usize),
    /// Messages in all; message `j` goes from sender `j % S` to recipient `j % R`.
    pub messages: u64,
    /// Most un-✓'d sends per sender.
    pub window: usize,
    /// Payload bytes.
    pub payload: usize,
    /// Give up at this monotonic time.
    pub deadline_ns: u64,
}

/// One step, executed by every worker on its own accounts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Cmd {
    /// First message to a worker process.
    Init(Box<WorkerSpec>),
    /// Register every local account (RegisterRequest → code file → RegisterVerify).
    Provision {
        /// Registrations in flight at once.
        concurrency: usize,
        /// Give up at this monotonic time.
        deadline_ns: u64,
    },
    /// Multi-device setup of every local account: the primary logs in and publishes its
    /// identity keys (`PrekeyUpload`); then each companion not linked yet, one at a time per
    /// account, connects, asks for a code (`LinkRequest` → `LinkCode`), the primary approves it
    /// (`LinkApprove` with `sign_device`) → `DeviceLinked`, the companion gets `Registered`, logs
    /// in and publishes its own keys. Every connection is closed at the end.
    Link {
        /// Companion handshakes in flight at once.
        concurrency: usize,
        /// Give up at this monotonic time.
        deadline_ns: u64,
    },
    /// Connect, handshake and log in every local account in `lo..hi` that is not logged in.
    Connect {
        /// Global range start.
        lo: usize,
        /// Global range end.
        hi: usize,
        /// New connections per second from this worker (0: no pacing).
        rate: f64,
        /// Handshakes in progress at once (0: no limit).
        max_pending: usize,
        /// Give up at this monotonic time.
        deadline_ns: u64,
    },
    /// Close local connections in `lo..hi`.
    Disconnect {
        /// Global range start.
        lo: usize,
        /// Global range end.
        hi: usize,
    },
    /// Close every local connection at once, then reconnect them all.
    Storm {
        /// Handshakes in progress at once (0: no limit).
        max_pending: usize,
        /// Give up at this monotonic time.
        deadline_ns: u64,
    },
    /// Keep every connection (pinging at keepalive) until this monotonic time.
    Hold {
        /// End of the hold.
        until_ns: u64,
    },
    /// 1:1 messaging between connected accounts.
    Message(MsgParams),
    /// Fill offline mailboxes.
    Queue(QueueParams),
    /// Connect `lo..hi` and count deliveries until `expected` arrived on this worker.
    Drain {
        /// Global range start.
        lo: usize,
        /// Global range end.
        hi: usize,
        /// Deliveries this worker's accounts in range should receive.
        expected: u64,
        /// Handshakes in progress at once (0: no limit).
        max_pending: usize,
        /// Give up at this monotonic time.
        deadline_ns: u64,
    },
    /// Stop the worker.
    Shutdown,
}

/// A worker's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Report {
    /// The worker is up (process id).
    Ready {
        /// Its pid.
        pid: u32,
    },
    /// Progress of the current step.
    Progress {
        /// Units done.
        done: u64,
        /// Units expected.
        total: u64,
    },
    /// The step finished (or hit its deadline).
    Done(Box<Outcome>),
    /// The worker cannot go on.
    Fatal(String),
}

/// Counters and histograms of one step on one worker; [`Outcome::merge`] adds workers up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Connection attempts started.
    pub connects_started: u64,
    /// Logins completed (`Welcome`).
    pub logged_in: u64,
    /// Registrations completed (`Registered`).
    pub registered: u64,
    /// Link step: companions linked, logged in and with their keys published.
    #[serde(default)]
    pub linked: u64,
    /// Link step: `PrekeyUpload`s answered `UPLOADED`.
    #[serde(default)]
    pub keys_uploaded: u64,
    /// Link step: (global slot, device id the server assigned) of every companion linked.
    #[serde(default)]
    pub linked_devices: Vec<(usize, u16)>,
    /// Attempts that failed (refused, reset, timeout, server error); retried while allowed.
    pub attempt_failures: u64,
    /// Connections given up after `max_attempts`.
    pub gave_up: u64,
    /// Logged-in connections that the server closed or lost during the step.
    pub disconnects: u64,
    /// `Send` frames written.
    pub sent: u64,
    /// `ServerAck` (✓) received.
    pub acked: u64,
    /// ✓ received inside the measurement window.
    pub acked_in_window: u64,
    /// `Deliver` received.
    pub delivered: u64,
    /// `Deliver` received inside the measurement window.
    pub delivered_in_window: u64,
    /// Of `delivered`: sync copies (sent by another device of the receiving account).
    #[serde(default)]
    pub delivered_sync: u64,
    /// Of `delivered_in_window`: sync copies.
    #[serde(default)]
    pub delivered_sync_in_window: u64,
    /// Sealed bytes written for the `Send` / `SendMulti` frames (length prefix and tag
    /// included), over `sent` frames.
    #[serde(default)]
    pub send_wire_bytes: u64,
    /// `DeviceList` frames received.
    #[serde(default)]
    pub device_lists: u64,
    /// `Receipt` received.
    pub receipts: u64,
    /// Groups created (`GroupInfo` answers to this run's `GroupCreate`s).
    #[serde(default)]
    pub groups_created: u64,
    /// Group membership events delivered (`Deliver` with `msg_type` `GROUP_EVENT`; not counted
    /// in `delivered`).
    #[serde(default)]
    pub group_events: u64,
    /// Pings sent.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// `GoAway` received.
    pub goaways: u64,
    /// Open-loop send slots skipped (connection down or too many un-✓'d sends).
    pub skipped_sends: u64,
    /// Sends still without ✓ at the end.
    pub inflight_left: u64,
    /// Logged-in connections at the end.
    pub ready_at_end: u64,
    /// `Error` frames by code name.
    pub errors: BTreeMap<String, u64>,
    /// Failed attempts by reason.
    pub fail_reasons: BTreeMap<String, u64>,
    /// Step start (monotonic ns).
    pub t_start_ns: u64,
    /// First login/registration completed.
    pub t_first_ok_ns: u64,
    /// Last login/registration completed.
    pub t_last_ok_ns: u64,
    /// First delivery.
    pub t_first_deliver_ns: u64,
    /// Last delivery.
    pub t_last_deliver_ns: u64,
    /// Step end.
    pub t_end_ns: u64,
    /// Connect → `Welcome` latency (hex HdrHistogram).
    pub hist_handshake: String,
    /// Send (scheduled) time → ✓ latency.
    pub hist_ack: String,
    /// Send (scheduled) time → `Deliver` latency.
    pub hist_deliver: String,
    /// Open loop: how late the generator sent each message after its scheduled time (shows
    /// whether the generator kept its schedule).
    pub hist_send_lag: String,
    /// Actual send time → ✓ (excludes the generator's own lag; equals `hist_ack` in closed loop).
    pub hist_ack_from_write: String,
    /// Actual send time → `Deliver`.
    pub hist_deliver_from_write: String,
    /// The worker's own memory at the end of the step.
    pub worker_mem: ProcMem,
    /// Workers merged into this outcome.
    pub workers: u32,
    /// The server static key seen in handshakes (hex), if any.
    pub server_key: String,
}

fn min_nz(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

impl Outcome {
    /// Adds `o` (another worker's outcome of the same step) into `self`.
    pub fn merge(&mut self, o: &Outcome) {
        self.connects_started += o.connects_started;
        self.logged_in += o.logged_in;
        self.registered += o.registered;
        self.linked += o.linked;
        self.keys_uploaded += o.keys_uploaded;
        self.linked_devices.extend_from_slice(&o.linked_devices);
        self.delivered_sync += o.delivered_sync;
        self.delivered_sync_in_window += o.delivered_sync_in_window;
        self.send_wire_bytes += o.send_wire_bytes;
        self.device_lists += o.device_lists;
        self.attempt_failures += o.attempt_failures;
        self.gave_up += o.gave_up;
        self.disconnects += o.disconnects;
        self.sent += o.sent;
        self.acked += o.acked;
        self.acked_in_window += o.acked_in_window;
        self.delivered += o.delivered;
        self.delivered_in_window += o.delivered_in_window;
        self.receipts += o.receipts;
        self.groups_created += o.groups_created;
        self.group_events += o.group_events;
        self.pings += o.pings;
        self.pongs += o.pongs;
        self.goaways += o.goaways;
        self.skipped_sends += o.skipped_sends;
        self.inflight_left += o.inflight_left;
        self.ready_at_end += o.ready_at_end;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.fail_reasons {
            *self.fail_reasons.entry(k.clone()).or_default() += v;
        }
        self.t_start_ns = min_nz(self.t_start_ns, o.t_start_ns);
        self.t_first_ok_ns = min_nz(self.t_first_ok_ns, o.t_first_ok_ns);
        self.t_last_ok_ns = self.t_last_ok_ns.max(o.t_last_ok_ns);
        self.t_first_deliver_ns = min_nz(self.t_first_deliver_ns, o.t_first_deliver_ns);
        self.t_last_deliver_ns = self.t_last_deliver_ns.max(o.t_last_deliver_ns);
        self.t_end_ns = self.t_end_ns.max(o.t_end_ns);
        for (mine, theirs) in [
            (&mut self.hist_handshake, &o.hist_handshake),
            (&mut self.hist_ack, &o.hist_ack),
            (&mut self.hist_deliver, &o.hist_deliver),
            (&mut self.hist_send_lag, &o.hist_send_lag),
            (&mut self.hist_ack_from_write, &o.hist_ack_from_write),
            (
                &mut self.hist_deliver_from_write,
                &o.hist_deliver_from_write,
            ),
        ] {
            let mut h = Lat::from_hex(mine);
            h.merge(&Lat::from_hex(theirs));
            *mine = h.to_hex();
        }
        self.worker_mem.rss += o.worker_mem.rss;
        self.worker_mem.rss_anon += o.worker_mem.rss_anon;
        self.worker_mem.fd_table += o.worker_mem.fd_table;
        self.workers += o.workers.max(1);
        if self.server_key.is_empty() {
            self.server_key = o.server_key.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_parses_and_commands_round_trip() {
        assert_eq!("uniform".parse::<Dist>(), Ok(Dist::Uniform));
        assert_eq!("zipf:1.1".parse::<Dist>(), Ok(Dist::Zipf(1.1)));
        assert!("zipf:x".parse::<Dist>().is_err());
        let c = Cmd::Connect {
            lo: 1,
            hi: 2,
            rate: 3.0,
            max_pending: 4,
            deadline_ns: 5,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(matches!(
            serde_json::from_str::<Cmd>(&s).unwrap(),
            Cmd::Connect { hi: 2, .. }
        ));
    }

    #[test]
    fn outcomes_merge() {
        let mut a = Outcome {
            logged_in: 2,
            t_start_ns: 10,
            t_last_ok_ns: 50,
            ..Default::default()
        };
        let b = Outcome {
            logged_in: 3,
            t_start_ns: 5,
            t_last_ok_ns: 40,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!((a.logged_in, a.t_start_ns, a.t_last_ok_ns), (5, 5, 50));
    }
}
