//! `chat send-file` and `chat recv-files`: encrypted media (docs/e2ee.md "Media").
//!
//! ```text
//! chat send-file  --server 127.0.0.1:7300 --state DIR --to 14155550101 PATH [--caption TEXT]
//! chat recv-files --server 127.0.0.1:7300 --state DIR --dir OUT [--count N] [--timeout-s T]
//! ```
//!
//! `send-file` encrypts the file with a fresh key, uploads the ciphertext to a slot of the
//! server's media endpoint (resuming after a broken connection) and sends the key and hash in
//! an end-to-end encrypted message. `recv-files` waits for messages; each media message is
//! downloaded, checked (length, SHA-256, then every chunk's tag) and written to `--dir` under
//! its file name. Both show a progress bar on stderr for files over 1 MiB and print one JSON
//! line per file on stdout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use switchboard_client::media::{MediaError, MediaMessage};
use switchboard_client::media_session;
use switchboard_client::registration::parse_phone;
use switchboard_client::{Event, SessionOptions};

use super::{login, out, CliResult, Common, Failure};

#[derive(Args)]
pub(crate) struct SendFileArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Recipient (E.164 digits).
    #[arg(long)]
    to: String,
    /// Caption sent with the file.
    #[arg(long, default_value = "")]
    caption: String,
    /// The file to send.
    path: PathBuf,
}

#[derive(Args)]
pub(crate) struct RecvFilesArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Directory the received files are written to.
    #[arg(long)]
    dir: PathBuf,
    /// Number of messages to wait for (text ones are printed, media ones downloaded).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Give up (exit status 3) after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

impl From<MediaError> for Failure {
    fn from(e: MediaError) -> Self {
        match e {
            MediaError::Session(e) => Failure::from(e),
            other => Failure {
                message: other.to_string(),
                status: 1,
            },
        }
    }
}

/// A text progress bar on stderr, redrawn at most ten times a second, for transfers over
/// 1 MiB.
struct Bar {
    label: String,
    started: Instant,
    drawn: Option<Instant>,
    finished: bool,
}

impl Bar {
    fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            started: Instant::now(),
            drawn: None,
            finished: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if total < 1 << 20 || self.finished {
            return;
        }
        let now = Instant::now();
        if done < total
            && self
                .drawn
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(now);
        let frac = done as f64 / total as f64;
        let filled = (frac * 30.0) as usize;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{} [{}{}] {:5.1}% {:.1}/{:.1} MiB {:.1} MiB/s",
            self.label,
            "#".repeat(filled.min(30)),
            ".".repeat(30 - filled.min(30)),
            frac * 100.0,
            done as f64 / 1048576.0,
            total as f64 / 1048576.0,
            done as f64 / 1048576.0 / secs
        );
        if done >= total {
            self.finished = true;
            eprintln!();
        }
    }
}

fn work_dir(state: &Path) -> PathBuf {
    state.join("media-tmp")
}

pub(crate) fn send_file(a: SendFileArgs) -> CliResult {
    let to = parse_phone(&a.to)?;
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let work = work_dir(&a.common.state);
    std::fs::create_dir_all(&work).map_err(|e| Failure {
        message: format!("creating {}: {e}", work.display()),
        status: 1,
    })?;
    let mut bar = Bar::new("upload");
    let id =
        media_session::send_file(&mut session, to, &a.path, &a.caption, &work, &mut |d, t| {
            bar.update(d, t)
        })?;
    let size = std::fs::metadata(&a.path).map_or(0, |m| m.len());
    out(json!({ "client_msg_id": id, "file": a.path.display().to_string(), "bytes": size }))?;
    session.close()?;
    Ok(())
}

pub(crate) fn recv_files(a: RecvFilesArgs) -> CliResult {
    let options = SessionOptions {
        persist_dedup: true,
        ..SessionOptions::default()
    };
    let mut session = login(&a.common, a.phone.as_deref(), options)?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let mut got = 0;
    while got < a.count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = session.recv(Some(left))? else {
            break;
        };
        let Event::Message(m) = event else { continue };
        got += 1;
        let from = format!("{}/{}", m.from.user, m.from.device);
        if !MediaMessage::is_media(&m.payload) {
            let text = String::from_utf8_lossy(&m.payload);
            out(json!({ "from": from, "client_msg_id": m.client_msg_id, "text": text }))?;
            continue;
        }
        let msg = MediaMessage::decode(&m.payload)?;
        let mut bar = Bar::new("download");
        let path =
            media_session::receive_file(&mut session, &msg, &a.dir, &mut |d, t| bar.update(d, t))?;
        out(json!({
            "from": from,
            "client_msg_id": m.client_msg_id,
            "file": path.display().to_string(),
            "bytes": msg.plain_len,
            "mime": msg.mime,
            "caption": msg.caption,
        }))?;
    }
    session.flush_acks()?;
    session.close()?;
    if got < a.count {
        return Err(Failure {
            message: format!("timed out with {got} of {} message(s)", a.count),
            status: super::EXIT_TIMEOUT,
        });
    }
    Ok(())
}
