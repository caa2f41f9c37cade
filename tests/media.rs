//! Encrypted media over real HTTP: slots granted over the protocol, the daemon's media
//! endpoint driven with curl and with the SDK. Proves 100 MiB uploads and downloads (whole
//! and by ranges) with the daemon's RSS flat meanwhile, every refusal the slot and token
//! rules promise, and a broken 100 MiB upload resumed from the offset the server reports.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use client::media::{self, MediaMessage};
use client::media_session;
use client::{Connection, Event, Identity, Session, Timeouts};
use common::media::*;
use common::Daemon;
use protocol::frame::MediaClass;
use protocol::ErrorCode;

const MIB: u64 = 1024 * 1024;

fn text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn curl_uploads_and_downloads_100_mib_by_ranges_with_flat_rss() {
    let (d, _media) = start_media(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let (mut raw, _) = media_login(&d, 12025550200);
    let file = tmp.path().join("video.bin");
    let sha = gen_file(&file, 100 * MIB, 42);
    let s = slot(&mut raw, MediaClass::VIDEO, 100 * MIB, sha).unwrap();
    assert!(s.url.0.contains("/v1/upload/"), "{}", s.url.0);

    // Upload in the background while sampling the daemon's RSS from /proc.
    let pid = d.child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    let out = tmp.path().join("put.out");
    let (url, f2, o2) = (s.url.0.clone(), file.clone(), out.clone());
    let put =
        std::thread::spawn(move || curl(&["-T", f2.to_str().unwrap(), "-H", "Expect:", &url], &o2));
    let mut peak = before;
    while !put.is_finished() {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = put.join().unwrap();
    assert_eq!(status, 201, "PUT: {}", text(&out));
    println!(
        "daemon RSS during a 100 MiB upload: {} KiB before, {} KiB peak (+{} KiB)",
        before,
        peak,
        peak - before
    );
    // Streamed to disk: the blob never sits in memory (a tenth of it is a generous bound).
    assert!(
        peak - before < 10 * 1024,
        "RSS grew by {} KiB",
        peak - before
    );

    let get = download_url(&mut raw, sha);
    let whole = tmp.path().join("whole.bin");
    assert_eq!(curl(&[&get], &whole), 200);
    assert_eq!(sha_file(&whole), sha, "downloaded bytes differ");

    let part = tmp.path().join("part.bin");
    let headers = tmp.path().join("h.txt");
    let h = headers.to_str().unwrap();
    assert_eq!(curl(&["-r", "1000-1999", "-D", h, &get], &part), 206);
    let mut want = vec![0u8; 1000];
    let mut f = std::fs::File::open(&whole).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1000)).unwrap();
    f.read_exact(&mut want).unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), want);
    assert!(text(&headers)
        .to_lowercase()
        .contains("content-range: bytes 1000-1999/104857600"));
    assert_eq!(curl(&["-r", "-10", &get], &part), 206);
    assert_eq!(std::fs::read(&part).unwrap().len(), 10);
    assert_eq!(curl(&["-r", "104857600-", "-D", h, &get], &part), 416);
    assert!(text(&headers)
        .to_lowercase()
        .contains("content-range: bytes */104857600"));
    assert!(d.metric_sum("switchboard_media_uploads_total") >= 1.0);
    assert!(d.metric_sum("switchboard_media_bytes_stored") >= (100 * MIB) as f64);
}

