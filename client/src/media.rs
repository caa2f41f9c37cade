//! Encrypted media: the file encryption, the media message, and the HTTP transfers
//! (docs/e2ee.md "Media", docs/protocol.md §19).
//!
//! A file is encrypted on the device with a fresh random 32-byte media key in chunks of
//! [`MEDIA_CHUNK_BYTES`] with AES-256-GCM, in the STREAM construction (Hoang, Reyhanitabar,
//! Rogaway, Vizár 2015): `HKDF-SHA256(ikm = media key, salt = none, info = "Switchboard media
//! v1")` gives 39 bytes, the AES key (32) and a nonce prefix (7); chunk `i` is sealed with the
//! nonce `prefix ‖ i (u32 BE) ‖ last (1 for the final chunk, else 0)` and no associated data.
//! The ciphertext is the chunks' ciphertexts with their 16-byte tags, in order; it is what is
//! uploaded, hashed (SHA-256) and named by the server. A file of `n` bytes has
//! `max(1, ceil(n / 65536))` chunks and `n + 16 × chunks` ciphertext bytes.
//!
//! Why not WhatsApp's AES-256-CBC + HMAC-SHA256: that MAC covers the whole file, so a receiver
//! can only check it after reading everything and must buffer or re-read before releasing a
//! byte; CBC needs padding (and a padding-oracle-safe implementation). Chunked GCM
//! authenticates every 64 KiB on its own (a receiver streams, and could decrypt a Range), the
//! counter and the last-chunk flag make reordering, truncation and extension detectable, and it
//! uses the AES-GCM implementation already in the tree. The whole ciphertext's SHA-256 is still
//! checked first: against the server (the slot) and by the receiver before decrypting.
//!
//! The [`MediaMessage`] (key, hash, sizes, class, MIME type, file name, caption) travels inside
//! the end-to-end encrypted payload of an ordinary message; the server sees only the
//! ciphertext blob and its hash. A receiver asks its own home shard for a download URL of that
//! hash (`MediaDownloadRequest`).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use protocol::media::MediaClass;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Plaintext bytes per encrypted chunk.
pub const MEDIA_CHUNK_BYTES: usize = 64 * 1024;
/// AES-GCM tag bytes per chunk.
pub const MEDIA_TAG_BYTES: usize = 16;
/// HKDF info string of the media keys.
pub const MEDIA_HKDF_INFO: &[u8] = b"Switchboard media v1";
/// First bytes of a [`MediaMessage`] payload.
pub const MEDIA_MESSAGE_MAGIC: &[u8; 8] = b"SWBMEDIA";
/// Most bytes of a media message's MIME type and of its file name.
pub const MEDIA_TEXT_MAX: usize = 255;

