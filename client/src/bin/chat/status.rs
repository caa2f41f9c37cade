//! `chat status post|list|delete`: 24-hour status posts (docs/protocol.md §19.7).
//!
//! ```text
//! chat status post   --state DIR --to 14155550101,14155550102 (--text "hi" | --file PATH [--caption T])
//! chat status list   --state DIR [--dir OUT] [--timeout-s T]
//! chat status delete --state DIR POST_ID
//! ```
//!
//! `post` sends the status end-to-end encrypted to every device of the audience and prints its
//! id and expiry; `list` prints the status posts waiting for this device (a file status is
//! downloaded into `--dir`), marks each viewed (the poster gets a read receipt) and prints any
//! other message it receives as well; `delete` removes one of this user's posts and its blobs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::json;
use switchboard_client::media_session;
use switchboard_client::registration::parse_phone;
use switchboard_client::status::{delete_status, post_status, Post, StatusContent, StatusMessage};
use switchboard_client::{Event, SessionOptions};

use super::{login, out, CliResult, Common, Failure};

#[derive(Args)]
pub(crate) struct StatusArgs {
    #[command(subcommand)]
    cmd: StatusCmd,
}

#[derive(Subcommand)]
enum StatusCmd {
    /// Post a status to an audience.
    Post(PostArgs),
    /// Show the status posts received (and mark them viewed).
    List(ListArgs),
    /// Delete one of your status posts now.
    Delete(DeleteArgs),
}

#[derive(Args)]
struct PostArgs {
    #[command(flatten)]
    common: Common,
    /// Who sees it: comma-separated numbers.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// A text status.
    #[arg(long, conflicts_with = "file")]
    text: Option<String>,
    /// A file status (picture, video, ...).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Caption of a file status.
    #[arg(long, default_value = "")]
    caption: String,
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    common: Common,
    /// Where file statuses are written.
    #[arg(long, default_value = "status-files")]
    dir: PathBuf,
    /// Stop when nothing arrives for this many seconds.
    #[arg(long, default_value_t = 3)]
    timeout_s: u64,
}

#[derive(Args)]
struct DeleteArgs {
    #[command(flatten)]
    common: Common,
    /// The post to delete (as `post` printed it).
    post_id: u64,
}

pub(crate) fn status(a: StatusArgs) -> CliResult {
    match a.cmd {
        StatusCmd::Post(p) => post(p),
        StatusCmd::List(l) => list(l),
        StatusCmd::Delete(d) => delete(d),
    }
}

fn post(a: PostArgs) -> CliResult {
    let audience =
        a.to.iter()
            .map(|t| parse_phone(t))
            .collect::<Result<Vec<_>, _>>()?;
    let mut session = login(&a.common, None, SessionOptions::default())?;
    let work = a.common.state.join("media-tmp");
    std::fs::create_dir_all(&work).map_err(|e| Failure {
        message: format!("creating {}: {e}", work.display()),
        status: 1,
    })?;
    let what = match (&a.text, &a.file) {
        (Some(t), None) => Post::Text(t),
        (None, Some(f)) => Post::File(f, &a.caption),
        _ => {
            return Err(Failure {
                message: "give --text or --file".into(),
                status: 2,
            })
        }
    };
    let posted = post_status(&mut session, &audience, what, &work, &mut |_, _| {})?;
    out(json!({
        "post_id": posted.post_id,
        "expires_at_ms": posted.expires_at_ms,
        "copies": posted.copies.iter().map(|(u, id)| json!({"to": u, "client_msg_id": id})).collect::<Vec<_>>(),
    }))?;
    session.close()?;
    Ok(())
}

fn list(a: ListArgs) -> CliResult {
    let options = SessionOptions {
        persist_dedup: true,
        ..SessionOptions::default()
    };
    let mut session = login(&a.common, None, options)?;
    let idle = Duration::from_secs(a.timeout_s.max(1));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let mut last = Instant::now();
    while last.elapsed() < idle {
        let Some(event) = session.recv(Some(idle))? else {
            break;
        };
        last = Instant::now();
        let Event::Message(m) = event else { continue };
        let from = format!("{}/{}", m.from.user, m.from.device);
        if !StatusMessage::is_status(&m.payload) {
            let text = String::from_utf8_lossy(&m.payload);
            out(json!({ "kind": "message", "from": from, "text": text }))?;
            continue;
        }
        let s = StatusMessage::decode(&m.payload)?;
        if s.expires_at_ms <= now_ms() {
            // Past its 24 hours: not shown (its blobs are gone on the server too).
            continue;
        }
        let shown = match &s.content {
            StatusContent::Text(t) => json!({ "text": t }),
            StatusContent::Media(media) => {
                let path =
                    media_session::receive_file(&mut session, media, &a.dir, &mut |_, _| {})?;
                json!({ "file": path.display().to_string(), "caption": media.caption })
            }
        };
        out(json!({
            "kind": "status",
            "from": from,
            "post_id": s.post_id,
            "expires_at_ms": s.expires_at_ms,
            "content": shown,
        }))?;
        session.flush_acks()?;
        session.mark_read_device(m.from, m.client_msg_id)?;
    }
    session.flush_acks()?;
    session.close()?;
    Ok(())
}

fn delete(a: DeleteArgs) -> CliResult {
    let mut session = login(&a.common, None, SessionOptions::default())?;
    delete_status(&mut session, a.post_id)?;
    out(json!({ "deleted": a.post_id }))?;
    session.close()?;
    Ok(())
}
