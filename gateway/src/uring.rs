//! The ring connection core (`connection_core = "uring"`): a shard's client sockets on its own
//! io_uring instance, driven through the `io-uring` crate by one glommio task per shard.
//!
//! * **Receive**: one multishot `recv` per connection, selecting from a provided-buffer ring
//!   shared by the shard. An idle connection holds no buffer, no task and no future: the kernel
//!   holds the armed request, user space holds the connection's [`Conn`] entry (fd, transport
//!   keys and nonces, token bucket, timestamps, flags) and its place in the timer wheel.
//! * **Send**: output sealed during a loop turn is gathered per connection and submitted as one
//!   `send` per connection, all in the turn's single `io_uring_enter`.
//! * **Wake-up**: the ring signals an eventfd that glommio reads (a read in glommio's own ring),
//!   so the shard sleeps in glommio as before and wakes for client traffic, the mesh, the log and
//!   timers alike. No polling, no spinning.
//! * **Completion work** ([`TaskWork`], `uring_task_work`): by default the ring is set up with
//!   `IORING_SETUP_DEFER_TASKRUN`, so the kernel does a socket's receive and posts its completion
//!   only when the shard enters the ring (once per loop turn, with `GETEVENTS`), never by
//!   interrupting the shard with an inter-processor interrupt from the CPU where the packet
//!   arrived. The eventfd still fires when such work is first queued, which wakes a sleeping
//!   shard.
//! * **Hand-off**: the multishot receive is cancelled and its last completion awaited before the
//!   descriptor moves to another shard; bytes received meanwhile travel with it.
//!
//! glommio keeps the executors, pinning, the mesh, the log files, timers, the listener and the
//! (short-lived) handshake; see docs/architecture.md.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use shards::{ConnId, Event, ShardId};

use crate::connection::{Conn, ConnState, RingIo};
use crate::ctx::Ctx;
use crate::mesh::{GatewayMsg, Handoff};
use crate::notify::Notify;

/// The provided-buffer group of the shard's receive buffers.
const BGID: u16 = 1;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_CANCEL: u64 = 3;
const ID_BITS: u64 = (1 << 48) - 1;
/// Completions handled before the driver yields to the shard's other tasks.
const CQE_BATCH: usize = 1024;
/// A send buffer with more capacity than this is freed once its bytes are written: none is
/// kept, so a connection between bursts holds no output allocation at all (a fresh one per
/// send costs far less than the send).
const SEND_BUF_KEEP_BYTES: usize = 0;

fn user_data(id: ConnId, op: u64) -> u64 {
    ((id & ID_BITS) << 8) | op
}

fn conn_of(shard: ShardId, ud: u64) -> ConnId {
    (u64::from(shard) << 48) | (ud >> 8)
}

/// The shard's run queue: connections with output or a state change since the last loop turn.
#[derive(Default)]
pub struct Kick {
    queue: RefCell<Vec<ConnId>>,
    wake: Notify,
}

impl Kick {
    /// Queues `id` and wakes the driver.
    pub fn push(&self, id: ConnId) {
        self.queue.borrow_mut().push(id);
        self.wake.notify();
    }

    fn wake(&self) {
        self.wake.notify();
    }
}

