//! The data directory: the server's static key (`server.key`, `server.pub`), the shard-count
//! marker (`SHARDS`) and one `shard-N/` log directory per shard.
//!
//! Every file written here is written durably: a temporary file in the same directory, written
//! and `fsync`ed, renamed over the target, then the directory `fsync`ed, so a crash or power
//! loss leaves either the old file or the whole new one, never an empty or torn one.
//!
//! Start-up refuses, with a message that says what to do, when the directory is inconsistent:
//! a damaged `SHARDS`, a shard count different from the one the data was written with, or a
//! missing `server.key` beside existing shard data (a new key would silently give the server a
//! new identity; `new_server_key = true` says that is intended).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use protocol::noise::StaticKeypair;

/// File holding the server's 32-byte X25519 private key.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File holding the server's public key in hex, for clients to pin.
pub const SERVER_PUB_FILE: &str = "server.pub";
/// File holding the shard count the data was written with.
pub const SHARDS_FILE: &str = "SHARDS";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// A filesystem operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `SHARDS` exists but does not hold a positive shard count.
    #[error(
        "{} is damaged: it holds {found:?} instead of a shard count. It must contain the number \
         of shards the data in {} was written with. {advice}",
        path.display(),
        dir.display()
    )]
    ShardsDamaged {
        /// The `SHARDS` file.
        path: PathBuf,
        /// The data directory.
        dir: PathBuf,
        /// Its contents (lossy, at most 64 characters).
        found: String,
        /// How to recover, from the `shard-N` directories present.
        advice: String,
    },
    /// The configured shard count differs from the one the data was written with.
    #[error(
        "{} was written by {had} shards but {configured} are configured; start with --shards \
         {had} (re-sharding an existing data directory is not supported: users' home shards, \
         and so where their mailboxes live, depend on the count)",
        dir.display()
    )]
    ShardCountMismatch {
        /// The data directory.
        dir: PathBuf,
        /// Count in `SHARDS`.
        had: usize,
        /// Count configured.
        configured: usize,
    },
    /// `server.key` is missing but the directory already holds shard data.
    #[error(
        "{} is missing but {} holds shard data ({evidence}). A new key would give this server a \
         new identity that clients pinned to the old server.pub refuse. Restore server.key \
         from a backup, or start once with --new-server-key true (config new_server_key = \
         true) to generate a new one on purpose",
        key.display(),
        dir.display()
    )]
    ServerKeyMissing {
        /// The missing key file.
        key: PathBuf,
        /// The data directory.
        dir: PathBuf,
        /// What shard data was found.
        evidence: String,
    },
    /// `server.key` is not a 32-byte private key.
    #[error(
        "{} is damaged: {len} bytes instead of 32. Restore it from a backup (or delete it and \
         start with --new-server-key true to give the server a new identity)",
        path.display()
    )]
    ServerKeyDamaged {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes `dir/name` durably: `.name.tmp` created with `mode`, written, `fsync`ed, renamed over
/// `name`, then `dir` `fsync`ed (without it the rename itself may not survive a power loss).
pub fn write_durable(dir: &Path, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    // A leftover from a crash may carry other permissions; `mode` applies only on creation.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and its parents) and makes its entry durable in its parent.
pub fn create_dir_durable(dir: &Path) -> Result<(), DataDirError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(io_err("syncing", parent))?;
    }
    Ok(())
}

/// The media token secret's file in the data directory.
pub const MEDIA_KEY_FILE: &str = "media.key";

