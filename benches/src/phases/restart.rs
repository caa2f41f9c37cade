//! `restart` (needs `--spawn-daemon`): stops the daemon with `--restart-signal` (`kill` or
//! `term`), restarts it on the same data directory and reads its `recovered … elapsed_ms` log
//! lines. Figures: replay ms, ms per million queued messages.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::controller::ctx::metric;
use crate::controller::Ctx;
use crate::daemon::Recovered;
use crate::sys::Signal;

/// Stops the daemon with `--restart-signal`, restarts it and reads its recovery lines.
pub(super) fn run(ctx: &mut Ctx) -> Result<()> {
    let sig = match ctx.args.restart_signal.as_str() {
        "kill" => Signal::KILL,
        "term" => Signal::TERM,
        other => bail!("--restart-signal {other:?}: kill or term"),
    };
    let depth = metric(ctx, "switchboard_mailbox_depth");
    let appends = metric(ctx, "switchboard_log_appends_total");
    let rss_before = ctx.daemon_rss_now();
    let (stop_t, start_t, new) = restart_daemon(ctx, sig)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = ctx.daemon_rss_now();
    let depth_after = metric(ctx, "switchboard_mailbox_depth");
    let replay_ms = new.iter().map(|r| r.elapsed_ms).max().unwrap_or(0);
    let records: u64 = new.iter().map(|r| r.records).sum();
    let queued = depth_after.or(depth).unwrap_or(0.0);
    let per_m = if queued > 0.0 {
        Some(replay_ms as f64 * 1e6 / queued)
    } else {
        None
    };
    let per_m_records = if records > 0 {
        Some(replay_ms as f64 * 1e6 / records as f64)
    } else {
        None
    };
    ctx.report.insert(
        "restart".into(),
        json!({
            "signal": ctx.args.restart_signal, "mailbox_depth_before": depth, "mailbox_depth_after": depth_after,
            "log_appends_total_before": appends,
            "stop_ms": stop_t.as_millis() as u64, "start_to_listening_ms": start_t.as_millis() as u64,
            "recovered": new, "replay_elapsed_ms": replay_ms, "records_replayed": records,
            "replay_ms_per_million_queued": per_m, "replay_ms_per_million_records": per_m_records,
            "daemon_rss_before": rss_before, "daemon_rss_after": rss_after,
        }),
    );
    ctx.row(
        "restart",
        &format!("SIG{} + restart", ctx.args.restart_signal.to_uppercase()),
        format!(
            "recovered {records} records in {replay_ms} ms (daemon log), listening after {} ms; {:.0} queued → {} ms per 1M queued",
            start_t.as_millis(),
            queued,
            per_m.map(|x| format!("{x:.0}")).unwrap_or("-".into())
        ),
    );
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        ctx.row(
            "restart",
            "daemon RSS",
            format!("{} MiB before, {} MiB after recovery", a >> 20, b >> 20),
        );
    }
    Ok(())
}

/// Stops the spawned daemon with `sig` and starts it again on the same data directory.
/// Returns the time to stop, the time until it listens again, and the recovery lines of
/// this start (one per shard).
fn restart_daemon(ctx: &mut Ctx, sig: Signal) -> Result<(Duration, Duration, Vec<Recovered>)> {
    let shards = ctx.args.daemon_shards.max(1);
    let d = ctx
        .daemon
        .as_mut()
        .context("the restart phase needs --spawn-daemon (the generator must own the process)")?;
    let seen = d.recovered().len();
    let stop_t = d
        .stop(sig, Duration::from_secs(120))
        .context("stopping the daemon")?;
    let start_t = d.start().context("restarting the daemon")?;
    let rec = d.wait_recovered(seen + shards, Duration::from_secs(30));
    let new: Vec<_> = rec.into_iter().skip(seen).collect();
    ctx.daemon_pid = d.pid();
    Ok((stop_t, start_t, new))
}
