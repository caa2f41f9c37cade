//! Pure parsers for the `/proc` formats the preflight reads.
//!
//! Every function takes the file's text (as read, trailing newline included)
//! and a `what` label used in errors, so they can be unit-tested on strings.

use crate::{Error, Result};

fn bad(what: &str, input: &str) -> Error {
    let mut input = input.trim().to_owned();
    if input.len() > 120 {
        let mut cut = 120;
        while !input.is_char_boundary(cut) {
            cut -= 1;
        }
        input.truncate(cut);
        input.push('…');
    }
    Error::Parse {
        what: what.to_owned(),
        input,
    }
}

/// Parses a single unsigned integer, e.g. `/proc/sys/fs/file-max` (`"2466170\n"`).
pub fn parse_u64(what: &str, s: &str) -> Result<u64> {
    s.trim().parse().map_err(|_| bad(what, s))
}

/// Parses exactly `N` whitespace-separated unsigned integers, e.g.
/// `/proc/sys/net/ipv4/tcp_mem` (`"287898\t383867\t575796\n"`).
pub fn parse_u64_array<const N: usize>(what: &str, s: &str) -> Result<[u64; N]> {
    let mut out = [0u64; N];
    let mut it = s.split_whitespace();
    for slot in out.iter_mut() {
        *slot = it
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad(what, s))?;
    }
    if it.next().is_some() {
        return Err(bad(what, s));
    }
    Ok(out)
}

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` (`"32768\t60999\n"`) into
/// `(low, high)`, both inclusive. Rejects `low > high` and ports above 65535.
pub fn parse_port_range(what: &str, s: &str) -> Result<(u32, u32)> {
    let [lo, hi] = parse_u64_array::<2>(what, s)?;
    if lo > hi || hi > 65535 {
        return Err(bad(what, s));
    }
    Ok((lo as u32, hi as u32))
}

/// The two `/proc/meminfo` figures the preflight uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`, bytes.
    pub total_bytes: u64,
    /// `MemAvailable`, bytes (the kernel's estimate of memory usable without swapping).
    pub available_bytes: u64,
}

/// Parses `/proc/meminfo` (`"MemTotal:       24684084 kB\n..."`).
///
/// Both `MemTotal` and `MemAvailable` must be present (MemAvailable exists since
/// Linux 3.14); values are converted from kB (KiB, in fact) to bytes.
pub fn parse_meminfo(s: &str) -> Result<MemInfo> {
    let mut total = None;
    let mut avail = None;
    for line in s.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut avail,
            _ => continue,
        };
        let mut parts = rest.split_whitespace();
        let n: u64 = parts
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad("/proc/meminfo", line))?;
        let mult = match parts.next() {
            Some("kB") => 1024,
            None => 1,
            Some(_) => return Err(bad("/proc/meminfo", line)),
        };
        *slot = Some(n.saturating_mul(mult));
    }
    match (total, avail) {
        (Some(total_bytes), Some(available_bytes)) => Ok(MemInfo {
            total_bytes,
            available_bytes,
        }),
        _ => Err(bad("/proc/meminfo (MemTotal/MemAvailable)", s)),
    }
}

/// Parses `/proc/sys/fs/file-nr` (`"485\t0\t2466170\n"`: allocated, free, max)
/// and returns the number of file handles currently allocated system-wide.
pub fn parse_file_nr(s: &str) -> Result<u64> {
    let [allocated, _free, _max] = parse_u64_array::<3>("/proc/sys/fs/file-nr", s)?;
    Ok(allocated)
}

/// Parses the `CapEff:` line of `/proc/self/status` (hex bitmask of effective
/// capabilities).
pub fn parse_cap_eff(status: &str) -> Result<u64> {
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("CapEff:") {
            return u64::from_str_radix(rest.trim(), 16)
                .map_err(|_| bad("/proc/self/status CapEff", line));
        }
    }
    Err(bad("/proc/self/status (no CapEff line)", ""))
}

/// Parses the `major.minor` prefix of a kernel release string
/// (`"6.18.44-fc-v669"` → `(6, 18)`). Returns `None` for unparsable strings.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-', '+', '_']);
    let major = it.next()?.parse().ok()?;
    let minor_str = it.next()?;
    let digits: String = minor_str.chars().take_while(char::is_ascii_digit).collect();
    let minor = digits.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_value() {
        assert_eq!(parse_u64("x", "2466170\n").unwrap(), 2_466_170);
        assert_eq!(parse_u64("x", "  4096 ").unwrap(), 4096);
        assert!(parse_u64("x", "").is_err());
        assert!(parse_u64("x", "-1\n").is_err());
        assert!(parse_u64("x", "12 13\n").is_err());
    }

    #[test]
    fn triples_tab_separated() {
        let v = parse_u64_array::<3>("tcp_mem", "287898\t383867\t575796\n").unwrap();
        assert_eq!(v, [287_898, 383_867, 575_796]);
        let v = parse_u64_array::<3>("tcp_rmem", "4096\t131072\t33554432\n").unwrap();
        assert_eq!(v, [4096, 131_072, 33_554_432]);
        assert!(parse_u64_array::<3>("x", "1 2\n").is_err());
        assert!(parse_u64_array::<3>("x", "1 2 3 4\n").is_err());
        assert!(parse_u64_array::<3>("x", "1 two 3\n").is_err());
    }

    #[test]
    fn port_range() {
        assert_eq!(
            parse_port_range("r", "32768\t60999\n").unwrap(),
            (32768, 60999)
        );
        assert_eq!(parse_port_range("r", "1024 65535").unwrap(), (1024, 65535));
        assert!(parse_port_range("r", "60999 32768").is_err());
        assert!(parse_port_range("r", "1024 70000").is_err());
    }

    #[test]
    fn meminfo() {
        let s = "MemTotal:       24684084 kB\nMemFree:        23547596 kB\n\
                 MemAvailable:   24295244 kB\nBuffers:            2048 kB\n\
                 HugePages_Total:       0\n";
        let m = parse_meminfo(s).unwrap();
        assert_eq!(m.total_bytes, 24_684_084 * 1024);
        assert_eq!(m.available_bytes, 24_295_244 * 1024);
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 1 MB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn file_nr() {
        assert_eq!(parse_file_nr("485\t0\t2466170\n").unwrap(), 485);
        assert!(parse_file_nr("485\n").is_err());
    }

    #[test]
    fn cap_eff() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        let caps = parse_cap_eff(status).unwrap();
        assert_eq!(caps, 0x1fffeffffff);
        // bit 24 = CAP_SYS_RESOURCE is clear, bit 14 = CAP_IPC_LOCK is set.
        assert_eq!(caps & (1 << 24), 0);
        assert_ne!(caps & (1 << 14), 0);
        assert!(parse_cap_eff("Name:\tcat\n").is_err());
        assert!(parse_cap_eff("CapEff:\tzz\n").is_err());
    }

    #[test]
    fn kernel_version() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic\n"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1-rc3"), Some((6, 1)));
        assert_eq!(parse_kernel_version("6.8+"), Some((6, 8)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert_eq!(parse_kernel_version(""), None);
    }
}
