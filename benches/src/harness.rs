//! A synchronous, in-memory driver for the shard state machine, used by the criterion benches:
//! the simulated journal (`storage::sim`, which encodes records exactly as the real log does,
//! here forgetting what it committed), and a tiny cluster that carries mesh messages between
//! shards and group-commits every journal, so one call runs an event to quiescence.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};

use protocol::{capability, frame, DeviceAddr, Frame, Message, MsgType, UserId};
use shards::record::Record;
use shards::{home_shard, key_shard, Action, Config, ConnId, Event, MeshMsg, Shard, ShardId};
use storage::{SegmentId, SimConfig, SimJournal};

/// The benches' journal: the simulated journal, which frames every append exactly as the real
/// log does (its CPU cost), with the synced bytes forgotten after each commit so memory stays
/// flat however many iterations criterion runs.
fn bench_journal() -> SimJournal {
    SimJournal::new(SimConfig::default())
}

/// A deterministic static key for a bench user.
pub fn key_of(user: UserId) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&user.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    k[8..16].copy_from_slice(&user.to_le_bytes());
    k
}

/// The `skip`-th phone number homed on `shard` of `shards`.
pub fn user_on(shard: ShardId, shards: u16, skip: usize) -> UserId {
    let mut found = 0usize;
    for u in 14_155_550_000u64..14_155_550_000 + 1_000_000 {
        if home_shard(u, shards) == shard {
            if found == skip {
                return u;
            }
            found += 1;
        }
    }
    panic!("no user on shard {shard}")
}

/// A set of shards driven synchronously: mesh messages go through one FIFO.
#[derive(Debug)]
pub struct MiniCluster {
    /// The shards.
    pub shards: Vec<Shard>,
    /// Their journals.
    pub journals: Vec<SimJournal>,
    /// Shard clock.
    pub now_ms: u64,
    mesh: VecDeque<(ShardId, ShardId, MeshMsg)>,
    /// Frames sent to connections: (shard, conn, frame), in order.
    pub out: Vec<(ShardId, ConnId, Frame)>,
    /// Other actions (push, close, sms, …) seen, counted.
    pub other_actions: u64,
    next_conn: ConnId,
    /// The preloaded (recovered) records of each shard, kept whole: cold mailbox entries are
    /// read back from here (the bench journals forget what they commit).
    preloaded: Vec<SimJournal>,
}

/// The recovered records bound for `shard` (`home_shard` and `key_shard` name one of the `n`
/// shards; `n` = 0 has no shard to hold them).
fn recs_of(
    per_shard: &mut [Vec<(SegmentId, Record)>],
    shard: ShardId,
) -> &mut Vec<(SegmentId, Record)> {
    let n = per_shard.len();
    per_shard
        .get_mut(usize::from(shard))
        .unwrap_or_else(|| panic!("no shard {shard} in a cluster of {n}"))
}

