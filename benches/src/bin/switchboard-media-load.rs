//! `switchboard-media-load`: upload and download load against a daemon's media endpoint, for
//! the figures in hardware.md section 11.
//!
//! Registers one account (the code from the daemon's file SMS provider), logs in with the
//! `MEDIA` capability, then uploads `--uploads` blobs of `--size-mib` MiB (generated on the fly:
//! one pass to hash, one to send, never held in memory) and downloads each `--downloads` times,
//! discarding the bytes. Prints one JSON line per transfer and a summary with MB/s and, with
//! `--daemon-pid`, the daemon's CPU seconds (user + system, from /proc) per GB moved.
//! `--loop-seconds` keeps uploading until that much time has passed (a background load).

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use client::protocol::media::MediaClass;
use client::registration::CodeFile;
use client::{Connection, Identity, Session, Timeouts};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-media-load",
    about = "Media endpoint upload/download load"
)]
struct Args {
    /// Daemon client address.
    #[arg(long, default_value = "127.0.0.1:7300")]
    target: String,
    /// The daemon's data directory (registration codes are read from its sms/).
    #[arg(long)]
    data_dir: PathBuf,
    /// Phone number of the load account.
    #[arg(long, default_value_t = 19_995_550_000)]
    phone: u64,
    /// Blob size, MiB.
    #[arg(long, default_value_t = 100)]
    size_mib: u64,
    /// Uploads.
    #[arg(long, default_value_t = 3)]
    uploads: usize,
    /// Downloads of each uploaded blob.
    #[arg(long, default_value_t = 1)]
    downloads: usize,
    /// Keep uploading until this many seconds have passed (0: just `--uploads`).
    #[arg(long, default_value_t = 0)]
    loop_seconds: u64,
    /// Wait this long before the first upload (to start inside another tool's window).
    #[arg(long, default_value_t = 0)]
    delay_seconds: u64,
    /// The daemon's pid, for CPU seconds per GB.
    #[arg(long)]
    daemon_pid: Option<u32>,
}

/// Deterministic bytes (xorshift64) produced on the fly.
struct Gen {
    x: u64,
    left: u64,
}

impl Read for Gen {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = n - n % 8;
        let n = if n == 0 { self.left.min(8) as usize } else { n };
        for chunk in buf.get_mut(..n).unwrap_or_default().chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let b = self.x.to_le_bytes();
            chunk.copy_from_slice(b.get(..chunk.len()).unwrap_or_default());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn cpu_s(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn login(a: &Args) -> Result<Session> {
    let dir = tempfile::tempdir()?;
    let id = Identity::load_or_create(dir.path())?;
    let mut c = Connection::connect(a.target.as_str(), &id, Timeouts::default())?;
    let watch = CodeFile::watch(CodeFile::default_path(&a.data_dir, a.phone));
    c.register_request(a.phone)?;
    let code = watch.wait_new(Duration::from_secs(10), Duration::from_millis(20))?;
    c.register_verify(a.phone, code)?;
    let c = Connection::connect(a.target.as_str(), &id, Timeouts::default())?;
    let s = c.login(a.phone, 0)?;
    // The identity directory may go: the session keeps its keys in memory.
    drop(dir);
    Ok(s)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut session = login(&a).context("registering the load account")?;
    std::thread::sleep(Duration::from_secs(a.delay_seconds));
    let size = a.size_mib << 20;
    let started = Instant::now();
    let (mut up_bytes, mut up_s, mut down_bytes, mut down_s) = (0u64, 0f64, 0u64, 0f64);
    let (mut up_cpu, mut down_cpu) = (0f64, 0f64);
    let mut i = 0u64;
    loop {
        let more_loop = a.loop_seconds > 0 && started.elapsed().as_secs() < a.loop_seconds;
        if !more_loop && (a.loop_seconds > 0 || i as usize >= a.uploads) {
            break;
        }
        let seed = 0x9E37_79B9_7F4A_7C15 ^ (i + 1) ^ (a.phone << 8);
        let mut h = Sha256::new();
        std::io::copy(
            &mut Gen {
                x: seed,
                left: size,
            },
            &mut h,
        )?;
        let sha: [u8; 32] = h.finalize().into();
        let grant = session.media_slot(MediaClass::VIDEO, size, sha)?;
        let cpu0 = cpu_s(a.daemon_pid);
        let t = Instant::now();
        let resp = ureq::put(&grant.url)
            .set("content-length", &size.to_string())
            .send(Gen {
                x: seed,
                left: size,
            });
        if let Err(e) = resp {
            bail!("upload {i}: {e}");
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_s(a.daemon_pid).zip(cpu0).map(|(b, a)| b - a);
        up_bytes += size;
        up_s += secs;
        up_cpu += cpu.unwrap_or(0.0);
        println!(
            "{}",
            json!({"op": "upload", "bytes": size, "seconds": secs, "mb_per_s": size as f64 / 1e6 / secs, "daemon_cpu_s": cpu})
        );
        let url = session.media_download_url(sha)?.url;
        for _ in 0..a.downloads {
            let cpu0 = cpu_s(a.daemon_pid);
            let t = Instant::now();
            let mut body = ureq::get(&url).call()?.into_reader();
            let n = std::io::copy(&mut body, &mut std::io::sink())?;
            let secs = t.elapsed().as_secs_f64();
            let cpu = cpu_s(a.daemon_pid).zip(cpu0).map(|(b, a)| b - a);
            if n != size {
                bail!("download returned {n} bytes, expected {size}");
            }
            down_bytes += n;
            down_s += secs;
            down_cpu += cpu.unwrap_or(0.0);
            println!(
                "{}",
                json!({"op": "download", "bytes": n, "seconds": secs, "mb_per_s": n as f64 / 1e6 / secs, "daemon_cpu_s": cpu})
            );
            session.flush_acks()?;
        }
        i += 1;
    }
    let per_gb = |cpu: f64, bytes: u64| (bytes > 0).then(|| cpu / (bytes as f64 / 1e9));
    println!(
        "{}",
        json!({
            "summary": true,
            "uploads": i,
            "upload_mb_per_s": up_bytes as f64 / 1e6 / up_s.max(1e-9),
            "download_mb_per_s": down_bytes as f64 / 1e6 / down_s.max(1e-9),
            "daemon_cpu_s_per_gb_upload": a.daemon_pid.and(per_gb(up_cpu, up_bytes)),
            "daemon_cpu_s_per_gb_download": a.daemon_pid.and(per_gb(down_cpu, down_bytes)),
        })
    );
    Ok(())
}
