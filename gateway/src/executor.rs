//! One shard's executor: recovery of its log, its context, and its tasks (mesh receivers, the
//! backlog flusher, group commit, the timer, the accept loop), then the drain at shutdown.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers};
use glommio::net::TcpStream;
use protocol::noise::StaticKeypair;
use protocol::{frame, ErrorCode, Frame};
use rand::rngs::OsRng;
use rand::RngCore as _;
use shards::{Event, Shard, ShardId};
use storage::log::{Log, LogConfig};

use crate::accept;
use crate::config::Config;
use crate::conn_task;
use crate::connection::ConnState;
use crate::ctx::{wall_ms, Ctx, CtxParts};
use crate::datadir;
use crate::mesh::{GatewayMsg, Handoff, MeshOut};
use crate::metrics::ShardMetrics;
use crate::sidecar::Sidecar;

/// The mesh as each executor receives it.
pub type Mesh = MeshBuilder<GatewayMsg, Full>;

/// Everything the process shares across shards (read-only or per-shard-written).
pub struct Shared {
    /// Read-only configuration.
    pub cfg: Arc<Config>,
    /// Server static key.
    pub key: Arc<StaticKeypair>,
    /// Every shard's metrics, indexed by shard.
    pub metrics: Arc<Vec<Arc<ShardMetrics>>>,
    /// The side-effect worker's queue.
    pub sidecar: Sidecar,
    /// Set by SIGTERM/SIGINT.
    pub drain: Arc<AtomicBool>,
}

