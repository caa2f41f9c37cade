//! Presence cost, measured on the shard state machine itself (the code the daemon runs, driven
//! in process like the simulator: three shards, an in-memory journal, mesh messages delivered
//! in order, every append made durable at once).
//!
//! Setup: one user U with `--contacts` users on its server-side contact list (privacy
//! `CONTACTS` for last seen and online), all registered and online, of whom `--subscribers`
//! have U's chat open (a `PresenceSubscribe`). Then U reconnects `--rounds` times.
//!
//! Reported (JSON on stdout):
//! * frames sent per login of U, and per logout: every frame any connection gets (U's own
//!   `Welcome` included), and separately the mesh messages between shards (XMPP would send one presence stanza per contact: `contacts`);
//! * CPU per presence change: process CPU time over the reconnect loop divided by the changes
//!   (a login and a logout are two changes), everything each change causes included (the
//!   login's `Welcome`, the subscribers' frames, the last-seen batch at the next tick).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use clap::Parser;
use protocol::frame::{self, ContactsEdit, PresenceSubscribe, PrivacySet};
use protocol::presence::{ContactOp, Visibility};
use protocol::{capability, DeviceAddr, Frame, UserId};
use shards::{home_shard, Action, Config, ConnId, Event, MeshMsg, Shard, ShardId};
use storage::{SimConfig, SimJournal};

#[derive(Parser, Debug)]
#[command(about = "Frames per login and CPU per presence change on the shard state machine")]
struct Args {
    /// Users on U's contact list.
    #[arg(long, default_value_t = 500)]
    contacts: usize,
    /// Of them, how many subscribe to U's presence.
    #[arg(long, default_value_t = 20)]
    subscribers: usize,
    /// Reconnects of U measured.
    #[arg(long, default_value_t = 20_000)]
    rounds: usize,
    /// Shards.
    #[arg(long, default_value_t = 3)]
    shards: u16,
    /// Measure a real daemon instead: spawn this `switchboard` binary, set the scene up over
    /// the protocol with the client SDK, and read the daemon's CPU time (/proc) and frame
    /// counters (metrics) around the reconnect loop.
    #[arg(long)]
    daemon: Option<std::path::PathBuf>,
}

const CAPS: u64 = capability::MESSAGING | capability::PRESENCE | capability::CALLS;

struct Cluster {
    shards: Vec<Shard>,
    journals: Vec<SimJournal>,
    mesh: VecDeque<(ShardId, ShardId, MeshMsg)>,
    now: u64,
    next_conn: ConnId,
    /// Frames written to connections, and mesh messages, since the last reset.
    frames: u64,
    mesh_msgs: u64,
    /// SMS codes (registration).
    sms: Vec<(UserId, u32)>,
}

impl Cluster {
    fn new(n: u16) -> Self {
        Self {
            shards: (0..n)
                .map(|i| {
                    let mut cfg = Config::new(i, n);
                    // Every account registers from the one loopback address.
                    cfg.register_per_ip_per_hour = u32::MAX;
                    Shard::new(cfg, u64::from(i))
                })
                .collect(),
            journals: (0..n)
                .map(|_| SimJournal::new(SimConfig::records_per_segment(100_000)))
                .collect(),
            mesh: VecDeque::new(),
            now: 1_700_000_000_000,
            next_conn: 1,
            frames: 0,
            mesh_msgs: 0,
            sms: Vec::new(),
        }
    }

    fn event(&mut self, s: ShardId, ev: Event) {
        let i = usize::from(s);
        let (Some(shard), Some(journal)) = (self.shards.get_mut(i), self.journals.get_mut(i))
        else {
            return;
        };
        shard.handle(self.now, ev, journal);
        let actions: Vec<Action> = shard.drain_actions().collect();
        for a in actions {
            match a {
                Action::ToShard { shard, msg } => {
                    // A frame for another shard's connection is counted there, as its Send.
                    self.mesh_msgs += 1;
                    self.mesh.push_back((s, shard, msg));
                }
                Action::Send { .. } => self.frames += 1,
                Action::Handoff { conn, to, info } => self.event(to, Event::Login { conn, info }),
                Action::SendSms { phone, code } => self.sms.push((phone, code)),
                _ => {}
            }
        }
    }

    /// Delivers mesh messages and makes every append durable until nothing moves.
    fn settle(&mut self) {
        loop {
            while let Some((from, to, msg)) = self.mesh.pop_front() {
                self.event(to, Event::Mesh { from, msg });
            }
            let mut moved = false;
            for s in 0..self.shards.len() {
                if let Some(up_to) = self.journals.get_mut(s).and_then(SimJournal::commit) {
                    self.event(s as ShardId, Event::Durable { up_to });
                    moved = true;
                }
            }
            if !moved && self.mesh.is_empty() {
                break;
            }
        }
    }

