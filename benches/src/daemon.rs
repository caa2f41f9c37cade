//! The daemon under test: spawning `switchboard` (optional), its metrics page, its memory, its
//! log lines (the "recovered … elapsed_ms" line of a restart).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One "recovered" log line of a shard.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Recovered {
    /// Shard.
    pub shard: u64,
    /// Segments read.
    pub segments: u64,
    /// Records replayed.
    pub records: u64,
    /// Recovery time reported by the daemon.
    pub elapsed_ms: u64,
}

/// Parses a daemon log line (JSON or text format) that reports a shard's recovery.
pub fn parse_recovered(line: &str) -> Option<Recovered> {
    if !line.contains("recovered") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let f = v.get("fields")?;
        if f.get("message")?.as_str()? != "recovered" {
            return None;
        }
        let n = |k: &str| f.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        return Some(Recovered {
            shard: n("shard"),
            segments: n("segments"),
            records: n("records"),
            elapsed_ms: n("elapsed_ms"),
        });
    }
    // Text format: strip ANSI colour codes, then read key=value pairs.
    let mut clean = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(ch);
        }
    }
    let mut r = Recovered::default();
    let mut any = false;
    for tok in clean.split_whitespace() {
        if let Some((k, v)) = tok.split_once('=') {
            let Ok(v) = v.trim_matches('"').parse::<u64>() else {
                continue;
            };
            match k {
                "shard" => r.shard = v,
                "segments" => r.segments = v,
                "records" => r.records = v,
                "elapsed_ms" => {
                    r.elapsed_ms = v;
                    any = true;
                }
                _ => {}
            }
        }
    }
    any.then_some(r)
}

