//! The runtime: one pinned glommio executor per shard, the channel mesh between them, and the
//! glue that feeds events to each shard's state machine and carries out its actions.
//!
//! Architecture invariants:
//! * A shard's state (its `Shard`, its connections, its log) is touched only by its own
//!   executor thread. Nothing here takes a lock.
//! * Shards talk only through glommio's channel mesh (bounded SPSC rings), carrying
//!   [`GatewayMsg`]s. The only things shared across threads are the read-only [`Config`], the
//!   server key, each shard's metrics (written by that shard only) and the drain flag.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use protocol::noise::{StaticKeypair, Transport};
use protocol::{frame, ErrorCode, Frame};
use shards::{Action, ConnId, Event, LoginInfo, MeshMsg, Shard, ShardId};
use storage::log::{Log, LogConfig};

use crate::config::Config;
use crate::conn::{self, Conn, ConnState};
use crate::metrics::{self, ShardMetrics};
use crate::notify::Notify;
use crate::sidecar::{Job, Providers, Sidecar};

/// A connection moving to its user's home shard after login: the socket, the transport cipher
/// state, and any bytes already read or sealed but not yet processed or written.
pub struct Handoff {
    /// The socket (a duplicate descriptor with no io_uring operation in flight).
    pub fd: OwnedFd,
    /// Noise transport state (keys and nonces).
    pub transport: Transport,
    /// Bytes received after the `Login` record, not yet processed.
    pub pending_in: Vec<u8>,
    /// Sealed records not yet written.
    pub pending_out: Vec<u8>,
    /// The login to replay on the home shard.
    pub info: LoginInfo,
    /// Peer address.
    pub peer: SocketAddr,
}

/// What travels on the channel mesh.
pub enum GatewayMsg {
    /// A state-machine message.
    Core(MeshMsg),
    /// A connection hand-off.
    Handoff(Box<Handoff>),
}