    fn connect(&mut self, s: ShardId, key: [u8; 32]) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        let peer_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        self.event(
            s,
            Event::Connected {
                conn,
                peer_ip,
                static_key: key,
            },
        );
        conn
    }

    fn register(&mut self, user: UserId, key: [u8; 32]) {
        let s = home_shard(user, self.shards.len() as u16);
        let conn = self.connect(s, key);
        self.event(
            s,
            frame_ev(
                conn,
                Frame::RegisterRequest(frame::RegisterRequest { phone: user }),
            ),
        );
        self.settle();
        let code = self
            .sms
            .iter()
            .rev()
            .find(|(p, _)| *p == user)
            .map(|(_, c)| *c);
        let code = code.expect("registration code");
        let verify = Frame::RegisterVerify(frame::RegisterVerify { phone: user, code });
        self.event(s, frame_ev(conn, verify));
        self.settle();
        self.event(s, Event::Closed { conn });
    }

    fn login(&mut self, user: UserId, key: [u8; 32]) -> (ShardId, ConnId) {
        let s = home_shard(user, self.shards.len() as u16);
        let conn = self.connect(s, key);
        let login = Frame::Login(frame::Login {
            addr: DeviceAddr::new(user, 0),
            revision: protocol::PROTOCOL_REVISION,
            capabilities: CAPS,
        });
        self.event(s, frame_ev(conn, login));
        self.settle();
        (s, conn)
    }
}

fn frame_ev(conn: ConnId, frame: Frame) -> Event {
    Event::Frame { conn, frame }
}

fn key(n: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&n.to_le_bytes());
    k[8..16].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    k
}