/// Kernel features the ring core needs, checked before a shard starts (and by
/// `switchboard-preflight`): multishot receive (`IORING_RECV_MULTISHOT`) and provided-buffer
/// rings (`IORING_REGISTER_PBUF_RING`), both Linux >= 6.0.
pub fn check_kernel() -> Result<(), String> {
    let release = kernel_release();
    match parse_release(&release) {
        Some((major, _)) if major >= 6 => {}
        Some(_) => {
            return Err(format!(
                "connection_core = \"uring\" needs multishot receive (IORING_RECV_MULTISHOT) and \
                 provided-buffer rings (IORING_REGISTER_PBUF_RING), Linux >= 6.0; this kernel is \
                 {release}. Use connection_core = \"task\"."
            ))
        }
        None => tracing::warn!(release, "kernel release not parsed; probing io_uring"),
    }
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let bufs = BufRing::new(8, 64).map_err(|e| format!("allocating a buffer ring: {e}"))?;
    // SAFETY: the ring memory lives in `bufs`, which outlives the registration (unregistered
    // below, before `bufs` drops).
    unsafe { bufs.register(&ring) }.map_err(|e| {
        format!(
            "provided-buffer rings (IORING_REGISTER_PBUF_RING, Linux >= 5.19) unavailable: {e}. \
             Use connection_core = \"task\"."
        )
    })?;
    let _ = ring.submitter().unregister_buf_ring(BGID);
    Ok(())
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc`.
pub fn parse_release(r: &str) -> Option<(u32, u32)> {
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// A provided-buffer ring: `count` buffers of `size` bytes that the kernel fills on receive and
/// we give back once their bytes are processed.
struct BufRing {
    /// Ring entries (page-aligned, as the kernel requires), `count` of them.
    entries: *mut types::BufRingEntry,
    entries_len: usize,
    /// The buffers, `count * size` bytes.
    mem: *mut u8,
    mem_len: usize,
    count: u16,
    size: usize,
    tail: Cell<u16>,
}

impl BufRing {
    fn new(count: u16, size: usize) -> std::io::Result<Self> {
        let count = count.max(1).next_power_of_two();
        let entries_len = usize::from(count) * std::mem::size_of::<types::BufRingEntry>();
        let mem_len = usize::from(count) * size;
        let entries = mmap(entries_len)?.cast::<types::BufRingEntry>();
        let mem = match mmap(mem_len) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: `entries` was just mapped with this length and is not used elsewhere.
                unsafe { libc::munmap(entries.cast(), entries_len) };
                return Err(e);
            }
        };
        let r = Self {
            entries,
            entries_len,
            mem,
            mem_len,
            count,
            size,
            tail: Cell::new(0),
        };
        for bid in 0..count {
            r.put(bid);
        }
        r.publish();
        Ok(r)
    }

    /// # Safety
    /// `self` must outlive the registration (until unregistered or the ring is dropped).
    unsafe fn register(&self, ring: &IoUring) -> std::io::Result<()> {
        // SAFETY: the entries are a live, page-aligned mapping of `count` entries (caller
        // guarantees the lifetime).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.entries as u64, self.count, BGID, 0)
        }
    }

    /// Writes buffer `bid` into the next free ring slot (visible to the kernel once published).
    fn put(&self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let tail = self.tail.get();
        let slot = usize::from(tail & (self.count - 1));
        // SAFETY: `slot < count`, so the pointer is inside the entries mapping; the kernel reads
        // only slots between its head and the published tail, and this slot is past the tail.
        let e = unsafe { &mut *self.entries.add(slot) };
        // SAFETY: `bid < count`, so the offset is inside the buffer mapping.
        let addr = unsafe { self.mem.add(usize::from(bid) * self.size) };
        e.set_addr(addr as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    /// Makes every `put` so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field sits in the first entry of the live mapping; the kernel reads
        // it concurrently, hence the atomic release store.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.entries).cast::<AtomicU16>()) };
        tail.store(self.tail.get(), Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and handed to us.
    ///
    /// # Safety
    /// `bid` must come from a completion and not have been given back since, and no other
    /// slice of that buffer may be alive.
    #[allow(clippy::mut_from_ref)] // the kernel handed this buffer to us: it is ours alone
    unsafe fn get(&self, bid: u16, len: usize) -> Option<&mut [u8]> {
        if bid >= self.count || len > self.size {
            return None;
        }
        // SAFETY: in bounds (checked above); the kernel no longer writes a buffer it completed
        // until we give it back (caller's contract), and no other reference to it exists.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.mem.add(usize::from(bid) * self.size), len)
        })
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were created in `new` with these lengths; the ring that used
        // them is dropped first (field order in `Ring`) or never registered them.
        unsafe {
            libc::munmap(self.mem.cast(), self.mem_len);
            libc::munmap(self.entries.cast(), self.entries_len);
        }
    }
}

fn mmap(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// How the kernel runs the ring's completion work (`uring_task_work`), from the most batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskWork {
    /// `DEFER_TASKRUN | SINGLE_ISSUER | TASKRUN_FLAG` (Linux >= 6.1): run only when the shard
    /// enters the ring with `GETEVENTS`.
    Defer,
    /// `COOP_TASKRUN | TASKRUN_FLAG` (Linux >= 5.19): run at the shard's next kernel entry, no
    /// interrupt.
    Coop,
    /// The kernel's default: the shard is interrupted (`TWA_SIGNAL`, an IPI when the work was
    /// queued on another CPU) to run it at once.
    Signal,
}

impl TaskWork {
    /// Parses a `uring_task_work` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "defer" => Some(Self::Defer),
            "coop" => Some(Self::Coop),
            "signal" => Some(Self::Signal),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Defer => "defer",
            Self::Coop => "coop",
            Self::Signal => "signal",
        }
    }

    /// The next mode to try when the kernel refuses this one.
    fn fallback(self) -> Option<Self> {
        match self {
            Self::Defer => Some(Self::Coop),
            Self::Coop => Some(Self::Signal),
            Self::Signal => None,
        }
    }

    fn build(self, entries: u32) -> std::io::Result<IoUring> {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries.saturating_mul(4));
        match self {
            Self::Defer => {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }
            Self::Coop => {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            Self::Signal => {}
        }
        b.build(entries)
    }
}

/// One shard's ring, its receive buffers and its run queue.
pub struct Ring {
    // Field order matters: the ring is dropped (and its registrations released) before the
    // buffers it points into.
    ring: RefCell<IoUring>,
    bufs: BufRing,
    /// Connections with work for the next loop turn.
    pub kick: Rc<Kick>,
    event_fd: OwnedFd,
    /// Send buffers of connections closed while their send was in flight, kept until the
    /// kernel completes it.
    orphans: RefCell<HashMap<ConnId, Vec<u8>>>,
    /// Submissions queued for the next `io_uring_enter`.
    queued: Cell<usize>,
    /// How the kernel runs this ring's completion work (after any fallback).
    pub task_work: TaskWork,
}

impl Ring {
    /// A ring with `entries` submission slots and `buf_count` receive buffers of `buf_bytes`.
    /// `task_work` is tried first; a mode the kernel refuses (`EINVAL`) falls back to the next
    /// one with a warning.
    pub fn new(
        entries: u32,
        buf_count: u16,
        buf_bytes: usize,
        task_work: TaskWork,
    ) -> Result<Self, String> {
        let mut mode = task_work;
        let ring = loop {
            match mode.build(entries) {
                Ok(r) => break r,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let Some(next) = mode.fallback() else {
                        return Err(format!("io_uring_setup for the connection ring: {e}"));
                    };
                    tracing::warn!(
                        refused = mode.name(),
                        using = next.name(),
                        "uring_task_work: the kernel refused this mode (EINVAL); falling back"
                    );
                    mode = next;
                }
                Err(e) => return Err(format!("io_uring_setup for the connection ring: {e}")),
            }
        };
        let bufs = BufRing::new(buf_count, buf_bytes)
            .map_err(|e| format!("allocating the receive buffer ring: {e}"))?;
        // SAFETY: `bufs` is stored next to the ring and dropped after it (field order).
        unsafe { bufs.register(&ring) }
            .map_err(|e| format!("registering the provided-buffer ring (Linux >= 6.0): {e}"))?;
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let event_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter()
            .register_eventfd(event_fd.as_raw_fd())
            .map_err(|e| format!("registering the ring's eventfd: {e}"))?;
        Ok(Self {
            ring: RefCell::new(ring),
            bufs,
            kick: Rc::new(Kick::default()),
            event_fd,
            orphans: RefCell::new(HashMap::new()),
            queued: Cell::new(0),
            task_work: mode,
        })
    }

    /// Whether the kernel holds completion work that only an enter with `GETEVENTS` runs
    /// (`IORING_SQ_TASKRUN`, set in the `defer` and `coop` modes).
    fn task_work_pending(&self) -> bool {
        self.task_work != TaskWork::Signal && self.ring.borrow_mut().submission().taskrun()
    }

    fn push(&self, e: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: every buffer an entry points to (a connection's in-flight send buffer,
            // kept unmoved until its completion) outlives the operation.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                self.queued.set(self.queued.get() + 1);
                return;
            }
            if let Err(err) = ring.submit() {
                tracing::warn!(error = %err, "io_uring_enter failed");
            }
            self.queued.set(0);
        }
    }

    /// Submits what was queued and runs pending completion work (one `io_uring_enter`, with
    /// `GETEVENTS` when work is pending); false when there was neither.
    fn submit(&self) -> bool {
        if self.queued.get() == 0 && !self.task_work_pending() {
            return false;
        }
        if let Err(e) = self.ring.borrow_mut().submit() {
            tracing::warn!(error = %e, "io_uring_enter failed");
        }
        self.queued.set(0);
        true
    }

    fn arm_recv(&self, c: &Conn, io: &RingIo) {
        let Some(fd) = raw(io) else { return };
        let e = opcode::RecvMulti::new(types::Fd(fd), BGID)
            .build()
            .user_data(user_data(c.id, OP_RECV));
        io.receiving.set(true);
        self.push(e);
    }

    fn reap(&self, out: &mut Vec<(u64, i32, u32)>) {
        let mut ring = self.ring.borrow_mut();
        let mut cq = ring.completion();
        cq.sync();
        for e in cq.by_ref().take(CQE_BATCH) {
            out.push((e.user_data(), e.result(), e.flags()));
        }
    }

    fn has_completions(&self) -> bool {
        if self.task_work_pending() {
            return true;
        }
        let mut ring = self.ring.borrow_mut();
        let mut cq = ring.completion();
        cq.sync();
        !cq.is_empty()
    }
}

fn raw(io: &RingIo) -> Option<RawFd> {
    io.fd.borrow().as_ref().map(AsRawFd::as_raw_fd)
}

/// Takes over a socket whose handshake is done: the connection is registered by the caller,
/// this arms its receive and queues its first turn.
pub fn start(ctx: &Rc<Ctx>, c: &Rc<Conn>) {
    let (Some(ring), Some(io)) = (ctx.ring.as_ref(), c.io.as_ref()) else {
        return;
    };
    ring.arm_recv(c, io);
    c.notify();
}

/// Feeds bytes that arrived before the connection reached this shard (a hand-off's
/// `pending_in`).
pub fn feed_pending(ctx: &Rc<Ctx>, c: &Rc<Conn>, bytes: Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    let mut b = bytes;
    on_bytes(ctx, c, &mut b);
}

/// Runs the shard's ring until the process exits: completions, then every connection with
/// work, then one `io_uring_enter`; sleeps in glommio when there is nothing to do.
pub async fn drive(ctx: Rc<Ctx>) {
    let Some(ring) = ctx.ring.as_ref() else {
        return;
    };
    spawn_eventfd_reader(&ctx, ring);
    let mut cqes = Vec::with_capacity(CQE_BATCH);
    let mut turn: Vec<ConnId> = Vec::new();
    let gather = Duration::from_micros(ctx.cfg.uring_gather_us);
    loop {
        // Deferred completion work (receives' copies, sends' results) runs here, batched.
        if ring.task_work_pending() && ring.submit() {
            ctx.metrics.uring_enters_total.fetch_add(1, Relaxed);
        }
        ring.reap(&mut cqes);
        if !cqes.is_empty() {
            ctx.refresh_now();
        }
        for (ud, res, flags) in cqes.drain(..) {
            on_completion(&ctx, ring, ud, res, flags);
        }
        loop {
            std::mem::swap(&mut turn, &mut *ring.kick.queue.borrow_mut());
            if turn.is_empty() {
                break;
            }
            for id in turn.drain(..) {
                if let Some(c) = ctx.conns.get(id) {
                    service(&ctx, ring, &c);
                }
            }
        }
        if ring.submit() {
            ctx.metrics.uring_enters_total.fetch_add(1, Relaxed);
        }
        if ring.has_completions() {
            glommio::yield_if_needed().await;
            continue;
        }
        ring.kick.wake.notified().await;
        // Woken by client traffic alone after an idle moment, i.e. at a low rate: let the next
        // few packets arrive, so they share this wake-up, its loop turn and its enter.
        if gather > Duration::ZERO
            && ring.kick.queue.borrow().is_empty()
            && !ctx.life.draining.get()
        {
            glommio::timer::sleep(gather).await;
        }
    }
}

/// Reads the ring's eventfd through glommio and wakes the driver on every signal.
fn spawn_eventfd_reader(ctx: &Rc<Ctx>, ring: &Ring) {
    let kick = ring.kick.clone();
    let shard = ctx.id;
    // A second descriptor for glommio to own (and close); the ring keeps the registered one.
    let dup = match ring.event_fd.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(shard, error = %e, "dup of the ring eventfd failed");
            return;
        }
    };
    glommio::spawn_local(async move {
        use std::os::fd::IntoRawFd;
        // SAFETY: `dup` is a descriptor we own; glommio's file takes it over.
        let file = unsafe { glommio::io::BufferedFile::from_raw_fd(dup.into_raw_fd()) };
        loop {
            match file.read_at(0, 8).await {
                Ok(_) => kick.wake(),
                Err(e) => {
                    tracing::error!(shard, error = %e, "reading the ring eventfd failed; polling every ms");
                    loop {
                        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                        kick.wake();
                    }
                }
            }
        }
    })
    .detach();
}

fn on_completion(ctx: &Rc<Ctx>, ring: &Ring, ud: u64, res: i32, flags: u32) {
    let id = conn_of(ctx.id, ud);
    match ud & 0xff {
        OP_RECV => {
            let bid = cqueue::buffer_select(flags);
            if let Some(c) = ctx.conns.get(id) {
                on_recv(ctx, ring, &c, res, flags, bid);
            }
            if let Some(bid) = bid {
                ring.bufs.put(bid);
                ring.bufs.publish();
            }
        }
        OP_SEND => match ctx.conns.get(id) {
            Some(c) if c.io.as_ref().is_some_and(|io| io.sending.get()) => {
                on_sent(ctx, &c, res);
            }
            _ => {
                ring.orphans.borrow_mut().remove(&id);
            }
        },
        _ => {}
    }
}

fn on_recv(ctx: &Rc<Ctx>, ring: &Ring, c: &Rc<Conn>, res: i32, flags: u32, bid: Option<u16>) {
    let Some(io) = c.io.as_ref() else { return };
    let more = cqueue::more(flags);
    if !more {
        io.receiving.set(false);
    }
    if res > 0 {
        let n = res as usize;
        ctx.metrics.bytes_in_total.fetch_add(n as u64, Relaxed);
        // SAFETY: `bid` comes from this completion and is given back only after this call.
        if let Some(buf) = bid.and_then(|b| unsafe { ring.bufs.get(b, n) }) {
            on_bytes(ctx, c, buf);
        }
    } else if res == 0 || (res != -libc::ENOBUFS && res != -libc::ECANCELED) {
        // EOF, or a socket error.
        teardown(ctx, ring, c);
        return;
    }
    if !more && !io.receiving.get() {
        if c.state.get() == ConnState::HandingOff || io.cancelling.get() {
            c.notify();
        } else if matches!(c.state.get(), ConnState::Open | ConnState::Closing) {
            ctx.metrics.uring_recv_rearms_total.fetch_add(1, Relaxed);
            ring.arm_recv(c, io);
        }
    }
}

/// Bytes received on `c`: whole records are opened and fed; a split record's head waits in
/// `pending_in`. While handing off, everything waits there (it travels with the socket).
fn on_bytes(ctx: &Rc<Ctx>, c: &Rc<Conn>, data: &mut [u8]) {
    let Some(io) = c.io.as_ref() else { return };
    c.last_rx_ms.set(ctx.now_ms.get());
    match c.state.get() {
        ConnState::Open => {}
        ConnState::HandingOff => {
            io.pending_in.borrow_mut().extend_from_slice(data);
            return;
        }
        ConnState::Closing | ConnState::ForceClose => return,
    }
    let mut pending = std::mem::take(&mut *io.pending_in.borrow_mut());
    if pending.is_empty() {
        let used = crate::conn_task::process(ctx, c, data);
        if let Some(rest) = data.get(used..) {
            if !rest.is_empty() {
                pending.extend_from_slice(rest);
            }
        }
    } else {
        pending.extend_from_slice(data);
        let used = crate::conn_task::process(ctx, c, &mut pending);
        pending.drain(..used.min(pending.len()));
        if pending.is_empty() {
            pending = Vec::new();
        }
    }
    if c.state.get() == ConnState::Open || c.state.get() == ConnState::HandingOff {
        let mut slot = io.pending_in.borrow_mut();
        if slot.is_empty() {
            *slot = pending;
        } else {
            // Bytes arrived for a hand-off while we processed (not possible today: kept safe).
            pending.extend_from_slice(&slot);
            *slot = pending;
        }
    }
}

fn on_sent(ctx: &Rc<Ctx>, c: &Rc<Conn>, res: i32) {
    let Some(io) = c.io.as_ref() else { return };
    io.sending.set(false);
    if res <= 0 {
        ctx.refresh_now();
        if let Some(ring) = ctx.ring.as_ref() {
            teardown(ctx, ring, c);
        }
        return;
    }
    let n = res as usize;
    ctx.metrics.bytes_out_total.fetch_add(n as u64, Relaxed);
    ctx.metrics.writes_total.fetch_add(1, Relaxed);
    let pos = io.inflight_pos.get() + n;
    let mut inflight = io.inflight.borrow_mut();
    if pos >= inflight.len() {
        if inflight.capacity() > SEND_BUF_KEEP_BYTES {
            *inflight = Vec::new();
        } else {
            inflight.clear();
        }
        io.inflight_pos.set(0);
    } else {
        io.inflight_pos.set(pos);
    }
    drop(inflight);
    c.notify();
}

/// Starts a send of everything sealed since the last one, unless one is in flight.
fn start_send(ring: &Ring, c: &Conn, io: &RingIo) {
    if io.sending.get() {
        return;
    }
    let Some(fd) = raw(io) else { return };
    let mut inflight = io.inflight.borrow_mut();
    if io.inflight_pos.get() >= inflight.len() {
        let mut out = c.out.borrow_mut();
        if out.len() <= c.out_pos.get() {
            if out.capacity() > SEND_BUF_KEEP_BYTES {
                *out = Vec::new();
            }
            return;
        }
        inflight.clear();
        std::mem::swap(&mut *out, &mut *inflight);
        io.inflight_pos.set(c.out_pos.get());
        c.out_pos.set(0);
    }
    let pos = io.inflight_pos.get();
    let Some(rest) = inflight.get(pos..) else {
        return;
    };
    let e = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(c.id, OP_SEND));
    io.sending.set(true);
    drop(inflight);
    ring.push(e);
}

/// One loop turn's work for a connection that was kicked.
fn service(ctx: &Rc<Ctx>, ring: &Ring, c: &Rc<Conn>) {
    let Some(io) = c.io.as_ref() else { return };
    io.kicked.set(false);
    match c.state.get() {
        ConnState::Open => start_send(ring, c, io),
        ConnState::Closing => {
            start_send(ring, c, io);
            if !io.sending.get() && c.unsent() == 0 {
                teardown(ctx, ring, c);
            }
        }
        ConnState::ForceClose => teardown(ctx, ring, c),
        ConnState::HandingOff => {
            if io.receiving.get() {
                if !io.cancelling.replace(true) {
                    let e = opcode::AsyncCancel::new(user_data(c.id, OP_RECV))
                        .build()
                        .user_data(user_data(c.id, OP_CANCEL));
                    ring.push(e);
                }
                return;
            }
            if io.sending.get() {
                return;
            }
            handoff(ctx, c, io);
        }
    }
}

/// Closes the socket and forgets the connection. A receive still armed ends with the
/// `shutdown`; a send still in flight keeps its buffer alive in `orphans` until it completes.
fn teardown(ctx: &Rc<Ctx>, ring: &Ring, c: &Rc<Conn>) {
    let Some(io) = c.io.as_ref() else { return };
    let Some(fd) = io.fd.borrow_mut().take() else {
        return;
    };
    if io.sending.replace(false) {
        let buf = std::mem::take(&mut *io.inflight.borrow_mut());
        ring.orphans.borrow_mut().insert(c.id, buf);
    }
    // SAFETY: `fd` is a live socket we own; shutdown(2) has no memory effects.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    drop(fd);
    ctx.conn_gone(c.id);
}

/// Moves a logged-in connection to its home shard: no operation of ours is in flight on it.
fn handoff(ctx: &Rc<Ctx>, c: &Rc<Conn>, io: &RingIo) {
    let Some((to, info)) = c.handoff.borrow_mut().take().map(|b| *b) else {
        if let Some(ring) = ctx.ring.as_ref() {
            teardown(ctx, ring, c);
        }
        return;
    };
    let Some(fd) = io.fd.borrow_mut().take() else {
        ctx.conn_gone(c.id);
        return;
    };
    ctx.forget_conn(c.id);
    let transport = c.transport.borrow().clone();
    ctx.metrics.handoffs_out_total.fetch_add(1, Relaxed);
    let h = Handoff {
        fd,
        transport,
        pending_in: std::mem::take(&mut *io.pending_in.borrow_mut()),
        pending_out: c.unsent_bytes(),
        info,
        peer: c.peer,
    };
    ctx.mesh_send(to, GatewayMsg::Handoff(Box::new(h)));
}

/// A connection handed to this shard, on the ring: registered, login replayed, the bytes that
/// came with it fed, its receive armed.
pub fn adopt(ctx: &Rc<Ctx>, h: Handoff) {
    let Some(ring) = ctx.ring.as_ref() else {
        return;
    };
    let io = RingIo::new(h.fd, ring.kick.clone());
    let c = ctx.register(h.peer, h.transport, Some(io));
    *c.out.borrow_mut() = h.pending_out;
    ctx.metrics.handoffs_in_total.fetch_add(1, Relaxed);
    ctx.feed(Event::Login {
        conn: c.id,
        info: h.info,
    });
    feed_pending(ctx, &c, h.pending_in);
    start(ctx, &c);
}

/// Turns a glommio stream whose handshake is done into a descriptor for the ring: a duplicate
/// (close-on-exec), after which the stream is dropped (closing its descriptor and cancelling
/// its poll), so no glommio operation is in flight on the socket.
pub fn take_fd(stream: glommio::net::TcpStream) -> std::io::Result<OwnedFd> {
    let dup = {
        // SAFETY: `stream` owns the descriptor and is alive for this borrow.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        borrowed.try_clone_to_owned()
    };
    drop(stream);
    dup
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_the_connection_id() {
        let id = (3u64 << 48) | 123_456;
        let ud = user_data(id, OP_SEND);
        assert_eq!(ud & 0xff, OP_SEND);
        assert_eq!(conn_of(3, ud), id);
    }

    #[test]
    fn kernel_release_parses() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("x"), None);
    }
}

#[cfg(test)]
mod size_report {
    #[test]
    fn print_sizes() {
        use std::mem::size_of;
        eprintln!(
            "Conn {} RingIo {} Transport {} LoginInfo {} PreauthSlot {} Notify {} SocketAddr {}",
            size_of::<crate::connection::Conn>(),
            size_of::<crate::connection::RingIo>(),
            size_of::<protocol::noise::Transport>(),
            size_of::<shards::LoginInfo>(),
            size_of::<crate::preauth::PreauthSlot>(),
            size_of::<crate::notify::Notify>(),
            size_of::<std::net::SocketAddr>(),
        );
    }
}
