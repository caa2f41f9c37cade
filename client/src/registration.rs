//! Helpers for registration: phone numbers, codes, and the development server's code file.
//!
//! The server delivers the one-time code out of band (SMS in production). The development SMS
//! sender appends each code as a line to `<data_dir>/sms/<phone>.txt`, newest last;
//! [`CodeFile`] watches that file so a test or the `chat register --data-dir` command can pick
//! up the code that was sent *after* the request, not an older one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use protocol::addr::is_valid_user_id;
use protocol::UserId;

use crate::error::{Error, Result};

/// Parses a phone number in E.164 form into a [`UserId`]. Accepts `14155550100`,
/// `+14155550100` and `+1 415-555-0100` (spaces, dashes, dots and parentheses are ignored).
pub fn parse_phone(s: &str) -> Result<UserId> {
    let t = s.trim();
    if !t.starts_with(|c: char| c == '+' || c == '(' || c.is_ascii_digit()) {
        return Err(Error::InvalidPhone(s.to_owned()));
    }
    let digits: String = t
        .trim_start_matches('+')
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidPhone(s.to_owned()));
    }
    match digits.parse::<UserId>() {
        Ok(id) if is_valid_user_id(id) && !digits.starts_with('0') => Ok(id),
        _ => Err(Error::InvalidPhone(s.to_owned())),
    }
}

/// Parses a registration code typed by a person (`123456`, `123 456`, `123-456`).
pub fn parse_code(s: &str) -> Result<u32> {
    let digits: String = s
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .collect();
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidCode(s.to_owned()));
    }
    digits.parse().map_err(|_| Error::InvalidCode(s.to_owned()))
}

/// Extracts the code from one line of the development code file. Accepted shapes: the bare
/// code (`123456`), `code=123456` / `code: 123456` anywhere in the line, or else the first run
/// of exactly six digits (`2024-05-01T10:00:00Z 14155550100 123456` gives `123456`).
pub fn parse_code_line(line: &str) -> Option<u32> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    if line.len() <= 9 && line.bytes().all(|b| b.is_ascii_digit()) {
        return line.parse().ok();
    }
    let lower = line.to_ascii_lowercase();
    if let Some(at) = lower.find("code") {
        let rest = line.get(at + 4..).unwrap_or_default();
        let rest = rest
            .trim_start_matches(|c: char| c == '=' || c == ':' || c == '"' || c.is_whitespace());
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && digits.len() <= 9 {
            return digits.parse().ok();
        }
    }
    digit_runs(line)
        .find(|r| r.len() == 6)
        .and_then(|r| r.parse().ok())
}

fn digit_runs(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|r| !r.is_empty())
}

/// Watches the development server's code file for a code newer than the ones present when
/// the watch started.
#[derive(Clone, Debug)]
pub struct CodeFile {
    path: PathBuf,
    lines_at_start: usize,
}

impl CodeFile {
    /// Where the development server writes codes for `phone`: `<data_dir>/sms/<phone>.txt`.
    pub fn default_path(data_dir: &Path, phone: UserId) -> PathBuf {
        data_dir.join("sms").join(format!("{phone}.txt"))
    }

    /// Starts watching `path`. Call this *before* sending the `RegisterRequest`, so that the
    /// code the request produces is told apart from older ones.
    pub fn watch(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let lines_at_start = read_code_lines(&path).map(|v| v.len()).unwrap_or(0);
        Self {
            path,
            lines_at_start,
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest code in the file, whenever it was written.
    pub fn latest(&self) -> Result<Option<u32>> {
        Ok(read_code_lines(&self.path)?.last().copied())
    }

    /// The newest code written since [`CodeFile::watch`], if one is there yet. If the file was
    /// replaced by a shorter one, its newest code counts as new.
    pub fn poll_new(&self) -> Result<Option<u32>> {
        let codes = read_code_lines(&self.path)?;
        if codes.len() != self.lines_at_start {
            return Ok(codes.last().copied());
        }
        Ok(None)
    }

    /// Waits up to `timeout` for a new code, checking every `interval`.
    pub fn wait_new(&self, timeout: Duration, interval: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.poll_new()? {
                return Ok(code);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: "registration code in the code file",
                });
            }
            std::thread::sleep(interval.min(deadline - now));
        }
    }
}

/// The codes in the file, oldest first (lines without a code are skipped). A missing file has
/// none.
fn read_code_lines(path: &Path) -> Result<Vec<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(parse_code_line).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::state(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones() {
        assert_eq!(parse_phone("14155550100").unwrap(), 14155550100);
        assert_eq!(parse_phone("+1 (415) 555-0100").unwrap(), 14155550100);
        for bad in ["", "+", "0123", "1234567890123456", "12a4", "-1"] {
            assert!(
                matches!(parse_phone(bad), Err(Error::InvalidPhone(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn codes() {
        assert_eq!(parse_code(" 123 456\n").unwrap(), 123456);
        assert_eq!(parse_code("012345").unwrap(), 12345);
        assert!(parse_code("12x").is_err());
        assert!(parse_code("").is_err());
        assert!(parse_code("1234567890").is_err());
    }

    #[test]
    fn code_lines() {
        assert_eq!(parse_code_line("123456"), Some(123456));
        assert_eq!(parse_code_line("  042017 "), Some(42017));
        assert_eq!(
            parse_code_line("phone=14155550100 code=654321 expires=1714557600"),
            Some(654321)
        );
        assert_eq!(
            parse_code_line(r#"{"phone":14155550100,"code":111222}"#),
            Some(111222)
        );
        assert_eq!(
            parse_code_line("2024-05-01T10:00:00Z 14155550100 123456"),
            Some(123456)
        );
        assert_eq!(parse_code_line(""), None);
        assert_eq!(parse_code_line("no digits here"), None);
    }

    #[test]
    fn code_file_sees_only_new_codes() {
        let dir = tempfile::tempdir().unwrap();
        let path = CodeFile::default_path(dir.path(), 14155550100);
        assert!(path.ends_with("sms/14155550100.txt"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "111111\n").unwrap();
        let w = CodeFile::watch(&path);
        assert_eq!(w.latest().unwrap(), Some(111111));
        assert_eq!(w.poll_new().unwrap(), None);
        assert!(matches!(
            w.wait_new(Duration::from_millis(30), Duration::from_millis(10)),
            Err(Error::Timeout { .. })
        ));
        std::fs::write(&path, "111111\n222222\n").unwrap();
        assert_eq!(
            w.wait_new(Duration::from_secs(1), Duration::from_millis(10))
                .unwrap(),
            222222
        );
    }

    #[test]
    fn missing_code_file_is_empty() {
        let w = CodeFile::watch("/nonexistent/switchboard/sms/1.txt");
        assert_eq!(w.latest().unwrap(), None);
        assert_eq!(w.poll_new().unwrap(), None);
    }
}
