//! Provisioned accounts (phone number + device static key), cached in a file so later runs
//! against the same daemon data directory skip registration.
//!
//! File format (text, one account per line):
//!
//! ```text
//! # switchboard-flood accounts v1
//! # server <hex of the daemon's static public key>
//! <phone> <hex of the 32-byte private key>
//! ```

use std::io::Write;
use std::path::Path;

use protocol::noise::StaticKeypair;
use serde::{Deserialize, Serialize};

/// One registered device (device 0 of `phone`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Account {
    /// The phone number (user id).
    pub phone: u64,
    /// Hex of the private key.
    pub key: String,
}

impl Account {
    /// A fresh account with a random key.
    pub fn generate(phone: u64) -> Self {
        Self {
            phone,
            key: hex(&StaticKeypair::generate().private),
        }
    }

    /// The key pair.
    pub fn keypair(&self) -> Option<StaticKeypair> {
        let b = unhex(&self.key)?;
        let private: [u8; 32] = b.try_into().ok()?;
        Some(StaticKeypair::from_private(private))
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
            let acc = Account {
                phone,
                key: k.to_owned(),
            };
            if acc.keypair().is_none() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: bad key", path.display(), i + 1),
                ));
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
            writeln!(w, "# switchboard-flood accounts v1")?;
            writeln!(w, "# server {}", self.server)?;
            for a in &self.accounts {
                writeln!(w, "{} {}", a.phone, a.key)?;
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
}