/// Why a media operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// Reading or writing a file failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The downloaded ciphertext's SHA-256 is not the message's: nothing was decrypted.
    #[error("ciphertext SHA-256 does not match the media message")]
    HashMismatch,
    /// A chunk failed authentication (wrong key, or altered, reordered or truncated data).
    #[error("media chunk {0} failed authentication")]
    BadChunk(u64),
    /// The ciphertext's length is not the one the message states.
    #[error("ciphertext length {have} is not the message's {expected}")]
    Length {
        /// Bytes present.
        have: u64,
        /// Bytes the message states.
        expected: u64,
    },
    /// A payload that is not a well-formed media message.
    #[error("malformed media message: {0}")]
    Malformed(&'static str),
    /// The media endpoint answered with an error status.
    #[error("media endpoint answered {status}: {reason}")]
    Http {
        /// HTTP status.
        status: u16,
        /// The `Media-Error` header (or the body).
        reason: String,
    },
    /// The HTTP request could not be made.
    #[error("media transport: {0}")]
    Transport(String),
    /// A request over the Switchboard connection failed.
    #[error(transparent)]
    Session(#[from] crate::Error),
}

/// Ciphertext bytes of a file of `plain_len` bytes.
pub fn ciphertext_len(plain_len: u64) -> u64 {
    plain_len + MEDIA_TAG_BYTES as u64 * chunk_count(plain_len)
}

fn chunk_count(plain_len: u64) -> u64 {
    plain_len.div_ceil(MEDIA_CHUNK_BYTES as u64).max(1)
}

/// The AES-256 key and the 7-byte nonce prefix HKDF derives from a media key (exposed for the
/// documented vectors).
pub fn derive_keys(media_key: &[u8; 32]) -> ([u8; 32], [u8; 7]) {
    let mut okm = Zeroizing::new([0u8; 39]);
    // 39 bytes is far below HKDF-SHA256's 8160-byte limit: `expand` cannot fail.
    let _ = Hkdf::<Sha256>::new(None, media_key).expand(MEDIA_HKDF_INFO, okm.as_mut());
    let mut key = [0u8; 32];
    let mut prefix = [0u8; 7];
    let (k, p) = okm.split_at(32);
    key.copy_from_slice(k);
    prefix.copy_from_slice(p);
    (key, prefix)
}

/// The AES key and nonce prefix derived from a media key.
struct ChunkKeys {
    aead: Aes256Gcm,
    prefix: [u8; 7],
}

impl ChunkKeys {
    fn derive(media_key: &[u8; 32]) -> Self {
        let (key, prefix) = derive_keys(media_key);
        let key = Zeroizing::new(key);
        let aead =
            Aes256Gcm::new_from_slice(key.as_ref()).unwrap_or_else(|_| unreachable!("32-byte key"));
        Self { aead, prefix }
    }

    fn nonce(&self, index: u64, last: bool) -> Result<[u8; 12], MediaError> {
        let index = u32::try_from(index).map_err(|_| MediaError::Malformed("too many chunks"))?;
        let mut n = [0u8; 12];
        let (p, rest) = n.split_at_mut(7);
        p.copy_from_slice(&self.prefix);
        let (i, l) = rest.split_at_mut(4);
        i.copy_from_slice(&index.to_be_bytes());
        l.copy_from_slice(&[u8::from(last)]);
        Ok(n)
    }
}

/// Encrypts `plain_len` bytes from `src` to `dst`; returns the ciphertext's SHA-256.
pub fn encrypt_stream(
    media_key: &[u8; 32],
    plain_len: u64,
    src: &mut impl Read,
    dst: &mut impl Write,
) -> Result<[u8; 32], MediaError> {
    let keys = ChunkKeys::derive(media_key);
    let chunks = chunk_count(plain_len);
    let mut hasher = Sha256::new();
    let mut buf = Vec::with_capacity(MEDIA_CHUNK_BYTES + MEDIA_TAG_BYTES);
    let mut left = plain_len;
    for i in 0..chunks {
        let n = left.min(MEDIA_CHUNK_BYTES as u64) as usize;
        buf.clear();
        buf.resize(n, 0);
        src.read_exact(&mut buf)?;
        left -= n as u64;
        let nonce = keys.nonce(i, i + 1 == chunks)?;
        keys.aead
            .encrypt_in_place(Nonce::from_slice(&nonce), b"", &mut buf)
            .map_err(|_| MediaError::Malformed("chunk too large"))?;
        hasher.update(&buf);
        dst.write_all(&buf)?;
    }
    Ok(hasher.finalize().into())
}

/// Decrypts `cipher_len` bytes of ciphertext from `src` to `dst`, authenticating each chunk
/// before its plaintext is written; returns the plaintext length.
pub fn decrypt_stream(
    media_key: &[u8; 32],
    cipher_len: u64,
    src: &mut impl Read,
    dst: &mut impl Write,
) -> Result<u64, MediaError> {
    let keys = ChunkKeys::derive(media_key);
    let full = (MEDIA_CHUNK_BYTES + MEDIA_TAG_BYTES) as u64;
    let chunks = cipher_len.div_ceil(full).max(1);
    if cipher_len < MEDIA_TAG_BYTES as u64 * chunks
        || ciphertext_len(cipher_len - MEDIA_TAG_BYTES as u64 * chunks) != cipher_len
    {
        return Err(MediaError::Malformed("ciphertext length"));
    }
    let mut buf = Vec::with_capacity(full as usize);
    let (mut left, mut plain) = (cipher_len, 0u64);
    for i in 0..chunks {
        let n = left.min(full) as usize;
        buf.clear();
        buf.resize(n, 0);
        src.read_exact(&mut buf)?;
        left -= n as u64;
        let nonce = keys.nonce(i, i + 1 == chunks)?;
        keys.aead
            .decrypt_in_place(Nonce::from_slice(&nonce), b"", &mut buf)
            .map_err(|_| MediaError::BadChunk(i))?;
        dst.write_all(&buf)?;
        plain += buf.len() as u64;
    }
    Ok(plain)
}

/// What a media message says: everything a receiver needs to fetch, check and decrypt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaMessage {
    /// The media class (sets the server's size limit).
    pub class: MediaClass,
    /// The random media key.
    pub media_key: [u8; 32],
    /// SHA-256 of the ciphertext (the blob's name on the server).
    pub sha256: [u8; 32],
    /// Ciphertext bytes.
    pub cipher_len: u64,
    /// Plaintext bytes.
    pub plain_len: u64,
    /// MIME type, e.g. `image/jpeg` (at most 255 bytes).
    pub mime: String,
    /// File name (at most 255 bytes).
    pub name: String,
    /// Caption, to the end of the payload.
    pub caption: String,
}

