//! `messaging`: 1:1 messages among all connections, recipients `--dist`, `--payload` bytes,
//! recipients ack every delivery. A closed loop with `--window` un-✓'d sends per connection
//! (finds the peak), then open-loop runs at `--open-fractions` of that peak; or only an open
//! loop at `--offered-rate`. Figures: delivered/s and ✓/s in the window, latencies, daemon
//! cores, commits/s, records per commit, fsync ms.

use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use serde_json::{json, Value};

use crate::controller::ctx::{lat_json, lat_line};
use crate::controller::{Ctx, Pool, SEC};
use crate::daemon;
use crate::phase::{Cmd, MsgParams, Outcome};
use crate::stats::LatSummary;
use crate::sys::now_ns;
use crate::sysmem;

use super::ensure_connected;

/// The closed loop and the open-loop runs (or the one `--offered-rate` run).
pub(super) fn run(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    let mut runs = Vec::new();
    if let Some(r) = ctx.args.offered_rate {
        let (v, _) = msg_run(ctx, pool, "open-loop", Some(r))?;
        runs.push(v);
    } else {
        let (v, peak) = msg_run(ctx, pool, "closed", None)?;
        runs.push(v);
        for f in ctx.args.open_fractions.clone() {
            let r = (peak * f).max(1.0);
            let (v, _) = msg_run(ctx, pool, &format!("open@{f}"), Some(r))?;
            runs.push(v);
        }
    }
    ctx.report.insert("messaging".into(), json!(runs));
    Ok(())
}

/// One run: closed loop (`offered` is `None`) or open loop at `offered` msgs/s. Returns its
/// report object and its delivered rate.
fn msg_run(
    ctx: &mut Ctx,
    pool: &mut Pool,
    label: &str,
    offered: Option<f64>,
) -> Result<(Value, f64)> {
    ensure_connected(ctx, pool, label)?;
    let start = now_ns() + 300 * 1_000_000;
    let from = start + ctx.args.warmup * SEC;
    let to = from + ctx.args.duration * SEC;
    ensure!(
        to <= ctx.deadline,
        "{label}: not enough time left under --max-seconds"
    );
    let p = MsgParams {
        start_ns: start,
        measure_from_ns: from,
        measure_to_ns: to,
        grace_ns: 10 * SEC,
        window: ctx.args.window,
        payload: ctx.args.payload,
        dist: ctx.args.dist,
        offered_rate: offered,
        // With several devices per account only the primaries send.
        senders_total: if ctx.devices > 1 { ctx.users } else { ctx.n },
        max_inflight: ctx.args.max_inflight,
    };
    let cmds = (0..ctx.k).map(|_| Cmd::Message(p.clone())).collect();
    let sampler = spawn_sampler(ctx, pool, from, to);
    let o = pool.call(label, cmds, to + 15 * SEC)?;
    let (a, b) = sampler
        .join()
        .map_err(|_| anyhow!("{label}: sampler thread panicked"))?;
    let w = Window::new(&o, ctx.args.duration as f64, a, b);
    let v = report(ctx, &o, offered, &w);
    rows(ctx, &o, offered, &w);
    Ok((v, w.delivered_rate))
}

/// Daemon CPU seconds (if its pid is known), generator CPU seconds, the metrics page.
type Sample = (Option<f64>, f64, Option<String>);