/// Loads `dir/media.key` (32 random bytes, mode 0600), creating it durably when missing.
/// Losing it only invalidates outstanding media URLs (blobs stay readable with new ones).
pub fn load_media_secret(dir: &Path) -> Result<[u8; 32], DataDirError> {
    let path = dir.join(MEDIA_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|b: Vec<u8>| DataDirError::Io {
            what: "reading",
            path: path.clone(),
            source: std::io::Error::other(format!("{} bytes, expected 32", b.len())),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            write_durable(dir, MEDIA_KEY_FILE, &secret, 0o600).map_err(io_err("writing", &path))?;
            Ok(secret)
        }
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// The directory of shard `id`'s log.
pub fn shard_dir(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("shard-{id}"))
}

/// What an existing data directory holds, read before anything is written to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// `SHARDS` exists.
    pub shards_file: bool,
    /// Numbers of the `shard-N` directories present, ascending.
    pub shard_dirs: Vec<usize>,
    /// Log segment files found across those directories.
    pub segments: usize,
}

impl Inventory {
    /// Reads `dir` (a missing directory is an empty inventory).
    pub fn read(dir: &Path) -> Result<Self, DataDirError> {
        let mut inv = Inventory {
            shards_file: dir.join(SHARDS_FILE).exists(),
            ..Inventory::default()
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(inv),
            Err(e) => return Err(io_err("reading", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("reading", dir))?;
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("shard-"))
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            if !entry.path().is_dir() {
                continue;
            }
            inv.shard_dirs.push(n);
            inv.segments += count_segments(&entry.path())?;
        }
        inv.shard_dirs.sort_unstable();
        Ok(inv)
    }