impl MediaMessage {
    /// The payload bytes: `"SWBMEDIA"`, `version u8 = 1`, `class u8`, `media_key [32]`,
    /// `sha256 [32]`, `cipher_len u64`, `plain_len u64`, `mime_len u8`, mime, `name_len u8`,
    /// name, then the caption (UTF-8) to the end. Integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mime = cut(&self.mime);
        let name = cut(&self.name);
        let mut out = Vec::with_capacity(94 + mime.len() + name.len() + self.caption.len());
        out.extend_from_slice(MEDIA_MESSAGE_MAGIC);
        out.extend_from_slice(&[1, self.class.0]);
        out.extend_from_slice(&self.media_key);
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.cipher_len.to_be_bytes());
        out.extend_from_slice(&self.plain_len.to_be_bytes());
        out.push(mime.len() as u8);
        out.extend_from_slice(mime.as_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(self.caption.as_bytes());
        out
    }

    /// Whether `payload` starts like a media message.
    pub fn is_media(payload: &[u8]) -> bool {
        payload.starts_with(MEDIA_MESSAGE_MAGIC)
    }

    /// Parses a payload made by [`MediaMessage::encode`].
    pub fn decode(payload: &[u8]) -> Result<Self, MediaError> {
        let mut r = payload
            .strip_prefix(MEDIA_MESSAGE_MAGIC.as_slice())
            .ok_or(MediaError::Malformed("magic"))?;
        let [version, class] = take::<2>(&mut r)?;
        if version != 1 {
            return Err(MediaError::Malformed("version"));
        }
        let class = MediaClass(class);
        if !class.is_known() {
            return Err(MediaError::Malformed("class"));
        }
        let media_key = take::<32>(&mut r)?;
        let sha256 = take::<32>(&mut r)?;
        let cipher_len = u64::from_be_bytes(take(&mut r)?);
        let plain_len = u64::from_be_bytes(take(&mut r)?);
        if ciphertext_len(plain_len) != cipher_len {
            return Err(MediaError::Malformed("sizes"));
        }
        let mime = text(&mut r)?;
        let name = text(&mut r)?;
        let caption = std::str::from_utf8(r)
            .map_err(|_| MediaError::Malformed("caption"))?
            .to_owned();
        Ok(Self {
            class,
            media_key,
            sha256,
            cipher_len,
            plain_len,
            mime,
            name,
            caption,
        })
    }
}

