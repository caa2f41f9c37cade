//! `ramp`: opens every connection at `--rate`/s (at most `--max-pending` handshakes in
//! flight), handshake + login. Figures: logins/s, connect → Welcome latency, failures, CPU per
//! login.

use anyhow::Result;
use serde_json::json;

use crate::controller::ctx::{cpu_json, cpu_line, cpu_now, lat_json, lat_line, rate_per_s};
use crate::controller::{Ctx, Pool};

use super::connect_all;

/// Opens every connection at `--rate`/s: handshake + login.
pub(super) fn run(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    let c0 = cpu_now(ctx, pool);
    let o = connect_all(
        ctx,
        pool,
        "ramp",
        0,
        ctx.n,
        ctx.args.rate,
        ctx.args.max_pending,
    )?;
    let secs = o.t_last_ok_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let hs = rate_per_s(o.logged_in, o.t_start_ns, o.t_last_ok_ns);
    let (s, lj) = lat_json(&o.hist_handshake);
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.logged_in);
    ctx.report.insert(
        "ramp".into(),
        json!({
            "target_connections": ctx.n, "target_rate_per_s": ctx.args.rate, "max_pending": ctx.args.max_pending,
            "logged_in": o.logged_in, "ready_at_end": o.ready_at_end, "attempt_failures": o.attempt_failures,
            "gave_up": o.gave_up, "fail_reasons": o.fail_reasons, "errors": o.errors,
            "seconds_to_last_login": secs, "handshakes_per_s": hs, "latency_connect_to_welcome": lj,
            "cpu": cpu,
        }),
    );
    ctx.row("ramp", "CPU", cpu_line(&cpu, "login"));
    ctx.row(
        "ramp",
        "logged in",
        format!(
            "{} of {} in {:.2} s, {} failed attempts, {} gave up",
            o.logged_in, ctx.n, secs, o.attempt_failures, o.gave_up
        ),
    );
    ctx.row(
        "ramp",
        "handshakes+logins/s",
        format!("{hs:.0} (target {})", ctx.args.rate),
    );
    ctx.row("ramp", "connect → Welcome", lat_line(&s));
    Ok(())
}
