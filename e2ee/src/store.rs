//! The local key store: one file, encrypted at rest, written atomically.
//!
//! File layout:
//!
//! ```text
//! 0   8   magic "SBE2EEv1"
//! 8   12  nonce (random per write)
//! 20  ..  AES-256-GCM(store key, nonce, state bytes, AAD = bytes 0..20) || 16-byte tag
//! ```
//!
//! The store key is either supplied by the caller ([`StoreKey::from_bytes`], e.g. from the
//! OS keychain) or a random 32-byte key file created with mode 0600 next to the state
//! ([`StoreKey::load_or_create`]). Threat model (docs/e2ee.md): the encryption protects the
//! state file when it is copied away without the key (backups, sync folders, another user
//! reading a world-readable state file); it does not protect against an attacker who can read
//! the key file as the same OS user, nor against one who controls the process.
//!
//! Writes: temp file (same directory, mode 0600) → write → fsync → rename over the state
//! file → fsync the directory. A crash leaves the old or the new state, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::error::Error;
use crate::kdf::{aes_gcm_open, aes_gcm_seal};

/// First 8 bytes of a state file.
pub const MAGIC: &[u8; 8] = b"SBE2EEv1";
/// Header length (magic + nonce).
pub const HEADER_LEN: usize = 20;
/// The state file's name inside the state directory.
pub const STATE_FILE_NAME: &str = "e2ee.state";
/// The key file's name inside the state directory.
pub const KEY_FILE_NAME: &str = "e2ee.key";
/// Largest state file read (64 MiB): a bound, not an expectation.
pub const MAX_STATE_FILE_BYTES: u64 = 64 << 20;

/// The 32-byte AES-256-GCM key of the state file (zeroized on drop).
#[derive(Clone)]
pub struct StoreKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

impl StoreKey {
    /// A caller-provided key.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(Zeroizing::new(key))
    }

    /// Reads the 32-byte key file at `path`, or creates it (random, mode 0600, fsync'd,
    /// created exclusively so two processes never write two keys).
    pub fn load_or_create(path: &Path) -> Result<Self, Error> {
        match File::open(path) {
            Ok(mut f) => {
                let mut key = Zeroizing::new([0u8; 32]);
                f.read_exact(&mut key[..])?;
                let mut extra = [0u8; 1];
                if f.read(&mut extra)? != 0 {
                    return Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "key file is longer than 32 bytes",
                    )));
                }
                Ok(Self(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(&mut key[..]);
                let mut f = create_private(path, true)?;
                f.write_all(&key[..])?;
                f.sync_all()?;
                sync_dir(path)?;
                Ok(Self(key))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn create_private(path: &Path, exclusive: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true);
    if exclusive {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    // IMPORTANT: fsync the directory so that the new directory entry itself is durable.
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Where the state lives and the key that encrypts it.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
    key: StoreKey,
}

impl StateStore {
    /// A store at `state_file` encrypted under `key`.
    pub fn new(state_file: impl Into<PathBuf>, key: StoreKey) -> Self {
        Self {
            path: state_file.into(),
            key,
        }
    }

    /// The usual layout: `dir/e2ee.state` under the key file `dir/e2ee.key` (created if
    /// absent). Creates `dir` with mode 0700 if needed.
    pub fn open_dir(dir: &Path) -> Result<Self, Error> {
        if !dir.exists() {
            let mut b = fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                b.mode(0o700);
            }
            b.create(dir)?;
        }
        let key = StoreKey::load_or_create(&dir.join(KEY_FILE_NAME))?;
        Ok(Self::new(dir.join(STATE_FILE_NAME), key))
    }

    /// The state file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and decrypts the state file; `None` if there is none yet.
    pub fn load(&self) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Vec::new();
        f.take(MAX_STATE_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "state file larger than MAX_STATE_FILE_BYTES",
            )));
        }
        open_file_bytes(&self.key, &bytes).map(Some)
    }

    /// Encrypts `state` and replaces the state file atomically (temp, fsync, rename, fsync
    /// directory).
    pub fn save(&self, state: &[u8]) -> Result<(), Error> {
        let bytes = seal_file_bytes(&self.key, state, &mut rand::rngs::OsRng);
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = create_private(&tmp, false)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &self.path)?;
        sync_dir(&self.path)?;
        Ok(())
    }
}

/// `magic ‖ nonce ‖ AES-256-GCM(key, nonce, state, aad = magic ‖ nonce)`.
pub fn seal_file_bytes<R: RngCore + CryptoRng + ?Sized>(
    key: &StoreKey,
    state: &[u8],
    rng: &mut R,
) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(HEADER_LEN + state.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    let ct = aes_gcm_seal(&key.0, &nonce, state, &out);
    out.extend_from_slice(&ct);
    out
}

/// Inverse of [`seal_file_bytes`]; any damage or a wrong key is [`Error::StoreDecryptFailed`].
pub fn open_file_bytes(key: &StoreKey, bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    let (header, ct) = bytes
        .split_at_checked(HEADER_LEN)
        .ok_or(Error::StoreDecryptFailed)?;
    let (magic, nonce) = header.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(Error::StoreDecryptFailed);
    }
    let mut n = [0u8; 12];
    n.copy_from_slice(nonce);
    aes_gcm_open(&key.0, &n, ct, header).map_err(|_| Error::StoreDecryptFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open_dir(&dir.path().join("state")).unwrap();
        assert!(store.load().unwrap().is_none());
        store.save(b"hello state").unwrap();
        assert_eq!(&store.load().unwrap().unwrap()[..], b"hello state");
        store.save(b"second").unwrap();
        assert_eq!(&store.load().unwrap().unwrap()[..], b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key_mode = fs::metadata(dir.path().join("state").join(KEY_FILE_NAME))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(key_mode & 0o777, 0o600);
            let state_mode = fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(state_mode & 0o777, 0o600);
        }
        // The same key file is read back by a second open.
        let again = StateStore::open_dir(&dir.path().join("state")).unwrap();
        assert_eq!(&again.load().unwrap().unwrap()[..], b"second");
        // Any flipped byte is refused.
        let bytes = fs::read(store.path()).unwrap();
        for i in [0, 9, 25, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(matches!(
                open_file_bytes(&store.key, &b),
                Err(Error::StoreDecryptFailed)
            ));
        }
        // A wrong key is refused.
        let other = StoreKey::from_bytes([7; 32]);
        assert!(matches!(
            open_file_bytes(&other, &bytes),
            Err(Error::StoreDecryptFailed)
        ));
        assert!(matches!(
            open_file_bytes(&other, &bytes[..5]),
            Err(Error::StoreDecryptFailed)
        ));
    }
}
