//! What the phases share ([`Ctx`]) and the measurement helpers they use: memory and CPU
//! readings, rates, latency summaries, the final table.

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::daemon::{self, Daemon};
use crate::stats::{fmt_us, Lat, LatSummary};
use crate::sys::now_ns;
use crate::sysmem::{self, KernelMem, ProcMem};

use super::{Args, Pool, SEC};

/// One memory reading of everything involved.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct MemReading {
    pub(crate) daemon: Option<ProcMem>,
    /// From the metrics page when the pid is unknown.
    pub(crate) daemon_rss_metric: Option<u64>,
    pub(crate) workers: ProcMem,
    pub(crate) kernel: KernelMem,
}

/// What the phases share: parameters, the daemon, the report being written.
pub(crate) struct Ctx {
    /// The command line.
    pub(crate) args: Args,
    /// The daemon this run started (`--spawn-daemon`).
    pub(crate) daemon: Option<Daemon>,
    /// Client address of the daemon.
    pub(crate) target: SocketAddr,
    /// Admin address (`/metrics`).
    pub(crate) admin: SocketAddr,
    /// Its pid, when known (memory and CPU from `/proc`).
    pub(crate) daemon_pid: Option<u32>,
    /// Connections in the run (accounts × devices).
    pub(crate) n: usize,
    /// Accounts in the run.
    pub(crate) users: usize,
    /// Devices (connections) per account.
    pub(crate) devices: usize,
    /// Workers.
    pub(crate) k: usize,
    /// The JSON report, filled phase by phase.
    pub(crate) report: Map<String, Value>,
    /// Rows of the final table: (phase, figure, value).
    pub(crate) table: Vec<(String, String, String)>,
    /// `--max-seconds` as a monotonic time.
    pub(crate) deadline: u64,
    /// Memory before the ramp.
    pub(crate) baseline: Option<MemReading>,
    /// The workers' memory before the ramp.
    pub(crate) worker_baseline: ProcMem,
    /// What the queue phase left for the drain phase: (first offline, end, ✓'d).
    pub(crate) queued: Option<(usize, usize, u64)>,
    /// Notes printed under the table and put in the report.
    pub(crate) notes: Vec<String>,
}

impl Ctx {
    pub(crate) fn daemon_rss_now(&self) -> Option<u64> {
        match self.daemon_pid {
            Some(p) => sysmem::proc_mem(p).map(|m| m.rss),
            None => daemon::metrics(self.admin)
                .ok()
                .and_then(|m| daemon::metric_sum(&m, "process_resident_memory_bytes"))
                .map(|v| v as u64),
        }
    }

    pub(crate) fn read_mem(&self, pool: &Pool) -> MemReading {
        let mut w = ProcMem::default();
        let mut seen = Vec::new();
        for &p in &pool.pids {
            if seen.contains(&p) {
                continue;
            }
            seen.push(p);
            if let Some(m) = sysmem::proc_mem(p) {
                w.rss += m.rss;
                w.rss_anon += m.rss_anon;
                w.fd_table += m.fd_table;
            }
        }
        MemReading {
            daemon: self.daemon_pid.and_then(sysmem::proc_mem),
            daemon_rss_metric: if self.daemon_pid.is_none() {
                self.daemon_rss_now()
            } else {
                None
            },
            workers: w,
            kernel: sysmem::kernel_mem(),
        }
    }

    pub(crate) fn metrics(&self) -> Option<String> {
        daemon::metrics(self.admin).ok()
    }

    pub(crate) fn row(&mut self, phase: &str, what: &str, value: String) {
        self.table.push((phase.to_owned(), what.to_owned(), value));
    }

    pub(crate) fn phase_deadline(&self, secs: u64) -> u64 {
        (now_ns() + secs * SEC).min(self.deadline)
    }

    /// Each worker's global slots: whole accounts, `devices` slots each.
    pub(crate) fn ranges(&self) -> Vec<(usize, usize)> {
        let (u, d, k) = (self.users, self.devices, self.k);
        (0..k)
            .map(|i| (i * u / k * d, (i + 1) * u / k * d))
            .collect()
    }

