//! `storm`: closes every connection at once and reconnects them all at once (at most
//! `--storm-max-pending` handshakes in flight). Figure: time until all are logged in again.

use anyhow::Result;
use serde_json::json;

use crate::controller::ctx::{cpu_json, cpu_line, cpu_now, lat_json, lat_line, rate_per_s};
use crate::controller::{Ctx, Pool};
use crate::phase::Cmd;

use super::{ensure_connected, per_worker};

/// Closes every connection at once and reconnects them all.
pub(super) fn run(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    ensure_connected(ctx, pool, "storm")?;
    let limit = ctx.phase_deadline(ctx.args.phase_timeout);
    let per = per_worker(ctx.args.storm_max_pending, ctx.k);
    let cmds = (0..ctx.k)
        .map(|_| Cmd::Storm {
            max_pending: per,
            deadline_ns: limit,
        })
        .collect();
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("storm", cmds, limit)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.logged_in);
    let secs = o.t_last_ok_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let (s, lj) = lat_json(&o.hist_handshake);
    ctx.row("storm", "CPU", cpu_line(&cpu, "login"));
    ctx.report.insert(
        "storm".into(),
        json!({
            "cpu": cpu,
            "connections": ctx.n, "logged_in_again": o.logged_in, "ready_at_end": o.ready_at_end,
            "seconds_until_all_logged_in": secs, "attempt_failures": o.attempt_failures, "gave_up": o.gave_up,
            "fail_reasons": o.fail_reasons, "errors": o.errors, "latency_connect_to_welcome": lj,
            "logins_per_s": rate_per_s(o.logged_in, o.t_start_ns, o.t_last_ok_ns),
        }),
    );
    ctx.row(
        "storm",
        "reconnect storm",
        format!(
            "{} of {} back in {:.2} s ({} failed attempts, {} gave up)",
            o.logged_in, ctx.n, secs, o.attempt_failures, o.gave_up
        ),
    );
    ctx.row("storm", "connect → Welcome", lat_line(&s));
    Ok(())
}
