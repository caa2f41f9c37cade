//! The webhook SMS and push providers against the real daemon: registration codes arrive as a
//! JSON POST, and an offline recipient's push carries who and what kind, never the content.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use protocol::noise::StaticKeypair;
use protocol::{frame, DeviceAddr, Frame};

/// A one-thread HTTP sink: every request's path and JSON body go to the channel.
fn webhook_sink() -> (String, mpsc::Receiver<(String, serde_json::Value)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().take(64) {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).unwrap();
            s.write_all(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
            let _ = tx.send((
                path,
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            ));
        }
    });
    (url, rx)
}

#[test]
fn webhook_providers_get_codes_and_content_free_pushes() {
    let (url, rx) = webhook_sink();
    let sms = format!("{url}/sms");
    let push = format!("{url}/push");
    let d = Daemon::start(
        1,
        &[
            ("sms-provider", "webhook"),
            ("sms-webhook-url", &sms),
            ("push-provider", "webhook"),
            ("push-webhook-url", &push),
        ],
    );
    let reg = |phone: u64| -> StaticKeypair {
        let key = StaticKeypair::generate();
        let mut r = Raw::connect(d.addr, &key);
        r.send(Frame::RegisterRequest(frame::RegisterRequest { phone }));
        assert!(matches!(r.recv(), Frame::RegisterCodeSent { .. }));
        let (path, body) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("sms webhook called");
        assert_eq!(path, "/sms");
        assert_eq!(body["phone"], phone.to_string());
        let code: u32 = body["code"].as_str().unwrap().parse().unwrap();
        r.send(Frame::RegisterVerify(frame::RegisterVerify { phone, code }));
        assert_eq!(
            r.recv(),
            Frame::Registered(frame::Registered {
                addr: DeviceAddr {
                    user: phone,
                    device: 0
                }
            })
        );
        key
    };
    let akey = reg(4930000000001);
    let _bkey = reg(4930000000002);
    // No code file is written by the webhook provider.
    assert!(!d.data_dir.join("sms").join("4930000000001.txt").exists());

    let mut alice = login(&d, 4930000000001, &akey);
    alice
        .raw
        .send(send_frame(4930000000002, 1, b"top secret words"));
    assert!(matches!(
        alice.raw.recv(),
        Frame::ServerAck(frame::ServerAck {
            client_msg_id: 1,
            ..
        })
    ));
    let (path, body) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("push webhook called");
    assert_eq!(path, "/push");
    assert_eq!(body["user"], 4930000000002u64);
    assert_eq!(body["device"], 0);
    assert_eq!(body["from"], 4930000000001u64);
    let text = body.to_string();
    assert!(!text.contains("top secret"), "push carried content: {text}");
    assert_eq!(
        body.as_object().unwrap().len(),
        4,
        "push body has only user, device, from, msg_type: {text}"
    );
}