/// A `switchboard` process started by the generator.
pub struct Daemon {
    /// The binary.
    pub bin: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Client address.
    pub listen: SocketAddr,
    /// Admin (metrics) address.
    pub admin: SocketAddr,
    /// Every flag passed.
    pub args: Vec<String>,
    /// Where its log goes.
    pub log_path: PathBuf,
    child: Option<Child>,
    recovered: Arc<Mutex<Vec<Recovered>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// A free loopback port (bound, then released for the daemon).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Daemon {
    /// Starts `bin` with one shard pinned to `cpu` (or `shards` shards), a data directory (a
    /// fresh temporary one unless given), generous registration limits (benches register many
    /// numbers from one address) and `extra` flags; waits until it listens.
    pub fn spawn(
        bin: &Path,
        data_dir: Option<&Path>,
        shards: usize,
        cpus: &str,
        extra: &[String],
    ) -> std::io::Result<Daemon> {
        let (data_dir, tmp) = match data_dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("switchboard-flood-")
                    .tempdir()?;
                (t.path().join("data"), Some(t))
            }
        };
        std::fs::create_dir_all(&data_dir)?;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?)
            .parse()
            .map_err(std::io::Error::other)?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?)
            .parse()
            .map_err(std::io::Error::other)?;
        let mut args = vec![
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--shards".into(),
            shards.to_string(),
            "--listen-addr".into(),
            listen.to_string(),
            "--admin-addr".into(),
            admin.to_string(),
            "--register-per-ip-per-hour".into(),
            "100000000".into(),
            "--register-per-number-per-hour".into(),
            "1000".into(),
            // Every flood client shares one source address (unless --source-ips): lift the
            // per-address pre-auth cap, which protects against exactly that pattern.
            "--max-preauth-per-ip".into(),
            "0".into(),
            "--log-format".into(),
            "json".into(),
            "--log-filter".into(),
            "info".into(),
        ];
        if !cpus.is_empty() {
            args.push("--cpus".into());
            args.push(cpus.to_owned());
        }
        args.extend(extra.iter().cloned());
        let log_path = data_dir
            .parent()
            .unwrap_or(&data_dir)
            .join("switchboard-flood-daemon.log");
        let mut d = Daemon {
            bin: bin.to_path_buf(),
            data_dir,
            listen,
            admin,
            args,
            log_path,
            child: None,
            recovered: Arc::new(Mutex::new(Vec::new())),
            _tmp: tmp,
        };
        d.start()?;
        Ok(d)
    }

    /// Starts (or restarts) the process with the same flags and waits until it listens.
    pub fn start(&mut self) -> std::io::Result<Duration> {
        let t0 = Instant::now();
        let mut child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
        let rec = self.recovered.clone();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        std::thread::Builder::new()
            .name("daemon-log".into())
            .spawn(move || {
                let r = BufReader::new(stderr);
                // Ends when the daemon closes its stderr (exits).
                for line in r.lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    if let Some(x) = parse_recovered(&line) {
                        if let Ok(mut v) = rec.lock() {
                            v.push(x);
                        }
                    }
                }
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(600))?;
        Ok(t0.elapsed())
    }

    fn wait_ready(&mut self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    return Err(std::io::Error::other(format!(
                        "switchboard exited during start-up ({status}); see {}",
                        self.log_path.display()
                    )));
                }
            }
            if TcpStream::connect_timeout(&self.listen, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(std::io::Error::other("switchboard did not start listening"))
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` and waits (at most `limit`) for the exit; SIGKILL after that.
    pub fn stop(&mut self, sig: crate::sys::Signal, limit: Duration) -> std::io::Result<Duration> {
        let t0 = Instant::now();
        let Some(mut c) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        crate::sys::kill(c.id(), sig)?;
        let deadline = Instant::now() + limit;
        loop {
            if c.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                c.kill()?;
                c.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let exited = t0.elapsed();
        // The kernel tears a dead process's io_uring instance down asynchronously: until the
        // accept it had in flight is cancelled, the old listening socket still completes
        // handshakes, and with SO_REUSEPORT a new daemon would share the port with that ghost.
        // Wait (bounded) until the port refuses connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.listen, Duration::from_millis(100)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(exited)
    }

    /// Recovery lines seen so far (all starts).
    pub fn recovered(&self) -> Vec<Recovered> {
        self.recovered.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits until `n` recovery lines in all have been seen (the log thread may lag the
    /// listener by a little).
    pub fn wait_recovered(&self, n: usize, limit: Duration) -> Vec<Recovered> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.recovered();
            if v.len() >= n || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = crate::sys::kill(c.id(), crate::sys::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The metrics page of the admin endpoint (Prometheus text).
pub fn metrics(admin: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: switchboard\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    // Bounded by the read timeout and the server closing the connection.
    let _ = s.take(64 << 20).read_to_string(&mut out);
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.to_owned()),
        None => Ok(out),
    }
}

/// Sum of a metric over its label sets.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let mut any = false;
    let mut sum = 0.0;
    for l in page.lines() {
        if l.starts_with('#') || !l.starts_with(name) {
            continue;
        }
        let rest = &l[name.len()..];
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            any = true;
        }
    }
    any.then_some(sum)
}

/// The `version` label of `switchboard_build_info`.
pub fn build_version(page: &str) -> Option<String> {
    let l = page
        .lines()
        .find(|l| l.starts_with("switchboard_build_info"))?;
    let i = l.find("version=\"")? + 9;
    let rest = l.get(i..)?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// `switchboard --print-config` with the given flags.
pub fn print_config(bin: &Path, args: &[String]) -> Option<String> {
    let out = Command::new(bin)
        .args(args)
        .arg("--print-config")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recovered_lines() {
        let j = r#"{"timestamp":"x","level":"INFO","fields":{"message":"recovered","shard":0,"segments":3,"records":1200,"truncated":0,"skipped":0,"elapsed_ms":42},"target":"switchboard_gateway::runtime"}"#;
        assert_eq!(
            parse_recovered(j),
            Some(Recovered {
                shard: 0,
                segments: 3,
                records: 1200,
                elapsed_ms: 42
            })
        );
        let t = "2026-01-01T00:00:00Z \u{1b}[32m INFO\u{1b}[0m switchboard_gateway::runtime: recovered shard=1 segments=2 records=5 truncated=0 skipped=0 elapsed_ms=7";
        assert_eq!(
            parse_recovered(t),
            Some(Recovered {
                shard: 1,
                segments: 2,
                records: 5,
                elapsed_ms: 7
            })
        );
        assert_eq!(parse_recovered("nothing here"), None);
        let page = "# HELP x\nswitchboard_build_info{version=\"0.1.0\"} 1\nswitchboard_mailbox_depth{shard=\"0\"} 3\nswitchboard_mailbox_depth{shard=\"1\"} 4\n";
        assert_eq!(build_version(page).as_deref(), Some("0.1.0"));
        assert_eq!(metric_sum(page, "switchboard_mailbox_depth"), Some(7.0));
    }
}