impl MiniCluster {
    /// `n` shards whose recovered state holds an account (device 0, key [`key_of`]) for every
    /// user in `users`, plus `queued` durable messages per `(recipient, count, sender)`.
    pub fn new(
        n: u16,
        users: &[UserId],
        queued: &[(UserId, usize, UserId)],
        payload: &bytes::Bytes,
    ) -> Self {
        let now_ms = 1_700_000_000_000;
        let mut per_shard: Vec<Vec<(SegmentId, Record)>> = (0..n).map(|_| Vec::new()).collect();
        for &u in users {
            let k = key_of(u);
            recs_of(&mut per_shard, home_shard(u, n)).push((
                1,
                Record::Account {
                    user: u,
                    device: 0,
                    static_key: k,
                    ts_ms: 1,
                },
            ));
            recs_of(&mut per_shard, key_shard(&k, n)).push((
                1,
                Record::KeyBinding {
                    static_key: k,
                    user: u,
                    device: 0,
                    ts_ms: 1,
                },
            ));
        }
        let mut seq = 0u64;
        for &(to, count, from) in queued {
            let recs = recs_of(&mut per_shard, home_shard(to, n));
            for i in 0..count {
                seq += 1;
                recs.push((
                    1,
                    Record::Message {
                        seq,
                        to: DeviceAddr {
                            user: to,
                            device: 0,
                        },
                        message: Message {
                            from: DeviceAddr {
                                user: from,
                                device: 0,
                            },
                            client_msg_id: i as u64 + 1,
                            server_ts_ms: now_ms - 1000,
                            msg_type: MsgType::TEXT,
                            payload: payload.clone(),
                        },
                    },
                ));
            }
        }
        let shards = per_shard
            .into_iter()
            .enumerate()
            .map(|(i, recs)| {
                let preload = SimJournal::with_durable(SimConfig::default(), recs);
                let mut s = Shard::new(Config::new(i as ShardId, n), 7 + i as u64);
                s.recover(now_ms, &[1], shards::decode_log(preload.appended()).records);
                (s, preload)
            })
            .collect::<Vec<_>>();
        let (shards, preloaded) = shards.into_iter().unzip();
        Self {
            preloaded,
            shards,
            journals: (0..n).map(|_| bench_journal()).collect(),
            now_ms,
            mesh: VecDeque::new(),
            out: Vec::new(),
            other_actions: 0,
            next_conn: 1,
        }
    }

    /// Framed log bytes and records appended so far, summed over the shards' journals (as the
    /// real log writes them: header and body).
    pub fn log_appended(&self) -> (u64, u64) {
        self.journals
            .iter()
            .fold((0, 0), |(b, r), j| (b + j.bytes_appended, r + j.appends))
    }

    fn n(&self) -> u16 {
        self.shards.len() as u16
    }

    /// Feeds one event to shard `s` and routes its actions (mesh messages are queued).
    pub fn event(&mut self, s: ShardId, ev: Event) {
        let i = usize::from(s);
        let (Some(shard), Some(journal)) = (self.shards.get_mut(i), self.journals.get_mut(i))
        else {
            panic!("no shard {s} in a cluster of {}", self.shards.len());
        };
        shard.handle(self.now_ms, ev, journal);
        let actions: Vec<Action> = shard.drain_actions().collect();
        for a in actions {
            match a {
                Action::ToShard { shard, msg } => self.mesh.push_back((s, shard, msg)),
                Action::Send { conn, frame } => self.out.push((s, conn, frame)),
                Action::Handoff { conn, to, info } => self.event(to, Event::Login { conn, info }),
                Action::ReadRecords { token, reads } => {
                    let results = reads
                        .iter()
                        .map(|r| {
                            let preloaded = self
                                .preloaded
                                .get(i)
                                .map(|j| j.read_record(r.segment, r.offset));
                            match preloaded {
                                Some(Ok(raw)) => Ok(raw),
                                _ => self.journals.get(i).map_or(
                                    Err(storage::ReadError::NoSegment { segment: r.segment }),
                                    |j| j.read_record(r.segment, r.offset),
                                ),
                            }
                            .map(|raw| (raw.tag, raw.body))
                        })
                        .collect();
                    self.event(s, Event::RecordsRead { token, results });
                }
                _ => self.other_actions += 1,
            }
        }
    }

