//! The shard state machine fanning one group message out to a 1,024-member group whose members
//! live on both shards of a two-shard cluster: `GroupSend` on the sender's shard → the group's
//! home appends the message → durable → ✓ → one `GroupFanout` per destination shard → each
//! stores the payload once (one record) with one mailbox entry per member device → durable →
//! `Deliver` to every online member device (and their acks, in the `online` case) → fan-out acks
//! back to the home. No sockets, no disk: the CPU of the state machine per group message, with
//! an in-memory journal that frames every record as the real log does.
//!
//! Besides the criterion timings it prints, once per case, the log bytes and records per group
//! message and (`offline` case) the heap bytes each queued message costs per offline member
//! (counted by this binary's allocator), the figures hardware.md §10 quotes.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use protocol::group::UserList;
use protocol::{capability, frame, Frame, UserId};
use shards::{ConnId, ShardId};
use switchboard_benches::harness::{user_on, MiniCluster};

/// Counts live heap bytes, to report what queued group messages hold in memory.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MEMBERS: usize = 1024;

/// A connection in the cluster: (shard, conn).
type Conn = (ShardId, ConnId);
const CAPS: u64 = capability::MESSAGING | capability::GROUPS;

/// A two-shard cluster with `MEMBERS` accounts, half homed on each shard; the creator (member
/// 0) is logged in; the others are logged in when `online`. Returns the cluster, the creator's
/// connection, every other member's connection (empty when offline) and the group id.
fn setup(online: bool) -> (MiniCluster, Conn, Vec<Conn>, u64) {
    let users: Vec<UserId> = (0..MEMBERS)
        .map(|i| user_on((i % 2) as ShardId, 2, i / 2))
        .collect();
    let mut cl = MiniCluster::new(2, &users, &[], &common::payload());
    let creator = cl.login_with(users[0], CAPS);
    let members: Vec<_> = if online {
        users[1..].iter().map(|&u| cl.login_with(u, CAPS)).collect()
    } else {
        Vec::new()
    };
    cl.settle();
    cl.out.clear();
    cl.frame(
        creator,
        Frame::GroupCreate(frame::GroupCreate {
            request_id: 1,
            members: UserList::of(users[1..].iter().copied()),
        }),
    );
    cl.settle();
    let group = cl
        .out
        .iter()
        .find_map(|(_, c, f)| match f {
            Frame::GroupInfo(i) if *c == creator.1 => Some(i.group),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no GroupInfo for the creator: {:?}", cl.out.first()));
    // The creation event reaches every member like a message: drain it.
    ack_all(&mut cl, &members);
    cl.out.clear();
    (cl, creator, members, group)
}

/// Every member acknowledges what it was delivered; returns how many deliveries there were.
fn ack_all(cl: &mut MiniCluster, members: &[Conn]) -> usize {
    let mut delivered = 0;
    for &m in members {
        let (seqs, _) = cl.take_seqs(m.1);
        if !seqs.is_empty() {
            delivered += seqs.len();
            cl.frame(m, Frame::Ack(frame::Ack { seqs }));
        }
    }
    cl.settle();
    delivered
}

fn send(cl: &mut MiniCluster, creator: Conn, group: u64, id: u64) {
    cl.now_ms += 1;
    cl.frame(
        creator,
        Frame::GroupSend(frame::GroupSend {
            client_msg_id: id,
            group,
            payload: common::payload(),
        }),
    );
    cl.settle();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("group_fanout_1024");
    // One element = one member device reached: the criterion figure is deliveries/s.
    g.throughput(Throughput::Elements((MEMBERS - 1) as u64));

    let (mut cl, creator, members, group) = setup(true);
    // One message outside the measurement, for the per-message log figures.
    let (b0, r0) = cl.log_appended();
    send(&mut cl, creator, group, 1);
    let delivered = ack_all(&mut cl, &members);
    let (b1, r1) = cl.log_appended();
    eprintln!(
        "group_fanout_1024/online: one message to {} members: {delivered} deliveries, \
         {} log bytes in {} records (send, fan-out, copies, acks)",
        MEMBERS - 1,
        b1 - b0,
        r1 - r0
    );
    assert_eq!(delivered, MEMBERS - 1, "every member device got it once");
    let mut id = 1u64;
    g.bench_function("online_send_deliver_ack", |bench| {
        bench.iter(|| {
            id += 1;
            send(&mut cl, creator, group, id);
            black_box(ack_all(&mut cl, &members));
            cl.out.clear();
        })
    });
    drop(cl);

    let (mut cl, creator, _, group) = setup(false);
    let (b0, r0) = cl.log_appended();
    let live0 = LIVE.load(Relaxed);
    const QUEUED: u64 = 200;
    for id in 1..=QUEUED {
        send(&mut cl, creator, group, id);
        cl.out.retain(|(_, _, f)| !matches!(f, Frame::ServerAck(_)));
    }
    let live1 = LIVE.load(Relaxed);
    let (b1, r1) = cl.log_appended();
    let per = QUEUED * (MEMBERS as u64 - 1);
    eprintln!(
        "group_fanout_1024/offline: {QUEUED} messages of 100 B queued for {} offline members: \
         {:.1} log bytes and {:.1} heap bytes per queued message per member; {:.0} log bytes \
         ({:.1} records) per group message",
        MEMBERS - 1,
        (b1 - b0) as f64 / per as f64,
        (live1 - live0) as f64 / per as f64,
        (b1 - b0) as f64 / QUEUED as f64,
        (r1 - r0) as f64 / QUEUED as f64,
    );
    let mut id = QUEUED;
    g.bench_function("offline_send_queue", |bench| {
        bench.iter(|| {
            id += 1;
            send(&mut cl, creator, group, id);
            cl.out.clear();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = fanout
}
criterion_main!(benches);
