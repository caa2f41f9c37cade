//! `switchboard-preflight`: reads the live host and reports how many persistent
//! connections a Switchboard gateway process can hold as configured, which
//! limit binds first, and every change needed to reach `--target`.
//!
//! Exit codes: 0 target reachable as configured; 1 not reachable (a factor
//! allows fewer connections than the target, or a hard requirement such as
//! io_uring fails); 2 error (host unreadable, bad arguments).

use std::process::ExitCode;

use clap::Parser;
use switchboard_tuning::capacity::{self, Params};

/// Capacity preflight for a Switchboard gateway box.
///
/// Exit status: 0 = target reachable as configured, 1 = not reachable,
/// 2 = error (host unreadable or invalid arguments).
#[derive(Debug, Parser)]
#[command(name = "switchboard-preflight", version)]
struct Args {
    /// Connections the box must hold.
    #[arg(long, default_value_t = capacity::DEFAULT_TARGET)]
    target: u64,
    /// File descriptors kept aside for listeners, log segments, rings, stdio.
    #[arg(long, default_value_t = capacity::DEFAULT_FD_RESERVE)]
    fd_reserve: u64,
    /// User-space bytes per connection (placeholder until measured).
    #[arg(long, default_value_t = capacity::DEFAULT_BYTES_PER_CONN_USER)]
    bytes_per_conn_user: u64,
    /// Kernel bytes per idle connection, excluding socket buffers (placeholder until measured).
    #[arg(long, default_value_t = capacity::DEFAULT_BYTES_PER_CONN_KERNEL)]
    bytes_per_conn_kernel: u64,
    /// Reconnect-storm arrival rate per box, connections per second.
    #[arg(long, default_value_t = capacity::DEFAULT_STORM_RATE)]
    storm_rate: u64,
    /// Longest time a shard may go without accepting, in milliseconds.
    #[arg(long, default_value_t = capacity::DEFAULT_ACCEPT_STALL_MS)]
    accept_stall_ms: u64,
    /// Shards (SO_REUSEPORT listeners); default: CPUs in this process's affinity mask.
    #[arg(long)]
    shards: Option<usize>,
    /// Backlog the gateway's listeners pass to listen(2) (glommio 0.9 TcpListener::bind uses 1024).
    #[arg(long, default_value_t = capacity::DEFAULT_LISTEN_BACKLOG)]
    listen_backlog: u64,
    /// Gateway client port (used in the conntrack bypass rules).
    #[arg(long, default_value_t = capacity::DEFAULT_LISTEN_PORT)]
    listen_port: u16,
    /// Print the full report as JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // --help / --version exit 0; real argument errors exit 2.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if args.target == 0 {
        eprintln!("switchboard-preflight: --target must be > 0");
        return ExitCode::from(2);
    }
    let params = Params {
        target: args.target,
        fd_reserve: args.fd_reserve,
        bytes_per_conn_user: args.bytes_per_conn_user,
        bytes_per_conn_kernel: args.bytes_per_conn_kernel,
        storm_rate: args.storm_rate,
        accept_stall_ms: args.accept_stall_ms,
        shards: args.shards,
        listen_backlog: args.listen_backlog,
        listen_port: args.listen_port,
    };
    let readings = match switchboard_tuning::read_host() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard-preflight: {e}");
            return ExitCode::from(2);
        }
    };
    let report = switchboard_tuning::evaluate(&readings, &params);
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("switchboard-preflight: cannot encode JSON: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", switchboard_tuning::render::render_text(&report));
    }
    ExitCode::from(report.exit_code() as u8)
}