    /// Runs the mesh and group-commits every journal until nothing moves (bounded).
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            while let Some((from, to, msg)) = self.mesh.pop_front() {
                self.event(to, Event::Mesh { from, msg });
            }
            let mut moved = false;
            for s in 0..self.n() {
                let Some(journal) = self.journals.get_mut(usize::from(s)) else {
                    continue; // never: one journal per shard
                };
                let committed = journal.commit();
                journal.forget_durable();
                if let Some(up_to) = committed {
                    moved = true;
                    self.event(s, Event::Durable { up_to });
                }
            }
            if !moved && self.mesh.is_empty() {
                return;
            }
        }
        panic!("cluster did not settle");
    }

    /// Connects `user` on its home shard and logs it in; returns (shard, conn). Frames sent on
    /// login (Welcome, queued Delivers) stay in `out`.
    pub fn login(&mut self, user: UserId) -> (ShardId, ConnId) {
        self.login_with(user, capability::MESSAGING)
    }

    /// [`MiniCluster::login`] announcing `capabilities`.
    pub fn login_with(&mut self, user: UserId, capabilities: u64) -> (ShardId, ConnId) {
        let home = home_shard(user, self.n());
        let conn = self.next_conn;
        self.next_conn += 1;
        let peer_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        self.event(
            home,
            Event::Connected {
                conn,
                peer_ip,
                static_key: key_of(user),
            },
        );
        self.event(
            home,
            Event::Frame {
                conn,
                frame: Frame::Login(frame::Login {
                    addr: DeviceAddr { user, device: 0 },
                    revision: protocol::PROTOCOL_REVISION,
                    capabilities,
                }),
            },
        );
        (home, conn)
    }

    /// Sends `frame` on `(shard, conn)`.
    pub fn frame(&mut self, at: (ShardId, ConnId), frame: Frame) {
        self.event(at.0, Event::Frame { conn: at.1, frame });
    }

    /// Takes the sequence numbers of Deliver/Receipt frames sent to `conn`, dropping every
    /// other frame for it; returns (seqs, other frames count).
    pub fn take_seqs(&mut self, conn: ConnId) -> (Vec<u64>, usize) {
        let mut seqs = Vec::new();
        let mut other = 0;
        self.out.retain(|(_, c, f)| {
            if *c != conn {
                return true;
            }
            match f {
                Frame::Deliver(frame::Deliver { seq, .. })
                | Frame::Receipt(frame::Receipt { seq, .. }) => seqs.push(*seq),
                _ => other += 1,
            }
            false
        });
        (seqs, other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Address;

    #[test]
    fn message_lifecycle_runs_locally_and_cross_shard() {
        let payload = bytes::Bytes::from_static(&[7u8; 100]);
        for n in [1u16, 2] {
            let a = user_on(0, n, 0);
            let b = user_on(n - 1, n, 1);
            let mut c = MiniCluster::new(n, &[a, b], &[], &payload);
            let ca = c.login(a);
            let cb = c.login(b);
            c.out.clear();
            c.frame(
                ca,
                Frame::Send(frame::Send {
                    client_msg_id: 1,
                    to: Address::device(b, 0),
                    msg_type: MsgType::TEXT,
                    payload: payload.clone(),
                }),
            );
            c.settle();
            assert!(
                c.out.iter().any(|(_, conn, f)| *conn == ca.1
                    && matches!(
                        f,
                        Frame::ServerAck(frame::ServerAck {
                            client_msg_id: 1,
                            ..
                        })
                    )),
                "{:?}",
                c.out
            );
            let (seqs, _) = c.take_seqs(cb.1);
            assert_eq!(seqs.len(), 1);
            c.frame(cb, Frame::Ack(frame::Ack { seqs }));
            c.settle();
            let (receipts, _) = c.take_seqs(ca.1);
            assert_eq!(receipts.len(), 1, "a delivered receipt for the sender");
        }
    }

    #[test]
    fn queued_mailbox_drains_on_login() {
        let payload = bytes::Bytes::from_static(&[7u8; 100]);
        let a = user_on(0, 1, 0);
        let b = user_on(0, 1, 1);
        let mut c = MiniCluster::new(1, &[a, b], &[(b, 300, a)], &payload);
        let cb = c.login(b);
        let mut total = 0;
        for _ in 0..100 {
            let (seqs, _) = c.take_seqs(cb.1);
            if seqs.is_empty() {
                break;
            }
            total += seqs.len();
            c.frame(cb, Frame::Ack(frame::Ack { seqs }));
            c.settle();
        }
        assert_eq!(total, 300);
    }
}
