//! The flood generator's controller: command line, daemon, accounts, workers, phases,
//! measurements, the final table and the JSON report.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use clap::Parser;
use protocol::noise::ClientHandshake;
use protocol::wire;
use protocol::PREAMBLE;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::accounts::{hex, Account, AccountsFile};
use crate::daemon::{self, Daemon};
use crate::engine::Engine;
use crate::phase::{Cmd, Dist, MsgParams, Outcome, QueueParams, Report, WorkerSpec};
use crate::stats::{fmt_us, Lat, LatSummary};
use crate::sys::{self, now_ns};
use crate::sysmem::{self, KernelMem, ProcMem};

const SEC: u64 = 1_000_000_000;

/// `switchboard-flood`: connection and message load generator for Switchboard.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "switchboard-flood",
    version,
    about = "Connection and message load generator for Switchboard: the real protocol (Noise XX, registration, login), epoll workers, phases ramp/idle/messaging/storm/queue/restart/drain"
)]
pub struct Args {
    /// Server client address (ignored with --spawn-daemon).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub target: SocketAddr,
    /// Server admin address, for /metrics (ignored with --spawn-daemon).
    #[arg(long, default_value = "127.0.0.1:7301")]
    pub admin: SocketAddr,
    /// The daemon's data directory: registration codes are read from <data-dir>/sms/ (file SMS
    /// provider). With --spawn-daemon: the directory to run it in (default: a fresh temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Start this `switchboard` binary with --shards 1 --cpus 0, generous registration limits,
    /// and pin the generator to CPU 1: the standard measurement in one command.
    #[arg(long)]
    pub spawn_daemon: Option<PathBuf>,
    /// Extra flag for the spawned daemon (repeat), e.g. --daemon-arg=--rate-limit-frames-per-s=5000.
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
    /// Shards of the spawned daemon.
    #[arg(long, default_value_t = 1)]
    pub daemon_shards: usize,
    /// CPUs of the spawned daemon (its --cpus).
    #[arg(long, default_value = "0")]
    pub daemon_cpus: String,
    /// Pid of an already running daemon (memory and CPU readings from /proc).
    #[arg(long)]
    pub daemon_pid: Option<u32>,
    /// The `switchboard` binary, for `--print-config` in the report (default: --spawn-daemon).
    #[arg(long)]
    pub daemon_bin: Option<PathBuf>,
    /// Pin the generator (and its workers) to these CPUs (default with --spawn-daemon: 1).
    #[arg(long, value_delimiter = ',')]
    pub gen_cpus: Vec<usize>,
    /// Connections (= accounts) in the run.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Accounts cache file: read if present (skipping registration), written after provisioning.
    #[arg(long)]
    pub accounts: Option<PathBuf>,
    /// First phone number of provisioned accounts.
    #[arg(long, default_value_t = 15_550_000_000)]
    pub phone_base: u64,
    /// Phases in order: provision, ramp, idle, messaging, storm, queue, restart, drain.
    #[arg(long, value_delimiter = ',', default_value = "ramp,idle")]
    pub phases: Vec<String>,
    /// Ramp: new connections per second in all (0: as fast as possible).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Ramp: handshakes in progress at once, in all.
    #[arg(long, default_value_t = 1024)]
    pub max_pending: usize,
    /// Storm and drain reconnects: handshakes in progress at once (0: everything at once).
    #[arg(long, default_value_t = 0)]
    pub storm_max_pending: usize,
    /// Provision: registrations in flight at once.
    #[arg(long, default_value_t = 256)]
    pub provision_concurrency: usize,
    /// Idle: seconds to hold the connections.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Idle: seconds to let the daemon settle after the ramp before the first reading.
    #[arg(long, default_value_t = 3)]
    pub settle_seconds: u64,
    /// Ping interval in ms (0: the server's Welcome.keepalive_ms).
    #[arg(long, default_value_t = 0)]
    pub keepalive_ms: u64,
    /// Messaging: un-✓'d sends per connection (closed loop).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Messaging: payload bytes (at least 20: send times and sender are carried in it).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Messaging: recipients, `uniform` or `zipf:<s>`.
    #[arg(long, default_value = "uniform")]
    pub dist: Dist,
    /// Messaging: measured seconds (per run).
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Messaging: warm-up seconds before the measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Messaging: open loop at this many messages/s in all (instead of the closed loop).
    #[arg(long)]
    pub offered_rate: Option<f64>,
    /// Messaging: after the closed loop, open-loop runs at these fractions of its delivered rate.
    #[arg(long, value_delimiter = ',')]
    pub open_fractions: Vec<f64>,
    /// Open loop: a connection with this many un-✓'d sends skips a scheduled send (counted).
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
    /// Queue/drain: messages queued for offline users.
    #[arg(long, default_value_t = 100_000)]
    pub drain_messages: u64,
    /// Queue/drain: offline users (the last accounts; default half of --conns).
    #[arg(long)]
    pub drain_users: Option<usize>,
    /// Restart: `kill` (SIGKILL) or `term` (SIGTERM, graceful drain).
    #[arg(long, default_value = "kill")]
    pub restart_signal: String,
    /// Upper bound of each connection/queue/drain phase, seconds.
    #[arg(long, default_value_t = 120)]
    pub phase_timeout: u64,
    /// Worker processes (each holds its share of the connections; the fd limit is per process).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Source addresses: `none`, `auto` (127.0.0.2.. for a loopback target, one per 20,000
    /// connections), a range `127.0.0.2-127.0.0.50`, or a comma list.
    #[arg(long, default_value = "none")]
    pub source_ips: String,
    /// Give up an attempt (connect + handshake + login) after this many ms.
    #[arg(long, default_value_t = 15_000)]
    pub connect_timeout_ms: u64,
    /// Attempts per connection per phase.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    /// Stop everything after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Write parameters, daemon version/config and every figure here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Internal: run as worker `i/K` (commands on stdin, reports on stdout).
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

// ----- workers ----------------------------------------------------------------------------------

enum Link {
    Thread {
        tx: Sender<Cmd>,
        stop: Arc<AtomicBool>,
        handle: Option<std::thread::JoinHandle<()>>,
    },
    Proc {
        child: Child,
        stdin: Option<ChildStdin>,
    },
}

/// The workers of a run.
pub struct Pool {
    links: Vec<Link>,
    rx: Receiver<(usize, Report)>,
    /// Worker process ids (this process for an in-process worker).
    pub pids: Vec<u32>,
    quiet: bool,
}

impl Pool {
    /// Starts one worker per spec: in this process (a thread) when there is one, else child
    /// processes re-executing this binary with `--worker i/K`.
    pub fn start(specs: Vec<WorkerSpec>, quiet: bool) -> Result<Pool> {
        let (rtx, rx) = mpsc::channel::<(usize, Report)>();
        let k = specs.len();
        let mut links = Vec::with_capacity(k);
        if k == 1 {
            let spec = specs.into_iter().next().context("no worker spec")?;
            let (tx, crx) = mpsc::channel::<Cmd>();
            let stop = Arc::new(AtomicBool::new(false));
            let st = stop.clone();
            let rtx = rtx.clone();
            let handle = std::thread::Builder::new()
                .name("flood-engine".into())
                .spawn(move || match Engine::new(spec, st) {
                    Ok(e) => e.run(crx, &mut |r| {
                        let _ = rtx.send((0, r));
                    }),
                    Err(e) => {
                        let _ = rtx.send((0, Report::Fatal(e.to_string())));
                    }
                })
                .context("spawning the engine thread")?;
            links.push(Link::Thread {
                tx,
                stop,
                handle: Some(handle),
            });
        } else {
            let exe =
                std::env::current_exe().context("locating this executable for the workers")?;
            for (i, spec) in specs.into_iter().enumerate() {
                let mut child = Command::new(&exe)
                    .arg("--worker")
                    .arg(format!("{i}/{k}"))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .with_context(|| format!("spawning worker {i}"))?;
                let mut stdin = child.stdin.take().context("worker stdin")?;
                let stdout = child.stdout.take().context("worker stdout")?;
                let line = serde_json::to_string(&Cmd::Init(Box::new(spec)))
                    .context("encoding the worker spec")?;
                writeln!(stdin, "{line}").with_context(|| format!("starting worker {i}"))?;
                let rtx = rtx.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}-reader"))
                    .spawn(move || {
                        // Ends at the worker's EOF.
                        for line in BufReader::new(stdout).lines() {
                            let Ok(line) = line else { break };
                            match serde_json::from_str::<Report>(&line) {
                                Ok(r) => {
                                    let _ = rtx.send((i, r));
                                }
                                Err(e) => eprintln!(
                                    "switchboard-flood: worker {i}: bad report ({e}): {line}"
                                ),
                            }
                        }
                    })
                    .with_context(|| format!("spawning the reader of worker {i}"))?;
                links.push(Link::Proc {
                    child,
                    stdin: Some(stdin),
                });
            }
        }
        let mut pool = Pool {
            links,
            rx,
            pids: vec![0; k],
            quiet,
        };
        // Wait for every worker's Ready.
        let mut ready = 0;
        while ready < k {
            match pool.rx.recv_timeout(Duration::from_secs(60)) {
                Ok((i, Report::Ready { pid })) => {
                    pool.pids[i] = pid;
                    ready += 1;
                }
                Ok((i, Report::Fatal(e))) => bail!("worker {i}: {e}"),
                Ok(_) => {}
                Err(_) => bail!("workers did not start within 60 s"),
            }
        }
        Ok(pool)
    }

