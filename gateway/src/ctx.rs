//! A shard's runtime context: the state machine, its log, its connections and its side of the
//! mesh, on one executor, and the glue that feeds events to the state machine and carries out
//! its actions. Shared by the shard's tasks through `Rc`; never touched by another thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use protocol::noise::{StaticKeypair, Transport};
use protocol::{ErrorCode, Frame};
use shards::{Action, ConnId, Event, LoginInfo, RecordRef, Shard, ShardId};
use storage::log::Log;

use crate::config::Config;
use crate::conn_table::ConnTable;
use crate::connection::{Conn, ConnState, RingIo};
use crate::mesh::{GatewayMsg, MeshOut, Refused};
use crate::metrics::ShardMetrics;
use crate::notify::Notify;
use crate::sidecar::{Job, MediaJob, Sidecar};
use crate::timer_wheel::TimerWheel;
use crate::uring::Ring;

/// Wall clock, ms since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The state machine and its event queue. `feed` is re-entrant through `queue`: an action that
/// produces an event queues it, and the outer call handles it in order.
pub struct Machine {
    core: RefCell<Shard>,
    queue: RefCell<VecDeque<Event>>,
    dispatching: Cell<bool>,
}

impl Machine {
    /// Wraps a recovered shard.
    pub fn new(core: Shard) -> Self {
        Self {
            core: RefCell::new(core),
            queue: RefCell::new(VecDeque::new()),
            dispatching: Cell::new(false),
        }
    }

    /// Whether an event is being handled right now.
    pub fn dispatching(&self) -> bool {
        self.dispatching.get()
    }
}

/// Drain and commit signals of a shard.
#[derive(Default)]
pub struct Lifecycle {
    /// Wakes the group-commit task (appends are pending).
    pub commit: Notify,
    /// Stops the accept loop (drain began).
    pub stop_accept: Notify,
    /// Set once the shard started draining.
    pub draining: Cell<bool>,
}

/// Slots of the connection timer wheel, and their span: a 102.4 s horizon at 100 ms (the
/// shard timer's period), longer deadlines re-armed when they come up.
const WHEEL_SLOTS: usize = 1024;
const WHEEL_SLOT_MS: u64 = 100;

/// Per-shard runtime context.
pub struct Ctx {
    /// This shard.
    pub id: ShardId,
    /// Read-only configuration.
    pub cfg: Arc<Config>,
    /// Server static key.
    pub key: Arc<StaticKeypair>,
    /// This shard's metrics.
    pub metrics: Arc<ShardMetrics>,
    /// The shard's log.
    pub log: Rc<Log>,
    /// Its connections.
    pub conns: ConnTable,
    /// Its side of the mesh.
    pub mesh: MeshOut,
    /// The state machine.
    pub machine: Machine,
    /// Drain and commit signals.
    pub life: Lifecycle,
    sidecar: Sidecar,
    /// The shard's receive buffer, shared by all its connections.
    pub rx_buf: Rc<RefCell<Vec<u8>>>,
    /// Shard clock, ms since the Unix epoch, refreshed on every wake-up that reads.
    pub now_ms: Cell<u64>,
    /// The connection ring (`connection_core = "uring"`), `None` with the task core.
    pub ring: Option<Ring>,
    /// Connection deadlines (idle, pre-auth, closing).
    pub wheel: RefCell<TimerWheel>,
}

/// What `Ctx::new` is built from.
pub struct CtxParts {
    /// This shard.
    pub id: ShardId,
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Server key.
    pub key: Arc<StaticKeypair>,
    /// Metrics slot.
    pub metrics: Arc<ShardMetrics>,
    /// Opened log.
    pub log: Log,
    /// Recovered state machine.
    pub core: Shard,
    /// Mesh senders.
    pub mesh: MeshOut,
    /// Side-effect queue.
    pub sidecar: Sidecar,
    /// The connection ring, with the ring core.
    pub ring: Option<Ring>,
}