    /// Whether the directory holds data written by an earlier start; `None` if it is fresh,
    /// else a description of what was found.
    pub fn evidence(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.shards_file {
            parts.push(SHARDS_FILE.to_owned());
        }
        if self.segments > 0 {
            parts.push(format!(
                "{} log segments in {} shard directories",
                self.segments,
                self.shard_dirs.len()
            ));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

fn count_segments(dir: &Path) -> Result<usize, DataDirError> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).map_err(io_err("reading", dir))? {
        let entry = entry.map_err(io_err("reading", dir))?;
        if entry
            .file_name()
            .to_str()
            .and_then(storage::segment::parse_segment_file_name)
            .is_some()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// How to repair a damaged `SHARDS`, from the shard directories present.
fn shards_advice(dir: &Path, inv: &Inventory) -> String {
    let path = dir.join(SHARDS_FILE);
    let contiguous = inv.shard_dirs.iter().copied().eq(0..inv.shard_dirs.len());
    match inv.shard_dirs.len() {
        0 => format!(
            "No shard-N directory is present, so no data depends on it: delete {} and start \
             again.",
            path.display()
        ),
        n if contiguous => format!(
            "To recover, write the number of shard-N directories present ({n}: shard-0 to \
             shard-{}) into it, e.g. `echo {n} > {}`, and start again with --shards {n}.",
            n - 1,
            path.display()
        ),
        _ => format!(
            "The shard directories present ({}) are not shard-0 to shard-N: check that none was \
             lost, then write the shard count (highest N + 1) into {}.",
            inv.shard_dirs
                .iter()
                .map(|n| format!("shard-{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            path.display()
        ),
    }
}

/// Refuses to start with a shard count different from the one the data was written with (users'
/// home shards, and so where their mailboxes live, depend on it); writes `SHARDS` on first start.
pub fn check_layout(dir: &Path, shards: usize, inv: &Inventory) -> Result<(), DataDirError> {
    let path = dir.join(SHARDS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let had = match text.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(DataDirError::ShardsDamaged {
                        path,
                        dir: dir.to_owned(),
                        found: text.chars().take(64).collect(),
                        advice: shards_advice(dir, inv),
                    })
                }
            };
            if had != shards {
                return Err(DataDirError::ShardCountMismatch {
                    dir: dir.to_owned(),
                    had,
                    configured: shards,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_durable(dir, SHARDS_FILE, format!("{shards}\n").as_bytes(), 0o644)
                .map_err(io_err("writing", &path))
        }
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// Loads the server's static key from `dir/server.key`. When it is missing, a new one is
/// generated only if the directory holds no shard data (`inv`) or `allow_new` is set
/// (`new_server_key`). `server.pub` is (re)written whenever it does not match the key.
pub fn load_server_key(
    dir: &Path,
    inv: &Inventory,
    allow_new: bool,
) -> Result<StaticKeypair, DataDirError> {
    let path = dir.join(SERVER_KEY_FILE);
    let kp = match std::fs::read(&path) {
        Ok(bytes) => {
            let len = bytes.len();
            let private: [u8; 32] =
                bytes
                    .try_into()
                    .map_err(|_| DataDirError::ServerKeyDamaged {
                        path: path.clone(),
                        len,
                    })?;
            StaticKeypair::from_private(private)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match (inv.evidence(), allow_new) {
                (Some(evidence), false) => {
                    return Err(DataDirError::ServerKeyMissing {
                        key: path,
                        dir: dir.to_owned(),
                        evidence,
                    })
                }
                (Some(evidence), true) => tracing::warn!(
                    path = %path.display(), %evidence,
                    "server.key missing beside shard data; new_server_key is set: generating a new server identity"
                ),
                (None, _) => tracing::info!(path = %path.display(), "generating the server key"),
            }
            let kp = StaticKeypair::generate();
            write_durable(dir, SERVER_KEY_FILE, &kp.private, 0o600)
                .map_err(io_err("writing", &path))?;
            kp
        }
        Err(e) => return Err(io_err("reading", &path)(e)),
    };
    write_server_pub(dir, &kp)?;
    Ok(kp)
}

/// Rewrites `server.pub` if it is missing or does not match `kp` (a crash between writing the
/// key and its public half, or a key restored from a backup).
fn write_server_pub(dir: &Path, kp: &StaticKeypair) -> Result<(), DataDirError> {
    let path = dir.join(SERVER_PUB_FILE);
    let want = format!("{}\n", hex::encode(kp.public));
    if std::fs::read_to_string(&path).is_ok_and(|s| s == want) {
        return Ok(());
    }
    write_durable(dir, SERVER_PUB_FILE, want.as_bytes(), 0o644).map_err(io_err("writing", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_durable_replaces_whole_file_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".x.tmp"), b"leftover").unwrap();
        write_durable(d.path(), "x", b"one", 0o600).unwrap();
        write_durable(d.path(), "x", b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"two");
        assert!(!d.path().join(".x.tmp").exists());
    }

    #[test]
    fn damaged_shards_advice_counts_shard_dirs() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..3 {
            std::fs::create_dir(shard_dir(d.path(), i)).unwrap();
        }
        std::fs::write(d.path().join(SHARDS_FILE), b"").unwrap();
        let inv = Inventory::read(d.path()).unwrap();
        assert_eq!(inv.shard_dirs, vec![0, 1, 2]);
        let e = check_layout(d.path(), 3, &inv).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("echo 3 >"), "{e}");
        assert!(!e.contains("--shards 0"), "{e}");
        std::fs::write(d.path().join(SHARDS_FILE), b"0\n").unwrap();
        let e = check_layout(d.path(), 3, &inv).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
    }

    #[test]
    fn key_is_created_on_a_fresh_dir_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let inv = Inventory::read(d.path()).unwrap();
        assert_eq!(inv.evidence(), None);
        let a = load_server_key(d.path(), &inv, false).unwrap();
        let b = load_server_key(d.path(), &inv, false).unwrap();
        assert_eq!(a.public, b.public);
        let pubtext = std::fs::read_to_string(d.path().join(SERVER_PUB_FILE)).unwrap();
        assert_eq!(pubtext.trim(), hex::encode(a.public));
    }

    #[test]
    fn missing_key_beside_shard_data_needs_new_server_key() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(SHARDS_FILE), b"1\n").unwrap();
        let inv = Inventory::read(d.path()).unwrap();
        let e = load_server_key(d.path(), &inv, false).unwrap_err();
        assert!(matches!(e, DataDirError::ServerKeyMissing { .. }), "{e}");
        assert!(!d.path().join(SERVER_KEY_FILE).exists());
        load_server_key(d.path(), &inv, true).unwrap();
        assert!(d.path().join(SERVER_KEY_FILE).exists());
    }
}
