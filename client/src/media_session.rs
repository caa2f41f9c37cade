//! Media over a session: send a file (encrypt, slot, upload, message) and receive one
//! (download URL, download, hash check, decrypt). The crypto and HTTP are in [`crate::media`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use protocol::{MsgType, UserId};

use crate::media::{self, MediaError, MediaMessage, Progress};
use crate::Session;

/// A URL granted by the home shard (`MediaSlot` or `MediaDownload`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaGrant {
    /// The upload slot (0 for a download URL).
    pub slot_id: u64,
    /// When the URL's token expires, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// The URL.
    pub url: String,
}

/// Upload attempts (resuming from the server's offset) before giving up.
pub const UPLOAD_ATTEMPTS: u32 = 5;

/// Longest pause between pings while a transfer runs (the server's `Welcome.keepalive_ms`
/// when that is shorter): the HTTP transfer does not use the Switchboard connection, which the
/// server would otherwise close after `idle_timeout_ms` (90 s by default) of silence during a
/// long upload or download.
pub const KEEPALIVE_DURING_TRANSFER: Duration = Duration::from_secs(15);

/// Runs `transfer` with a progress callback that also pings `session` every
/// [`KEEPALIVE_DURING_TRANSFER`]; afterwards reconnects the session if it was closed anyway
/// (a ping that failed, a server restart), so the next request goes out on a live connection.
fn with_keepalive<T>(
    session: &mut Session,
    progress: Progress<'_>,
    transfer: impl FnOnce(Progress<'_>) -> Result<T, MediaError>,
) -> Result<T, MediaError> {
    let keepalive_ms = u64::from(session.welcome().keepalive_ms);
    let every = match keepalive_ms {
        0 => KEEPALIVE_DURING_TRANSFER,
        ms => KEEPALIVE_DURING_TRANSFER.min(Duration::from_millis(ms)),
    };
    let mut last = Instant::now();
    let result = {
        let mut tick = |done: u64, total: u64| {
            progress(done, total);
            if last.elapsed() >= every {
                last = Instant::now();
                if let Err(e) = session.ping() {
                    tracing::debug!(error = %e, "keepalive during a media transfer failed");
                }
            }
        };
        transfer(&mut tick)
    };
    ensure_live(session)?;
    result
}

/// Pings the session and reconnects it if the connection is gone.
fn ensure_live(session: &mut Session) -> Result<(), MediaError> {
    if session.is_closed() || session.ping().is_err() {
        session.reconnect()?;
    }
    Ok(())
}

/// What [`upload_file`] made: the media message to send, and the encrypted file.
#[derive(Debug)]
pub struct Uploaded {
    /// Describes the blob (key, hash, sizes); goes inside an end-to-end encrypted payload.
    pub message: MediaMessage,
    /// The slot it was uploaded to.
    pub grant: MediaGrant,
}

/// Encrypts `path` into a temporary file in `work_dir`, asks for a slot, uploads it
/// (resumably) and returns the media message. The temporary file is removed.
pub fn upload_file(
    session: &mut Session,
    path: &Path,
    work_dir: &Path,
    progress: Progress<'_>,
) -> Result<Uploaded, MediaError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let class = media::class_for(name);
    let tmp = work_dir.join(format!(".upload-{}.enc", crate::new_client_msg_id()));
    let result = (|| {
        let message = media::encrypt_file(path, &tmp, class)?;
        // Encrypting a large file takes a while: make sure the connection is still there.
        ensure_live(session)?;
        let grant = session.media_slot(class, message.cipher_len, message.sha256)?;
        with_keepalive(session, progress, |p| {
            media::upload_resumable(&grant.url, &tmp, UPLOAD_ATTEMPTS, p)
        })?;
        Ok(Uploaded { message, grant })
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Uploads `path` and sends its media message (with `caption`) to `to`; returns the
/// message's client id.
pub fn send_file(
    session: &mut Session,
    to: UserId,
    path: &Path,
    caption: &str,
    work_dir: &Path,
    progress: Progress<'_>,
) -> Result<u64, MediaError> {
    let mut up = upload_file(session, path, work_dir, progress)?;
    up.message.caption = caption.to_owned();
    let msg_type = match up.message.class {
        protocol::media::MediaClass::IMAGE => MsgType::IMAGE,
        protocol::media::MediaClass::AUDIO => MsgType::VOICE,
        _ => MsgType::TEXT,
    };
    Ok(session.send(to, &up.message.encode(), msg_type)?)
}

/// Fetches the blob a media message names, checks its length and SHA-256, decrypts it into
/// `out_dir` (under the message's file name, made safe) and returns the path written. The
/// ciphertext is kept only in a temporary file, removed at the end.
pub fn receive_file(
    session: &mut Session,
    msg: &MediaMessage,
    out_dir: &Path,
    progress: Progress<'_>,
) -> Result<PathBuf, MediaError> {
    ensure_live(session)?;
    let grant = session.media_download_url(msg.sha256)?;
    std::fs::create_dir_all(out_dir)?;
    let tmp = out_dir.join(format!(".download-{}.enc", crate::new_client_msg_id()));
    let dst = out_dir.join(safe_name(&msg.name));
    let result = (|| {
        with_keepalive(session, progress, |p| {
            media::download_to(&grant.url, msg, &tmp, p)
        })?;
        media::decrypt_file(msg, &tmp, &dst)?;
        Ok(dst.clone())
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// A file name with no directory part or leading dot (a sender cannot write outside the
/// output directory or hide a file).
pub fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let base = base.trim_start_matches('.');
    if base.is_empty() {
        "file".to_owned()
    } else {
        base.to_owned()
    }
}