/// The seed of a shard's random number generator, which draws the 6-digit registration codes.
///
/// It comes from the operating system's CSPRNG (`getrandom(2)` through [`OsRng`]), never from
/// the clock or the pid: a seed an attacker can guess (start time to the second, a small pid)
/// lets them recompute every code the shard sends and register any number. Each shard draws its
/// own. Failure to read the OS generator is an error (the shard refuses to start) rather than a
/// fallback to a guessable seed. Tests and the simulator pass their own seed to `Shard::new`.
pub fn shard_seed() -> Result<u64, rand::Error> {
    let mut b = [0u8; 8];
    OsRng.try_fill_bytes(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Runs shard `id` until the process drains.
pub async fn shard_main(id: ShardId, shared: Arc<Shared>, mesh: Mesh) -> Result<(), String> {
    let (ctx, receivers) = open_shard(id, &shared, mesh).await?;
    ctx.sync_stats();
    spawn_mesh_receivers(&ctx, receivers);
    spawn_flushers(&ctx);
    let committer = spawn_committer(&ctx);
    spawn_timer(&ctx, shared.drain.clone());
    if ctx.ring.is_some() {
        glommio::spawn_local(crate::uring::drive(ctx.clone())).detach();
    }
    let cfg = &ctx.cfg;
    let listener = accept::bind_listener(cfg.listen_addr, cfg.listen_backlog)
        .map_err(|e| format!("binding {}: {e}", cfg.listen_addr))?;
    tracing::debug!(shard = id, addr = %cfg.listen_addr, backlog = cfg.listen_backlog, "listening");
    accept::accept_loop(&ctx, listener).await;
    drain_shard(&ctx).await;
    ctx.life.commit.notify();
    committer.await;
    // Whatever is still buffered (tombstones from late acks) is made durable before exit.
    while ctx.log.has_pending() && ctx.log.poisoned().is_none() {
        if ctx.log.commit().await.is_err() {
            break;
        }
    }
    ctx.sync_stats();
    tracing::info!(shard = id, "shard drained");
    Ok(())
}

/// Recovers the shard's log, opens it for writing, joins the mesh and builds the context.
async fn open_shard(
    id: ShardId,
    shared: &Shared,
    mesh: Mesh,
) -> Result<(Rc<Ctx>, Receivers<GatewayMsg>), String> {
    let cfg = shared.cfg.clone();
    let (core, next_segment) = recover(id, &shared.cfg)?;
    let dir = datadir::shard_dir(&cfg.data_dir, usize::from(id));
    let log = Log::open(
        LogConfig {
            dir: dir.clone(),
            segment_bytes_max: cfg.segment_bytes_max,
            ..LogConfig::new(dir.clone())
        },
        next_segment,
    )
    .await
    .map_err(|e| format!("opening log in {}: {e}", dir.display()))?;
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|_| "joining the channel mesh failed".to_owned())?;
    let metrics = shared
        .metrics
        .get(usize::from(id))
        .cloned()
        .ok_or("metrics slot missing")?;
    let ring = if cfg.uring_core() {
        Some(crate::uring::Ring::new(
            cfg.uring_entries,
            cfg.uring_buffers,
            cfg.uring_buffer_bytes,
            crate::uring::TaskWork::parse(&cfg.uring_task_work)
                .unwrap_or(crate::uring::TaskWork::Defer),
        )?)
    } else {
        None
    };
    let ctx = Rc::new(Ctx::new(CtxParts {
        ring,
        id,
        mesh: MeshOut::new(senders, cfg.shard_count(), cfg.mesh_backlog_msgs_max),
        cfg,
        key: shared.key.clone(),
        metrics,
        log,
        core,
        sidecar: shared.sidecar.clone(),
    }));
    Ok((ctx, receivers))
}

/// Replays the shard's segments into a fresh state machine (before the shard serves anything,
/// so blocking reads are fine). Returns it and the next segment to create.
fn recover(id: ShardId, cfg: &Config) -> Result<(Shard, storage::SegmentId), String> {
    let dir = datadir::shard_dir(&cfg.data_dir, usize::from(id));
    let started = std::time::Instant::now();
    let options = storage::RecoveryOptions {
        accept_missing_segments: cfg.accept_segment_loss,
    };
    let rec = storage::recovery::recover_with(&dir, options)
        .map_err(|e| format!("recovery of {}: {e}", dir.display()))?;
    let seed = shard_seed().map_err(|e| format!("reading the OS random generator: {e}"))?;
    let mut shard_cfg = cfg.shard_config(usize::from(id));
    if cfg.media_socket_addr().is_some() {
        let secret = datadir::load_media_secret(&cfg.data_dir).map_err(|e| e.to_string())?;
        shard_cfg.media.secret = shards::media::MediaSecret(secret);
    }
    let mut core = Shard::new(shard_cfg, seed);
    // Decoded one by one as the shard consumes them, so a segment's read buffer is freed as
    // soon as its last record is replayed (mailbox entries come back cold and keep no slice of
    // it), and the decoded records are never all in memory at once.
    let (mut records, mut undecodable) = (0usize, 0usize);
    let located = rec.records.into_iter().filter_map(|raw| {
        let d = shards::decode_log(std::iter::once(raw));
        undecodable += d.undecodable.len();
        records += d.records.len();
        d.records.into_iter().next()
    });
    core.recover(wall_ms(), &rec.segments, located);
    tracing::info!(
        shard = id,
        segments = rec.segments.len(),
        records,
        truncated = rec.report.truncated.len(),
        skipped = rec.report.skipped.len(),
        resynced = rec.report.resynced.len(),
        segments_missing = rec.report.segments_missing,
        undecodable,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    Ok((core, rec.next_segment))
}

/// One receiving task per peer shard.
fn spawn_mesh_receivers(ctx: &Rc<Ctx>, mut receivers: Receivers<GatewayMsg>) {
    for (from, rx) in receivers.streams() {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                on_mesh(&ctx, from, msg);
            }
        })
        .detach();
    }
}

fn on_mesh(ctx: &Rc<Ctx>, from: usize, msg: GatewayMsg) {
    ctx.refresh_now();
    match msg {
        GatewayMsg::Core(m) => ctx.feed(Event::Mesh {
            from: from as ShardId,
            msg: m,
        }),
        GatewayMsg::Handoff(h) => adopt(ctx, *h),
    }
}