/// `s` cut to at most [`MEDIA_TEXT_MAX`] bytes at a character boundary.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(MEDIA_TEXT_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], MediaError> {
    let (head, rest) = r
        .split_first_chunk::<N>()
        .ok_or(MediaError::Malformed("truncated"))?;
    *r = rest;
    Ok(*head)
}

fn text(r: &mut &[u8]) -> Result<String, MediaError> {
    let [len] = take::<1>(r)?;
    let len = usize::from(len);
    if r.len() < len {
        return Err(MediaError::Malformed("truncated text"));
    }
    let (t, rest) = r.split_at(len);
    *r = rest;
    std::str::from_utf8(t)
        .map(str::to_owned)
        .map_err(|_| MediaError::Malformed("text"))
}

/// Progress of a transfer: bytes done, bytes in all.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

fn http_error(e: ureq::Error) -> MediaError {
    match e {
        ureq::Error::Status(status, resp) => {
            let reason = resp
                .header("media-error")
                .map(str::to_owned)
                .unwrap_or_else(|| resp.into_string().unwrap_or_default());
            MediaError::Http { status, reason }
        }
        ureq::Error::Transport(t) => MediaError::Transport(t.to_string()),
    }
}

/// Counts bytes read through it and reports progress.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    progress: Progress<'a>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.done, self.total);
        Ok(n)
    }
}

/// How many bytes of the slot behind `url` the server has (`HEAD`, `Upload-Offset`), and
/// whether the upload is complete.
pub fn upload_offset(url: &str) -> Result<(u64, bool), MediaError> {
    let resp = ureq::head(url).call().map_err(http_error)?;
    let offset = resp
        .header("upload-offset")
        .and_then(|v| v.parse().ok())
        .ok_or(MediaError::Malformed("Upload-Offset"))?;
    Ok((offset, resp.header("upload-complete") == Some("?1")))
}

/// `PUT`s the ciphertext file at `path` to the slot URL, from `offset` (0: the whole file;
/// otherwise a `Content-Range` resumption from where the server is).
pub fn put_file(
    url: &str,
    path: &Path,
    offset: u64,
    progress: Progress<'_>,
) -> Result<(), MediaError> {
    let mut file = File::open(path)?;
    let total = file.metadata()?.len();
    file.seek(SeekFrom::Start(offset))?;
    let mut req = ureq::put(url)
        .set("content-type", "application/octet-stream")
        .set("content-length", &(total - offset).to_string());
    if offset > 0 {
        let last = total.saturating_sub(1);
        req = req.set("content-range", &format!("bytes {offset}-{last}/{total}"));
    }
    let body = Counting {
        inner: BufReader::with_capacity(1 << 20, file),
        done: offset,
        total,
        progress,
    };
    req.send(body).map_err(http_error)?;
    Ok(())
}

