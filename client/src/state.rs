//! The device's state directory: its static key, the pinned server key, the account.
//!
//! Files (all small, all written atomically: temporary file, fsync, rename or link, fsync of
//! the directory):
//!
//! | file | content |
//! |---|---|
//! | `identity.key` | the device's X25519 static private key, 64 hex digits and a newline, mode 0600. Created once, never overwritten by the SDK. It *is* the device credential: whoever holds it can log in as this device. |
//! | `server.pub` | the server's static public key, 64 hex digits, pinned on first use (TOFU). |
//! | `account.json` | `{"user": 14155550100, "device": 0}`, written after registration. |
//! | `seen.txt` | optional: the dedup cache (see [`crate::DedupCache`]). |
//! | `e2ee/` | with end-to-end encryption ([`crate::secure`]): `e2ee.key` (mode 0600), the encrypted `e2ee.state` (identity, prekeys, sessions, known identities; `docs/e2ee.md` §7), and `published` (the identity the server last confirmed). |

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use protocol::noise::{StaticKeypair, KEY_BYTES};
use protocol::{DeviceId, UserId};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File holding the device's static private key.
pub const IDENTITY_FILE: &str = "identity.key";
/// File holding the pinned server static public key.
pub const SERVER_KEY_FILE: &str = "server.pub";
/// File holding the registered account.
pub const ACCOUNT_FILE: &str = "account.json";
/// File holding the persisted dedup cache.
pub const DEDUP_FILE: &str = "seen.txt";

/// The account this device is registered as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The user id: the phone number as an integer.
    pub user: UserId,
    /// The device id the server bound to this device's key.
    pub device: DeviceId,
}

/// A device identity: its Noise static key pair and, when persisted, the state directory it
/// lives in (which also holds the pinned server key and the account).
#[derive(Clone)]
pub struct Identity {
    keypair: StaticKeypair,
    state_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &hex::encode(self.keypair.public))
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Opens the identity in `state_dir`, creating the directory (mode 0700) and a fresh key
    /// (`identity.key`, mode 0600) if there is none. Two processes racing to create it end up
    /// with the same key: the file is linked into place only if absent.
    pub fn load_or_create(state_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = state_dir.as_ref().to_path_buf();
        create_dir_private(&dir)?;
        let path = dir.join(IDENTITY_FILE);
        if !path.exists() {
            let keypair = StaticKeypair::generate();
            let text = format!("{}\n", hex::encode(keypair.private));
            create_new_atomic(&path, text.as_bytes())?;
            tracing::info!(path = %path.display(), public_key = %hex::encode(keypair.public), "created device identity");
        }
        let keypair = StaticKeypair::from_private(read_key_file(&path)?);
        warn_if_readable_by_others(&path);
        Ok(Self {
            keypair,
            state_dir: Some(dir),
        })
    }

    /// A fresh identity that lives only in memory: nothing is persisted and no server key is
    /// pinned (use [`crate::ServerKeyPolicy::Expect`] to check the server). For tests, benches
    /// and load generators.
    pub fn ephemeral() -> Self {
        Self {
            keypair: StaticKeypair::generate(),
            state_dir: None,
        }
    }

    /// An identity from an existing key pair, optionally tied to a state directory (used for
    /// the server pin and the account; `identity.key` is not written).
    pub fn from_keypair(keypair: StaticKeypair, state_dir: Option<PathBuf>) -> Self {
        Self { keypair, state_dir }
    }

    /// The device's static public key (its credential as the server sees it).
    pub fn public_key(&self) -> [u8; KEY_BYTES] {
        self.keypair.public
    }

    /// The key pair used in the Noise handshake.
    pub fn keypair(&self) -> &StaticKeypair {
        &self.keypair
    }

    /// The state directory, if persisted.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// The server key pinned in `server.pub`, if any (always `None` without a state directory).
    pub fn pinned_server_key(&self) -> Result<Option<[u8; KEY_BYTES]>> {
        let Some(dir) = &self.state_dir else {
            return Ok(None);
        };
        let path = dir.join(SERVER_KEY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        read_key_file(&path).map(Some)
    }

    /// Pins `key` as the server's key in `server.pub`, replacing any earlier pin. A no-op
    /// without a state directory.
    pub fn pin_server_key(&self, key: &[u8; KEY_BYTES]) -> Result<()> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        write_atomic(
            &dir.join(SERVER_KEY_FILE),
            format!("{}\n", hex::encode(key)).as_bytes(),
        )
    }

    /// The account saved after registration, if any.
    pub fn account(&self) -> Result<Option<Account>> {
        let Some(dir) = &self.state_dir else {
            return Ok(None);
        };
        let path = dir.join(ACCOUNT_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::state(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::corrupt(path, e.to_string()))
    }

    /// Saves the account (after registration). A no-op without a state directory.
    pub fn save_account(&self, account: &Account) -> Result<()> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        let mut text = serde_json::to_string_pretty(account).unwrap_or_default();
        text.push('\n');
        write_atomic(&dir.join(ACCOUNT_FILE), text.as_bytes())
    }

    /// The account, or [`Error::NotRegistered`].
    pub fn require_account(&self) -> Result<Account> {
        self.account()?.ok_or_else(|| Error::NotRegistered {
            path: self.state_dir.clone().unwrap_or_default(),
        })
    }
}

