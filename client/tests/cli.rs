//! The `chat` binary end to end against the in-process MiniServer.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::MiniServer;

const ALICE: &str = "14155550100";
const BOB: &str = "14155550101";

fn chat(server: &MiniServer, state: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
    cmd.args(&args[..1])
        .arg("--server")
        .arg(server.addr.to_string())
        .arg("--state")
        .arg(state)
        .args(&args[1..]);
    cmd.env_remove("SWITCHBOARD_SERVER")
        .env_remove("SWITCHBOARD_STATE")
        .env("RUST_LOG", "warn");
    cmd.output().expect("run chat")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "chat failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn register(server: &MiniServer, state: &Path, phone: &str) {
    let out = chat(
        server,
        state,
        &[
            "register",
            "--phone",
            phone,
            "--data-dir",
            server.data_dir.to_str().unwrap(),
        ],
    );
    let v = json_lines(&ok(&out));
    assert_eq!(v[0]["user"].as_u64().unwrap().to_string(), phone);
    assert_eq!(v[0]["device"], 0);
}

/// register (code read from the dev server's code file) → send --wait-ack → recv --read →
/// the sender sees ✓✓ and read receipts; a second recv finds nothing (the message was acked)
/// and exits with status 3.
#[test]
fn register_send_recv_round_trip() {
    let server = MiniServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&server, &alice, ALICE);
    register(&server, &bob, BOB);
    assert!(alice.join("identity.key").exists() && alice.join("server.pub").exists());
    assert!(alice.join("account.json").exists());

    let out = ok(&chat(
        &server,
        &alice,
        &["send", "--to", BOB, "--text", "hello bob", "--wait-ack"],
    ));
    let sent = &json_lines(&out)[0];
    let id = sent["client_msg_id"].as_u64().unwrap();
    assert!(sent["server_ts_ms"].as_u64().unwrap() > 0);

    let out = ok(&chat(
        &server,
        &bob,
        &["recv", "--count", "1", "--timeout-s", "10", "--read"],
    ));
    let got = &json_lines(&out)[0];
    assert_eq!(got["from"].as_u64().unwrap().to_string(), ALICE);
    assert_eq!(got["device"], 0);
    assert_eq!(got["client_msg_id"].as_u64().unwrap(), id);
    assert_eq!(got["text"], "hello bob");

    // Acked: not delivered again.
    let out = chat(&server, &bob, &["recv", "--count", "1", "--timeout-s", "1"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    // Alice's next session gets the ✓✓ and read receipts (printed on stderr by recv).
    let out = chat(
        &server,
        &alice,
        &["recv", "--count", "1", "--timeout-s", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("✓✓") && err.contains("read"), "stderr: {err}");
}

/// Errors are clear and give a non-zero status: a wrong code, an unregistered state dir, an
/// unknown recipient, a changed server key.
#[test]
fn errors_exit_non_zero_with_a_message() {
    let server = MiniServer::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice");

    let out = chat(
        &server,
        &alice,
        &["register", "--phone", ALICE, "--code", "1"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("WrongCode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = chat(&server, &alice, &["send", "--to", BOB, "--text", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("register first"));

    // Register with an explicit --code-file path.
    let code_file = server.data_dir.join("sms").join(format!("{ALICE}.txt"));
    let out = chat(
        &server,
        &alice,
        &[
            "register",
            "--phone",
            ALICE,
            "--code-file",
            code_file.to_str().unwrap(),
        ],
    );
    ok(&out);

    let out = chat(
        &server,
        &alice,
        &["send", "--to", BOB, "--text", "x", "--wait-ack"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NoSuchRecipient"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another server (new key) at a new address, same state dir: refused.
    let other = MiniServer::start();
    let out = chat(&other, &alice, &["send", "--to", BOB, "--text", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server key changed") && err.contains("--allow-server-key-change"),
        "{err}"
    );
}

/// `chat talk`: typed lines are sent and their ticks shown; the peer's messages are printed.
#[test]
fn talk_sends_lines_and_shows_ticks() {
    let server = MiniServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&server, &alice, ALICE);
    register(&server, &bob, BOB);

    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["talk", "--server", &server.addr.to_string(), "--state"])
        .arg(&alice)
        .args(["--to", BOB])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chat talk");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Lines {
        rx,
        seen: Vec::new(),
    };
    writeln!(stdin, "hi from alice").unwrap();
    lines.wait_for("#1 → hi from alice");
    lines.wait_for("#1 ✓");
    // Bob reads it: alice's talk shows ✓✓ and read.
    let out = ok(&chat(&server, &bob, &["recv", "--count", "1", "--read"]));
    assert_eq!(json_lines(&out)[0]["text"], "hi from alice");
    // The read receipt may overtake the delivery receipt; both must show.
    lines.wait_for(&format!("#1 ✓✓ (+{BOB}/0)"));
    lines.wait_for(&format!("#1 ✓✓ read (+{BOB}/0)"));
    // Bob answers; alice's talk prints it.
    ok(&chat(
        &server,
        &bob,
        &["send", "--to", ALICE, "--text", "hi alice", "--wait-ack"],
    ));
    lines.wait_for(&format!("[+{BOB}/0] hi alice"));

    drop(stdin); // EOF ends the conversation
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "chat talk did not exit on EOF");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines printed by a child process, collected by a reader thread.
struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    /// Waits until a line equal to `want` has been printed (now or earlier).
    fn wait_for(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.seen.iter().any(|l| l == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no line {want:?}; saw {:?}",
                self.seen
            );
            if let Ok(line) = self.rx.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line);
            }
        }
    }
}

/// Messages are end-to-end encrypted by default (the server only ever sees ciphertext); both
/// sides print the same safety number; after the peer reinstalls, `recv` refuses the changed
/// identity with a warning until `--accept-identity-change`, and the safety number changes.
#[test]
fn e2ee_by_default_safety_numbers_and_identity_change() {
    let server = MiniServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&server, &alice, ALICE);
    register(&server, &bob, BOB);
    assert!(alice.join("e2ee").join("e2ee.state").exists());

    ok(&chat(
        &server,
        &alice,
        &[
            "send",
            "--to",
            BOB,
            "--text",
            "attack at dawn",
            "--wait-ack",
        ],
    ));
    let payloads = server.payloads();
    assert_eq!(payloads.len(), 1);
    assert!(
        !payloads[0]
            .windows(b"attack at dawn".len())
            .any(|w| w == b"attack at dawn"),
        "the server saw the plaintext"
    );
    let out = ok(&chat(&server, &bob, &["recv", "--count", "1"]));
    assert_eq!(json_lines(&out)[0]["text"], "attack at dawn");

    let number = |state: &Path, contact: &str| {
        let out = ok(&chat_offline(
            state,
            &["safety-number", "--contact", contact],
        ));
        json_lines(&out)[0]["safety_number"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = number(&alice, BOB);
    assert_eq!(before, number(&bob, ALICE));
    assert_eq!(before.len(), 12 * 5 + 11, "12 groups of 5 digits");

    // Bob reinstalls: his E2EE state is gone; his next login publishes a new identity.
    std::fs::remove_dir_all(bob.join("e2ee")).unwrap();
    ok(&chat(
        &server,
        &bob,
        &["send", "--to", ALICE, "--text", "new phone", "--wait-ack"],
    ));
    let out = chat(
        &server,
        &alice,
        &["recv", "--count", "1", "--timeout-s", "5"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("identity") && err.contains("--accept-identity-change"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing shown before acceptance");
    assert_eq!(number(&alice, BOB), before, "nothing accepted");

    let out = ok(&chat(
        &server,
        &alice,
        &[
            "recv",
            "--count",
            "1",
            "--timeout-s",
            "5",
            "--accept-identity-change",
        ],
    ));
    assert_eq!(json_lines(&out)[0]["text"], "new phone");
    let after = number(&alice, BOB);
    assert_ne!(after, before);
    assert_eq!(after, number(&bob, ALICE));

    // --plaintext still works for servers without E2EE, and says what it is.
    ok(&chat(
        &server,
        &alice,
        &[
            "send",
            "--to",
            BOB,
            "--text",
            "in clear",
            "--plaintext",
            "--wait-ack",
        ],
    ));
    assert_eq!(server.payloads().last().unwrap().as_ref(), b"in clear");
}

/// `chat` without a server (`safety-number`).
fn chat_offline(state: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
    cmd.args(&args[..1])
        .arg("--state")
        .arg(state)
        .args(&args[1..]);
    cmd.env_remove("SWITCHBOARD_SERVER")
        .env_remove("SWITCHBOARD_STATE")
        .env("RUST_LOG", "warn");
    cmd.output().expect("run chat")
}