/// Per-shard runtime context. Lives on one executor; shared by its tasks through `Rc`.
pub struct Ctx {
    /// This shard.
    pub id: ShardId,
    /// Read-only configuration.
    pub cfg: Arc<Config>,
    /// Server static key.
    pub key: Arc<StaticKeypair>,
    core: RefCell<Shard>,
    log: Rc<Log>,
    conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    next_conn: Cell<u64>,
    senders: Senders<GatewayMsg>,
    backlog: RefCell<Vec<VecDeque<GatewayMsg>>>,
    flushing: Vec<Cell<bool>>,
    mesh_notify: Notify,
    commit_notify: Notify,
    stop_accept: Notify,
    /// This shard's metrics.
    pub metrics: Arc<ShardMetrics>,
    sidecar: Sidecar,
    /// The shard's receive buffer, shared by all its connections.
    pub rx_buf: Rc<RefCell<Vec<u8>>>,
    /// Shard clock, ms since the Unix epoch, refreshed on every wake-up that reads.
    pub now_ms: Cell<u64>,
    queue: RefCell<VecDeque<Event>>,
    dispatching: Cell<bool>,
    draining: Cell<bool>,
    /// Connections accepted and still in the handshake (they count against `conns_max` too, so
    /// a flood of half-open handshakes cannot exceed the cap).
    handshaking: Cell<usize>,
    /// Unauthenticated connections per source address (`max_preauth_per_ip`).
    preauth: conn::PreauthCounter,
    conns_max: usize,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Ctx {
    /// Refreshes and returns the shard clock.
    pub fn refresh_now(&self) -> u64 {
        let now = wall_ms();
        self.now_ms.set(now);
        now
    }

    /// Feeds one event to the state machine and carries out the resulting actions. Re-entrant
    /// calls (an action that produces an event) are queued and handled in order by the outer
    /// call, so the state machine is never entered twice at once.
    pub fn feed(self: &Rc<Self>, ev: Event) {
        self.queue.borrow_mut().push_back(ev);
        if self.dispatching.replace(true) {
            return;
        }
        let mut actions = Vec::new();
        loop {
            let Some(ev) = self.queue.borrow_mut().pop_front() else {
                break;
            };
            {
                let mut core = self.core.borrow_mut();
                let mut journal: &Log = &self.log;
                tracing::trace!(shard = self.id, event = ?ev, "event");
                core.handle(self.now_ms.get(), ev, &mut journal);
                actions.extend(core.drain_actions());
            }
            for a in actions.drain(..) {
                self.act(a);
            }
        }
        self.dispatching.set(false);
        if self.log.has_pending() {
            self.commit_notify.notify();
        }
    }

    fn act(self: &Rc<Self>, a: Action) {
        tracing::trace!(shard = self.id, action = ?a, "action");
        match a {
            Action::Send { conn, frame } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    if c.push_frame(&frame, self.cfg.outbound_queue_bytes_max) {
                        self.metrics.frames_out_total.fetch_add(1, Relaxed);
                    } else {
                        self.metrics.error(ErrorCode::SlowConsumer);
                        tracing::info!(conn, "closing slow consumer");
                        c.force_close();
                        self.queue.borrow_mut().push_back(Event::Closed { conn });
                    }
                }
            }
            Action::Close { conn, code, text } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    self.close_conn(&c, code, &text);
                }
            }
            Action::Handoff { conn, to, info } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    *c.handoff.borrow_mut() = Some((to, info));
                    c.state.set(ConnState::HandingOff);
                    c.wake.notify();
                }
            }
            Action::ToShard { shard, msg } => {
                if shard == self.id {
                    self.queue
                        .borrow_mut()
                        .push_back(Event::Mesh { from: self.id, msg });
                } else {
                    self.metrics.mesh_sent_total.fetch_add(1, Relaxed);
                    self.mesh_send(shard, GatewayMsg::Core(msg));
                }
            }
            Action::LoggedIn { conn, .. } => {
                if let Some(c) = self.conns.borrow().get(&conn) {
                    c.mark_logged_in();
                }
            }
            Action::SendSms { phone, code } => {
                if !self.sidecar.submit(Job::Sms { phone, code }) {
                    self.metrics
                        .side_effects_dropped_total
                        .fetch_add(1, Relaxed);
                }
            }
            Action::Push {
                to,
                from_user,
                msg_type,
            } => {
                self.metrics.pushes_total.fetch_add(1, Relaxed);
                if !self.sidecar.submit(Job::Push {
                    user: to.user,
                    device: to.device,
                    from_user,
                    msg_type: msg_type.0,
                }) {
                    self.metrics
                        .side_effects_dropped_total
                        .fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Sends `Error{code}` and closes after flushing. Counts the code.
    pub fn close_conn(&self, c: &Conn, code: ErrorCode, text: &str) {
        if c.state.get() != ConnState::Open {
            return;
        }
        self.metrics.error(code);
        tracing::debug!(conn = c.id, peer = %c.peer, code = code.name(), text, "closing connection");
        let _ = c.push_frame(&Frame::error(code, 0, text), usize::MAX);
        c.begin_close(self.now_ms.get());
    }

    /// Sends a mesh message to `to`, preserving per-peer order: straight into the ring when
    /// nothing is queued for that peer, else behind the queued ones (flushed by a task).
    pub fn mesh_send(&self, to: ShardId, msg: GatewayMsg) {
        let i = usize::from(to);
        let idle = self.backlog.borrow().get(i).is_some_and(VecDeque::is_empty)
            && !self.flushing.get(i).is_some_and(Cell::get);
        let msg = if idle {
            match self.senders.try_send_to(i, msg) {
                Ok(()) => return,
                Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(m)))
                | Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => m,
                Err(e) => {
                    tracing::warn!(to, error = %e, "mesh send failed");
                    return;
                }
            }
        } else {
            msg
        };
        if let Some(q) = self.backlog.borrow_mut().get_mut(i) {
            q.push_back(msg);
        }
        self.metrics.mesh_backlog.fetch_add(1, Relaxed);
        self.mesh_notify.notify();
    }

    /// A connection's task ended.
    pub fn conn_gone(self: &Rc<Self>, id: ConnId) {
        self.forget_conn(id);
        self.feed(Event::Closed { conn: id });
    }

    /// Drops the runtime's record of a connection (no event).
    pub fn forget_conn(&self, id: ConnId) {
        if self.conns.borrow_mut().remove(&id).is_some() {
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    fn new_conn_id(&self) -> ConnId {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        (u64::from(self.id) << 48) | n
    }

    fn register(self: &Rc<Self>, peer: SocketAddr, transport: Transport) -> Rc<Conn> {
        let id = self.new_conn_id();
        let c = Rc::new(Conn::new(
            id,
            peer,
            transport,
            self.now_ms.get(),
            self.cfg.rate_limit_burst,
        ));
        self.conns.borrow_mut().insert(id, c.clone());
        self.metrics.connections.fetch_add(1, Relaxed);
        c
    }

    fn on_mesh(self: &Rc<Self>, from: usize, msg: GatewayMsg) {
        self.refresh_now();
        match msg {
            GatewayMsg::Core(m) => self.feed(Event::Mesh {
                from: from as ShardId,
                msg: m,
            }),
            GatewayMsg::Handoff(h) => {
                let h = *h;
                if self.draining.get() {
                    return; // dropping the fd closes it; the client reconnects
                }
                // SAFETY: the descriptor was duplicated for us by the sending shard and is owned
                // by nothing else; glommio takes ownership.
                let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
                let c = self.register(h.peer, h.transport);
                *c.out.borrow_mut() = h.pending_out;
                self.metrics.handoffs_in_total.fetch_add(1, Relaxed);
                glommio::spawn_local(conn::run(self.clone(), c.clone(), stream, h.pending_in))
                    .detach();
                self.feed(Event::Login {
                    conn: c.id,
                    info: h.info,
                });
                c.wake.notify();
            }
        }
    }

    fn sync_stats(&self) {
        let core = self.core.borrow();
        let s = core.stats();
        let m = &self.metrics;
        ShardMetrics::set(&m.routed_local_total, s.routed_local);
        ShardMetrics::set(&m.routed_cross_shard_total, s.routed_cross_shard);
        ShardMetrics::set(&m.stored_total, s.stored);
        ShardMetrics::set(&m.dedup_hits_total, s.dedup_hits);
        ShardMetrics::set(&m.delivered_total, s.delivered);
        ShardMetrics::set(&m.receipts_total, s.receipts_stored);
        ShardMetrics::set(&m.acked_total, s.acked);
        ShardMetrics::set(&m.pruned_total, s.pruned);
        ShardMetrics::set(&m.expired_total, s.expired);
        ShardMetrics::set(&m.mailbox_depth, s.mailbox_depth);
        ShardMetrics::set(&m.log_appends_total, s.appends);
        ShardMetrics::set(&m.connections_logged_in, s.connections_logged_in);
        ShardMetrics::set(&m.logins_total, s.logins);
        ShardMetrics::set(&m.registrations_total, s.registrations);
        ShardMetrics::set(&m.segments_deleted_total, s.segments_deleted);
        ShardMetrics::set(&m.segments_compacted_total, s.segments_compacted);
        ShardMetrics::set(&m.prekey_uploads_total, s.prekey_uploads);
        ShardMetrics::set(&m.prekey_uploads_refused_total, s.prekey_uploads_refused);
        ShardMetrics::set(&m.prekey_fetches_total, s.prekey_fetches);
        ShardMetrics::set(&m.prekeys_consumed_total, s.prekeys_consumed);
        ShardMetrics::set(
            &m.prekey_bundles_without_one_time_total,
            s.prekey_bundles_without_one_time,
        );
        ShardMetrics::set(
            &m.prekey_fetches_rate_limited_total,
            s.prekey_fetches_rate_limited,
        );
        ShardMetrics::set(&m.prekeys_stored, s.prekeys_stored);
        ShardMetrics::set(&m.log_poisoned, u64::from(core.poisoned().is_some()));
    }

    /// Closes connections idle past `idle_timeout_ms` or not logged in within
    /// `preauth_timeout_ms`, and forces closed those whose flush outlived `drain_timeout_ms`.
    fn scan_conns(&self, now: u64) {
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for c in conns {
            match c.state.get() {
                ConnState::Open
                    if now.saturating_sub(c.last_rx_ms.get()) > self.cfg.idle_timeout_ms =>
                {
                    self.close_conn(
                        &c,
                        ErrorCode::IdleTimeout,
                        "no frame within idle_timeout_ms",
                    );
                }
                ConnState::Open
                    if !c.logged_in.get()
                        && now.saturating_sub(c.opened_ms) > self.cfg.preauth_timeout_ms =>
                {
                    self.close_conn(
                        &c,
                        ErrorCode::NotAuthenticated,
                        "no login within preauth_timeout_ms",
                    );
                }
                ConnState::Closing
                    if now.saturating_sub(c.closing_since_ms.get()) > self.cfg.drain_timeout_ms =>
                {
                    c.force_close()
                }
                _ => {}
            }
        }
    }
}

/// Everything the process shares across shards (read-only or per-shard-written).
struct Shared {
    cfg: Arc<Config>,
    key: Arc<StaticKeypair>,
    metrics: Arc<Vec<Arc<ShardMetrics>>>,
    sidecar: Sidecar,
    drain: Arc<AtomicBool>,
}

/// Loads the server's static key from `<data_dir>/server.key`, creating it on first start.
pub fn load_server_key(dir: &Path) -> std::io::Result<StaticKeypair> {
    let path = dir.join("server.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let private: [u8; 32] = bytes.try_into().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not 32 bytes", path.display()),
                )
            })?;
            Ok(StaticKeypair::from_private(private))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = StaticKeypair::generate();
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&kp.private)?;
            f.sync_all()?;
            std::fs::write(
                dir.join("server.pub"),
                format!("{}\n", hex_encode(&kp.public)),
            )?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(kp)
        }
        Err(e) => Err(e),
    }
}

