//! The media blob store: content-addressed ciphertext files under `<data_dir>/media/`.
//!
//! Layout:
//!
//! * `blobs/<sha256 hex>`: complete, verified blobs. A file appears here only by `rename` of a
//!   partial whose length and SHA-256 were checked and whose data was `fsync`ed, followed by an
//!   `fsync` of `blobs/`; so a blob that exists is whole (no partial blob is ever served) and a
//!   confirmed one survives kill -9 and power loss.
//! * `partial/<user>-<slot>`: an upload in progress. It may be resumed from its length
//!   ([`BlobStore::partial_len`]); after a crash its tail may be short (unsynced), never
//!   trusted: the SHA-256 of the whole file decides at the end.
//! * `done/<user>-<slot>`: the slot was completed (holds the blob's hash in hex); a second
//!   upload to the same slot is refused. Written durably before the upload is confirmed.
//!
//! * `acl/<sha256 hex>`: who may download a blob, when it is restricted (a status post's
//!   poster and audience): one user id per line. Written durably (temporary file, fsync,
//!   rename, directory fsync).
//!
//! Expiry: [`BlobStore::sweep`] deletes blobs and done markers older than the TTL (by mtime:
//! a blob uploaded again is renamed over and starts a new life) and partials no longer
//! resumable. Disk-full shows as [`BlobError::DiskFull`]; the partial is then removed so the
//! space comes back, and nothing appears under `blobs/`.
//!
//! The store does blocking `std::fs` IO: it runs on the media endpoint's own thread, never on
//! a shard's.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The filesystem is full (`ENOSPC`/`EDQUOT`). The partial was removed.
    #[error("disk full")]
    DiskFull,
    /// The bytes received are not `expected` long.
    #[error("size mismatch: have {have}, slot says {expected}")]
    SizeMismatch {
        /// Bytes received.
        have: u64,
        /// Bytes the slot was granted for.
        expected: u64,
    },
    /// The SHA-256 of the bytes is not the slot's. The partial was removed.
    #[error("sha256 mismatch")]
    HashMismatch,
    /// A resumed write does not start where the partial ends.
    #[error("offset mismatch: the server has {have} bytes")]
    OffsetMismatch {
        /// Bytes the server has.
        have: u64,
    },
    /// Another IO error.
    #[error("io: {0}")]
    Io(io::Error),
}

impl From<io::Error> for BlobError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(28) | Some(122) => BlobError::DiskFull, // ENOSPC, EDQUOT
            _ => BlobError::Io(e),
        }
    }
}

