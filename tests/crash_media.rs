//! kill -9 and the media blob store: an upload killed midway leaves no blob that could be
//! served and can be started again after the restart (the token stays valid: the media key
//! is durable in the data directory); an upload confirmed with 201 just before kill -9 is
//! there after the restart, whole, and its slot stays used.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use client::media;
use common::media::*;
use protocol::frame::MediaClass;

const MIB: u64 = 1024 * 1024;

#[test]
fn kill9_mid_upload_serves_no_partial_blob_and_the_upload_starts_again() {
    let (mut d, _media) = start_media(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let phone = 12025550300;
    let (mut raw, key) = media_login(&d, phone);
    let file = tmp.path().join("video.bin");
    let sha = gen_file(&file, 64 * MIB, 51);
    let s = slot(&mut raw, MediaClass::VIDEO, 64 * MIB, sha).unwrap();

    // Start the PUT and keep the connection open with 24 MiB sent.
    let rest = s.url.0.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut put = TcpStream::connect(host).unwrap();
    write!(
        put,
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        64 * MIB
    )
    .unwrap();
    let mut f = std::fs::File::open(&file).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..24 {
        f.read_exact(&mut buf).unwrap();
        put.write_all(&buf).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while media::upload_offset(&s.url.0).unwrap().0 < 16 * MIB {
        assert!(
            Instant::now() < deadline,
            "the server did not take the bytes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill9();
    drop(put);
    d.restart();

    let mut raw = media_relogin(&d, phone, &key);
    let get = download_url(&mut raw, sha);
    let out = tmp.path().join("out");
    assert_eq!(curl(&[&get], &out), 404, "a partial blob was served");
    let (offset, done) = media::upload_offset(&s.url.0).unwrap();
    println!("after kill -9 mid-upload the server reports {offset} bytes");
    assert!(!done && offset <= 24 * MIB);

    // Start again from zero with the same (still valid) URL.
    assert_eq!(
        curl(
            &["-T", file.to_str().unwrap(), "-H", "Expect:", &s.url.0],
            &out
        ),
        201
    );
    assert_eq!(curl(&[&get], &out), 200);
    assert_eq!(sha_file(&out), sha);
}

#[test]
fn kill9_right_after_a_confirmed_upload_keeps_the_blob() {
    let (mut d, _media) = start_media(1, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let phone = 12025550310;
    let (mut raw, key) = media_login(&d, phone);
    let file = tmp.path().join("img.bin");
    let sha = gen_file(&file, 8 * MIB, 52);
    let s = slot(&mut raw, MediaClass::IMAGE, 8 * MIB, sha).unwrap();
    let out = tmp.path().join("out");
    assert_eq!(curl(&["-T", file.to_str().unwrap(), &s.url.0], &out), 201);
    d.kill9();
    d.restart();

    let mut raw = media_relogin(&d, phone, &key);
    let get = download_url(&mut raw, sha);
    assert_eq!(curl(&[&get], &out), 200);
    assert_eq!(sha_file(&out), sha, "the confirmed blob is not whole");
    assert_eq!(curl(&["-T", file.to_str().unwrap(), &s.url.0], &out), 409);
    assert!(d.metric_sum("switchboard_media_blobs") >= 1.0);
}
