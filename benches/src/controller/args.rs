//! The command line of `switchboard-flood` (a public interface: flags and defaults stay).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

use crate::phase::Dist;

/// `switchboard-flood`: connection and message load generator for Switchboard.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "switchboard-flood",
    version,
    about = "Connection and message load generator for Switchboard: the real protocol (Noise XX, registration, login), epoll workers, phases ramp/idle/messaging/storm/queue/restart/drain"
)]
pub struct Args {
    /// Server client address (ignored with --spawn-daemon).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub target: SocketAddr,
    /// Server admin address, for /metrics (ignored with --spawn-daemon).
    #[arg(long, default_value = "127.0.0.1:7301")]
    pub admin: SocketAddr,
    /// The daemon's data directory: registration codes are read from <data-dir>/sms/ (file SMS
    /// provider). With --spawn-daemon: the directory to run it in (default: a fresh temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Start this `switchboard` binary with --shards 1 --cpus 0, generous registration limits,
    /// and pin the generator to CPU 1: the standard measurement in one command.
    #[arg(long)]
    pub spawn_daemon: Option<PathBuf>,
    /// Extra flag for the spawned daemon (repeat), e.g. --daemon-arg=--rate-limit-frames-per-s=5000.
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
    /// Shards of the spawned daemon.
    #[arg(long, default_value_t = 1)]
    pub daemon_shards: usize,
    /// CPUs of the spawned daemon (its --cpus).
    #[arg(long, default_value = "0")]
    pub daemon_cpus: String,
    /// Pid of an already running daemon (memory and CPU readings from /proc).
    #[arg(long)]
    pub daemon_pid: Option<u32>,
    /// The `switchboard` binary, for `--print-config` in the report (default: --spawn-daemon).
    #[arg(long)]
    pub daemon_bin: Option<PathBuf>,
    /// Pin the generator (and its workers) to these CPUs (default with --spawn-daemon: 1).
    #[arg(long, value_delimiter = ',')]
    pub gen_cpus: Vec<usize>,
    /// Accounts in the run (connections = accounts × --devices).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Devices per account (1..=5): each account's primary registers, publishes its identity
    /// keys, and links devices − 1 companions (each its own connection); messaging then sends
    /// one `SendMulti` per message with a copy per device (phases queue/drain need 1).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Messaging: send `SendMulti` even with one device per account (one copy), for a
    /// like-for-like comparison with the multi-device path.
    #[arg(long)]
    pub send_multi: bool,
    /// Account setup: publish identity keys and prekeys with one device per account too (as
    /// --devices > 1 always does), so memory figures compare like for like.
    #[arg(long)]
    pub publish_keys: bool,
    /// Messaging in groups of this many accounts (2..=1024; 0: 1:1 messaging). The accounts
    /// are cut into consecutive groups; each group's first account creates it when messaging
    /// starts and is its only sender (`GroupSend`, window or open-loop rate per sender); every
    /// member device receives. The report's `group` object gives deliveries/s and the daemon
    /// CPU and log bytes per group message.
    #[arg(long, default_value_t = 0)]
    pub group_size: usize,
    /// Account setup: one-time prekeys each device uploads with its identity keys.
    #[arg(long, default_value_t = 10)]
    pub setup_prekeys: u32,
    /// Accounts cache file: read if present (skipping registration), written after provisioning.
    #[arg(long)]
    pub accounts: Option<PathBuf>,
    /// First phone number of provisioned accounts.
    #[arg(long, default_value_t = 15_550_000_000)]
    pub phone_base: u64,
    /// Phases in order: provision, ramp, idle, messaging, storm, queue, restart, drain.
    #[arg(long, value_delimiter = ',', default_value = "ramp,idle")]
    pub phases: Vec<String>,
    /// Ramp: new connections per second in all (0: as fast as possible).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Ramp: handshakes in progress at once, in all.
    #[arg(long, default_value_t = 1024)]
    pub max_pending: usize,
    /// Storm and drain reconnects: handshakes in progress at once (0: everything at once).
    #[arg(long, default_value_t = 0)]
    pub storm_max_pending: usize,
    /// Provision: registrations in flight at once.
    #[arg(long, default_value_t = 256)]
    pub provision_concurrency: usize,
    /// Idle: seconds to hold the connections.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Idle: seconds to let the daemon settle after the ramp before the first reading.
    #[arg(long, default_value_t = 3)]
    pub settle_seconds: u64,
    /// Ping interval in ms (0: the server's Welcome.keepalive_ms).
    #[arg(long, default_value_t = 0)]
    pub keepalive_ms: u64,
    /// Messaging: un-✓'d sends per connection (closed loop).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Messaging: payload bytes (at least 20: send times and sender are carried in it).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Messaging: recipients, `uniform` or `zipf:<s>`.
    #[arg(long, default_value = "uniform")]
    pub dist: Dist,
    /// Messaging: measured seconds (per run).
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Messaging: warm-up seconds before the measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Messaging: open loop at this many messages/s in all (instead of the closed loop).
    #[arg(long)]
    pub offered_rate: Option<f64>,
    /// Messaging: after the closed loop, open-loop runs at these fractions of its delivered rate.
    #[arg(long, value_delimiter = ',')]
    pub open_fractions: Vec<f64>,
    /// Open loop: a connection with this many un-✓'d sends skips a scheduled send (counted).
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
    /// Queue/drain: messages queued for offline users.
    #[arg(long, default_value_t = 100_000)]
    pub drain_messages: u64,
    /// Queue/drain: offline users (the last accounts; default half of --conns).
    #[arg(long)]
    pub drain_users: Option<usize>,
    /// Restart: `kill` (SIGKILL) or `term` (SIGTERM, graceful drain).
    #[arg(long, default_value = "kill")]
    pub restart_signal: String,
    /// Upper bound of each connection/queue/drain phase, seconds.
    #[arg(long, default_value_t = 120)]
    pub phase_timeout: u64,
    /// Worker processes (each holds its share of the connections; the fd limit is per process).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Source addresses: `none`, `auto` (127.0.0.2.. for a loopback target, one per 20,000
    /// connections), a range `127.0.0.2-127.0.0.50`, or a comma list.
    #[arg(long, default_value = "none")]
    pub source_ips: String,
    /// Give up an attempt (connect + handshake + login) after this many ms.
    #[arg(long, default_value_t = 15_000)]
    pub connect_timeout_ms: u64,
    /// Attempts per connection per phase.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    /// Stop everything after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Write parameters, daemon version/config and every figure here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Internal: run as worker `i/K` (commands on stdin, reports on stdout).
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        let a = Args::try_parse_from([
            "switchboard-flood",
            "--phases",
            "ramp,messaging",
            "--dist",
            "zipf:1.1",
            "--daemon-arg=--foo=1",
            "--devices",
            "4",
            "--send-multi",
            "--group-size",
            "1024",
        ])
        .unwrap();
        assert_eq!((a.devices, a.send_multi, a.setup_prekeys), (4, true, 10));
        assert_eq!(a.group_size, 1024);
        assert_eq!(a.phases, vec!["ramp", "messaging"]);
        assert_eq!(a.dist, Dist::Zipf(1.1));
        assert_eq!(a.daemon_args, vec!["--foo=1"]);
    }
}