/// Lower-case hex.
pub fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Refuses to start with a shard count different from the one the data was written with:
/// users' home shards (and so where their mailboxes live) depend on it.
fn check_layout(dir: &Path, shards: usize) -> std::io::Result<()> {
    let path = dir.join("SHARDS");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let had: usize = s.trim().parse().unwrap_or(0);
            if had != shards {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} was written by {had} shards; start with --shards {had} (re-sharding an existing data directory is not supported)",
                        dir.display()
                    ),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, format!("{shards}\n"))?;
            std::fs::File::open(dir)?.sync_all()
        }
        Err(e) => Err(e),
    }
}

/// Runs the daemon until SIGTERM/SIGINT has drained it. Returns the process exit status.
pub fn run(cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    cfg.validate()?;
    let n = cfg.shard_count();
    std::fs::create_dir_all(&cfg.data_dir)?;
    check_layout(&cfg.data_dir, n)?;
    let key = Arc::new(load_server_key(&cfg.data_dir)?);
    let metrics: Arc<Vec<Arc<ShardMetrics>>> =
        Arc::new((0..n).map(|_| Arc::new(ShardMetrics::new())).collect());
    let admin = metrics::spawn_admin(cfg.admin_addr, metrics.clone())?;
    let (sidecar, _sidecar_thread) = Sidecar::spawn(Providers {
        sms: cfg.sms_provider.clone(),
        sms_url: cfg.sms_webhook_url.clone(),
        push: cfg.push_provider.clone(),
        push_url: cfg.push_webhook_url.clone(),
        data_dir: cfg.data_dir.clone(),
    })?;
    let drain = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, drain.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, drain.clone())?;
    tracing::info!(
        listen = %cfg.listen_addr, admin = %admin, shards = n, data_dir = %cfg.data_dir.display(),
        server_key = %hex_encode(&key.public), "switchboard starting"
    );
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        key,
        metrics,
        sidecar,
        drain,
    });
    let mesh = MeshBuilder::full(n, cfg.mesh_channel_capacity);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let placement = if cfg.pin_cpus {
            let cpu = if cfg.cpus.is_empty() {
                i
            } else {
                cfg.cpus.get(i % cfg.cpus.len()).copied().unwrap_or(i)
            };
            Placement::Fixed(cpu)
        } else {
            Placement::Unbound
        };
        let shared = shared.clone();
        let mesh = mesh.clone();
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{i}"))
            .spawn(move || async move { shard_main(i as ShardId, shared, mesh).await })?;
        handles.push(h);
    }
    let mut failed = None;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(shard = i, error = %e, "shard failed");
                failed = Some(e);
            }
            Err(e) => {
                tracing::error!(shard = i, error = %e, "shard executor failed");
                failed = Some(e.to_string());
            }
        }
    }
    match failed {
        None => {
            tracing::info!("drained; exiting");
            Ok(())
        }
        Some(e) => Err(e.into()),
    }
}

