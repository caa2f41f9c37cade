//! Media over a session: send a file (encrypt, slot, upload, message) and receive one
//! (download URL, download, hash check, decrypt). The crypto and HTTP are in [`crate::media`].

use std::path::{Path, PathBuf};

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
        let grant = session.media_slot(class, message.cipher_len, message.sha256)?;
        media::upload_resumable(&grant.url, &tmp, UPLOAD_ATTEMPTS, progress)?;
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
    let grant = session.media_download_url(msg.sha256)?;
    std::fs::create_dir_all(out_dir)?;
    let tmp = out_dir.join(format!(".download-{}.enc", crate::new_client_msg_id()));
    let dst = out_dir.join(safe_name(&msg.name));
    let result = (|| {
        media::download_to(&grant.url, msg, &tmp, progress)?;
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