/// Uploads `path` to the slot URL, resuming from the server's offset after a broken
/// connection (at most `attempts` tries).
pub fn upload_resumable(
    url: &str,
    path: &Path,
    attempts: u32,
    progress: Progress<'_>,
) -> Result<(), MediaError> {
    let mut last = MediaError::Transport("no attempt".into());
    for _ in 0..attempts.max(1) {
        let (offset, done) = upload_offset(url)?;
        if done {
            return Ok(());
        }
        match put_file(url, path, offset, &mut *progress) {
            Ok(()) => return Ok(()),
            Err(e @ (MediaError::Transport(_) | MediaError::Io(_))) => last = e,
            Err(
                e @ MediaError::Http {
                    status: 400 | 409, ..
                },
            ) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Downloads the blob at `url` into `dst` (created or truncated), checking its length and
/// SHA-256 against `msg` while it streams. Returns the bytes written.
pub fn download_to(
    url: &str,
    msg: &MediaMessage,
    dst: &Path,
    progress: Progress<'_>,
) -> Result<u64, MediaError> {
    let resp = ureq::get(url).call().map_err(http_error)?;
    let mut reader = Counting {
        inner: resp.into_reader(),
        done: 0,
        total: msg.cipher_len,
        progress,
    };
    let mut out = io::BufWriter::new(File::create(dst)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut have = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        out.write_all(chunk)?;
        have += n as u64;
        if have > msg.cipher_len {
            break;
        }
    }
    out.flush()?;
    if have != msg.cipher_len {
        return Err(MediaError::Length {
            have,
            expected: msg.cipher_len,
        });
    }
    if <[u8; 32]>::from(hasher.finalize()) != msg.sha256 {
        return Err(MediaError::HashMismatch);
    }
    Ok(have)
}

/// Encrypts the file at `src` into `dst` with a fresh media key; returns the media message
/// (without caption) describing it.
pub fn encrypt_file(src: &Path, dst: &Path, class: MediaClass) -> Result<MediaMessage, MediaError> {
    let mut media_key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut media_key);
    let mut input = BufReader::with_capacity(1 << 20, File::open(src)?);
    let plain_len = std::fs::metadata(src)?.len();
    let mut out = io::BufWriter::with_capacity(1 << 20, File::create(dst)?);
    let sha256 = encrypt_stream(&media_key, plain_len, &mut input, &mut out)?;
    out.flush()?;
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_owned();
    Ok(MediaMessage {
        class,
        media_key,
        sha256,
        cipher_len: ciphertext_len(plain_len),
        plain_len,
        mime: mime_for(&name).to_owned(),
        name,
        caption: String::new(),
    })
}

/// Decrypts a downloaded, hash-checked ciphertext file into `dst`. On any failure `dst` is
/// removed (no unauthenticated plaintext is left behind).
pub fn decrypt_file(msg: &MediaMessage, src: &Path, dst: &Path) -> Result<u64, MediaError> {
    let mut input = BufReader::with_capacity(1 << 20, File::open(src)?);
    let have = std::fs::metadata(src)?.len();
    if have != msg.cipher_len {
        return Err(MediaError::Length {
            have,
            expected: msg.cipher_len,
        });
    }
    let result = (|| {
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(dst)?);
        let n = decrypt_stream(&msg.media_key, msg.cipher_len, &mut input, &mut out)?;
        out.flush()?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// The media class for a file name (by extension; documents otherwise).
pub fn class_for(name: &str) -> MediaClass {
    let m = mime_for(name);
    if m.starts_with("image/") {
        MediaClass::IMAGE
    } else if m.starts_with("video/") {
        MediaClass::VIDEO
    } else if m.starts_with("audio/") {
        MediaClass::AUDIO
    } else {
        MediaClass::DOCUMENT
    }
}

/// A MIME type guessed from a file name's extension.
pub fn mime_for(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mov") => "video/quicktime",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "opus") => "audio/ogg",
        Some("m4a") => "audio/mp4",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let key = [9u8; 32];
        for len in [0usize, 1, 65_535, 65_536, 65_537, 200_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut ct = Vec::new();
            let sha = encrypt_stream(&key, len as u64, &mut plain.as_slice(), &mut ct).unwrap();
            assert_eq!(ct.len() as u64, ciphertext_len(len as u64));
            assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&ct)));
            let mut back = Vec::new();
            decrypt_stream(&key, ct.len() as u64, &mut ct.as_slice(), &mut back).unwrap();
            assert_eq!(back, plain);
            let mut bad = ct.clone();
            if let Some(b) = bad.last_mut() {
                *b ^= 1;
            }
            let e = decrypt_stream(&key, bad.len() as u64, &mut bad.as_slice(), &mut Vec::new());
            assert!(matches!(e, Err(MediaError::BadChunk(_))), "{len}: {e:?}");
        }
        // Truncating a whole chunk is caught by the last-chunk flag.
        let plain = vec![1u8; 3 * MEDIA_CHUNK_BYTES];
        let mut ct = Vec::new();
        encrypt_stream(&key, plain.len() as u64, &mut plain.as_slice(), &mut ct).unwrap();
        ct.truncate(2 * (MEDIA_CHUNK_BYTES + MEDIA_TAG_BYTES));
        let e = decrypt_stream(&key, ct.len() as u64, &mut ct.as_slice(), &mut Vec::new());
        assert!(matches!(e, Err(MediaError::BadChunk(1))), "{e:?}");
    }

    /// Every vector of docs/e2ee.md "Media", as (name, hex), in document order.
    fn compute_vectors() -> Vec<(String, String)> {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let (aes, prefix) = derive_keys(&key);
        let keys = ChunkKeys::derive(&key);
        let plain1 = b"Switchboard media vector.".to_vec();
        let mut ct1 = Vec::new();
        let sha1 =
            encrypt_stream(&key, plain1.len() as u64, &mut plain1.as_slice(), &mut ct1).unwrap();
        let plain2: Vec<u8> = (0..65_537u32).map(|i| (i % 251) as u8).collect();
        let mut ct2 = Vec::new();
        let sha2 =
            encrypt_stream(&key, plain2.len() as u64, &mut plain2.as_slice(), &mut ct2).unwrap();
        let msg = MediaMessage {
            class: MediaClass::DOCUMENT,
            media_key: key,
            sha256: sha1,
            cipher_len: ct1.len() as u64,
            plain_len: plain1.len() as u64,
            mime: "text/plain".into(),
            name: "vector.txt".into(),
            caption: "hi".into(),
        };
        fn h(b: impl AsRef<[u8]>) -> String {
            hex::encode(b)
        }
        vec![
            ("media_key", h(key)),
            ("media_aes_key", h(aes)),
            ("media_nonce_prefix", h(prefix)),
            ("media_nonce_0_last", h(keys.nonce(0, true).unwrap())),
            ("media_plaintext_1", h(&plain1)),
            ("media_ciphertext_1", h(&ct1)),
            ("media_ciphertext_1_sha256", h(sha1)),
            ("media_nonce_1_last", h(keys.nonce(1, true).unwrap())),
            ("media_ciphertext_2_len", format!("{:016x}", ct2.len())),
            ("media_ciphertext_2_tail", h(&ct2[ct2.len() - 17..])),
            ("media_ciphertext_2_sha256", h(sha2)),
            ("media_message_1", h(msg.encode())),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect()
    }

    #[test]
    fn media_vectors_match_docs() {
        const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/e2ee.md"));
        let computed = compute_vectors();
        if std::env::var_os("SWB_PRINT_VECTORS").is_some() {
            for (n, v) in &computed {
                println!("{n} = {v}");
            }
        }
        let block = DOC
            .split("<!-- e2ee-media-vectors:begin -->")
            .nth(1)
            .and_then(|b| b.split("<!-- e2ee-media-vectors:end -->").next())
            .expect("docs/e2ee.md has no media vector block");
        let documented: Vec<(String, String)> = block
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        assert_eq!(
            documented, computed,
            "docs/e2ee.md media vectors differ from the code"
        );
        // The documented ciphertext decrypts; the second file's last chunk carries the flag.
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let ct = hex::decode(&computed[5].1).unwrap();
        let mut back = Vec::new();
        decrypt_stream(&key, ct.len() as u64, &mut ct.as_slice(), &mut back).unwrap();
        assert_eq!(back, b"Switchboard media vector.");
    }

    proptest! {
        #[test]
        fn media_messages_round_trip(
            class in 1u8..=4, key in any::<[u8; 32]>(), sha in any::<[u8; 32]>(),
            plain_len in 0u64..1 << 40, mime in "[a-z/]{0,40}", name in "\\PC{0,40}",
            caption in "\\PC{0,80}",
        ) {
            let m = MediaMessage {
                class: MediaClass(class), media_key: key, sha256: sha,
                cipher_len: ciphertext_len(plain_len), plain_len, mime, name, caption,
            };
            let bytes = m.encode();
            prop_assert!(MediaMessage::is_media(&bytes));
            prop_assert_eq!(MediaMessage::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut p = MEDIA_MESSAGE_MAGIC.to_vec();
            p.extend_from_slice(&bytes);
            let _ = MediaMessage::decode(&p);
            let _ = MediaMessage::decode(&bytes);
        }
    }
}
