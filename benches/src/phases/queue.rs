//! `queue`: takes the last `--drain-users` accounts offline and sends `--drain-messages` to them
//! from the others (window `--window`). Figures: ✓/s while queueing, mailbox depth. Leaves
//! what it queued in `Ctx::queued` for `drain`.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::controller::ctx::{cpu_json, cpu_line, cpu_now, lat_json, lat_line, metric, rate_per_s};
use crate::controller::{Ctx, Pool};
use crate::phase::{Cmd, QueueParams};

use super::ensure_connected;

/// The offline users of the queue and drain phases: the last `--drain-users` accounts
/// (default half), as a range of account indices.
fn drain_split(ctx: &Ctx) -> (usize, usize) {
    let u = ctx
        .args
        .drain_users
        .unwrap_or(ctx.n / 2)
        .clamp(1, ctx.n.saturating_sub(1).max(1));
    (ctx.n - u, ctx.n)
}

/// Takes the offline users down and queues `--drain-messages` for them.
pub(super) fn run(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    ensure_connected(ctx, pool, "queue")?;
    let (rlo, rhi) = drain_split(ctx);
    let cmds = (0..ctx.k)
        .map(|_| Cmd::Disconnect { lo: rlo, hi: rhi })
        .collect();
    pool.call("offline", cmds, ctx.phase_deadline(30))?;
    let depth0 = metric(ctx, "switchboard_mailbox_depth");
    let limit = ctx.phase_deadline(ctx.args.phase_timeout);
    let q = QueueParams {
        senders: (0, rlo),
        rcpts: (rlo, rhi),
        messages: ctx.args.drain_messages,
        window: ctx.args.window,
        payload: ctx.args.payload,
        deadline_ns: limit,
    };
    let cmds = (0..ctx.k).map(|_| Cmd::Queue(q.clone())).collect();
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("queue", cmds, limit)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.acked);
    ctx.row("queue", "CPU", cpu_line(&cpu, "msg"));
    std::thread::sleep(Duration::from_millis(500));
    let depth = metric(ctx, "switchboard_mailbox_depth");
    let rate = rate_per_s(o.acked, o.t_start_ns, o.t_end_ns);
    let (s, lj) = lat_json(&o.hist_ack);
    ctx.report.insert(
        "queue".into(),
        json!({
            "messages_target": ctx.args.drain_messages, "offline_users": rhi - rlo, "senders": rlo,
            "sent": o.sent, "acked": o.acked, "errors": o.errors, "seconds": (o.t_end_ns - o.t_start_ns) as f64 / 1e9,
            "acked_per_s": rate, "mailbox_depth_before": depth0, "mailbox_depth_after": depth,
            "latency_send_to_serverack": lj, "disconnects": o.disconnects, "cpu": cpu,
        }),
    );
    ctx.row(
        "queue",
        "queued for offline",
        format!(
            "{} ✓ of {} to {} offline users at {rate:.0}/s (mailbox depth {})",
            o.acked,
            ctx.args.drain_messages,
            rhi - rlo,
            depth.map(|d| format!("{d:.0}")).unwrap_or("?".into())
        ),
    );
    ctx.row("queue", "send → ✓", lat_line(&s));
    if !o.errors.is_empty() {
        ctx.row("queue", "errors", format!("{:?}", o.errors));
    }
    ctx.queued = Some((rlo, rhi, o.acked));
    Ok(())
}
