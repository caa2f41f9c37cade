//! Status posts (WhatsApp's 24-hour stories): text or a file, end-to-end encrypted to an
//! audience (docs/protocol.md §19.7).
//!
//! Posting: upload the file's ciphertext if there is one ([`crate::media_session`]), register
//! the post with the server (`StatusPublish`: its blobs and audience; the server then serves
//! the blobs only to the poster and the audience, and deletes post and blobs after
//! `status_ttl_s` or on [`delete_status`]), then send the [`StatusMessage`] as an ordinary
//! end-to-end encrypted message (msg_type STATUS) to every audience user, which reaches every
//! device of each. A viewer's "viewed" receipt is the read receipt of that message
//! ([`crate::Session::mark_read`]); the poster sees it as `Event::Read` with one of the
//! `client_msg_id`s in [`PostedStatus::copies`].

use std::path::Path;

use protocol::{MsgType, UserId};

use crate::media::{MediaError, MediaMessage, Progress};
use crate::media_session;
use crate::Session;

/// First bytes of a status message payload.
pub const STATUS_MAGIC: &[u8; 8] = b"SWBSTATS";

/// What a status shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusContent {
    /// Text.
    Text(String),
    /// A file (picture, video, ...), described by its media message.
    Media(MediaMessage),
}

/// The payload of a status post's copies: `"SWBSTATS"`, `version u8 = 1`, `post_id u64`,
/// `expires_at_ms u64`, `kind u8` (1 text, 2 media), then the UTF-8 text or the media
/// message's bytes to the end. Integers big-endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMessage {
    /// The poster's id for the post.
    pub post_id: u64,
    /// When the server deletes it; a viewer hides it from then on.
    pub expires_at_ms: u64,
    /// What it shows.
    pub content: StatusContent,
}

impl StatusMessage {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = STATUS_MAGIC.to_vec();
        out.push(1);
        out.extend_from_slice(&self.post_id.to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        match &self.content {
            StatusContent::Text(t) => {
                out.push(1);
                out.extend_from_slice(t.as_bytes());
            }
            StatusContent::Media(m) => {
                out.push(2);
                out.extend_from_slice(&m.encode());
            }
        }
        out
    }

    /// Whether `payload` starts like a status message.
    pub fn is_status(payload: &[u8]) -> bool {
        payload.starts_with(STATUS_MAGIC)
    }

    /// Parses a payload made by [`StatusMessage::encode`].
    pub fn decode(payload: &[u8]) -> Result<Self, MediaError> {
        let rest = payload
            .strip_prefix(STATUS_MAGIC.as_slice())
            .ok_or(MediaError::Malformed("status magic"))?;
        let (head, body) = rest
            .split_first_chunk::<18>()
            .ok_or(MediaError::Malformed("status header"))?;
        let [version, p0, p1, p2, p3, p4, p5, p6, p7, e0, e1, e2, e3, e4, e5, e6, e7, kind] = *head;
        if version != 1 {
            return Err(MediaError::Malformed("status version"));
        }
        let content = match kind {
            1 => StatusContent::Text(
                std::str::from_utf8(body)
                    .map_err(|_| MediaError::Malformed("status text"))?
                    .to_owned(),
            ),
            2 => StatusContent::Media(MediaMessage::decode(body)?),
            _ => return Err(MediaError::Malformed("status kind")),
        };
        Ok(Self {
            post_id: u64::from_be_bytes([p0, p1, p2, p3, p4, p5, p6, p7]),
            expires_at_ms: u64::from_be_bytes([e0, e1, e2, e3, e4, e5, e6, e7]),
            content,
        })
    }
}

/// A posted status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostedStatus {
    /// Its id.
    pub post_id: u64,
    /// When the server deletes it.
    pub expires_at_ms: u64,
    /// The message sent to each audience user: (user, client_msg_id) (receipts name these).
    pub copies: Vec<(UserId, u64)>,
}

/// What to post.
#[derive(Clone, Copy, Debug)]
pub enum Post<'a> {
    /// A text status.
    Text(&'a str),
    /// A file status (uploaded first), with a caption.
    File(&'a Path, &'a str),
}

/// Posts a status to `audience` (see the module doc).
pub fn post_status(
    session: &mut Session,
    audience: &[UserId],
    post: Post<'_>,
    work_dir: &Path,
    progress: Progress<'_>,
) -> Result<PostedStatus, MediaError> {
    let post_id = crate::new_client_msg_id();
    let (content, blobs) = match post {
        Post::Text(t) => (StatusContent::Text(t.to_owned()), vec![]),
        Post::File(path, caption) => {
            let mut up = media_session::upload_file(session, path, work_dir, progress)?;
            up.message.caption = caption.to_owned();
            let blob = up.message.sha256;
            (StatusContent::Media(up.message), vec![blob])
        }
    };
    let expires_at_ms = session.status_publish(post_id, blobs, audience.to_vec())?;
    let payload = StatusMessage {
        post_id,
        expires_at_ms,
        content,
    }
    .encode();
    let mut copies = Vec::with_capacity(audience.len());
    for &user in audience {
        copies.push((user, session.send(user, &payload, MsgType::STATUS)?));
    }
    Ok(PostedStatus {
        post_id,
        expires_at_ms,
        copies,
    })
}

/// Deletes a posted status (and its blobs) before it expires.
pub fn delete_status(session: &mut Session, post_id: u64) -> Result<(), MediaError> {
    Ok(session.status_delete(post_id)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn status_messages_round_trip(post_id in any::<u64>(), exp in any::<u64>(), text in "\\PC{0,100}") {
            let m = StatusMessage { post_id, expires_at_ms: exp, content: StatusContent::Text(text) };
            let b = m.encode();
            prop_assert!(StatusMessage::is_status(&b));
            prop_assert_eq!(StatusMessage::decode(&b).unwrap(), m);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut p = STATUS_MAGIC.to_vec();
            p.extend_from_slice(&bytes);
            let _ = StatusMessage::decode(&p);
        }
    }
}
