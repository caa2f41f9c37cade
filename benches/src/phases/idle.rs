//! `idle`: holds every connection for `--idle-seconds`, pinging at the server's keepalive, and
//! reads daemon RSS, `/proc/net/sockstat`, `/proc/meminfo` Slab and `/proc/slabinfo` before the
//! ramp, after it and at the end. Figures: user, kernel and generator memory per connection.

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::controller::ctx::{cpu_json, cpu_line, cpu_now, mem_json, MemReading};
use crate::controller::{Ctx, Pool};
use crate::phase::{Cmd, Outcome};
use crate::sysmem::{self, KernelMem};

use super::ensure_connected;

/// Holds the connections and measures what they cost.
pub(super) fn run(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    ensure_connected(ctx, pool, "idle")?;
    std::thread::sleep(Duration::from_secs(ctx.args.settle_seconds));
    let after_ramp = ctx.read_mem(pool);
    let until = ctx.phase_deadline(ctx.args.idle_seconds);
    let cmds = (0..ctx.k).map(|_| Cmd::Hold { until_ns: until }).collect();
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("idle", cmds, until)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.pongs);
    let end = ctx.read_mem(pool);
    let base = ctx.baseline.clone().unwrap_or_default();
    let f = Figures::new(ctx, &base, &after_ramp, &end, o.ready_at_end.max(1));
    let v = report(ctx, &o, &cpu, [&base, &after_ramp, &end], &f);
    ctx.report.insert("idle".into(), v);
    rows(ctx, &o, &cpu, &f);
    Ok(())
}

/// Daemon RSS growth since the baseline (from `/proc`, else from the metrics page).
fn drss(base: &MemReading, m: &MemReading) -> i64 {
    let now = m.daemon.map(|d| d.rss).or(m.daemon_rss_metric).unwrap_or(0) as i64;
    let b = base
        .daemon
        .map(|d| d.rss)
        .or(base.daemon_rss_metric)
        .unwrap_or(0) as i64;
    now - b
}

/// Daemon anonymous RSS growth since the baseline.
fn danon(base: &MemReading, m: &MemReading) -> i64 {
    m.daemon
        .map(|d| d.rss_anon as i64 - base.daemon.map(|b| b.rss_anon).unwrap_or(0) as i64)
        .unwrap_or(0)
}

/// /proc inodes and dentries are created for every descriptor whenever any tool lists
/// /proc/<pid>/fd (on this box an external process scanner does, and the daemon's own
/// `process_open_fds` metric does on every scrape): a cost of inspecting the processes, not of
/// holding connections. They are measured and reported, and left out of the per-connection
/// figure.
fn proc_fd(base: &MemReading, m: &MemReading) -> i64 {
    let g = |c: &KernelMem, name: &str| {
        (
            c.caches.get(name).copied().unwrap_or(0) as i64,
            c.cache_objs.get(name).copied().unwrap_or(0) as i64,
        )
    };
    let (pb1, po1) = g(&m.kernel, "proc_inode_cache");
    let (pb0, po0) = g(&base.kernel, "proc_inode_cache");
    let (db, dobj) = g(&m.kernel, "dentry");
    let dentry_size = if dobj > 0 { db / dobj } else { 192 };
    (pb1 - pb0) + (po1 - po0).max(0) * dentry_size
}

/// Kernel growth since the baseline: (slab, tcp mem, slab − /proc fd inodes + tcp mem).
fn kern(base: &MemReading, m: &MemReading) -> (i64, i64, i64) {
    let slab = m.kernel.slab as i64 - base.kernel.slab as i64;
    let tcp = m.kernel.tcp_mem_bytes as i64 - base.kernel.tcp_mem_bytes as i64;
    (slab, tcp, slab - proc_fd(base, m) + tcp)
}

/// The idle phase's memory figures.
struct Figures {
    drss_end: i64,
    drss_after_ramp: i64,
    slab: i64,
    tcp: i64,
    proc_fd_bytes: i64,
    user_per: f64,
    anon_per: f64,
    k_per_pair: f64,
    client_per: f64,
    conns: u64,
    top: Vec<(String, i64, i64)>,
    loopback: bool,
}