#[test]
fn refusals_come_before_any_byte_is_stored() {
    let (d, _media) = start_media(1, &[("media-url-ttl-s", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (mut raw, _) = media_login(&d, 12025550210);
    let small = tmp.path().join("small.bin");
    let sha = gen_file(&small, 1000, 7);
    let f = small.to_str().unwrap();

    // An image over 16 MiB gets no slot at all.
    let e = slot(&mut raw, MediaClass::IMAGE, 16 * MIB + 1, sha).unwrap_err();
    assert_eq!(e.code, ErrorCode::MediaTooLarge as u16);
    let e = slot(&mut raw, MediaClass::VIDEO, 100 * MIB + 1, sha).unwrap_err();
    assert_eq!(e.code, ErrorCode::MediaTooLarge as u16);

    // Hash mismatch: the right size, other bytes.
    let other = tmp.path().join("other.bin");
    let other_sha = gen_file(&other, 1000, 8);
    let s = slot(&mut raw, MediaClass::DOCUMENT, 1000, sha).unwrap();
    assert_eq!(curl(&["-T", other.to_str().unwrap(), &s.url.0], &out), 422);
    assert!(text(&out).contains("hash_mismatch"));
    // ...and nothing under either hash.
    assert_eq!(curl(&[&download_url(&mut raw, sha)], &out), 404);
    assert_eq!(curl(&[&download_url(&mut raw, other_sha)], &out), 404);

    // Size mismatch: a shorter body than the slot's size, refused from Content-Length.
    let s = slot(&mut raw, MediaClass::DOCUMENT, 2000, sha).unwrap();
    assert_eq!(curl(&["-T", f, &s.url.0], &out), 400);
    assert!(text(&out).contains("size_mismatch"));

    // Oversize: Content-Length above the slot, refused before the body is read (curl waits
    // for 100-continue, which never comes, so it never sends the body).
    let received = d.metric_sum("switchboard_media_upload_bytes_total");
    let big = tmp.path().join("big.bin");
    gen_file(&big, 4 * MIB, 9);
    let s = slot(&mut raw, MediaClass::DOCUMENT, 1000, sha).unwrap();
    assert_eq!(curl(&["-T", big.to_str().unwrap(), &s.url.0], &out), 413);
    assert!(text(&out).contains("oversize"));
    assert_eq!(
        d.metric_sum("switchboard_media_upload_bytes_total"),
        received,
        "no body byte was read"
    );

    // Forged token: one character changed.
    let s = slot(&mut raw, MediaClass::DOCUMENT, 1000, sha).unwrap();
    let (base, token) = s.url.0.rsplit_once('/').unwrap();
    let mut t: Vec<u8> = token.bytes().collect();
    t[20] = if t[20] == b'A' { b'B' } else { b'A' };
    let forged = format!("{base}/{}", String::from_utf8(t).unwrap());
    assert_eq!(curl(&["-T", f, &forged], &out), 401);
    // A download token on the upload path.
    let get = download_url(&mut raw, sha);
    let (_, dtoken) = get.rsplit_once('/').unwrap();
    assert_eq!(curl(&["-T", f, &format!("{base}/{dtoken}")], &out), 403);

    // The genuine upload, then a second one to the same slot.
    assert_eq!(curl(&["-T", f, &s.url.0], &out), 201);
    assert_eq!(curl(&["-T", f, &s.url.0], &out), 409);
    assert!(text(&out).contains("already_uploaded"));
    let back = tmp.path().join("back.bin");
    assert_eq!(curl(&[&download_url(&mut raw, sha)], &back), 200);
    assert_eq!(sha_file(&back), sha);

    // Expired URLs (media_url_ttl_s = 2): upload and download.
    let s = slot(&mut raw, MediaClass::DOCUMENT, 1000, other_sha).unwrap();
    let get = download_url(&mut raw, sha);
    std::thread::sleep(Duration::from_millis(3_100));
    assert_eq!(curl(&["-T", other.to_str().unwrap(), &s.url.0], &out), 403);
    assert!(text(&out).contains("expired"));
    assert_eq!(curl(&[&get], &out), 403);

    let m = d.metrics();
    for reason in [
        "hash_mismatch",
        "size_mismatch",
        "oversize",
        "bad_token",
        "wrong_op",
        "already_uploaded",
        "expired",
    ] {
        let line = format!("switchboard_media_refused_total{{reason=\"{reason}\"}}");
        let n: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0);
        assert!(n >= 1.0, "{reason} not counted");
    }
}

/// Sends the PUT headers and `send` bytes of the body, then drops the connection.
fn broken_put(url: &str, body: &std::path::Path, total: u64, send: u64) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    write!(
        s,
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {total}\r\n\r\n"
    )
    .unwrap();
    let mut f = std::fs::File::open(body).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0;
    while sent < send {
        let n = f.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        sent += n as u64;
    }
    s.flush().unwrap();
    drop(s);
}

/// Sends only the headers of a `Content-Range` PUT from `first` to the end of a `total`-byte
/// slot and reads the answer (the server must answer without the body).
fn headers_only_put(url: &str, first: u64, total: u64) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let len = total - first;
    let last = total - 1;
    write!(
        s,
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\n\
         Content-Range: bytes {first}-{last}/{total}\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head)
}