/// Takes over a connection handed to this shard: registers it, starts its task, replays its
/// login.
fn adopt(ctx: &Rc<Ctx>, h: Handoff) {
    if ctx.life.draining.get() {
        return; // dropping the fd closes it; the client reconnects
    }
    if ctx.ring.is_some() {
        crate::uring::adopt(ctx, h);
        return;
    }
    // SAFETY: the descriptor was duplicated for us by the sending shard and is owned by nothing
    // else; glommio takes ownership.
    let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
    let c = ctx.register(h.peer, h.transport, None);
    *c.out.borrow_mut() = h.pending_out;
    ctx.metrics.handoffs_in_total.fetch_add(1, Relaxed);
    glommio::spawn_local(conn_task::run(ctx.clone(), c.clone(), stream, h.pending_in)).detach();
    ctx.feed(Event::Login {
        conn: c.id,
        info: h.info,
    });
    c.notify();
}

/// One mesh backlog flusher per peer shard, so a full ring to one peer holds up no other.
fn spawn_flushers(ctx: &Rc<Ctx>) {
    for peer in (0..ctx.cfg.shard_count()).filter(|&p| p != usize::from(ctx.id)) {
        let ctx = ctx.clone();
        glommio::spawn_local(
            async move { ctx.mesh.flush_forever(ctx.id, peer, &ctx.metrics).await },
        )
        .detach();
    }
}

/// Group commit: while one fdatasync runs, appends pile up for the next one.
fn spawn_committer(ctx: &Rc<Ctx>) -> glommio::Task<()> {
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        loop {
            if !ctx.log.has_pending() {
                if ctx.life.draining.get() && !ctx.machine.dispatching() {
                    break;
                }
                ctx.life.commit.notified().await;
                continue;
            }
            if ctx.cfg.commit_gather_us > 0 && !ctx.life.draining.get() {
                glommio::timer::sleep(Duration::from_micros(ctx.cfg.commit_gather_us)).await;
            }
            match ctx.log.commit().await {
                Ok(s) => {
                    let m = &ctx.metrics;
                    m.log_commits_total.fetch_add(1, Relaxed);
                    m.log_bytes_total.fetch_add(s.bytes as u64, Relaxed);
                    m.fsync_latency_us.observe(s.fsync_us);
                    m.commit_batch_records.observe(s.records as u64);
                    ctx.refresh_now();
                    ctx.feed(Event::Durable { up_to: s.up_to });
                }
                Err(e) => {
                    tracing::error!(shard = ctx.id, error = %e, "log commit failed: shard poisoned, refusing writes");
                    ShardMetrics::set(&ctx.metrics.log_poisoned, 1);
                    ctx.feed(Event::StorageFailed {
                        reason: e.to_string(),
                    });
                    break;
                }
            }
        }
    })
}

/// Timer: core tick, idle scan, stats, drain flag.
fn spawn_timer(ctx: &Rc<Ctx>, drain: Arc<AtomicBool>) {
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        let mut last_tick = 0u64;
        loop {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            let now = ctx.refresh_now();
            if drain.load(Relaxed) && !ctx.life.draining.get() {
                ctx.life.draining.set(true);
                ctx.life.stop_accept.notify();
            }
            ctx.expire_conns(now);
            if now.saturating_sub(last_tick) >= ctx.cfg.tick_ms {
                last_tick = now;
                ctx.feed(Event::Tick);
            }
            ctx.sync_stats();
        }
    })
    .detach();
}

/// Drain: tell every client to come back later, flush, close.
async fn drain_shard(ctx: &Rc<Ctx>) {
    let conns = ctx.conns.all();
    tracing::info!(shard = ctx.id, connections = conns.len(), "draining");
    for c in &conns {
        if c.state.get() == ConnState::Open {
            let _ = c.push_frame(
                &Frame::GoAway(frame::GoAway {
                    code: ErrorCode::ShuttingDown as u16,
                    reconnect_after_ms: ctx.cfg.drain_reconnect_after_ms,
                }),
                usize::MAX,
            );
            c.begin_close(ctx.now_ms.get());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(ctx.cfg.drain_timeout_ms);
    while !ctx.conns.is_empty() && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    for c in ctx.conns.all() {
        c.force_close();
    }
    glommio::timer::sleep(Duration::from_millis(20)).await;
}
