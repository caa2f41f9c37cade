//! The phases of a run, one module each, in the manner of a load tool's scenario files (see
//! `benches/README.md` for what each does and measures). Each module is the controller's side of
//! its phase: the commands it sends the workers, how it waits, and the figures it puts in the
//! table and the JSON report (a public interface: keys and meanings stay). The workers' side
//! of the same steps is in [`crate::engine`].

mod drain;
mod idle;
mod messaging;
pub(crate) mod provision;
mod queue;
mod ramp;
mod restart;
mod storm;

use anyhow::Result;
use serde_json::json;

use crate::controller::{Ctx, Pool};
use crate::phase::{Cmd, Outcome};

/// Every phase `--phases` accepts, in the order the README lists them.
pub(crate) const PHASES: [&str; 8] = [
    "provision",
    "ramp",
    "idle",
    "messaging",
    "storm",
    "queue",
    "restart",
    "drain",
];

/// Runs phase `name` (one of [`PHASES`]; `provision` runs before the workers start, so it is a
/// no-op here).
pub(crate) fn run(name: &str, ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    match name {
        "ramp" => ramp::run(ctx, pool),
        "idle" => idle::run(ctx, pool),
        "messaging" => messaging::run(ctx, pool),
        "storm" => storm::run(ctx, pool),
        "queue" => queue::run(ctx, pool),
        "restart" => restart::run(ctx),
        "drain" => drain::run(ctx, pool),
        _ => Ok(()),
    }
}

/// One worker's share of a limit on handshakes in progress (0: no limit).
fn per_worker(max_pending: usize, k: usize) -> usize {
    if max_pending == 0 {
        0
    } else {
        (max_pending / k).max(1)
    }
}

/// Asks every worker to log in its accounts of `lo..hi` (`rate`/s and `max_pending` in all,
/// split evenly) and waits, bounded by `--phase-timeout`.
pub(crate) fn connect_all(
    ctx: &mut Ctx,
    pool: &mut Pool,
    name: &str,
    lo: usize,
    hi: usize,
    rate: f64,
    max_pending: usize,
) -> Result<Outcome> {
    let k = ctx.k as f64;
    let limit = ctx.phase_deadline(ctx.args.phase_timeout);
    let per_rate = if rate > 0.0 { rate / k } else { 0.0 };
    let per_pending = per_worker(max_pending, ctx.k);
    let cmds = (0..ctx.k)
        .map(|_| Cmd::Connect {
            lo,
            hi,
            rate: per_rate,
            max_pending: per_pending,
            deadline_ns: limit,
        })
        .collect();
    pool.call(name, cmds, limit)
}

/// Makes sure every account is logged in (reconnecting the missing ones), recording it if any
/// were missing.
pub(crate) fn ensure_connected(ctx: &mut Ctx, pool: &mut Pool, why: &str) -> Result<()> {
    let o = connect_all(
        ctx,
        pool,
        "reconnect",
        0,
        ctx.n,
        ctx.args.rate,
        ctx.args.max_pending,
    )?;
    if o.logged_in > 0 || o.gave_up > 0 {
        let v = json!({"before": why, "logged_in": o.logged_in, "gave_up": o.gave_up, "fail_reasons": o.fail_reasons});
        if let Some(a) = ctx
            .report
            .entry("reconnects")
            .or_insert_with(|| json!([]))
            .as_array_mut()
        {
            a.push(v);
        }
    }
    if o.ready_at_end < ctx.n as u64 {
        ctx.notes.push(format!(
            "before {why}: only {} of {} connections logged in",
            o.ready_at_end, ctx.n
        ));
    }
    Ok(())
}