fn read_key_file(path: &Path) -> Result<[u8; KEY_BYTES]> {
    let text = fs::read_to_string(path).map_err(|e| Error::state(path, e))?;
    let bytes =
        hex::decode(text.trim()).map_err(|e| Error::corrupt(path, format!("not hex: {e}")))?;
    <[u8; KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
        Error::corrupt(
            path,
            format!("expected {KEY_BYTES} bytes, found {}", bytes.len()),
        )
    })
}

fn create_dir_private(dir: &Path) -> Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|e| Error::state(dir, e))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "device key is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// A temporary file beside `path`, created exclusively (mode 0600 on Unix).
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(|e| Error::state(&tmp, e))?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::state(&tmp, e));
    }
    Ok(tmp)
}

/// Makes a rename or link in `dir` durable (Unix; elsewhere a no-op).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Replaces `path` with `bytes` atomically (every state file is created 0600).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::state(path, e));
    }
    sync_dir(path.parent().unwrap_or_else(|| Path::new(".")));
    Ok(())
}

/// Creates `path` with `bytes` atomically unless it already exists (then leaves it alone).
fn create_new_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::state(path, e)),
    }
    sync_dir(path.parent().unwrap_or_else(|| Path::new(".")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("nested/state");
        let a = Identity::load_or_create(&state).unwrap();
        let b = Identity::load_or_create(&state).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let text = fs::read_to_string(state.join(IDENTITY_FILE)).unwrap();
        assert_eq!(text.trim().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(state.join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = fs::metadata(&state).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn corrupt_identity_is_an_error_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), "nope\n").unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(Error::CorruptState { .. })
        ));
        assert_eq!(
            fs::read_to_string(dir.path().join(IDENTITY_FILE)).unwrap(),
            "nope\n"
        );
    }

    #[test]
    fn pin_and_account_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(id.pinned_server_key().unwrap(), None);
        id.pin_server_key(&[7u8; 32]).unwrap();
        assert_eq!(id.pinned_server_key().unwrap(), Some([7u8; 32]));
        assert_eq!(id.account().unwrap(), None);
        assert!(matches!(
            id.require_account(),
            Err(Error::NotRegistered { .. })
        ));
        let acct = Account {
            user: 14155550100,
            device: 0,
        };
        id.save_account(&acct).unwrap();
        assert_eq!(id.account().unwrap(), Some(acct));
    }

    #[test]
    fn ephemeral_persists_nothing() {
        let id = Identity::ephemeral();
        id.pin_server_key(&[1u8; 32]).unwrap();
        assert_eq!(id.pinned_server_key().unwrap(), None);
        assert_eq!(id.account().unwrap(), None);
    }
}