async fn shard_main(
    id: ShardId,
    shared: Arc<Shared>,
    mesh: MeshBuilder<GatewayMsg, glommio::channels::channel_mesh::Full>,
) -> Result<(), String> {
    let cfg = shared.cfg.clone();
    let n = cfg.shard_count();
    let dir: PathBuf = cfg.data_dir.join(format!("shard-{id}"));
    // Recovery runs before this shard serves anything (blocking reads are fine here).
    let started = std::time::Instant::now();
    let rec = storage::recovery::recover(&dir)
        .map_err(|e| format!("recovery of {}: {e}", dir.display()))?;
    let mut core = Shard::new(cfg.shard_config(usize::from(id)), rand_seed(id));
    let now = wall_ms();
    let decoded = shards::record::decode_recovered(rec.records);
    let records = decoded.records.len();
    core.recover(now, &rec.segments, decoded.records);
    tracing::info!(
        shard = id,
        segments = rec.segments.len(),
        records,
        truncated = rec.report.truncated.len(),
        skipped = rec.report.skipped.len(),
        undecodable = decoded.undecodable.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    let log = Log::open(
        LogConfig {
            dir: dir.clone(),
            segment_bytes_max: cfg.segment_bytes_max,
            ..LogConfig::new(dir.clone())
        },
        rec.next_segment,
    )
    .await
    .map_err(|e| format!("opening log in {}: {e}", dir.display()))?;
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|_| "joining the channel mesh failed".to_owned())?;
    let metrics = shared
        .metrics
        .get(usize::from(id))
        .cloned()
        .ok_or("metrics slot missing")?;
    let per_shard_max = cfg.max_connections.div_ceil(n).max(1);
    let ctx = Rc::new(Ctx {
        id,
        cfg: cfg.clone(),
        key: shared.key.clone(),
        core: RefCell::new(core),
        log: Rc::new(log),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
        senders,
        backlog: RefCell::new((0..n).map(|_| VecDeque::new()).collect()),
        flushing: (0..n).map(|_| Cell::new(false)).collect(),
        mesh_notify: Notify::default(),
        commit_notify: Notify::default(),
        stop_accept: Notify::default(),
        metrics,
        sidecar: shared.sidecar.clone(),
        rx_buf: Rc::new(RefCell::new(vec![0u8; cfg.read_buffer_bytes])),
        now_ms: Cell::new(now),
        queue: RefCell::new(VecDeque::new()),
        dispatching: Cell::new(false),
        draining: Cell::new(false),
        handshaking: Cell::new(0),
        preauth: conn::PreauthCounter::default(),
        conns_max: per_shard_max,
    });
    ctx.sync_stats();

    // Mesh receivers: one task per peer.
    for (from, rx) in receivers.streams() {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                ctx.on_mesh(from, msg);
            }
        })
        .detach();
    }
    // Mesh backlog flusher.
    {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                ctx.mesh_notify.notified().await;
                for peer in 0..n {
                    loop {
                        let Some(msg) = ctx
                            .backlog
                            .borrow_mut()
                            .get_mut(peer)
                            .and_then(VecDeque::pop_front)
                        else {
                            break;
                        };
                        if let Some(f) = ctx.flushing.get(peer) {
                            f.set(true);
                        }
                        ctx.metrics.mesh_backlog.fetch_sub(1, Relaxed);
                        if ctx.senders.send_to(peer, msg).await.is_err() {
                            tracing::warn!(shard = ctx.id, peer, "mesh peer gone; message dropped");
                        }
                        if let Some(f) = ctx.flushing.get(peer) {
                            f.set(false);
                        }
                    }
                }
            }
        })
        .detach();
    }
    // Group commit: while one fdatasync runs, appends pile up for the next one.
    let committer = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                if !ctx.log.has_pending() {
                    if ctx.draining.get() && !ctx.dispatching.get() {
                        break;
                    }
                    ctx.commit_notify.notified().await;
                    continue;
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
    };
    // Timer: core tick, idle scan, stats, drain flag.
    {
        let ctx = ctx.clone();
        let drain = shared.drain.clone();
        glommio::spawn_local(async move {
            let mut last_tick = 0u64;
            loop {
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let now = ctx.refresh_now();
                if drain.load(Relaxed) && !ctx.draining.get() {
                    ctx.draining.set(true);
                    ctx.stop_accept.notify();
                }
                if now.saturating_sub(last_tick) >= ctx.cfg.tick_ms {
                    last_tick = now;
                    ctx.feed(Event::Tick);
                    ctx.scan_conns(now);
                }
                ctx.sync_stats();
            }
        })
        .detach();
    }

    // Accept loop until drain.
    let listener = bind_listener(cfg.listen_addr, cfg.listen_backlog)
        .map_err(|e| format!("binding {}: {e}", cfg.listen_addr))?;
    tracing::debug!(shard = id, addr = %cfg.listen_addr, backlog = cfg.listen_backlog, "listening");
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.stop_accept.notified().await;
            None
        })
        .await;
        let Some(res) = accepted else { break };
        match res {
            Ok(stream) => {
                ctx.metrics.accepted_total.fetch_add(1, Relaxed);
                if ctx.conns.borrow().len() + ctx.handshaking.get() >= ctx.conns_max {
                    ctx.metrics.refused_overload_total.fetch_add(1, Relaxed);
                    ctx.metrics.error(ErrorCode::Overloaded);
                    drop(stream);
                    continue;
                }
                glommio::spawn_local(accept_one(ctx.clone(), stream)).detach();
            }
            Err(e) => {
                // EMFILE/ENFILE: out of descriptors. Back off instead of spinning.
                tracing::warn!(shard = id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    drain_shard(&ctx).await;
    ctx.commit_notify.notify();
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

/// Drain: tell every client to come back later, flush, close.
async fn drain_shard(ctx: &Rc<Ctx>) {
    let conns: Vec<Rc<Conn>> = ctx.conns.borrow().values().cloned().collect();
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
    while !ctx.conns.borrow().is_empty() && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<Rc<Conn>> = ctx.conns.borrow().values().cloned().collect();
    for c in left {
        c.force_close();
    }
    glommio::timer::sleep(Duration::from_millis(20)).await;
}

async fn accept_one(ctx: Rc<Ctx>, mut stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let Some(slot) = ctx
        .preauth
        .try_acquire(peer.ip(), ctx.cfg.max_preauth_per_ip)
    else {
        ctx.metrics.refused_per_ip_total.fetch_add(1, Relaxed);
        ctx.metrics.error(ErrorCode::Overloaded);
        tracing::debug!(peer = %peer, "refused: max_preauth_per_ip reached for this address");
        return;
    };
    let _ = stream.set_nodelay(true);
    set_buffers(
        &stream,
        ctx.cfg.socket_rcvbuf_bytes,
        ctx.cfg.socket_sndbuf_bytes,
    );
    ctx.handshaking.set(ctx.handshaking.get() + 1);
    let shaken = conn::handshake(
        &mut stream,
        &ctx.key,
        Duration::from_millis(ctx.cfg.handshake_timeout_ms),
    )
    .await;
    ctx.handshaking.set(ctx.handshaking.get().saturating_sub(1));
    match shaken {
        Ok((transport, client_static)) => {
            ctx.metrics.handshakes_total.fetch_add(1, Relaxed);
            if ctx.draining.get() {
                return;
            }
            ctx.refresh_now();
            let c = ctx.register(peer, transport);
            *c.preauth_slot.borrow_mut() = Some(slot);
            ctx.feed(Event::Connected {
                conn: c.id,
                peer_ip: peer.ip(),
                static_key: client_static,
            });
            conn::run(ctx.clone(), c, stream, Vec::new()).await;
        }
        Err(e) => {
            ctx.metrics.handshake_failures_total.fetch_add(1, Relaxed);
            ctx.metrics.error(e.code());
            tracing::debug!(peer = %peer, error = %e, "handshake failed");
        }
    }
}

/// Binds a listener with SO_REUSEPORT (one per shard on the same address; the kernel spreads
/// connections across them) and the configured accept backlog. glommio's own `bind` fixes the
/// backlog at 1024, too short for a reconnect storm; somaxconn still caps what we ask.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    // SAFETY: a freshly bound, listening socket whose descriptor we hand over exactly once.
    Ok(unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

fn set_buffers(stream: &TcpStream, rcv: usize, snd: usize) {
    let fd = stream.as_raw_fd();
    for (opt, v) in [(libc::SO_RCVBUF, rcv), (libc::SO_SNDBUF, snd)] {
        if v == 0 {
            continue;
        }
        let v = v.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: setsockopt on a socket we own with a pointer to a live c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "setsockopt buffer size failed");
        }
    }
}

fn rand_seed(id: ShardId) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(id) << 56) ^ u64::from(std::process::id())
}