/// The store rooted at a directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// What a sweep deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Blobs deleted.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Partials deleted.
    pub partials: u64,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BlobStore {
    /// Opens (creating durably) the store under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        let fresh = !root.is_dir();
        for sub in ["blobs", "partial", "done", "acl"] {
            let dir = root.join(sub);
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir)?;
                sync_dir(root)?;
            }
        }
        if fresh {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The file of the blob `sha256`.
    pub fn blob_path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.root.join("blobs").join(hex(sha256))
    }

    fn partial_path(&self, user: u64, slot: u64) -> PathBuf {
        self.root.join("partial").join(format!("{user}-{slot}"))
    }

    fn done_path(&self, user: u64, slot: u64) -> PathBuf {
        self.root.join("done").join(format!("{user}-{slot}"))
    }

    /// The size of the complete blob `sha256`, if the store has it.
    pub fn blob_len(&self, sha256: &[u8; 32]) -> Option<u64> {
        std::fs::metadata(self.blob_path(sha256))
            .ok()
            .map(|m| m.len())
    }

    /// Opens the complete blob `sha256` for reading.
    pub fn open_blob(&self, sha256: &[u8; 32]) -> io::Result<File> {
        File::open(self.blob_path(sha256))
    }

    /// Whether the slot was completed.
    pub fn slot_done(&self, user: u64, slot: u64) -> bool {
        self.done_path(user, slot).exists()
    }

    /// Bytes of the slot's partial upload the server has (0 when none).
    pub fn partial_len(&self, user: u64, slot: u64) -> u64 {
        std::fs::metadata(self.partial_path(user, slot)).map_or(0, |m| m.len())
    }

    /// Starts writing the slot's bytes at `offset`: 0 starts over (truncating any partial);
    /// otherwise `offset` must equal [`BlobStore::partial_len`], and the partial's bytes are
    /// hashed from disk first so the hash covers the whole blob.
    pub fn writer(&self, user: u64, slot: u64, offset: u64) -> Result<PartialWriter, BlobError> {
        let path = self.partial_path(user, slot);
        let mut hasher = Sha256::new();
        let file = if offset == 0 {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?
        } else {
            let have = self.partial_len(user, slot);
            if have != offset {
                return Err(BlobError::OffsetMismatch { have });
            }
            let mut f = OpenOptions::new().read(true).write(true).open(&path)?;
            hash_prefix(&mut f, offset, &mut hasher)?;
            f.seek(SeekFrom::Start(offset))?;
            f
        };
        Ok(PartialWriter {
            file,
            path,
            hasher,
            len: offset,
        })
    }

    /// Ends an upload: `w` must hold exactly `size` bytes hashing to `sha256`. The partial is
    /// `fsync`ed, renamed to `blobs/<hash>`, `blobs/` is `fsync`ed and the done marker written
    /// durably; only then is the upload confirmed (Ok). A hash mismatch removes the partial.
    pub fn finish(
        &self,
        w: PartialWriter,
        (user, slot): (u64, u64),
        size: u64,
        sha256: &[u8; 32],
    ) -> Result<(), BlobError> {
        if w.len != size {
            return Err(BlobError::SizeMismatch {
                have: w.len,
                expected: size,
            });
        }
        let PartialWriter {
            mut file,
            path,
            hasher,
            ..
        } = w;
        let digest: [u8; 32] = hasher.finalize().into();
        if &digest != sha256 {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(BlobError::HashMismatch);
        }
        let synced = file.flush().and_then(|()| file.sync_all());
        if let Err(e) = synced {
            return Err(self.fail(&path, e));
        }
        drop(file);
        std::fs::rename(&path, self.blob_path(sha256))?;
        sync_dir(&self.root.join("blobs"))?;
        sync_dir(&self.root.join("partial"))?;
        self.write_done(user, slot, sha256)
            .map_err(|e| self.fail(&self.done_path(user, slot), e))
    }

    fn write_done(&self, user: u64, slot: u64, sha256: &[u8; 32]) -> io::Result<()> {
        let path = self.done_path(user, slot);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(hex(sha256).as_bytes())?;
        f.sync_all()?;
        sync_dir(&self.root.join("done"))
    }

    /// Maps an IO error; on disk-full removes `path` so its space comes back.
    fn fail(&self, path: &Path, e: io::Error) -> BlobError {
        let e = BlobError::from(e);
        if matches!(e, BlobError::DiskFull) {
            let _ = std::fs::remove_file(path);
        }
        e
    }

    /// Restricts downloads of `sha256` to `users` (durably; replaces an earlier list).
    pub fn set_acl(&self, sha256: &[u8; 32], users: &[u64]) -> io::Result<()> {
        let dir = self.root.join("acl");
        let name = hex(sha256);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let text: String = users.iter().map(|u| format!("{u}\n")).collect();
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join(&name))?;
        sync_dir(&dir)
    }

    /// Whether `user` may download `sha256`: yes when the blob has no ACL, else when the ACL
    /// names the user. An unreadable ACL refuses everyone.
    pub fn may_download(&self, sha256: &[u8; 32], user: u64) -> bool {
        match std::fs::read_to_string(self.root.join("acl").join(hex(sha256))) {
            Ok(text) => text.lines().any(|l| l.trim().parse() == Ok(user)),
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Deletes a blob and its ACL (a status post expired or was deleted); returns the bytes
    /// freed. Missing files are fine (idempotent).
    pub fn delete_blob(&self, sha256: &[u8; 32]) -> io::Result<u64> {
        let path = self.blob_path(sha256);
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        for p in [path, self.root.join("acl").join(hex(sha256))] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        sync_dir(&self.root.join("blobs"))?;
        Ok(len)
    }

    /// Removes the slot's partial (after a disk-full write, or to start over).
    pub fn discard_partial(&self, user: u64, slot: u64) {
        let _ = std::fs::remove_file(self.partial_path(user, slot));
    }

    /// Deletes blobs and done markers whose mtime is more than `ttl` before `now`, and partials
    /// untouched for `partial_ttl`.
    pub fn sweep(&self, now: SystemTime, ttl: Duration, partial_ttl: Duration) -> Swept {
        let mut swept = Swept::default();
        let dirs = [
            ("blobs", ttl),
            ("done", ttl),
            ("acl", ttl),
            ("partial", partial_ttl),
        ];
        for (sub, max_age) in dirs {
            let Ok(entries) = std::fs::read_dir(self.root.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .unwrap_or_default();
                if age <= max_age || std::fs::remove_file(entry.path()).is_err() {
                    continue;
                }
                match sub {
                    "blobs" => {
                        swept.blobs += 1;
                        swept.bytes += meta.len();
                    }
                    "partial" => swept.partials += 1,
                    _ => {}
                }
            }
        }
        swept
    }

    /// Number of complete blobs and their total bytes.
    pub fn usage(&self) -> (u64, u64) {
        let Ok(entries) = std::fs::read_dir(self.root.join("blobs")) else {
            return (0, 0);
        };
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .fold((0, 0), |(n, b), m| (n + 1, b + m.len()))
    }
}

fn hash_prefix(f: &mut File, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = buf.get_mut(..want).unwrap_or_default();
        f.read_exact(chunk)?;
        hasher.update(&*chunk);
        left -= want as u64;
    }
    Ok(())
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An upload being written: its partial file and the running SHA-256.
#[derive(Debug)]
pub struct PartialWriter {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    len: u64,
}

impl PartialWriter {
    /// Appends `bytes` (to the page cache; `finish` syncs).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        if let Err(e) = self.file.write_all(bytes) {
            let e = BlobError::from(e);
            if matches!(e, BlobError::DiskFull) {
                let _ = std::fs::remove_file(&self.path);
            }
            return Err(e);
        }
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far (offset included).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    #[test]
    fn disk_full_is_typed_and_acls_restrict() {
        for code in [28, 122] {
            let e = BlobError::from(io::Error::from_raw_os_error(code));
            assert!(matches!(e, BlobError::DiskFull), "{code}: {e:?}");
        }
        assert!(matches!(
            BlobError::from(io::Error::from_raw_os_error(5)),
            BlobError::Io(_)
        ));
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("media")).unwrap();
        let h = [9u8; 32];
        assert!(store.may_download(&h, 1), "no ACL: anyone");
        store.set_acl(&h, &[1, 2]).unwrap();
        assert!(store.may_download(&h, 2));
        assert!(!store.may_download(&h, 3));
        let mut w = store.writer(1, 1, 0).unwrap();
        w.write(b"x").unwrap();
        store.finish(w, (1, 1), 1, &sha(b"x")).unwrap();
        assert_eq!(store.delete_blob(&sha(b"x")).unwrap(), 1);
        assert_eq!(store.delete_blob(&sha(b"x")).unwrap(), 0, "idempotent");
        store.delete_blob(&h).unwrap();
        assert!(store.may_download(&h, 3), "the ACL went with the blob");
    }

    #[test]
    fn upload_resume_finish_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("media")).unwrap();
        let data = b"hello media world";
        let h = sha(data);
        let mut w = store.writer(1, 7, 0).unwrap();
        w.write(&data[..5]).unwrap();
        drop(w);
        assert_eq!(store.partial_len(1, 7), 5);
        assert!(store.blob_len(&h).is_none(), "no partial blob is visible");
        assert!(matches!(
            store.writer(1, 7, 3),
            Err(BlobError::OffsetMismatch { have: 5 })
        ));
        let mut w = store.writer(1, 7, 5).unwrap();
        w.write(&data[5..]).unwrap();
        store.finish(w, (1, 7), data.len() as u64, &h).unwrap();
        assert_eq!(store.blob_len(&h), Some(data.len() as u64));
        assert!(store.slot_done(1, 7));
        assert_eq!(store.partial_len(1, 7), 0);

        let mut w = store.writer(1, 8, 0).unwrap();
        w.write(b"other bytes!!!!!!").unwrap();
        let e = store.finish(w, (1, 8), data.len() as u64, &h);
        assert!(matches!(e, Err(BlobError::HashMismatch)));
        assert!(!store.slot_done(1, 8));
        assert_eq!(store.partial_len(1, 8), 0);

        let swept = store.sweep(
            SystemTime::now() + Duration::from_secs(10),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        assert_eq!(swept.blobs, 1);
        assert!(store.blob_len(&h).is_none());
        assert_eq!(store.usage(), (0, 0));
    }
}
