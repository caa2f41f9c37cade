//! `drain` (runs `queue` first if it did not run): connects the offline users at once and
//! counts deliveries. Figures: drain msgs/s until all are delivered; time until the mailboxes
//! are durably empty.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::controller::ctx::{cpu_json, cpu_line, cpu_now, lat_json, lat_line, metric, rate_per_s};
use crate::controller::{Ctx, Pool, SEC};
use crate::phase::{Cmd, Outcome};
use crate::sys::now_ns;

use super::{connect_all, per_worker};

/// Brings the offline users back and measures how fast their mailboxes drain.
pub(super) fn run(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    if ctx.queued.is_none() {
        super::queue::run(ctx, pool)?;
    }
    let (rlo, rhi, queued) = ctx.queued.take().context("nothing queued")?;
    // Make sure the senders are up (receipts go to them) but the recipients are not yet.
    let o = connect_all(
        ctx,
        pool,
        "senders",
        0,
        rlo,
        ctx.args.rate,
        ctx.args.max_pending,
    )?;
    let _ = o;
    let limit = ctx.phase_deadline(ctx.args.phase_timeout);
    let cmds = drain_cmds(ctx, rlo, rhi, limit);
    let depth0 = metric(ctx, "switchboard_mailbox_depth");
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("drain", cmds, limit)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.delivered);
    ctx.row("drain", "CPU", cpu_line(&cpu, "msg"));
    let secs = o.t_last_deliver_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let rate = rate_per_s(o.delivered, o.t_start_ns, o.t_last_deliver_ns);
    let rate_from_first = rate_per_s(o.delivered, o.t_first_deliver_ns, o.t_last_deliver_ns);
    let (s, lj) = lat_json(&o.hist_handshake);
    let (depth, emptied) = wait_until_empty(ctx, &o, depth0);
    let u = (rhi - rlo) as u64;
    ctx.report.insert(
        "drain".into(),
        json!({
            "queued_acked": queued, "offline_users": u, "delivered": o.delivered, "receipts": o.receipts,
            "logged_in": o.logged_in, "attempt_failures": o.attempt_failures, "errors": o.errors,
            "seconds_connect_to_last_delivery": secs, "drain_msgs_per_s": rate,
            "drain_msgs_per_s_from_first_delivery": rate_from_first,
            "mailbox_depth_before": depth0, "mailbox_depth_after": depth, "latency_connect_to_welcome": lj,
            "seconds_until_mailboxes_empty": emptied, "cpu": cpu,
        }),
    );
    ctx.row("drain", "offline drain", format!("{} of {queued} delivered to {u} users in {secs:.2} s: {rate:.0} msgs/s ({rate_from_first:.0}/s from first delivery)", o.delivered));
    ctx.row("drain", "connect → Welcome", lat_line(&s));
    Ok(())
}

/// One `Drain` per worker: connect the offline users `rlo..rhi` and expect the worker's share of
/// the `--drain-messages` queued for them (message `j` went to user `rlo + j % users`).
fn drain_cmds(ctx: &Ctx, rlo: usize, rhi: usize, limit: u64) -> Vec<Cmd> {
    let u = (rhi - rlo) as u64;
    let m = ctx.args.drain_messages;
    let count = |g: usize| -> u64 {
        let i = (g - rlo) as u64;
        m / u + u64::from(i < m % u)
    };
    let per = per_worker(ctx.args.storm_max_pending, ctx.k);
    ctx.ranges()
        .iter()
        .map(|&(lo, hi)| {
            let expected: u64 = (lo.max(rlo)..hi.min(rhi)).map(count).sum();
            Cmd::Drain {
                lo: rlo,
                hi: rhi,
                expected,
                max_pending: per,
                deadline_ns: limit,
            }
        })
        .collect()
}

/// Delivered is not yet gone: the recipients' acks become tombstones (and ✓✓ receipts for the
/// senders) through the log. Waits (bounded) until the mailboxes are durably empty; returns the
/// last depth read and, if they emptied, the seconds from the first connect until then. Adds
/// the table row.
fn wait_until_empty(ctx: &mut Ctx, o: &Outcome, depth0: Option<f64>) -> (Option<f64>, Option<f64>) {
    let target = depth0.map(|d| (d - o.delivered as f64).max(0.0));
    let wait_until = (now_ns() + 120 * SEC).min(ctx.deadline);
    let mut depth = metric(ctx, "switchboard_mailbox_depth");
    while let (Some(d), Some(t)) = (depth, target) {
        if d <= t || now_ns() > wait_until {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        depth = metric(ctx, "switchboard_mailbox_depth");
    }
    let emptied = match (depth, target) {
        (Some(d), Some(t)) if d <= t => Some(now_ns().saturating_sub(o.t_start_ns) as f64 / 1e9),
        _ => None,
    };
    ctx.row(
        "drain",
        "mailboxes durably empty",
        match emptied {
            Some(x) => format!(
                "{x:.2} s after the first connect ({:.0} msgs/s acked and tombstoned)",
                o.delivered as f64 / x
            ),
            None => format!("not within the wait (depth {depth:?})"),
        },
    );
    (depth, emptied)
}