/// The server's offset, polled until it stops growing (the broken body is being drained).
fn settled_offset(url: &str) -> u64 {
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (offset, done) = media::upload_offset(url).unwrap();
        assert!(!done);
        if offset == last || Instant::now() > deadline {
            return offset;
        }
        last = offset;
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_broken_100_mib_upload_resumes_from_the_reported_offset() {
    let (d, _media) = start_media(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let (mut raw, _) = media_login(&d, 12025550220);
    let file = tmp.path().join("video.bin");
    let sha = gen_file(&file, 100 * MIB, 43);
    let s = slot(&mut raw, MediaClass::VIDEO, 100 * MIB, sha).unwrap();

    broken_put(&s.url.0, &file, 100 * MIB, 40 * MIB);
    let offset = settled_offset(&s.url.0);
    println!("server has {offset} bytes after a PUT broken at 40 MiB");
    assert!(offset > 0 && offset <= 40 * MIB, "offset {offset}");
    // Nothing is served before the upload completes.
    let get = download_url(&mut raw, sha);
    let out = tmp.path().join("out");
    assert_eq!(curl(&[&get], &out), 404);

    // A resumption that does not start at the server's offset is refused, with the offset,
    // from its headers alone.
    let (status, head) = headers_only_put(&s.url.0, offset / 2, 100 * MIB);
    assert_eq!(status, 409, "{head}");
    assert!(
        head.to_lowercase()
            .contains(&format!("upload-offset: {offset}")),
        "{head}"
    );

    media::put_file(&s.url.0, &file, offset, &mut |_, _| {}).unwrap();
    assert_eq!(media::upload_offset(&s.url.0).unwrap(), (100 * MIB, true));
    assert_eq!(curl(&[&get], &out), 200);
    assert_eq!(sha_file(&out), sha);
}

fn account(d: &Daemon, dir: &std::path::Path, phone: u64) -> Session {
    let id = Identity::load_or_create(dir).unwrap();
    let mut c = Connection::connect(d.addr, &id, Timeouts::default()).unwrap();
    c.register_request(phone).unwrap();
    let code = d.sms_code(phone);
    c.register_verify(phone, code).unwrap();
    let c = Connection::connect(d.addr, &id, Timeouts::default()).unwrap();
    c.login(phone, 0).unwrap()
}

fn next_message(s: &mut Session) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(Event::Message(m)) = s.recv(Some(Duration::from_millis(200))).unwrap() {
            return m.payload.to_vec();
        }
        assert!(Instant::now() < deadline, "no message within 30 s");
    }
}

#[test]
fn sdk_sends_an_encrypted_100_mib_file_that_the_receiver_checks_and_decrypts() {
    // A short idle timeout: the transfers take longer than it, so the SDK must keep the
    // session alive while the HTTP transfer runs (or reconnect it).
    let (d, _media) = start_media(2, &[("idle-timeout-ms", "4000"), ("keepalive-ms", "1000")]);
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = account(&d, &tmp.path().join("alice"), 12025550230);
    let mut bob = account(&d, &tmp.path().join("bob"), 12025550231);
    // The largest video whose ciphertext (16 bytes per 64 KiB added) fits the 100 MiB slot.
    let plain_len = 100 * MIB - 16 * 1600;
    assert_eq!(media::ciphertext_len(plain_len), 100 * MIB);
    let file = tmp.path().join("clip.mp4");
    let plain_sha = gen_file(&file, plain_len, 44);

    let work = tmp.path().to_owned();
    let id = media_session::send_file(&mut alice, 12025550231, &file, "hi", &work, &mut |_, _| {})
        .unwrap();
    assert_ne!(id, 0);
    std::fs::remove_file(&file).unwrap();

    // Bob did not poll while Alice uploaded: the server closed his idle connection.
    bob.reconnect().unwrap();
    let payload = next_message(&mut bob);
    let msg = MediaMessage::decode(&payload).unwrap();
    assert_eq!((msg.class, msg.plain_len), (MediaClass::VIDEO, plain_len));
    assert_eq!(
        (msg.name.as_str(), msg.caption.as_str()),
        ("clip.mp4", "hi")
    );
    let out_dir = tmp.path().join("received");
    let path = media_session::receive_file(&mut bob, &msg, &out_dir, &mut |_, _| {}).unwrap();
    assert_eq!(sha_file(&path), plain_sha, "decrypted file differs");
    std::fs::remove_file(&path).unwrap();

    // A message whose key is wrong: the hash matches, the first chunk fails, nothing is left.
    let mut bad = msg.clone();
    bad.media_key[0] ^= 1;
    let e = media_session::receive_file(&mut bob, &bad, &out_dir, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, media::MediaError::BadChunk(0)), "{e:?}");
    assert!(!path.exists());
    // A message naming another hash: refused by the hash check before decrypting.
    let mut bad = msg.clone();
    bad.sha256[0] ^= 1;
    let e = media_session::receive_file(&mut bob, &bad, &out_dir, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(e, media::MediaError::Http { status: 404, .. }),
        "{e:?}"
    );
}