    fn send(&mut self, i: usize, cmd: Cmd) -> Result<()> {
        match &mut self.links[i] {
            Link::Thread { tx, .. } => tx.send(cmd).map_err(|_| anyhow!("worker {i} is gone")),
            Link::Proc { stdin, .. } => {
                let line = serde_json::to_string(&cmd).context("encoding a command")?;
                let s = stdin
                    .as_mut()
                    .with_context(|| format!("worker {i}: stdin closed"))?;
                writeln!(s, "{line}")
                    .and_then(|_| s.flush())
                    .with_context(|| format!("sending a command to worker {i}"))
            }
        }
    }

    /// Sends one command per worker and waits for every outcome (until `limit_ns`, monotonic,
    /// plus a minute of slack; then the workers are stopped). Returns the merged outcome.
    pub fn call(&mut self, name: &str, cmds: Vec<Cmd>, limit_ns: u64) -> Result<Outcome> {
        let k = self.links.len();
        for (i, c) in cmds.into_iter().enumerate() {
            self.send(i, c)?;
        }
        let mut done: Vec<Option<Outcome>> = vec![None; k];
        let mut prog = vec![(0u64, 0u64); k];
        let mut bar = Progress::new(name, self.quiet);
        let hard = limit_ns + 60 * SEC;
        while done.iter().any(Option::is_none) {
            if now_ns() > hard {
                self.stop_all();
                bail!("{name}: workers did not finish in time; stopped");
            }
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok((i, Report::Progress { done: d, total })) => {
                    prog[i] = (d, total);
                    let (d, t) = prog.iter().fold((0, 0), |a, p| (a.0 + p.0, a.1 + p.1));
                    bar.draw(d, t);
                }
                Ok((i, Report::Done(o))) => done[i] = Some(*o),
                Ok((i, Report::Fatal(e))) => bail!("{name}: worker {i}: {e}"),
                Ok((_, Report::Ready { .. })) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("{name}: workers are gone"),
            }
        }
        bar.finish();
        let mut all = Outcome::default();
        for o in done.into_iter().flatten() {
            all.merge(&o);
        }
        Ok(all)
    }

    fn stop_all(&mut self) {
        for l in &mut self.links {
            match l {
                Link::Thread { stop, .. } => stop.store(true, Ordering::Relaxed),
                Link::Proc { child, .. } => {
                    let _ = child.kill();
                }
            }
        }
    }

    /// Stops the workers and waits for them.
    pub fn shutdown(mut self) {
        for i in 0..self.links.len() {
            let _ = self.send(i, Cmd::Shutdown);
        }
        for l in &mut self.links {
            match l {
                Link::Thread { handle, .. } => {
                    if let Some(h) = handle.take() {
                        let _ = h.join();
                    }
                }
                Link::Proc { child, stdin } => {
                    drop(stdin.take());
                    let deadline = now_ns() + 10 * SEC;
                    while now_ns() < deadline {
                        if matches!(child.try_wait(), Ok(Some(_))) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

/// A worker process: `Init` on stdin first, then commands; reports as JSON lines on stdout.
pub fn worker_main(which: &str) -> Result<()> {
    let _ = which;
    let stdin = std::io::stdin();
    let mut first = String::new();
    stdin
        .lock()
        .read_line(&mut first)
        .context("reading the first command")?;
    let spec = match serde_json::from_str::<Cmd>(&first) {
        Ok(Cmd::Init(s)) => *s,
        _ => bail!("expected Init as the first command"),
    };
    sys::raise_nofile().context("raising the open-file limit")?;
    let (tx, rx) = mpsc::channel::<Cmd>();
    std::thread::Builder::new()
        .name("commands".into())
        .spawn(move || {
            // Ends at EOF (the controller closed our stdin or exited).
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Cmd>(&line) {
                    Ok(c) => {
                        if tx.send(c).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("switchboard-flood worker: bad command ({e})"),
                }
            }
        })
        .context("spawning the command reader")?;
    let engine =
        Engine::new(spec, Arc::new(AtomicBool::new(false))).context("starting the engine")?;
    let out = std::io::stdout();
    engine.run(rx, &mut |r| {
        if let Ok(line) = serde_json::to_string(&r) {
            let mut o = out.lock();
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
    });
    Ok(())
}

// ----- progress ---------------------------------------------------------------------------------

struct Progress {
    name: String,
    tty: bool,
    quiet: bool,
    t0: u64,
    last_line: u64,
    drawn: bool,
}

impl Progress {
    fn new(name: &str, quiet: bool) -> Self {
        Progress {
            name: name.to_owned(),
            tty: sys::stderr_is_tty(),
            quiet,
            t0: now_ns(),
            last_line: now_ns(),
            drawn: false,
        }
    }

    fn draw(&mut self, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        let secs = (now_ns() - self.t0) as f64 / 1e9;
        let frac = if total > 0 {
            (done as f64 / total as f64).min(1.0)
        } else {
            0.0
        };
        if self.tty {
            let w = 30usize;
            let fill = (frac * w as f64) as usize;
            eprint!(
                "\r{:<10} [{}{}] {:>9}/{:<9} {:>6.1}s",
                self.name,
                "#".repeat(fill),
                ".".repeat(w - fill),
                done,
                total,
                secs
            );
            self.drawn = true;
        } else if now_ns() - self.last_line > 5 * SEC {
            self.last_line = now_ns();
            eprintln!(
                "{}: {done}/{total} ({:.0}%) {secs:.1}s",
                self.name,
                frac * 100.0
            );
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

// ----- measurements -----------------------------------------------------------------------------

/// One memory reading of everything involved.
#[derive(Clone, Debug, Default, Serialize)]
struct MemReading {
    daemon: Option<ProcMem>,
    /// From the metrics page when the pid is unknown.
    daemon_rss_metric: Option<u64>,
    workers: ProcMem,
    kernel: KernelMem,
}

struct Ctx {
    args: Args,
    daemon: Option<Daemon>,
    target: SocketAddr,
    admin: SocketAddr,
    daemon_pid: Option<u32>,
    n: usize,
    k: usize,
    report: Map<String, Value>,
    table: Vec<(String, String, String)>,
    deadline: u64,
    baseline: Option<MemReading>,
    worker_baseline: ProcMem,
    queued: Option<(usize, usize, u64)>,
    notes: Vec<String>,
}

impl Ctx {
    fn daemon_rss_now(&self) -> Option<u64> {
        match self.daemon_pid {
            Some(p) => sysmem::proc_mem(p).map(|m| m.rss),
            None => daemon::metrics(self.admin)
                .ok()
                .and_then(|m| daemon::metric_sum(&m, "process_resident_memory_bytes"))
                .map(|v| v as u64),
        }
    }

    fn read_mem(&self, pool: &Pool) -> MemReading {
        let mut w = ProcMem::default();
        let mut seen = Vec::new();
        for &p in &pool.pids {
            if seen.contains(&p) {
                continue;
            }
            seen.push(p);
            if let Some(m) = sysmem::proc_mem(p) {
                w.rss += m.rss;
                w.rss_anon += m.rss_anon;
                w.fd_table += m.fd_table;
            }
        }
        MemReading {
            daemon: self.daemon_pid.and_then(sysmem::proc_mem),
            daemon_rss_metric: if self.daemon_pid.is_none() {
                self.daemon_rss_now()
            } else {
                None
            },
            workers: w,
            kernel: sysmem::kernel_mem(),
        }
    }

    fn metrics(&self) -> Option<String> {
        daemon::metrics(self.admin).ok()
    }

    fn row(&mut self, phase: &str, what: &str, value: String) {
        self.table.push((phase.to_owned(), what.to_owned(), value));
    }

    fn phase_deadline(&self, secs: u64) -> u64 {
        (now_ns() + secs * SEC).min(self.deadline)
    }

    fn ranges(&self) -> Vec<(usize, usize)> {
        (0..self.k)
            .map(|i| (i * self.n / self.k, (i + 1) * self.n / self.k))
            .collect()
    }
}

fn rate_per_s(count: u64, from_ns: u64, to_ns: u64) -> f64 {
    let secs = to_ns.saturating_sub(from_ns) as f64 / 1e9;
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

fn lat_json(hexs: &str) -> (LatSummary, Value) {
    let s = Lat::from_hex(hexs).summary();
    (s, serde_json::to_value(s).unwrap_or(Value::Null))
}

fn lat_line(s: &LatSummary) -> String {
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_us(s.p50_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us),
        fmt_us(s.max_us),
        s.count
    )
}

fn parse_ip_list(s: &str, target: SocketAddr, n: usize) -> Result<Vec<IpAddr>> {
    match s {
        "none" | "" => Ok(Vec::new()),
        "auto" => {
            if !target.ip().is_loopback() {
                return Ok(Vec::new());
            }
            let k = n.div_ceil(20_000).max(1);
            Ok((0..k)
                .map(|i| {
                    IpAddr::V4(Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(127, 0, 0, 2)) + i as u32,
                    ))
                })
                .collect())
        }
        _ if s.contains('-') && !s.contains(',') => {
            let (a, b) = s.split_once('-').context("bad range")?;
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 1 << 20 {
                bail!("bad address range {s:?}");
            }
            Ok((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect())
        }
        _ => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<IpAddr>()
                    .with_context(|| format!("bad address {x:?}"))
            })
            .collect(),
    }
}

/// Handshakes with the server once to learn its static key (hex).
fn probe_server_key(target: SocketAddr) -> Result<String> {
    let key = protocol::noise::StaticKeypair::generate();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("connecting to {target}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .context("setting a read timeout")?;
    let (st, msg1) = ClientHandshake::start(&key).context("starting a handshake")?;
    let mut out = PREAMBLE.to_vec();
    wire::put_len(&mut out, msg1.len());
    out.extend_from_slice(&msg1);
    s.write_all(&out)
        .with_context(|| format!("sending the handshake to {target}"))?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .with_context(|| format!("reading handshake from {target}"))?;
    let mut msg2 = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg2)
        .with_context(|| format!("reading handshake from {target}"))?;
    let (_, _, server) = st
        .read_hello(&msg2)
        .with_context(|| format!("handshake with {target}"))?;
    Ok(hex(&server))
}

fn base_spec(
    ctx: &Ctx,
    phones: &[u64],
    accounts: &[Account],
    i: usize,
    lo: usize,
    hi: usize,
    run_id: u32,
    data_dir: Option<PathBuf>,
) -> Result<WorkerSpec> {
    Ok(WorkerSpec {
        index: i,
        workers: ctx.k,
        target: ctx.target,
        source_ips: parse_ip_list(&ctx.args.source_ips, ctx.target, ctx.n)?,
        phones: phones.to_vec(),
        base: lo,
        accounts: accounts[lo..hi].to_vec(),
        run_id,
        keepalive_ms: ctx.args.keepalive_ms,
        connect_timeout_ms: ctx.args.connect_timeout_ms,
        max_attempts: ctx.args.max_attempts,
        data_dir,
        hard_deadline_ns: ctx.deadline + 30 * SEC,
    })
}

fn data_dir(ctx: &Ctx) -> Option<PathBuf> {
    ctx.daemon
        .as_ref()
        .map(|d| d.data_dir.clone())
        .or_else(|| ctx.args.data_dir.clone())
}

/// Loads the cached accounts, checks they belong to this server, registers what is missing.
fn ensure_accounts(ctx: &mut Ctx, run_id: u32) -> Result<Vec<Account>> {
    let n = ctx.n;
    let server = probe_server_key(ctx.target)?;
    let mut file = match &ctx.args.accounts {
        Some(p) => AccountsFile::load(p)
            .with_context(|| format!("loading the accounts file {}", p.display()))?,
        None => AccountsFile::default(),
    };
    if !file.server.is_empty() && file.server != server {
        ctx.notes.push(format!(
            "accounts file was for server key {}…, this server is {}…: provisioning afresh",
            &file.server[..8.min(file.server.len())],
            &server[..8]
        ));
        file.accounts.clear();
    }
    file.server = server;
    let have = file.accounts.len();
    let force = ctx.args.phases.iter().any(|p| p == "provision");
    let mut prov = Map::new();
    prov.insert("cached".into(), json!(have.min(n)));
    if have < n || force {
        let dd = data_dir(ctx).context("provisioning needs the daemon's --data-dir (registration codes are read from <data-dir>/sms/) or --spawn-daemon")?;
        let next_phone = file
            .accounts
            .iter()
            .map(|a| a.phone + 1)
            .max()
            .unwrap_or(ctx.args.phone_base)
            .max(ctx.args.phone_base);
        let fresh: Vec<Account> = (0..n.saturating_sub(have))
            .map(|i| Account::generate(next_phone + i as u64))
            .collect();
        if !fresh.is_empty() {
            let phones: Vec<u64> = fresh.iter().map(|a| a.phone).collect();
            let spec = WorkerSpec {
                index: 0,
                workers: 1,
                target: ctx.target,
                source_ips: Vec::new(),
                phones,
                base: 0,
                accounts: fresh.clone(),
                run_id,
                keepalive_ms: 0,
                connect_timeout_ms: ctx.args.connect_timeout_ms,
                max_attempts: ctx.args.max_attempts,
                data_dir: Some(dd),
                hard_deadline_ns: ctx.deadline,
            };
            let mut pool = Pool::start(vec![spec], ctx.args.quiet)?;
            let limit = ctx.phase_deadline(ctx.args.phase_timeout.max(60) * 5);
            let o = pool.call(
                "provision",
                vec![Cmd::Provision {
                    concurrency: ctx.args.provision_concurrency,
                    deadline_ns: limit,
                }],
                limit,
            );
            pool.shutdown();
            let o = o?;
            let secs = o.t_end_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
            let (s, lj) = lat_json(&o.hist_handshake);
            prov.insert("registered".into(), json!(o.registered));
            prov.insert("attempt_failures".into(), json!(o.attempt_failures));
            prov.insert("fail_reasons".into(), json!(o.fail_reasons));
            prov.insert("errors".into(), json!(o.errors));
            prov.insert("seconds".into(), json!(secs));
            prov.insert(
                "registrations_per_s".into(),
                json!(rate_per_s(o.registered, o.t_start_ns, o.t_last_ok_ns)),
            );
            prov.insert("latency_connect_to_registered".into(), lj);
            ctx.row(
                "provision",
                "registered",
                format!(
                    "{} of {} in {:.1} s ({:.0}/s)",
                    o.registered,
                    fresh.len(),
                    secs,
                    rate_per_s(o.registered, o.t_start_ns, o.t_last_ok_ns)
                ),
            );
            ctx.row("provision", "connect → Registered", lat_line(&s));
            if o.registered < fresh.len() as u64 {
                bail!(
                    "only {} of {} registrations succeeded (failures: {:?}, errors: {:?})",
                    o.registered,
                    fresh.len(),
                    o.fail_reasons,
                    o.errors
                );
            }
            file.accounts.extend(fresh);
        }
        if let Some(p) = &ctx.args.accounts {
            file.save(p)
                .with_context(|| format!("saving the accounts file {}", p.display()))?;
        }
    }
    ctx.report.insert("provision".into(), Value::Object(prov));
    file.accounts.truncate(n);
    Ok(file.accounts)
}

fn connect_all(
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
    let per_pending = if max_pending == 0 {
        0
    } else {
        (max_pending / ctx.k).max(1)
    };
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
fn ensure_connected(ctx: &mut Ctx, pool: &mut Pool, why: &str) -> Result<()> {
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

fn phase_ramp(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    let c0 = cpu_now(ctx, pool);
    let o = connect_all(
        ctx,
        pool,
        "ramp",
        0,
        ctx.n,
        ctx.args.rate,
        ctx.args.max_pending,
    )?;
    let secs = o.t_last_ok_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let hs = rate_per_s(o.logged_in, o.t_start_ns, o.t_last_ok_ns);
    let (s, lj) = lat_json(&o.hist_handshake);
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.logged_in);
    ctx.report.insert(
        "ramp".into(),
        json!({
            "target_connections": ctx.n, "target_rate_per_s": ctx.args.rate, "max_pending": ctx.args.max_pending,
            "logged_in": o.logged_in, "ready_at_end": o.ready_at_end, "attempt_failures": o.attempt_failures,
            "gave_up": o.gave_up, "fail_reasons": o.fail_reasons, "errors": o.errors,
            "seconds_to_last_login": secs, "handshakes_per_s": hs, "latency_connect_to_welcome": lj,
            "cpu": cpu,
        }),
    );
    ctx.row("ramp", "CPU", cpu_line(&cpu, "login"));
    ctx.row(
        "ramp",
        "logged in",
        format!(
            "{} of {} in {:.2} s, {} failed attempts, {} gave up",
            o.logged_in, ctx.n, secs, o.attempt_failures, o.gave_up
        ),
    );
    ctx.row(
        "ramp",
        "handshakes+logins/s",
        format!("{hs:.0} (target {})", ctx.args.rate),
    );
    ctx.row("ramp", "connect → Welcome", lat_line(&s));
    Ok(())
}

fn mem_json(m: &MemReading) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}

fn phase_idle(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    ensure_connected(ctx, pool, "idle")?;
    std::thread::sleep(Duration::from_secs(ctx.args.settle_seconds));
    let after_ramp = ctx.read_mem(pool);
    let until = ctx.phase_deadline(ctx.args.idle_seconds);
    let cmds = (0..ctx.k).map(|_| Cmd::Hold { until_ns: until }).collect();
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("idle", cmds, until)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.pongs);
    let end = ctx.read_mem(pool);
    let conns = o.ready_at_end.max(1);
    let base = ctx.baseline.clone().unwrap_or_default();
    let drss = |m: &MemReading| -> i64 {
        let now = m.daemon.map(|d| d.rss).or(m.daemon_rss_metric).unwrap_or(0) as i64;
        let b = base
            .daemon
            .map(|d| d.rss)
            .or(base.daemon_rss_metric)
            .unwrap_or(0) as i64;
        now - b
    };
    let danon = |m: &MemReading| -> i64 {
        m.daemon
            .map(|d| d.rss_anon as i64 - base.daemon.map(|b| b.rss_anon).unwrap_or(0) as i64)
            .unwrap_or(0)
    };
    // /proc inodes and dentries are created for every descriptor whenever any tool lists
    // /proc/<pid>/fd (on this box an external process scanner does, and the daemon's own
    // `process_open_fds` metric does on every scrape): a cost of inspecting the processes, not of
    // holding connections. They are measured and reported, and left out of the per-connection
    // figure.
    let proc_fd = |m: &MemReading| -> i64 {
        let g = |c: &KernelMem, name: &str| {
            (
                c.caches.get(name).copied().unwrap_or(0) as i64,
                c.cache_objs.get(name).copied().unwrap_or(0) as i64,
            )
        };
        let (pb1, po1) = g(&m.kernel, "proc_inode_cache");
        let (pb0, po0) = g(&base.kernel, "proc_inode_cache");
        let (db, dobj) = g(&m.kernel, "dentry");
        let dentry_size = if dobj > 0 { db / dobj } else { 192 };
        (pb1 - pb0) + (po1 - po0).max(0) * dentry_size
    };
    let kern = |m: &MemReading| -> (i64, i64, i64) {
        let slab = m.kernel.slab as i64 - base.kernel.slab as i64;
        let tcp = m.kernel.tcp_mem_bytes as i64 - base.kernel.tcp_mem_bytes as i64;
        (slab, tcp, slab - proc_fd(m) + tcp)
    };
    let (slab, tcp, ktotal) = kern(&end);
    let proc_fd_bytes = proc_fd(&end);
    let user_per = drss(&end) as f64 / conns as f64;
    let anon_per = danon(&end) as f64 / conns as f64;
    let k_per_pair = ktotal as f64 / conns as f64;
    let client_per =
        (end.workers.rss as i64 - ctx.worker_baseline.rss as i64) as f64 / conns as f64;
    let top = sysmem::top_cache_growth(&base.kernel, &end.kernel, 12);
    let loopback = ctx.target.ip().is_loopback();
    ctx.report.insert(
        "idle".into(),
        json!({
            "connections_held": o.ready_at_end, "seconds": ctx.args.idle_seconds, "cpu_per_pong": cpu,
            "pings": o.pings, "pongs": o.pongs, "disconnects": o.disconnects, "goaways": o.goaways, "errors": o.errors,
            "baseline": mem_json(&base), "after_ramp": mem_json(&after_ramp), "end": mem_json(&end),
            "daemon_rss_delta_bytes": drss(&end), "daemon_rss_per_conn_bytes": user_per,
            "daemon_rss_anon_per_conn_bytes": anon_per,
            "daemon_rss_per_conn_after_ramp_bytes": drss(&after_ramp) as f64 / conns as f64,
            "kernel_slab_delta_bytes": slab, "kernel_tcp_mem_delta_bytes": tcp,
            "kernel_proc_fd_inodes_excluded_bytes": proc_fd_bytes,
            "kernel_per_conn_both_ends_including_proc_fd_bytes": (slab + tcp) as f64 / conns as f64,
            "kernel_per_conn_both_ends_bytes": k_per_pair,
            "kernel_per_conn_server_end_bytes": if loopback { k_per_pair / 2.0 } else { k_per_pair },
            "kernel_both_ends_on_this_host": loopback,
            "slab_growth_top": top.iter().map(|(n, b, o)| json!({"cache": n, "bytes": b, "objects": o})).collect::<Vec<_>>(),
            "client_rss_per_conn_bytes": client_per,
        }),
    );
    ctx.row(
        "idle",
        "connections held",
        format!(
            "{} for {} s ({} pings, {} pongs, {} lost)",
            o.ready_at_end, ctx.args.idle_seconds, o.pings, o.pongs, o.disconnects
        ),
    );
    ctx.row(
        "idle",
        "daemon RSS / conn",
        format!(
            "{user_per:.0} B (anon {anon_per:.0} B); Δ {} MiB",
            drss(&end) / (1 << 20)
        ),
    );
    if loopback {
        ctx.row(
            "idle",
            "kernel / conn",
            format!(
                "{:.0} B both ends (slab Δ {} MiB − /proc fd inodes {} MiB + tcp mem Δ {} KiB); server end ≈ {:.0} B",
                k_per_pair,
                slab >> 20,
                proc_fd_bytes >> 20,
                tcp >> 10,
                k_per_pair / 2.0
            ),
        );
    } else {
        ctx.row(
            "idle",
            "kernel / conn",
            format!("{k_per_pair:.0} B (slab + tcp mem)"),
        );
    }
    ctx.row("idle", "generator RSS / conn", format!("{client_per:.0} B"));
    ctx.row("idle", "CPU while idle", cpu_line(&cpu, "ping"));
    Ok(())
}

/// CPU seconds used so far by the daemon (if its pid is known) and by the generator's workers.
fn cpu_now(ctx: &Ctx, pool: &Pool) -> (Option<f64>, f64) {
    (
        ctx.daemon_pid.and_then(sysmem::proc_cpu_secs),
        workers_cpu(pool).unwrap_or(0.0),
    )
}

/// CPU used between two [`cpu_now`] readings: seconds, and µs per completed unit (handshake,
/// message).
fn cpu_json(a: (Option<f64>, f64), b: (Option<f64>, f64), units: u64) -> Value {
    let d = match (a.0, b.0) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let g = b.1 - a.1;
    let per = |s: f64| (units > 0).then(|| s * 1e6 / units as f64);
    json!({
        "daemon_cpu_seconds": d, "generator_cpu_seconds": g,
        "daemon_cpu_us_per_unit": d.and_then(per), "generator_cpu_us_per_unit": per(g),
    })
}

fn cpu_line(v: &Value, unit: &str) -> String {
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
    format!(
        "daemon {} CPU-s ({} µs/{unit}), generator {:.2} CPU-s ({} µs/{unit})",
        f("daemon_cpu_seconds")
            .map(|x| format!("{x:.2}"))
            .unwrap_or("-".into()),
        f("daemon_cpu_us_per_unit")
            .map(|x| format!("{x:.0}"))
            .unwrap_or("-".into()),
        f("generator_cpu_seconds").unwrap_or(0.0),
        f("generator_cpu_us_per_unit")
            .map(|x| format!("{x:.0}"))
            .unwrap_or("-".into()),
    )
}

fn workers_cpu(pool: &Pool) -> Option<f64> {
    let mut seen = Vec::new();
    let mut t = 0.0;
    for &p in &pool.pids {
        if !seen.contains(&p) {
            seen.push(p);
            t += sysmem::proc_cpu_secs(p)?;
        }
    }
    Some(t)
}

fn msg_run(
    ctx: &mut Ctx,
    pool: &mut Pool,
    label: &str,
    offered: Option<f64>,
) -> Result<(Value, f64)> {
    ensure_connected(ctx, pool, label)?;
    let start = now_ns() + 300 * 1_000_000;
    let from = start + ctx.args.warmup * SEC;
    let to = from + ctx.args.duration * SEC;
    ensure!(
        to <= ctx.deadline,
        "{label}: not enough time left under --max-seconds"
    );
    let p = MsgParams {
        start_ns: start,
        measure_from_ns: from,
        measure_to_ns: to,
        grace_ns: 10 * SEC,
        window: ctx.args.window,
        payload: ctx.args.payload,
        dist: ctx.args.dist,
        offered_rate: offered,
        senders_total: ctx.n,
        max_inflight: ctx.args.max_inflight,
    };
    let cmds = (0..ctx.k).map(|_| Cmd::Message(p.clone())).collect();
    // Daemon CPU and counters over the measurement window, sampled from a helper thread.
    let pid = ctx.daemon_pid;
    let admin = ctx.admin;
    let gen_pids = pool.pids.clone();
    let sampler = std::thread::spawn(move || {
        let wait_until = |t: u64| {
            while now_ns() < t {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let read = || {
            let d = pid.and_then(sysmem::proc_cpu_secs);
            let mut g = 0.0;
            let mut seen = Vec::new();
            for &p in &gen_pids {
                if !seen.contains(&p) {
                    seen.push(p);
                    g += sysmem::proc_cpu_secs(p).unwrap_or(0.0);
                }
            }
            (d, g, daemon::metrics(admin).ok())
        };
        wait_until(from);
        let a = read();
        wait_until(to);
        let b = read();
        (a, b)
    });
    let o = pool.call(label, cmds, to + 15 * SEC)?;
    let ((d0, g0, m0), (d1, g1, m1)) = sampler
        .join()
        .map_err(|_| anyhow!("{label}: sampler thread panicked"))?;
    let secs = ctx.args.duration as f64;
    let delivered_rate = o.delivered_in_window as f64 / secs;
    let acked_rate = o.acked_in_window as f64 / secs;
    let (sa, ja) = lat_json(&o.hist_ack);
    let (sd, jd) = lat_json(&o.hist_deliver);
    let (sl, jl) = lat_json(&o.hist_send_lag);
    let (saw, jaw) = lat_json(&o.hist_ack_from_write);
    let (_, jdw) = lat_json(&o.hist_deliver_from_write);
    let daemon_cores = match (d0, d1) {
        (Some(a), Some(b)) => Some((b - a) / secs),
        _ => None,
    };
    let gen_cores = (g1 - g0) / secs;
    let counter = |name: &str| -> Option<f64> {
        let a = daemon::metric_sum(m0.as_deref()?, name)?;
        let b = daemon::metric_sum(m1.as_deref()?, name)?;
        Some(b - a)
    };
    let commits = counter("switchboard_log_commits_total");
    let fsync_sum = counter("switchboard_fsync_seconds_sum");
    let fsync_cnt = counter("switchboard_fsync_seconds_count");
    let batch_sum = counter("switchboard_commit_batch_records_sum");
    let batch_cnt = counter("switchboard_commit_batch_records_count");
    let appends = counter("switchboard_log_appends_total");
    let cores_per_m = daemon_cores
        .filter(|_| delivered_rate > 0.0)
        .map(|c| c / (delivered_rate / 1e6));
    let v = json!({
        "mode": if offered.is_some() { "open_loop" } else { "closed_loop" },
        "offered_rate_per_s": offered, "window": ctx.args.window, "payload_bytes": ctx.args.payload,
        "dist": format!("{:?}", ctx.args.dist), "connections": ctx.n, "measured_seconds": secs, "warmup_seconds": ctx.args.warmup,
        "sent": o.sent, "acked": o.acked, "acked_in_window": o.acked_in_window, "delivered": o.delivered,
        "delivered_in_window": o.delivered_in_window, "receipts": o.receipts, "skipped_sends": o.skipped_sends,
        "inflight_left": o.inflight_left, "disconnects": o.disconnects, "errors": o.errors, "fail_reasons": o.fail_reasons,
        "delivered_per_s": delivered_rate, "acked_per_s": acked_rate,
        "latency_send_to_serverack": ja, "latency_send_to_deliver": jd,
        "generator_send_lag": jl,
        "latency_actual_send_to_serverack": jaw, "latency_actual_send_to_deliver": jdw,
        "daemon_cpu_cores": daemon_cores, "generator_cpu_cores": gen_cores,
        "daemon_cores_per_million_msgs_per_s": cores_per_m,
        "log_commits_per_s": commits.map(|c| c / secs), "log_appends_per_s": appends.map(|c| c / secs),
        "avg_fsync_ms": match (fsync_sum, fsync_cnt) { (Some(s), Some(c)) if c > 0.0 => Some(s / c * 1e3), _ => None },
        "avg_commit_batch_records": match (batch_sum, batch_cnt) { (Some(s), Some(c)) if c > 0.0 => Some(s / c), _ => None },
    });
    let what = match offered {
        Some(r) => format!("open loop @ {r:.0}/s"),
        None => format!("closed loop, window {}", ctx.args.window),
    };
    ctx.row(
        "messaging",
        &what,
        format!(
            "delivered {delivered_rate:.0} msgs/s, ✓ {acked_rate:.0}/s ({} conns, {} B, {:?})",
            ctx.n, ctx.args.payload, ctx.args.dist
        ),
    );
    ctx.row("messaging", "  send → ✓", lat_line(&sa));
    ctx.row("messaging", "  send → Deliver", lat_line(&sd));
    if offered.is_some() {
        ctx.row("messaging", "  generator lag", lat_line(&sl));
        ctx.row("messaging", "  actual send → ✓", lat_line(&saw));
    }
    if let Some(c) = daemon_cores {
        ctx.row(
            "messaging",
            "  daemon CPU",
            format!(
                "{c:.2} cores ({} per 1M msgs/s); generator {gen_cores:.2} cores; {} commits/s, {} recs/commit, fsync {} ms",
                cores_per_m.map(|x| format!("{x:.1}")).unwrap_or("-".into()),
                commits.map(|c| format!("{:.0}", c / secs)).unwrap_or("-".into()),
                match (batch_sum, batch_cnt) { (Some(s), Some(c)) if c > 0.0 => format!("{:.1}", s / c), _ => "-".into() },
                match (fsync_sum, fsync_cnt) { (Some(s), Some(c)) if c > 0.0 => format!("{:.2}", s / c * 1e3), _ => "-".into() },
            ),
        );
    }
    if o.skipped_sends > 0 || !o.errors.is_empty() || o.disconnects > 0 {
        ctx.row(
            "messaging",
            "  trouble",
            format!(
                "{} skipped sends, {} disconnects, errors {:?}",
                o.skipped_sends, o.disconnects, o.errors
            ),
        );
    }
    Ok((v, delivered_rate))
}

fn phase_messaging(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    let mut runs = Vec::new();
    if let Some(r) = ctx.args.offered_rate {
        let (v, _) = msg_run(ctx, pool, "open-loop", Some(r))?;
        runs.push(v);
    } else {
        let (v, peak) = msg_run(ctx, pool, "closed", None)?;
        runs.push(v);
        for f in ctx.args.open_fractions.clone() {
            let r = (peak * f).max(1.0);
            let (v, _) = msg_run(ctx, pool, &format!("open@{f}"), Some(r))?;
            runs.push(v);
        }
    }
    ctx.report.insert("messaging".into(), json!(runs));
    Ok(())
}

fn phase_storm(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    ensure_connected(ctx, pool, "storm")?;
    let limit = ctx.phase_deadline(ctx.args.phase_timeout);
    let per = if ctx.args.storm_max_pending == 0 {
        0
    } else {
        (ctx.args.storm_max_pending / ctx.k).max(1)
    };
    let cmds = (0..ctx.k)
        .map(|_| Cmd::Storm {
            max_pending: per,
            deadline_ns: limit,
        })
        .collect();
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("storm", cmds, limit)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.logged_in);
    let secs = o.t_last_ok_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let (s, lj) = lat_json(&o.hist_handshake);
    ctx.row("storm", "CPU", cpu_line(&cpu, "login"));
    ctx.report.insert(
        "storm".into(),
        json!({
            "cpu": cpu,
            "connections": ctx.n, "logged_in_again": o.logged_in, "ready_at_end": o.ready_at_end,
            "seconds_until_all_logged_in": secs, "attempt_failures": o.attempt_failures, "gave_up": o.gave_up,
            "fail_reasons": o.fail_reasons, "errors": o.errors, "latency_connect_to_welcome": lj,
            "logins_per_s": rate_per_s(o.logged_in, o.t_start_ns, o.t_last_ok_ns),
        }),
    );
    ctx.row(
        "storm",
        "reconnect storm",
        format!(
            "{} of {} back in {:.2} s ({} failed attempts, {} gave up)",
            o.logged_in, ctx.n, secs, o.attempt_failures, o.gave_up
        ),
    );
    ctx.row("storm", "connect → Welcome", lat_line(&s));
    Ok(())
}

fn drain_split(ctx: &Ctx) -> (usize, usize) {
    let u = ctx
        .args
        .drain_users
        .unwrap_or(ctx.n / 2)
        .clamp(1, ctx.n.saturating_sub(1).max(1));
    (ctx.n - u, ctx.n)
}

fn phase_queue(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    ensure_connected(ctx, pool, "queue")?;
    let (rlo, rhi) = drain_split(ctx);
    let cmds = (0..ctx.k)
        .map(|_| Cmd::Disconnect { lo: rlo, hi: rhi })
        .collect();
    pool.call("offline", cmds, ctx.phase_deadline(30))?;
    let depth0 = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
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
    let depth = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
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

fn phase_restart(ctx: &mut Ctx) -> Result<()> {
    let sig = match ctx.args.restart_signal.as_str() {
        "kill" => sys::Signal::KILL,
        "term" => sys::Signal::TERM,
        other => bail!("--restart-signal {other:?}: kill or term"),
    };
    let depth = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
    let appends = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_log_appends_total"));
    let rss_before = ctx.daemon_rss_now();
    let shards = ctx.args.daemon_shards.max(1);
    let d = ctx
        .daemon
        .as_mut()
        .context("the restart phase needs --spawn-daemon (the generator must own the process)")?;
    let seen = d.recovered().len();
    let stop_t = d
        .stop(sig, Duration::from_secs(120))
        .context("stopping the daemon")?;
    let start_t = d.start().context("restarting the daemon")?;
    let rec = d.wait_recovered(seen + shards, Duration::from_secs(30));
    let new: Vec<_> = rec.into_iter().skip(seen).collect();
    ctx.daemon_pid = d.pid();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = ctx.daemon_rss_now();
    let depth_after = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
    let replay_ms = new.iter().map(|r| r.elapsed_ms).max().unwrap_or(0);
    let records: u64 = new.iter().map(|r| r.records).sum();
    let queued = depth_after.or(depth).unwrap_or(0.0);
    let per_m = if queued > 0.0 {
        Some(replay_ms as f64 * 1e6 / queued)
    } else {
        None
    };
    let per_m_records = if records > 0 {
        Some(replay_ms as f64 * 1e6 / records as f64)
    } else {
        None
    };
    ctx.report.insert(
        "restart".into(),
        json!({
            "signal": ctx.args.restart_signal, "mailbox_depth_before": depth, "mailbox_depth_after": depth_after,
            "log_appends_total_before": appends,
            "stop_ms": stop_t.as_millis() as u64, "start_to_listening_ms": start_t.as_millis() as u64,
            "recovered": new, "replay_elapsed_ms": replay_ms, "records_replayed": records,
            "replay_ms_per_million_queued": per_m, "replay_ms_per_million_records": per_m_records,
            "daemon_rss_before": rss_before, "daemon_rss_after": rss_after,
        }),
    );
    ctx.row(
        "restart",
        &format!("SIG{} + restart", ctx.args.restart_signal.to_uppercase()),
        format!(
            "recovered {records} records in {replay_ms} ms (daemon log), listening after {} ms; {:.0} queued → {} ms per 1M queued",
            start_t.as_millis(),
            queued,
            per_m.map(|x| format!("{x:.0}")).unwrap_or("-".into())
        ),
    );
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        ctx.row(
            "restart",
            "daemon RSS",
            format!("{} MiB before, {} MiB after recovery", a >> 20, b >> 20),
        );
    }
    Ok(())
}

fn phase_drain(ctx: &mut Ctx, pool: &mut Pool) -> Result<()> {
    if ctx.queued.is_none() {
        phase_queue(ctx, pool)?;
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
    let u = (rhi - rlo) as u64;
    let m = ctx.args.drain_messages;
    let count = |g: usize| -> u64 {
        let i = (g - rlo) as u64;
        m / u + u64::from(i < m % u)
    };
    let limit = ctx.phase_deadline(ctx.args.phase_timeout);
    let per = if ctx.args.storm_max_pending == 0 {
        0
    } else {
        (ctx.args.storm_max_pending / ctx.k).max(1)
    };
    let ranges = ctx.ranges();
    let cmds = ranges
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
        .collect();
    let depth0 = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
    let c0 = cpu_now(ctx, pool);
    let o = pool.call("drain", cmds, limit)?;
    let cpu = cpu_json(c0, cpu_now(ctx, pool), o.delivered);
    ctx.row("drain", "CPU", cpu_line(&cpu, "msg"));
    let secs = o.t_last_deliver_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let rate = rate_per_s(o.delivered, o.t_start_ns, o.t_last_deliver_ns);
    let rate_from_first = rate_per_s(o.delivered, o.t_first_deliver_ns, o.t_last_deliver_ns);
    let (s, lj) = lat_json(&o.hist_handshake);
    // Delivered is not yet gone: the recipients' acks become tombstones (and ✓✓ receipts for
    // the senders) through the log. Wait (bounded) until the mailboxes are durably empty.
    let target = depth0.map(|d| (d - o.delivered as f64).max(0.0));
    let wait_until = (now_ns() + 120 * SEC).min(ctx.deadline);
    let mut depth = ctx
        .metrics()
        .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
    while let (Some(d), Some(t)) = (depth, target) {
        if d <= t || now_ns() > wait_until {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        depth = ctx
            .metrics()
            .and_then(|m| daemon::metric_sum(&m, "switchboard_mailbox_depth"));
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

fn host_json() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned());
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| l.to_owned());
    json!({
        "cpus": sys::online_cpus(),
        "cpu_model": model, "mem_total": mem, "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "somaxconn": read("/proc/sys/net/core/somaxconn").trim(), "tcp_mem": read("/proc/sys/net/ipv4/tcp_mem").trim(),
        "ip_local_port_range": read("/proc/sys/net/ipv4/ip_local_port_range").trim(),
        "loadavg_at_start": read("/proc/loadavg").trim(),
    })
}

/// Runs the controller. Returns a message on failure.
pub fn run(args: Args) -> Result<()> {
    let t0 = now_ns();
    let deadline = t0 + args.max_seconds * SEC;
    let nofile = sys::raise_nofile().context("raising the open-file limit")?;
    let k = args.workers.max(1);
    let n = args.conns.max(2);
    ensure!(
        n / k + 64 <= nofile as usize,
        "{} connections per worker exceed the open-file limit {nofile}; use more --workers",
        n / k
    );
    let phases: Vec<String> = args
        .phases
        .iter()
        .map(|p| p.trim().to_lowercase())
        .collect();
    for p in &phases {
        if ![
            "provision",
            "ramp",
            "idle",
            "messaging",
            "storm",
            "queue",
            "restart",
            "drain",
        ]
        .contains(&p.as_str())
        {
            bail!("unknown phase {p:?}");
        }
    }
    let daemon = match &args.spawn_daemon {
        Some(bin) => {
            eprintln!(
                "switchboard-flood: starting {} (--shards {} --cpus {})",
                bin.display(),
                args.daemon_shards,
                args.daemon_cpus
            );
            Some(
                Daemon::spawn(
                    bin,
                    args.data_dir.as_deref(),
                    args.daemon_shards,
                    &args.daemon_cpus,
                    &args.daemon_args,
                )
                .with_context(|| format!("starting {}", bin.display()))?,
            )
        }
        None => None,
    };
    let mut gen_cpus = args.gen_cpus.clone();
    if gen_cpus.is_empty() && daemon.is_some() && sys::online_cpus() > 1 {
        gen_cpus = vec![1];
    }
    if !gen_cpus.is_empty() {
        sys::pin_to_cpus(&gen_cpus).with_context(|| format!("pinning to CPUs {gen_cpus:?}"))?;
    }
    let (target, admin) = match &daemon {
        Some(d) => (d.listen, d.admin),
        None => (args.target, args.admin),
    };
    let daemon_pid = daemon.as_ref().and_then(|d| d.pid()).or(args.daemon_pid);
    let mut ctx = Ctx {
        args: args.clone(),
        daemon,
        target,
        admin,
        daemon_pid,
        n,
        k,
        report: Map::new(),
        table: Vec::new(),
        deadline,
        baseline: None,
        worker_baseline: ProcMem::default(),
        queued: None,
        notes: Vec::new(),
    };
    ctx.report.insert(
        "params".into(),
        serde_json::to_value(&args).unwrap_or(Value::Null),
    );
    ctx.report.insert("generator_cpus".into(), json!(gen_cpus));
    ctx.report.insert("host".into(), host_json());
    ctx.report
        .insert("started_unix_ms".into(), json!(sys::wall_ms()));
    // The daemon: version and configuration.
    let page = ctx.metrics();
    let version = page.as_deref().and_then(daemon::build_version);
    let bin = args.daemon_bin.clone().or(args.spawn_daemon.clone());
    let cfg_args = ctx
        .daemon
        .as_ref()
        .map(|d| d.args.clone())
        .unwrap_or_else(|| args.daemon_args.clone());
    let config = bin
        .as_ref()
        .and_then(|b| daemon::print_config(b, &cfg_args));
    ctx.report.insert(
        "daemon".into(),
        json!({
            "version": version, "target": target.to_string(), "admin": admin.to_string(), "pid": daemon_pid,
            "spawned": ctx.daemon.as_ref().map(|d| json!({"bin": d.bin, "args": d.args, "data_dir": d.data_dir, "log": d.log_path})),
            "print_config": config, "metrics_at_start": if config.is_none() { page.clone() } else { None },
            "rss_at_start": ctx.daemon_rss_now(),
        }),
    );
    let run_id = (sys::wall_ms() / 1000) as u32;
    let accounts = ensure_accounts(&mut ctx, run_id)?;
    ctx.report.insert(
        "daemon_rss_after_provisioning".into(),
        json!(ctx.daemon_rss_now()),
    );
    let phones: Vec<u64> = accounts.iter().map(|a| a.phone).collect();
    let dd = data_dir(&ctx);
    let specs = ctx
        .ranges()
        .into_iter()
        .enumerate()
        .map(|(i, (lo, hi))| base_spec(&ctx, &phones, &accounts, i, lo, hi, run_id, dd.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    drop(accounts);
    let mut pool = Pool::start(specs, args.quiet)?;
    std::thread::sleep(Duration::from_millis(300));
    ctx.worker_baseline = ctx.read_mem(&pool).workers;
    ctx.baseline = Some(ctx.read_mem(&pool));
    let mut result = Ok(());
    for p in &phases {
        if now_ns() > ctx.deadline {
            ctx.notes
                .push(format!("--max-seconds reached before phase {p}"));
            break;
        }
        let r = match p.as_str() {
            "provision" => Ok(()),
            "ramp" => phase_ramp(&mut ctx, &mut pool),
            "idle" => phase_idle(&mut ctx, &mut pool),
            "messaging" => phase_messaging(&mut ctx, &mut pool),
            "storm" => phase_storm(&mut ctx, &mut pool),
            "queue" => phase_queue(&mut ctx, &mut pool),
            "restart" => phase_restart(&mut ctx),
            "drain" => phase_drain(&mut ctx, &mut pool),
            _ => Ok(()),
        };
        if let Err(e) = r {
            ctx.notes.push(format!("phase {p} failed: {e:#}"));
            result = Err(e.context(format!("phase {p}")));
            break;
        }
    }
    let cpu = workers_cpu(&pool);
    pool.shutdown();
    ctx.report
        .insert("generator_cpu_seconds".into(), json!(cpu));
    ctx.report.insert(
        "loadavg_at_end".into(),
        json!(std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()),
    );
    ctx.report.insert(
        "elapsed_seconds".into(),
        json!((now_ns() - t0) as f64 / 1e9),
    );
    ctx.report.insert("notes".into(), json!(ctx.notes));
    print_table(&ctx);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&Value::Object(ctx.report.clone()))
            .context("encoding the JSON report")?;
        std::fs::write(path, text)
            .with_context(|| format!("writing the JSON report {}", path.display()))?;
        eprintln!("switchboard-flood: wrote {}", path.display());
    }
    if let Some(d) = &ctx.daemon {
        eprintln!("switchboard-flood: daemon log: {}", d.log_path.display());
    }
    result
}

fn print_table(ctx: &Ctx) {
    let w0 = ctx
        .table
        .iter()
        .map(|r| r.0.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let w1 = ctx
        .table
        .iter()
        .map(|r| r.1.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    println!();
    println!(
        "switchboard-flood: {} connections, {} worker(s), target {}{}",
        ctx.n,
        ctx.k,
        ctx.target,
        ctx.report
            .get("daemon")
            .and_then(|d| d.get("version"))
            .and_then(|v| v.as_str())
            .map(|v| format!(", daemon {v}"))
            .unwrap_or_default()
    );
    println!("{:<w0$}  {:<w1$}  value", "phase", "figure");
    println!("{}  {}  {}", "-".repeat(w0), "-".repeat(w1), "-".repeat(40));
    for (a, b, c) in &ctx.table {
        let pad0 = w0.saturating_sub(a.chars().count());
        let pad1 = w1.saturating_sub(b.chars().count());
        println!("{a}{}  {b}{}  {c}", " ".repeat(pad0), " ".repeat(pad1));
    }
    for n in &ctx.notes {
        println!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_lists() {
        let t: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(parse_ip_list("none", t, 10).unwrap().is_empty());
        assert_eq!(parse_ip_list("auto", t, 45_000).unwrap().len(), 3);
        assert_eq!(
            parse_ip_list("127.0.0.2-127.0.0.50", t, 1).unwrap().len(),
            49
        );
        assert_eq!(parse_ip_list("127.0.0.2,::1", t, 1).unwrap().len(), 2);
        assert!(parse_ip_list("x", t, 1).is_err());
    }

    #[test]
    fn cli_parses() {
        let a = Args::try_parse_from([
            "switchboard-flood",
            "--phases",
            "ramp,messaging",
            "--dist",
            "zipf:1.1",
            "--daemon-arg=--foo=1",
        ])
        .unwrap();
        assert_eq!(a.phases, vec!["ramp", "messaging"]);
        assert_eq!(a.dist, Dist::Zipf(1.1));
        assert_eq!(a.daemon_args, vec!["--foo=1"]);
    }
}