    /// Whether account setup publishes identity keys (and links companions).
    pub(crate) fn publishes_keys(&self) -> bool {
        self.devices > 1 || self.args.publish_keys
    }
}

pub(crate) fn rate_per_s(count: u64, from_ns: u64, to_ns: u64) -> f64 {
    let secs = to_ns.saturating_sub(from_ns) as f64 / 1e9;
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

pub(crate) fn lat_json(hexs: &str) -> (LatSummary, Value) {
    let s = Lat::from_hex(hexs).summary();
    (s, serde_json::to_value(s).unwrap_or(Value::Null))
}

pub(crate) fn lat_line(s: &LatSummary) -> String {
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_us(s.p50_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us),
        fmt_us(s.max_us),
        s.count
    )
}

/// One memory reading as JSON.
pub(crate) fn mem_json(m: &MemReading) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}

/// A metric summed over shards from the admin page, if the page and the metric are there.
pub(crate) fn metric(ctx: &Ctx, name: &str) -> Option<f64> {
    ctx.metrics().and_then(|m| daemon::metric_sum(&m, name))
}

/// CPU seconds used so far by the daemon (if its pid is known) and by the generator's workers.
pub(crate) fn cpu_now(ctx: &Ctx, pool: &Pool) -> (Option<f64>, f64) {
    (
        ctx.daemon_pid.and_then(sysmem::proc_cpu_secs),
        workers_cpu(pool).unwrap_or(0.0),
    )
}

/// CPU used between two [`cpu_now`] readings: seconds, and µs per completed unit (handshake,
/// message).
pub(crate) fn cpu_json(a: (Option<f64>, f64), b: (Option<f64>, f64), units: u64) -> Value {
    let d = match (a.0, b.0) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let g = b.1 - a.1;
    let per = |s: f64| (units > 0).then(|| s * 1e6 / units as f64);
    json!({
        "daemon_cpu_seconds": d, "generator_cpu_seconds": g,
        "daemon_cpu_us_per_unit": d.and_then(per), "generator_cpu_us_per_unit": per(g),
    })
}

pub(crate) fn cpu_line(v: &Value, unit: &str) -> String {
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
    format!(
        "daemon {} CPU-s ({} µs/{unit}), generator {:.2} CPU-s ({} µs/{unit})",
        f("daemon_cpu_seconds")
            .map(|x| format!("{x:.2}"))
            .unwrap_or("-".into()),
        f("daemon_cpu_us_per_unit")
            .map(|x| format!("{x:.0}"))
            .unwrap_or("-".into()),
        f("generator_cpu_seconds").unwrap_or(0.0),
        f("generator_cpu_us_per_unit")
            .map(|x| format!("{x:.0}"))
            .unwrap_or("-".into()),
    )
}

pub(crate) fn workers_cpu(pool: &Pool) -> Option<f64> {
    let mut seen = Vec::new();
    let mut t = 0.0;
    for &p in &pool.pids {
        if !seen.contains(&p) {
            seen.push(p);
            t += sysmem::proc_cpu_secs(p)?;
        }
    }
    Some(t)
}

/// Prints the table of every figure, then the notes.
pub(crate) fn print_table(ctx: &Ctx) {
    let w0 = ctx
        .table
        .iter()
        .map(|r| r.0.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let w1 = ctx
        .table
        .iter()
        .map(|r| r.1.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    println!();
    println!(
        "switchboard-flood: {} connections, {} worker(s), target {}{}",
        ctx.n,
        ctx.k,
        ctx.target,
        ctx.report
            .get("daemon")
            .and_then(|d| d.get("version"))
            .and_then(|v| v.as_str())
            .map(|v| format!(", daemon {v}"))
            .unwrap_or_default()
    );
    println!("{:<w0$}  {:<w1$}  value", "phase", "figure");
    println!("{}  {}  {}", "-".repeat(w0), "-".repeat(w1), "-".repeat(40));
    for (a, b, c) in &ctx.table {
        let pad0 = w0.saturating_sub(a.chars().count());
        let pad1 = w1.saturating_sub(b.chars().count());
        println!("{a}{}  {b}{}  {c}", " ".repeat(pad0), " ".repeat(pad1));
    }
    for n in &ctx.notes {
        println!("note: {n}");
    }
}
