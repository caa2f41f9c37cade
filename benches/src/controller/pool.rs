//! The workers of a run: one engine thread in this process, or child processes re-executing
//! this binary with `--worker i/K` that exchange [`Cmd`]s and [`Report`]s as JSON lines.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::engine::Engine;
use crate::phase::{Cmd, Outcome, Report, WorkerSpec};
use crate::sys::{self, now_ns};

use super::progress::Progress;
use super::SEC;

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

/// Starts the single worker as a thread of this process.
fn spawn_thread_worker(spec: WorkerSpec, rtx: Sender<(usize, Report)>) -> Result<Link> {
    let (tx, crx) = mpsc::channel::<Cmd>();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
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
    Ok(Link::Thread {
        tx,
        stop,
        handle: Some(handle),
    })
}

/// Starts worker `i` of `k` as a child process, sends it its spec and forwards its reports.
fn spawn_proc_worker(
    exe: &Path,
    i: usize,
    k: usize,
    spec: WorkerSpec,
    rtx: Sender<(usize, Report)>,
) -> Result<Link> {
    let mut child = Command::new(exe)
        .arg("--worker")
        .arg(format!("{i}/{k}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawning worker {i}"))?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let line =
        serde_json::to_string(&Cmd::Init(Box::new(spec))).context("encoding the worker spec")?;
    writeln!(stdin, "{line}").with_context(|| format!("starting worker {i}"))?;
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
                    Err(e) => eprintln!("switchboard-flood: worker {i}: bad report ({e}): {line}"),
                }
            }
        })
        .with_context(|| format!("spawning the reader of worker {i}"))?;
    Ok(Link::Proc {
        child,
        stdin: Some(stdin),
    })
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
            links.push(spawn_thread_worker(spec, rtx.clone())?);
        } else {
            let exe =
                std::env::current_exe().context("locating this executable for the workers")?;
            for (i, spec) in specs.into_iter().enumerate() {
                links.push(spawn_proc_worker(&exe, i, k, spec, rtx.clone())?);
            }
        }
        let mut pool = Pool {
            links,
            rx,
            pids: vec![0; k],
            quiet,
        };
        pool.wait_ready()?;
        Ok(pool)
    }

    /// Waits for every worker's `Ready` (and its pid).
    fn wait_ready(&mut self) -> Result<()> {
        let k = self.links.len();
        let mut ready = 0;
        while ready < k {
            match self.rx.recv_timeout(Duration::from_secs(60)) {
                Ok((i, Report::Ready { pid })) => {
                    *self.pids.get_mut(i).with_context(|| unknown_worker(i))? = pid;
                    ready += 1;
                }
                Ok((i, Report::Fatal(e))) => bail!("worker {i}: {e}"),
                Ok(_) => {}
                Err(_) => bail!("workers did not start within 60 s"),
            }
        }
        Ok(())
    }

    fn send(&mut self, i: usize, cmd: Cmd) -> Result<()> {
        match self.links.get_mut(i).with_context(|| unknown_worker(i))? {
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
                    *prog.get_mut(i).with_context(|| unknown_worker(i))? = (d, total);
                    let (d, t) = prog.iter().fold((0, 0), |a, p| (a.0 + p.0, a.1 + p.1));
                    bar.draw(d, t);
                }
                Ok((i, Report::Done(o))) => {
                    *done.get_mut(i).with_context(|| unknown_worker(i))? = Some(*o);
                }
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

/// The error for a worker index the pool does not have (workers are numbered `0..k`).
fn unknown_worker(i: usize) -> String {
    format!("no worker {i} in the pool")
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