impl Figures {
    fn new(
        ctx: &Ctx,
        base: &MemReading,
        after_ramp: &MemReading,
        end: &MemReading,
        conns: u64,
    ) -> Self {
        let (slab, tcp, ktotal) = kern(base, end);
        Figures {
            drss_end: drss(base, end),
            drss_after_ramp: drss(base, after_ramp),
            slab,
            tcp,
            proc_fd_bytes: proc_fd(base, end),
            user_per: drss(base, end) as f64 / conns as f64,
            anon_per: danon(base, end) as f64 / conns as f64,
            k_per_pair: ktotal as f64 / conns as f64,
            client_per: (end.workers.rss as i64 - ctx.worker_baseline.rss as i64) as f64
                / conns as f64,
            conns,
            top: sysmem::top_cache_growth(&base.kernel, &end.kernel, 12),
            loopback: ctx.target.ip().is_loopback(),
        }
    }
}

/// The `idle` object of the report. `mem` is the baseline, after-ramp and end readings.
fn report(ctx: &Ctx, o: &Outcome, cpu: &Value, mem: [&MemReading; 3], f: &Figures) -> Value {
    let [base, after_ramp, end] = mem;
    let (slab, tcp, k_per_pair) = (f.slab, f.tcp, f.k_per_pair);
    json!({
        "connections_held": o.ready_at_end, "seconds": ctx.args.idle_seconds, "cpu_per_pong": cpu,
        "pings": o.pings, "pongs": o.pongs, "disconnects": o.disconnects, "goaways": o.goaways, "errors": o.errors,
        "baseline": mem_json(base), "after_ramp": mem_json(after_ramp), "end": mem_json(end),
        "daemon_rss_delta_bytes": f.drss_end, "daemon_rss_per_conn_bytes": f.user_per,
        "daemon_rss_anon_per_conn_bytes": f.anon_per,
        "daemon_rss_per_conn_after_ramp_bytes": f.drss_after_ramp as f64 / f.conns as f64,
        "kernel_slab_delta_bytes": slab, "kernel_tcp_mem_delta_bytes": tcp,
        "kernel_proc_fd_inodes_excluded_bytes": f.proc_fd_bytes,
        "kernel_per_conn_both_ends_including_proc_fd_bytes": (slab + tcp) as f64 / f.conns as f64,
        "kernel_per_conn_both_ends_bytes": k_per_pair,
        "kernel_per_conn_server_end_bytes": if f.loopback { k_per_pair / 2.0 } else { k_per_pair },
        "kernel_both_ends_on_this_host": f.loopback,
        "slab_growth_top": f.top.iter().map(|(n, b, o)| json!({"cache": n, "bytes": b, "objects": o})).collect::<Vec<_>>(),
        "client_rss_per_conn_bytes": f.client_per,
    })
}

/// The idle phase's rows of the table.
fn rows(ctx: &mut Ctx, o: &Outcome, cpu: &Value, f: &Figures) {
    ctx.row(
        "idle",
        "connections held",
        format!(
            "{} for {} s ({} pings, {} pongs, {} lost)",
            o.ready_at_end, ctx.args.idle_seconds, o.pings, o.pongs, o.disconnects
        ),
    );
    ctx.row(
        "idle",
        "daemon RSS / conn",
        format!(
            "{:.0} B (anon {:.0} B); Δ {} MiB",
            f.user_per,
            f.anon_per,
            f.drss_end / (1 << 20)
        ),
    );
    if f.loopback {
        ctx.row(
            "idle",
            "kernel / conn",
            format!(
                "{:.0} B both ends (slab Δ {} MiB − /proc fd inodes {} MiB + tcp mem Δ {} KiB); server end ≈ {:.0} B",
                f.k_per_pair,
                f.slab >> 20,
                f.proc_fd_bytes >> 20,
                f.tcp >> 10,
                f.k_per_pair / 2.0
            ),
        );
    } else {
        ctx.row(
            "idle",
            "kernel / conn",
            format!("{:.0} B (slab + tcp mem)", f.k_per_pair),
        );
    }
    ctx.row(
        "idle",
        "generator RSS / conn",
        format!("{:.0} B", f.client_per),
    );
    ctx.row("idle", "CPU while idle", cpu_line(cpu, "ping"));
}