fn cpu_s() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.subscribers <= args.contacts,
        "--subscribers must be <= --contacts"
    );
    if let Some(bin) = &args.daemon {
        return real::run(bin, &args);
    }
    let mut c = Cluster::new(args.shards);
    let u: UserId = 14_155_550_000;
    let contacts: Vec<UserId> = (1..=args.contacts as u64)
        .map(|i| 14_155_560_000 + i)
        .collect();
    c.register(u, key(0));
    for (i, &x) in contacts.iter().enumerate() {
        c.register(x, key(i as u64 + 1));
    }
    // U keeps its contacts on the server and shows presence to them only.
    let (us, uc) = c.login(u, key(0));
    for chunk in contacts.chunks(1024) {
        let edit = ContactsEdit {
            request_id: 1,
            op: ContactOp::ADD,
            users: chunk.to_vec(),
        };
        c.event(us, frame_ev(uc, Frame::ContactsEdit(edit)));
    }
    let privacy = PrivacySet {
        request_id: 2,
        last_seen: Visibility::CONTACTS,
        online: Visibility::CONTACTS,
    };
    c.event(us, frame_ev(uc, Frame::PrivacySet(privacy)));
    c.settle();
    // Every contact online; `subscribers` of them have U's chat open (TTL long enough).
    for (i, &x) in contacts.iter().enumerate() {
        let (s, conn) = c.login(x, key(i as u64 + 1));
        if i < args.subscribers {
            let sub = PresenceSubscribe {
                request_id: 3,
                user: u,
                ttl_s: 600,
            };
            c.event(s, frame_ev(conn, Frame::PresenceSubscribe(sub)));
        }
    }
    c.settle();
    c.event(us, Event::Closed { conn: uc });
    c.settle();

    let (mut login_frames, mut logout_frames, mut login_mesh, mut logout_mesh) = (0, 0, 0, 0);
    let cpu0 = cpu_s();
    let wall = Instant::now();
    for _ in 0..args.rounds {
        // 10 ms per reconnect: 20,000 rounds stay within the subscriptions' 600 s TTL.
        c.now += 10;
        (c.frames, c.mesh_msgs) = (0, 0);
        let (s, conn) = c.login(u, key(0));
        login_frames += c.frames;
        login_mesh += c.mesh_msgs;
        (c.frames, c.mesh_msgs) = (0, 0);
        c.event(s, Event::Closed { conn });
        // The last-seen batch is written at the tick.
        c.event(s, Event::Tick);
        c.settle();
        logout_frames += c.frames;
        logout_mesh += c.mesh_msgs;
    }
    let cpu = cpu_s() - cpu0;
    let changes = 2 * args.rounds;
    let r = args.rounds as f64;
    let report = serde_json::json!({
        "contacts": args.contacts,
        "subscribers": args.subscribers,
        "rounds": args.rounds,
        "shards": args.shards,
        "frames_per_login": login_frames as f64 / r,
        "mesh_msgs_per_login": login_mesh as f64 / r,
        "frames_per_logout": logout_frames as f64 / r,
        "mesh_msgs_per_logout": logout_mesh as f64 / r,
        "frames_per_login_if_broadcast_to_contacts": args.contacts + 1,
        "cpu_us_per_presence_change": cpu * 1e6 / changes as f64,
        "wall_s": wall.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `--daemon`: the same scene against the real daemon over TCP.
mod real {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use client::protocol::presence::{ContactOp, Visibility};
    use client::registration::CodeFile;
    use client::{Connection, Event, Identity, Session, SessionOptions, Timeouts};
    use protocol::UserId;
    use switchboard_benches::daemon::{metric_sum, metrics, Daemon};

    use super::Args;

    /// The daemon's user + system CPU time, in seconds (/proc/PID/stat, clock ticks of 10 ms).
    fn daemon_cpu_s(pid: u32) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        Ok((tick(11) + tick(12)) / 100.0)
    }

    fn metric(d: &Daemon, name: &str) -> anyhow::Result<f64> {
        Ok(metric_sum(&metrics(d.admin)?, name).unwrap_or(0.0))
    }

    fn register(d: &Daemon, dir: &Path, phone: UserId) -> anyhow::Result<Identity> {
        let identity = Identity::load_or_create(dir)?;
        let mut conn = Connection::connect(d.listen, &identity, Timeouts::default())?;
        let watcher = CodeFile::watch(CodeFile::default_path(&d.data_dir, phone));
        conn.register_request(phone)?;
        let code = watcher.wait_new(Duration::from_secs(20), Duration::from_millis(5))?;
        let account = conn.register_verify(phone, code)?;
        identity.save_account(&account)?;
        Ok(identity)
    }

    fn session(d: &Daemon, identity: &Identity, phone: UserId) -> anyhow::Result<Session> {
        let options = SessionOptions {
            e2ee: false,
            ..SessionOptions::default()
        };
        let conn = Connection::connect(d.listen, identity, Timeouts::default())?;
        Ok(conn.login_with(phone, 0, options)?)
    }

    /// The reconnect loop: `rounds` logins and logouts of U; the daemon's CPU seconds, and the
    /// frames it sent, over it.
    fn reconnects(
        d: &Daemon,
        pid: u32,
        u: (&Identity, UserId),
        rounds: usize,
    ) -> anyhow::Result<(f64, f64, f64)> {
        let frames0 = metric(d, "switchboard_frames_out_total")?;
        let changes0 = metric(d, "switchboard_presence_change_frames_total")?;
        let cpu0 = daemon_cpu_s(pid)?;
        for _ in 0..rounds {
            let s = session(d, u.0, u.1)?;
            s.close()?;
        }
        // Let the last logout's frames and the metrics settle (one tick).
        std::thread::sleep(Duration::from_millis(1_500));
        let cpu = daemon_cpu_s(pid)? - cpu0;
        let frames = metric(d, "switchboard_frames_out_total")? - frames0;
        let changes = metric(d, "switchboard_presence_change_frames_total")? - changes0;
        Ok((cpu, frames, changes))
    }

    pub fn run(bin: &Path, args: &Args) -> anyhow::Result<()> {
        let d = Daemon::spawn(bin, None, usize::from(args.shards), "", &[])?;
        let pid = d
            .pid()
            .ok_or_else(|| anyhow::anyhow!("daemon not running"))?;
        let states = tempfile::tempdir()?;
        let u: UserId = 14_155_550_000;
        let ui = register(&d, &states.path().join("u"), u)?;
        let mut contacts = Vec::new();
        for i in 1..=args.contacts as u64 {
            let phone = 14_155_560_000 + i;
            let id = register(&d, &states.path().join(format!("c{i}")), phone)?;
            contacts.push((phone, id));
        }
        let mut us = session(&d, &ui, u)?;
        let phones: Vec<UserId> = contacts.iter().map(|(p, _)| *p).collect();
        for chunk in phones.chunks(1024) {
            us.edit_contacts(ContactOp::ADD, chunk)?;
        }
        us.set_privacy(Visibility::CONTACTS, Visibility::CONTACTS)?;
        std::thread::sleep(Duration::from_millis(500));
        us.close()?;
        let mut subs = Vec::new();
        for (phone, id) in contacts.iter().take(args.subscribers) {
            let mut s = session(&d, id, *phone)?;
            s.subscribe_presence(u, 600)?;
            subs.push(s);
        }
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let (cpu, frames, changes) = reconnects(&d, pid, (&ui, u), args.rounds)?;
        let wall = t.elapsed().as_secs_f64();
        // The subscribers got their frames: count them.
        let mut received = 0u64;
        for s in subs.iter_mut() {
            while let Some(e) = s.recv(Some(Duration::from_millis(300)))? {
                if matches!(e, Event::Presence(ref p) if p.request_id == 0) {
                    received += 1;
                }
            }
        }
        // The same loop with nobody subscribed: the difference is what presence costs.
        for s in subs.iter_mut() {
            s.subscribe_presence(u, 0)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let (cpu_bare, frames_bare, _) = reconnects(&d, pid, (&ui, u), args.rounds)?;
        let r = args.rounds as f64;
        let report = serde_json::json!({
            "mode": "daemon",
            "contacts": args.contacts,
            "subscribers": args.subscribers,
            "rounds": args.rounds,
            "shards": args.shards,
            "frames_out_per_reconnect": frames / r,
            "presence_frames_per_reconnect": changes / r,
            "presence_frames_received_by_subscribers": received,
            "frames_out_per_reconnect_without_subscribers": frames_bare / r,
            "daemon_cpu_ms_per_reconnect": cpu * 1e3 / r,
            "daemon_cpu_ms_per_reconnect_without_subscribers": cpu_bare * 1e3 / r,
            "daemon_cpu_us_per_presence_change": (cpu - cpu_bare) * 1e6 / (2.0 * r),
            "wall_s": wall,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        for s in subs {
            s.close()?;
        }
        Ok(())
    }
}
