//! Provisioned accounts (phone number + device static key, and for multi-device runs the
//! primary's identity keys and the linked companions), cached in a file so later runs against
//! the same daemon data directory skip registration and linking.
//!
//! File format (text, one account per line; v1 files, without the optional fields, still load):
//!
//! ```text
//! # switchboard-flood accounts v2
//! # server <hex of the daemon's static public key>
//! <phone> <hex of the 32-byte private key> [id=<hex identity>] [c=<device>:<hex key>:<hex identity>]...
//! ```
//!
//! An identity is 64 bytes: the X25519 identity private key, then the Ed25519 seed. Only
//! companions the server has linked (with the device id it assigned) are written.

use std::io::Write;
use std::path::Path;

use protocol::noise::StaticKeypair;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use switchboard_e2ee::IdentityKeyPair;

/// One registered account: device 0 of `phone`, and its companion devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Account {
    /// The phone number (user id).
    pub phone: u64,
    /// Hex of the private key.
    pub key: String,
    /// Hex of the primary's identity private keys (see the module docs), once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Companion devices (linked or about to be).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<Companion>,
}

/// A companion device of an account: its own Noise static key and identity keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Companion {
    /// Hex of the Noise static private key.
    pub key: String,
    /// Hex of the identity private keys.
    pub identity: String,
    /// The device id the server assigned when it linked it (`None`: not linked yet).
    pub device: Option<u16>,
}

impl Companion {
    /// A fresh, unlinked companion with random keys.
    pub fn generate() -> Self {
        Self {
            key: hex(&StaticKeypair::generate().private),
            identity: generate_identity(),
            device: None,
        }
    }
}

/// Hex of a fresh identity (64 random bytes: X25519 private key, Ed25519 seed).
pub fn generate_identity() -> String {
    let mut b = [0u8; 64];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

/// The identity key pair of a hex identity (see the module docs).
pub fn identity_pair(hex_identity: &str) -> Option<IdentityKeyPair> {
    let b = unhex(hex_identity)?;
    let (dh, sign) = b.split_first_chunk::<32>()?;
    let sign: [u8; 32] = sign.try_into().ok()?;
    Some(IdentityKeyPair::from_private_bytes(*dh, sign))
}

/// The key pair of a hex static private key.
pub fn static_pair(hex_key: &str) -> Option<StaticKeypair> {
    let b = unhex(hex_key)?;
    let private: [u8; 32] = b.try_into().ok()?;
    Some(StaticKeypair::from_private(private))
}

impl Account {
    /// A fresh account with a random key.
    pub fn generate(phone: u64) -> Self {
        Self {
            phone,
            key: hex(&StaticKeypair::generate().private),
            identity: None,
            companions: Vec::new(),
        }
    }

    /// The key pair.
    pub fn keypair(&self) -> Option<StaticKeypair> {
        static_pair(&self.key)
    }

    /// Companions the server has linked.
    pub fn linked(&self) -> usize {
        self.companions
            .iter()
            .filter(|c| c.device.is_some())
            .count()
    }

    /// One line of the accounts file (without the newline).
    fn line(&self) -> String {
        let mut s = format!("{} {}", self.phone, self.key);
        if let Some(id) = &self.identity {
            s.push_str(&format!(" id={id}"));
        }
        for c in &self.companions {
            if let Some(d) = c.device {
                s.push_str(&format!(" c={d}:{}:{}", c.key, c.identity));
            }
        }
        s
    }

    /// Parses the optional fields after `<phone> <key>`.
    fn parse_extra(&mut self, token: &str) -> Option<()> {
        if let Some(id) = token.strip_prefix("id=") {
            identity_pair(id)?;
            self.identity = Some(id.to_owned());
            return Some(());
        }
        let c = token.strip_prefix("c=")?;
        let mut it = c.split(':');
        let (d, k, id) = (it.next()?, it.next()?, it.next()?);
        let device: u16 = d.parse().ok().filter(|&d| d > 0)?;
        static_pair(k)?;
        identity_pair(id)?;
        self.companions.push(Companion {
            key: k.to_owned(),
            identity: id.to_owned(),
            device: Some(device),
        });
        Some(())
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
        })
        .collect()
}

/// An accounts file: which server the accounts belong to, and the accounts.
#[derive(Clone, Debug, Default)]
pub struct AccountsFile {
    /// Hex of the server static key the accounts were registered with (empty if unknown).
    pub server: String,
    /// The accounts, in index order.
    pub accounts: Vec<Account>,
}

impl AccountsFile {
    /// Reads a file; a missing file is an empty set.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e),
        };
        let mut f = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# server ") {
                f.server = rest.trim().to_owned();
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(p), Some(k)) = (it.next(), it.next()) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: expected `<phone> <hex key>`", path.display(), i + 1),
                ));
            };
            let phone = p.parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: bad phone", path.display(), i + 1),
                )
            })?;
            let mut acc = Account {
                phone,
                key: k.to_owned(),
                identity: None,
                companions: Vec::new(),
            };
            if acc.keypair().is_none() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: bad key", path.display(), i + 1),
                ));
            }
            for token in it {
                if acc.parse_extra(token).is_none() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}:{}: bad field {token:?}", path.display(), i + 1),
                    ));
                }
            }
            f.accounts.push(acc);
        }
        Ok(f)
    }

    /// Writes the file (to a temporary name, then renamed into place).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            writeln!(w, "# switchboard-flood accounts v2")?;
            writeln!(w, "# server {}", self.server)?;
            for a in &self.accounts {
                writeln!(w, "{}", a.line())?;
            }
            w.flush()?;
        }
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acc.txt");
        assert!(AccountsFile::load(&p).unwrap().accounts.is_empty());
        let f = AccountsFile {
            server: "ab".repeat(32),
            accounts: (0..3)
                .map(|i| Account::generate(15_550_000_000 + i))
                .collect(),
        };
        f.save(&p).unwrap();
        let g = AccountsFile::load(&p).unwrap();
        assert_eq!(g.server, f.server);
        assert_eq!(g.accounts.len(), 3);
        assert_eq!(g.accounts[2].key, f.accounts[2].key);
        assert_eq!(
            g.accounts[1].keypair().unwrap().public,
            f.accounts[1].keypair().unwrap().public
        );
    }

    #[test]
    fn companions_round_trip_and_v1_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acc.txt");
        let mut a = Account::generate(15_550_000_000);
        a.identity = Some(generate_identity());
        let mut linked = Companion::generate();
        linked.device = Some(2);
        a.companions = vec![linked.clone(), Companion::generate()];
        let f = AccountsFile {
            server: "cd".repeat(32),
            accounts: vec![a.clone()],
        };
        f.save(&p).unwrap();
        let g = AccountsFile::load(&p).unwrap();
        let b = &g.accounts[0];
        assert_eq!(b.identity, a.identity);
        // Only the linked companion is kept.
        assert_eq!(b.companions.len(), 1);
        assert_eq!(b.companions[0].device, Some(2));
        assert_eq!(b.companions[0].key, linked.key);
        assert!(identity_pair(&b.companions[0].identity).is_some());
        // A v1 line still loads.
        std::fs::write(
            &p,
            format!("# switchboard-flood accounts v1\n15550000001 {}\n", a.key),
        )
        .unwrap();
        let v1 = AccountsFile::load(&p).unwrap();
        assert_eq!(v1.accounts[0].companions.len(), 0);
        assert!(v1.accounts[0].identity.is_none());
    }
}
