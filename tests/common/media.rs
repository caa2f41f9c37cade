//! Helpers of the media and status end-to-end tests: a daemon with the media endpoint on, a
//! logged-in device that announced `MEDIA`, slot and download requests, generated blobs, curl.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use protocol::frame::{self, MediaClass};
use protocol::noise::StaticKeypair;
use protocol::{capability, Frame};
use sha2::{Digest, Sha256};

use super::{free_port, login_as, register, Daemon, Raw};

/// The capabilities a media test client announces.
pub const MEDIA_CAPS: u64 = capability::MESSAGING | capability::MEDIA;

/// Starts a daemon with the media endpoint on a fresh port; returns it and that address.
pub fn start_media(shards: usize, extra: &[(&str, &str)]) -> (Daemon, SocketAddr) {
    let media: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let addr = media.to_string();
    let mut args: Vec<(&str, &str)> = vec![("media-addr", &addr)];
    args.extend_from_slice(extra);
    (Daemon::start(shards, &args), media)
}

/// Like [`start_media`] on an existing data directory and media address (restarts).
pub fn start_media_in(data_dir: &Path, media: SocketAddr, extra: &[(&str, &str)]) -> Daemon {
    let addr = media.to_string();
    let mut args: Vec<(&str, &str)> = vec![("media-addr", &addr)];
    args.extend_from_slice(extra);
    Daemon::start_in(data_dir, 1, &args)
}

/// Registers `phone` and logs in announcing `MEDIA`.
pub fn media_login(d: &Daemon, phone: u64) -> (Raw, StaticKeypair) {
    let key = StaticKeypair::generate();
    register(d, phone, &key);
    let (raw, first) = login_as(d, phone, 0, &key, MEDIA_CAPS);
    assert!(matches!(first, Frame::Welcome(_)), "login: {first:?}");
    (raw, key)
}

/// Logs in again with an existing key.
pub fn media_relogin(d: &Daemon, phone: u64, key: &StaticKeypair) -> Raw {
    let (raw, first) = login_as(d, phone, 0, key, MEDIA_CAPS);
    assert!(matches!(first, Frame::Welcome(_)), "login: {first:?}");
    raw
}

/// The next frame that is not a Pong.
fn answer(raw: &mut Raw) -> Frame {
    loop {
        match raw.recv_timeout(Duration::from_secs(10)) {
            Some(Frame::Pong(_)) => continue,
            Some(f) => return f,
            None => panic!("no answer within 10 s"),
        }
    }
}

/// Asks for a slot: the granted `MediaSlot`, or the `Error` refusing it.
pub fn slot(
    raw: &mut Raw,
    class: MediaClass,
    size: u64,
    sha256: [u8; 32],
) -> Result<frame::MediaSlot, frame::Error> {
    let request_id = super::next_request_id();
    raw.send(Frame::MediaSlotRequest(frame::MediaSlotRequest {
        request_id,
        class,
        size,
        sha256,
    }));
    match answer(raw) {
        Frame::MediaSlot(s) => {
            assert_eq!(s.request_id, request_id);
            Ok(s)
        }
        Frame::Error(e) => {
            assert_eq!(e.ref_id, request_id);
            Err(e)
        }
        other => panic!("expected MediaSlot, got {other:?}"),
    }
}

/// Asks for a download URL of `sha256`.
pub fn download_url(raw: &mut Raw, sha256: [u8; 32]) -> String {
    let request_id = super::next_request_id();
    raw.send(Frame::MediaDownloadRequest(frame::MediaDownloadRequest {
        request_id,
        sha256,
    }));
    match answer(raw) {
        Frame::MediaDownload(m) => {
            assert_eq!(m.request_id, request_id);
            m.url.0
        }
        other => panic!("expected MediaDownload, got {other:?}"),
    }
}

/// Writes `len` pseudo-random bytes (xorshift from `seed`) to `path` in 1 MiB pieces and
/// returns their SHA-256.
pub fn gen_file(path: &Path, len: u64, seed: u64) -> [u8; 32] {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = Sha256::new();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    h.finalize().into()
}

/// SHA-256 of a file.
pub fn sha_file(path: &Path) -> [u8; 32] {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().into()
}

/// Runs curl with `args`, the body written to `out`; returns the HTTP status.
pub fn curl(args: &[&str], out: &Path) -> u16 {
    let o = Command::new("curl")
        .args(["-s", "-S", "--max-time", "120", "-o"])
        .arg(out)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl (install it: apt-get install curl)");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Resident set size of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