/// Daemon CPU and counters over the measurement window `from..to`, sampled from a helper
/// thread at both ends.
fn spawn_sampler(ctx: &Ctx, pool: &Pool, from: u64, to: u64) -> JoinHandle<(Sample, Sample)> {
    let pid = ctx.daemon_pid;
    let admin = ctx.admin;
    let gen_pids = pool.pids.clone();
    std::thread::spawn(move || {
        let wait_until = |t: u64| {
            while now_ns() < t {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let read = || {
            let d = pid.and_then(sysmem::proc_cpu_secs);
            let mut g = 0.0;
            let mut seen = Vec::new();
            for &p in &gen_pids {
                if !seen.contains(&p) {
                    seen.push(p);
                    g += sysmem::proc_cpu_secs(p).unwrap_or(0.0);
                }
            }
            (d, g, daemon::metrics(admin).ok())
        };
        wait_until(from);
        let a = read();
        wait_until(to);
        let b = read();
        (a, b)
    })
}

/// `sum / count` of a Prometheus summary or histogram, when both moved.
fn avg(sum: Option<f64>, count: Option<f64>) -> Option<f64> {
    match (sum, count) {
        (Some(s), Some(c)) if c > 0.0 => Some(s / c),
        _ => None,
    }
}

/// The figures of one run's measurement window.
struct Window {
    secs: f64,
    delivered_rate: f64,
    acked_rate: f64,
    /// Latency summaries and their JSON: send → ✓, send → Deliver, generator lag, actual
    /// send → ✓; and the JSON of actual send → Deliver.
    lat: [(LatSummary, Value); 4],
    lat_deliver_from_write: Value,
    daemon_cores: Option<f64>,
    gen_cores: f64,
    commits: Option<f64>,
    appends: Option<f64>,
    log_bytes: Option<f64>,
    /// fdatasync seconds per commit.
    fsync_avg: Option<f64>,
    /// Records per commit.
    batch_avg: Option<f64>,
    cores_per_m: Option<f64>,
}

impl Window {
    fn new(o: &Outcome, secs: f64, a: Sample, b: Sample) -> Self {
        let ((d0, g0, m0), (d1, g1, m1)) = (a, b);
        let delivered_rate = o.delivered_in_window as f64 / secs;
        let daemon_cores = match (d0, d1) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        };
        let counter = |name: &str| -> Option<f64> {
            let a = daemon::metric_sum(m0.as_deref()?, name)?;
            let b = daemon::metric_sum(m1.as_deref()?, name)?;
            Some(b - a)
        };
        Window {
            secs,
            delivered_rate,
            acked_rate: o.acked_in_window as f64 / secs,
            lat: [
                lat_json(&o.hist_ack),
                lat_json(&o.hist_deliver),
                lat_json(&o.hist_send_lag),
                lat_json(&o.hist_ack_from_write),
            ],
            lat_deliver_from_write: lat_json(&o.hist_deliver_from_write).1,
            daemon_cores,
            gen_cores: (g1 - g0) / secs,
            commits: counter("switchboard_log_commits_total"),
            appends: counter("switchboard_log_appends_total"),
            log_bytes: counter("switchboard_log_bytes_total"),
            fsync_avg: avg(
                counter("switchboard_fsync_seconds_sum"),
                counter("switchboard_fsync_seconds_count"),
            ),
            batch_avg: avg(
                counter("switchboard_commit_batch_records_sum"),
                counter("switchboard_commit_batch_records_count"),
            ),
            cores_per_m: daemon_cores
                .filter(|_| delivered_rate > 0.0)
                .map(|c| c / (delivered_rate / 1e6)),
        }
    }
}

/// One run's object in the report's `messaging` array.
fn report(ctx: &Ctx, o: &Outcome, offered: Option<f64>, w: &Window) -> Value {
    let secs = w.secs;
    let [(_, ja), (_, jd), (_, jl), (_, jaw)] = &w.lat;
    json!({
        "mode": if offered.is_some() { "open_loop" } else { "closed_loop" },
        "offered_rate_per_s": offered, "window": ctx.args.window, "payload_bytes": ctx.args.payload,
        "dist": format!("{:?}", ctx.args.dist), "connections": ctx.n, "measured_seconds": secs, "warmup_seconds": ctx.args.warmup,
        "sent": o.sent, "acked": o.acked, "acked_in_window": o.acked_in_window, "delivered": o.delivered,
        "delivered_in_window": o.delivered_in_window, "receipts": o.receipts, "skipped_sends": o.skipped_sends,
        "inflight_left": o.inflight_left, "disconnects": o.disconnects, "errors": o.errors, "fail_reasons": o.fail_reasons,
        "delivered_per_s": w.delivered_rate, "acked_per_s": w.acked_rate,
        "latency_send_to_serverack": ja, "latency_send_to_deliver": jd,
        "generator_send_lag": jl,
        "latency_actual_send_to_serverack": jaw, "latency_actual_send_to_deliver": w.lat_deliver_from_write,
        "daemon_cpu_cores": w.daemon_cores, "generator_cpu_cores": w.gen_cores,
        "daemon_cores_per_million_msgs_per_s": w.cores_per_m,
        "log_commits_per_s": w.commits.map(|c| c / secs), "log_appends_per_s": w.appends.map(|c| c / secs),
        "avg_fsync_ms": w.fsync_avg.map(|x| x * 1e3),
        "avg_commit_batch_records": w.batch_avg,
        "log_bytes_per_s": w.log_bytes.map(|c| c / secs),
        "multi_device": multi_json(ctx, o, w),
        "group": group_json(ctx, o, w),
    })
}

/// The group figures of one run (`--group-size`): per group message (one ✓), the member
/// deliveries, the daemon's CPU and the log bytes; `null` without groups.
fn group_json(ctx: &Ctx, o: &Outcome, w: &Window) -> Value {
    let size = ctx.args.group_size;
    if size == 0 {
        return Value::Null;
    }
    let per_msg = |x: Option<f64>| x.filter(|_| w.acked_rate > 0.0).map(|x| x / w.acked_rate);
    json!({
        "group_size": size, "groups": ctx.users.div_ceil(size), "groups_created": o.groups_created,
        "group_events_delivered": o.group_events,
        "group_messages_acked_per_s": w.acked_rate,
        "member_deliveries_per_s": w.delivered_rate,
        "deliveries_per_group_message": per_msg(Some(w.delivered_rate)),
        "daemon_cpu_us_per_group_message": per_msg(w.daemon_cores.map(|c| c * 1e6)),
        "daemon_cpu_us_per_delivery": w.daemon_cores
            .filter(|_| w.delivered_rate > 0.0)
            .map(|c| c * 1e6 / w.delivered_rate),
        "log_bytes_per_group_message": per_msg(w.log_bytes.map(|b| b / w.secs)),
    })
}

/// The multi-device figures of one run (the `multi_device` object of its report).
fn multi_json(ctx: &Ctx, o: &Outcome, w: &Window) -> Value {
    let secs = w.secs;
    json!({
        "devices_per_account": ctx.devices, "accounts": ctx.users,
        "send_frame": if ctx.devices > 1 || ctx.args.send_multi { "SendMulti" } else { "Send" },
        "sends_acked_per_s": w.acked_rate,
        "deliveries_per_device_per_s": w.delivered_rate,
        "recipient_deliveries_per_s": (o.delivered_in_window - o.delivered_sync_in_window) as f64 / secs,
        "sync_deliveries_per_s": o.delivered_sync_in_window as f64 / secs,
        "delivered_sync": o.delivered_sync, "device_lists": o.device_lists,
        "wire_bytes_per_send": (o.sent > 0).then(|| o.send_wire_bytes as f64 / o.sent as f64),
        "wire_overhead_bytes_per_send": (o.sent > 0).then(|| {
            let copies = (ctx.devices * 2 - 1) as f64;
            let copies = if ctx.devices > 1 { copies } else { 1.0 };
            o.send_wire_bytes as f64 / o.sent as f64 - copies * ctx.args.payload.max(20) as f64
        }),
    })
}

/// One run's rows of the table.
fn rows(ctx: &mut Ctx, o: &Outcome, offered: Option<f64>, w: &Window) {
    let what = match offered {
        Some(r) => format!("open loop @ {r:.0}/s"),
        None => format!("closed loop, window {}", ctx.args.window),
    };
    ctx.row(
        "messaging",
        &what,
        format!(
            "delivered {:.0} msgs/s, ✓ {:.0}/s ({} conns, {} B, {:?})",
            w.delivered_rate, w.acked_rate, ctx.n, ctx.args.payload, ctx.args.dist
        ),
    );
    if ctx.devices > 1 || ctx.args.send_multi {
        let secs = w.secs;
        let sync = o.delivered_sync_in_window as f64 / secs;
        let bytes = if o.sent > 0 {
            o.send_wire_bytes as f64 / o.sent as f64
        } else {
            0.0
        };
        ctx.row(
            "messaging",
            "  multi-device",
            format!(
                "{} devices/account, SendMulti: {:.0} sends ✓/s; {:.0} per-device deliveries/s ({:.0} recipient + {:.0} sync); {:.0} wire bytes per send",
                ctx.devices,
                w.acked_rate,
                w.delivered_rate,
                w.delivered_rate - sync,
                sync,
                bytes
            ),
        );
    }
    if ctx.args.group_size > 0 && w.acked_rate > 0.0 {
        let dash = || "-".to_owned();
        let per = |x: f64| x / w.acked_rate;
        ctx.row(
            "messaging",
            "  groups",
            format!(
                "{} groups of {}: {:.0} group messages ✓/s, {:.0} member deliveries/s ({:.1} per message); per group message: daemon {} µs CPU, {} log bytes",
                ctx.users.div_ceil(ctx.args.group_size),
                ctx.args.group_size,
                w.acked_rate,
                w.delivered_rate,
                per(w.delivered_rate),
                w.daemon_cores.map(|c| format!("{:.0}", per(c * 1e6))).unwrap_or_else(dash),
                w.log_bytes.map(|b| format!("{:.0}", per(b / w.secs))).unwrap_or_else(dash),
            ),
        );
    }
    let [(sa, _), (sd, _), (sl, _), (saw, _)] = &w.lat;
    ctx.row("messaging", "  send → ✓", lat_line(sa));
    ctx.row("messaging", "  send → Deliver", lat_line(sd));
    if offered.is_some() {
        ctx.row("messaging", "  generator lag", lat_line(sl));
        ctx.row("messaging", "  actual send → ✓", lat_line(saw));
    }
    if let Some(c) = w.daemon_cores {
        let dash = || "-".to_owned();
        ctx.row(
            "messaging",
            "  daemon CPU",
            format!(
                "{c:.2} cores ({} per 1M msgs/s); generator {:.2} cores; {} commits/s, {} recs/commit, fsync {} ms",
                w.cores_per_m.map(|x| format!("{x:.1}")).unwrap_or_else(dash),
                w.gen_cores,
                w.commits.map(|c| format!("{:.0}", c / w.secs)).unwrap_or_else(dash),
                w.batch_avg.map(|x| format!("{x:.1}")).unwrap_or_else(dash),
                w.fsync_avg.map(|x| format!("{:.2}", x * 1e3)).unwrap_or_else(dash),
            ),
        );
    }
    if o.skipped_sends > 0 || !o.errors.is_empty() || o.disconnects > 0 {
        ctx.row(
            "messaging",
            "  trouble",
            format!(
                "{} skipped sends, {} disconnects, errors {:?}",
                o.skipped_sends, o.disconnects, o.errors
            ),
        );
    }
}