impl Ctx {
    /// Assembles a shard's context.
    pub fn new(p: CtxParts) -> Self {
        let n = p.cfg.shard_count();
        let per_shard_max = p.cfg.max_connections.div_ceil(n).max(1);
        Self {
            id: p.id,
            conns: ConnTable::new(p.id, per_shard_max),
            rx_buf: Rc::new(RefCell::new(if p.ring.is_some() {
                Vec::new()
            } else {
                vec![0u8; p.cfg.read_buffer_bytes]
            })),
            ring: p.ring,
            wheel: RefCell::new(TimerWheel::new(WHEEL_SLOTS, WHEEL_SLOT_MS, wall_ms())),
            cfg: p.cfg,
            key: p.key,
            metrics: p.metrics,
            log: Rc::new(p.log),
            mesh: p.mesh,
            machine: Machine::new(p.core),
            life: Lifecycle::default(),
            sidecar: p.sidecar,
            now_ms: Cell::new(wall_ms()),
        }
    }

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
        let m = &self.machine;
        m.queue.borrow_mut().push_back(ev);
        if m.dispatching.replace(true) {
            return;
        }
        let mut actions = Vec::new();
        loop {
            let Some(ev) = m.queue.borrow_mut().pop_front() else {
                break;
            };
            {
                let mut core = m.core.borrow_mut();
                let mut journal: &Log = &self.log;
                tracing::trace!(shard = self.id, event = ?ev, "event");
                core.handle(self.now_ms.get(), ev, &mut journal);
                actions.extend(core.drain_actions());
            }
            for a in actions.drain(..) {
                self.act(a);
            }
        }
        m.dispatching.set(false);
        if self.log.has_pending() {
            self.life.commit.notify();
        }
    }

    fn queue_event(&self, ev: Event) {
        self.machine.queue.borrow_mut().push_back(ev);
    }

    fn act(self: &Rc<Self>, a: Action) {
        tracing::trace!(shard = self.id, action = ?a, "action");
        match a {
            Action::Send { conn, frame } => self.send(conn, &frame),
            Action::Close { conn, code, text } => {
                if let Some(c) = self.conns.get(conn) {
                    self.close_conn(&c, code, &text);
                }
            }
            Action::Handoff { conn, to, info } => self.start_handoff(conn, to, info),
            Action::ToShard { shard, msg } => {
                // The shard handles its own mesh messages; this branch is only a safety net.
                debug_assert_ne!(shard, self.id, "a shard sent itself a mesh message");
                if shard == self.id {
                    self.queue_event(Event::Mesh { from: self.id, msg });
                } else {
                    self.metrics.mesh_sent_total.fetch_add(1, Relaxed);
                    self.mesh_send(shard, GatewayMsg::Core(msg));
                }
            }
            Action::LoggedIn { conn, .. } => {
                if let Some(c) = self.conns.get(conn) {
                    c.mark_logged_in();
                }
            }
            Action::SendSms { phone, code } => self.side_effect(Job::Sms { phone, code }),
            Action::Push {
                to,
                from_user,
                msg_type,
            } => {
                self.metrics.pushes_total.fetch_add(1, Relaxed);
                self.side_effect(Job::Push {
                    user: to.user,
                    device: to.device,
                    from_user,
                    msg_type: msg_type.0,
                });
            }
            Action::ReadRecords { token, reads } => self.read_records(token, reads),
            Action::MediaAcl { blobs, users, .. } => {
                self.side_effect(Job::Media(MediaJob::Acl { blobs, users }))
            }
            Action::MediaDelete { blobs } => {
                self.side_effect(Job::Media(MediaJob::Delete { blobs }))
            }
        }
    }

    /// Reads the records on a task of this executor (through the log's read cache) and feeds
    /// the results back as one `Event::RecordsRead`, in request order.
    fn read_records(self: &Rc<Self>, token: u64, reads: Vec<RecordRef>) {
        let ctx = self.clone();
        glommio::spawn_local(async move {
            let mut results = Vec::with_capacity(reads.len());
            for r in reads {
                let read = ctx.log.read_record(r.segment, r.offset).await;
                results.push(read.map(|raw| (raw.tag, raw.body)));
            }
            ctx.refresh_now();
            ctx.feed(Event::RecordsRead { token, results });
        })
        .detach();
    }

    /// Queues `frame` on `conn`; a connection past `outbound_queue_bytes_max` is closed as a
    /// slow consumer.
    fn send(&self, conn: ConnId, frame: &Frame) {
        let Some(c) = self.conns.get(conn) else {
            return;
        };
        if c.push_frame(frame, self.cfg.outbound_queue_bytes_max) {
            self.count_sent(frame);
        } else {
            self.metrics.error(ErrorCode::SlowConsumer);
            tracing::info!(conn, "closing slow consumer");
            c.force_close();
            self.queue_event(Event::Closed { conn });
        }
    }

    /// Marks `conn` for hand-off to shard `to`; its task carries it out.
    fn start_handoff(&self, conn: ConnId, to: ShardId, info: LoginInfo) {
        if let Some(c) = self.conns.get(conn) {
            *c.handoff.borrow_mut() = Some(Box::new((to, info)));
            c.state.set(ConnState::HandingOff);
            c.notify();
        }
    }

    fn side_effect(&self, job: Job) {
        if !self.sidecar.submit(job) {
            self.metrics
                .side_effects_dropped_total
                .fetch_add(1, Relaxed);
        }
    }

    /// Sends `Error{code}` and closes after flushing. Counts the code.
    pub fn close_conn(&self, c: &Conn, code: ErrorCode, text: &str) {
        if c.state.get() != ConnState::Open {
            return;
        }
        tracing::debug!(conn = c.id, peer = %c.peer, code = code.name(), text, "closing connection");
        let frame = Frame::error(code, 0, text);
        // Past the output cap too: the client should learn why it is closed.
        if c.push_frame(&frame, usize::MAX) {
            self.count_sent(&frame);
        }
        c.begin_close(self.now_ms.get());
        self.arm_deadline(c);
    }

    /// Counts a frame queued for a client: `frames_out_total`, and for every `Error` frame
    /// (fatal or not: WrongCode, NoSuchRecipient, PayloadTooLarge, …) `errors_total` by code.
    fn count_sent(&self, frame: &Frame) {
        self.metrics.frames_out_total.fetch_add(1, Relaxed);
        if let Frame::Error(e) = frame {
            let code = e.code;
            match ErrorCode::from_u16(code) {
                Some(code) => self.metrics.error(code),
                None => tracing::warn!(code, "error frame with an unknown code sent"),
            }
        }
    }

    /// Sends a mesh message to `to` (see [`MeshOut::send`] and the backlog policy in
    /// [`crate::mesh`]): a request the full backlog refused closes its connection with
    /// Overloaded.
    pub fn mesh_send(&self, to: ShardId, msg: GatewayMsg) {
        match self.mesh.send(to, msg, &self.metrics) {
            Ok(()) | Err(Refused::Dropped) => {}
            // Dropping the hand-off closes its socket; the client reconnects.
            Err(Refused::Handoff(_)) => {}
            Err(Refused::Request(conn)) => {
                if let Some(c) = self.conns.get(conn) {
                    self.close_conn(
                        &c,
                        ErrorCode::Overloaded,
                        "mesh backlog to another shard is full (mesh_backlog_msgs_max); reconnect and resend",
                    );
                }
            }
        }
    }

    /// A connection's task ended.
    pub fn conn_gone(self: &Rc<Self>, id: ConnId) {
        self.forget_conn(id);
        self.feed(Event::Closed { conn: id });
    }

    /// Drops the runtime's record of a connection (no event).
    pub fn forget_conn(&self, id: ConnId) {
        if self.conns.remove(id) {
            self.metrics.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Registers a new open connection on this shard (`io`: its ring state, with the ring
    /// core) and arms its first deadline.
    pub fn register(&self, peer: SocketAddr, transport: Transport, io: Option<RingIo>) -> Rc<Conn> {
        let c = self.conns.insert(
            peer,
            transport,
            self.now_ms.get(),
            self.cfg.rate_limit_burst,
            io,
        );
        self.metrics.connections.fetch_add(1, Relaxed);
        self.arm_deadline(&c);
        c
    }

    /// The next time `c` must be looked at: its idle deadline, its pre-auth deadline while not
    /// logged in, its flush deadline while closing.
    fn next_deadline(&self, c: &Conn) -> Option<u64> {
        let cfg = &self.cfg;
        match c.state.get() {
            ConnState::Open => {
                let idle = c.last_rx_ms.get() + cfg.idle_timeout_ms + 1;
                if c.logged_in.get() {
                    Some(idle)
                } else {
                    Some(idle.min(c.opened_ms + cfg.preauth_timeout_ms + 1))
                }
            }
            ConnState::Closing => Some(c.closing_since_ms.get() + cfg.drain_timeout_ms + 1),
            ConnState::ForceClose | ConnState::HandingOff => None,
        }
    }

    fn arm_deadline(&self, c: &Conn) {
        if let Some(at) = self.next_deadline(c) {
            self.wheel.borrow_mut().insert(c.id, at);
        }
    }

    /// Copies the state machine's counters into the metrics.
    pub fn sync_stats(&self) {
        let core = self.machine.core.borrow();
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
        ShardMetrics::set(&m.dedup_entries, s.dedup_entries);
        ShardMetrics::set(&m.mailbox_hot_entries, s.mailbox_hot);
        ShardMetrics::set(&m.mailbox_records_read_total, s.records_read);
        ShardMetrics::set(
            &m.mailbox_record_read_failures_total,
            s.record_read_failures,
        );
        ShardMetrics::set(&m.mailbox_record_reads_inflight, s.record_reads_inflight);
        ShardMetrics::set(&m.compactions_abandoned_total, s.compactions_abandoned);
        ShardMetrics::set(&m.devices_linked, s.devices_linked);
        ShardMetrics::set(&m.device_links_total, s.links);
        ShardMetrics::set(&m.device_unlinks_total, s.unlinks);
        ShardMetrics::set(&m.device_links_refused_total, s.links_refused);
        ShardMetrics::set(&m.link_codes_issued_total, s.link_codes_issued);
        ShardMetrics::set(&m.link_codes, s.link_codes);
        ShardMetrics::set(&m.device_list_fetches_total, s.device_list_fetches);
        ShardMetrics::set(&m.sends_stale_total, s.sends_stale);
        ShardMetrics::set(&m.sends_multi_total, s.sends_multi);
        ShardMetrics::set(
            &m.device_list_watchers_evicted_total,
            s.device_list_watchers_evicted,
        );
        ShardMetrics::set(&m.media_slots_granted_total, s.media_slots_granted);
        ShardMetrics::set(
            &m.media_slot_bytes_granted_total,
            s.media_slot_bytes_granted,
        );
        ShardMetrics::set(&m.media_slots_refused_total, s.media_slots_refused);
        ShardMetrics::set(&m.media_downloads_granted_total, s.media_downloads_granted);
        ShardMetrics::set(&m.status_published_total, s.status_published);
        ShardMetrics::set(&m.status_deleted_total, s.status_deleted);
        ShardMetrics::set(&m.status_expired_total, s.status_expired);
        ShardMetrics::set(&m.status_posts, s.status_live);
        ShardMetrics::set(&m.presence_subscriptions, s.presence_subscriptions);
        ShardMetrics::set(
            &m.presence_subscription_limit_total,
            s.presence_subscription_limit,
        );
        ShardMetrics::set(
            &m.presence_subscriber_limit_total,
            s.presence_subscriber_limit,
        );
        ShardMetrics::set(
            &m.presence_subscriptions_expired_total,
            s.presence_subscriptions_expired,
        );
        ShardMetrics::set(&m.presence_changes_total, s.presence_changes);
        ShardMetrics::set(&m.presence_change_frames_total, s.presence_change_frames);
        ShardMetrics::set(&m.presence_typing_relayed_total, s.presence_typing_relayed);
        ShardMetrics::set(
            &m.presence_typing_rate_limited_total,
            s.presence_typing_rate_limited,
        );
        ShardMetrics::set(&m.presence_contact_limit_total, s.presence_contact_limit);
        ShardMetrics::set(
            &m.presence_last_seen_records_total,
            s.presence_last_seen_records,
        );
        ShardMetrics::set(&m.presence_blocked_drops_total, s.presence_blocked_drops);
        ShardMetrics::set(&m.call_active, s.calls_active);
        ShardMetrics::set(&m.call_offers_total, s.call_offers);
        ShardMetrics::set(&m.call_answered_total, s.calls_answered);
        ShardMetrics::set(&m.call_missed_total, s.calls_missed);
        ShardMetrics::set(&m.call_busy_total, s.calls_busy);
        ShardMetrics::set(&m.call_limit_total, s.call_limit);
        ShardMetrics::set(&m.turn_credentials_total, s.turn_credentials);
        ShardMetrics::set(&m.turn_rate_limited_total, s.turn_rate_limited);
        ShardMetrics::set(&m.turn_unavailable_total, s.turn_unavailable);
        ShardMetrics::set(&m.group_groups, s.groups);
        ShardMetrics::set(&m.group_created_total, s.groups_created);
        ShardMetrics::set(&m.group_changes_total, s.group_changes);
        ShardMetrics::set(&m.group_messages_total, s.group_messages);
        ShardMetrics::set(&m.group_fanouts_pending, s.group_fanouts_pending);
        ShardMetrics::set(&m.group_fanouts_sent_total, s.group_fanouts_sent);
        ShardMetrics::set(&m.group_fanouts_redriven_total, s.group_fanouts_redriven);
        ShardMetrics::set(&m.group_refused_full_total, s.group_refused_full);
        ShardMetrics::set(&m.group_refused_backlog_total, s.group_refused_backlog);
        ShardMetrics::set(&m.group_copies_stored_total, s.group_copies_stored);
        ShardMetrics::set(&m.group_copy_entries_total, s.group_copy_entries);
        ShardMetrics::set(&m.group_copies_duplicate_total, s.group_copies_duplicate);
        ShardMetrics::set(&m.group_joins_refused_total, s.group_joins_refused);
        ShardMetrics::set(
            &m.group_copies_out_of_order_total,
            s.group_copies_out_of_order,
        );
        ShardMetrics::set(&m.group_receipts_sent_total, s.group_receipts_sent);
        ShardMetrics::set(&m.log_poisoned, u64::from(core.poisoned().is_some()));
    }

    /// Closes connections idle past `idle_timeout_ms` or not logged in within
    /// `preauth_timeout_ms`, and forces closed those whose flush outlived `drain_timeout_ms`.
    /// Only connections whose wheel slot came up are looked at (O(expiring)); one whose
    /// deadline moved (it received since) is re-armed at its new deadline.
    pub fn expire_conns(&self, now: u64) {
        let mut due = Vec::new();
        self.wheel.borrow_mut().expire(now, &mut due);
        for id in due {
            if let Some(c) = self.conns.get(id) {
                self.check_deadlines(&c, now);
            }
        }
    }

    fn check_deadlines(&self, c: &Conn, now: u64) {
        let cfg = &self.cfg;
        match c.state.get() {
            ConnState::Open if now.saturating_sub(c.last_rx_ms.get()) > cfg.idle_timeout_ms => {
                self.close_conn(c, ErrorCode::IdleTimeout, "no frame within idle_timeout_ms");
            }
            ConnState::Open
                if !c.logged_in.get()
                    && now.saturating_sub(c.opened_ms) > cfg.preauth_timeout_ms =>
            {
                self.close_conn(
                    c,
                    ErrorCode::NotAuthenticated,
                    "no login within preauth_timeout_ms",
                );
            }
            ConnState::Closing
                if now.saturating_sub(c.closing_since_ms.get()) > cfg.drain_timeout_ms =>
            {
                c.force_close()
            }
            _ => self.arm_deadline(c),
        }
    }
}
