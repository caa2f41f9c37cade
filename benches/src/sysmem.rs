//! Memory readings: a process's RSS, the kernel's TCP socket accounting and slab usage. Taken
//! before and after a phase, the differences divided by the number of connections give the
//! measured per-connection cost.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Memory of one process, from `/proc/<pid>/status` (bytes).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcMem {
    /// VmRSS.
    pub rss: u64,
    /// RssAnon (heap, stacks: what connections cost in user space).
    pub rss_anon: u64,
    /// Size of the descriptor table (`FDSize`: a power of two at or above the open count). The
    /// descriptors are not listed: listing `/proc/<pid>/fd` allocates a proc inode and a dentry
    /// per descriptor and would pollute the slab measurement.
    pub fd_table: u64,
}

/// Reads `/proc/<pid>/status`; `None` if the process is gone.
pub fn proc_mem(pid: u32) -> Option<ProcMem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut m = ProcMem::default();
    for line in s.lines() {
        let kb = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        if line.starts_with("VmRSS:") {
            m.rss = kb(line);
        } else if line.starts_with("RssAnon:") {
            m.rss_anon = kb(line);
        } else if let Some(v) = line.strip_prefix("FDSize:") {
            m.fd_table = v.trim().parse().unwrap_or(0);
        }
    }
    Some(m)
}

/// Kernel-wide readings (bytes unless named otherwise).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelMem {
    /// `/proc/net/sockstat` TCP `inuse` (sockets).
    pub tcp_inuse: u64,
    /// `/proc/net/sockstat` TCP `alloc` (sockets).
    pub tcp_alloc: u64,
    /// `/proc/net/sockstat` TCP `tw` (TIME_WAIT).
    pub tcp_tw: u64,
    /// `/proc/net/sockstat` TCP `mem` (pages of socket buffers) × page size.
    pub tcp_mem_bytes: u64,
    /// `/proc/meminfo` Slab.
    pub slab: u64,
    /// `/proc/meminfo` SUnreclaim.
    pub slab_unreclaim: u64,
    /// `/proc/slabinfo` bytes (num_objs × objsize) per cache, when readable (root).
    #[serde(skip)]
    pub caches: BTreeMap<String, u64>,
    /// `/proc/slabinfo` objects per cache.
    #[serde(skip)]
    pub cache_objs: BTreeMap<String, u64>,
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Reads sockstat, meminfo and (if readable) slabinfo.
pub fn kernel_mem() -> KernelMem {
    let mut k = KernelMem::default();
    if let Ok(s) = std::fs::read_to_string("/proc/net/sockstat") {
        for line in s.lines().filter(|l| l.starts_with("TCP:")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            for (&key, val) in f.iter().zip(f.iter().skip(1)) {
                let v = val.parse::<u64>().unwrap_or(0);
                match key {
                    "inuse" => k.tcp_inuse = v,
                    "alloc" => k.tcp_alloc = v,
                    "tw" => k.tcp_tw = v,
                    "mem" => k.tcp_mem_bytes = v * page_size(),
                    _ => {}
                }
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
        for line in s.lines() {
            let kb = || {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            if line.starts_with("Slab:") {
                k.slab = kb();
            } else if line.starts_with("SUnreclaim:") {
                k.slab_unreclaim = kb();
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/slabinfo") {
        for line in s.lines().skip(2) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [name, _, num, size, ..] = f.as_slice() else {
                continue;
            };
            let num: u64 = num.parse().unwrap_or(0);
            let size: u64 = size.parse().unwrap_or(0);
            if num > 0 {
                k.caches.insert((*name).to_owned(), num * size);
                k.cache_objs.insert((*name).to_owned(), num);
            }
        }
    }
    k
}

/// The caches that grew most between two readings: (name, bytes, objects), largest first.
pub fn top_cache_growth(
    before: &KernelMem,
    after: &KernelMem,
    n: usize,
) -> Vec<(String, i64, i64)> {
    let mut v: Vec<(String, i64, i64)> = after
        .caches
        .iter()
        .map(|(name, &b)| {
            let b0 = before.caches.get(name).copied().unwrap_or(0);
            let o = after.cache_objs.get(name).copied().unwrap_or(0);
            let o0 = before.cache_objs.get(name).copied().unwrap_or(0);
            (name.clone(), b as i64 - b0 as i64, o as i64 - o0 as i64)
        })
        .filter(|(_, d, _)| *d > 0)
        .collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process_and_kernel() {
        let m = proc_mem(std::process::id()).expect("own status");
        assert!(m.rss > 0 && m.fd_table > 0);
        let k = kernel_mem();
        assert!(k.slab > 0);
    }
}

/// CPU time (user + system) a process has used so far, in seconds (all its threads).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based, man proc).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let hz = match rustix::param::clock_ticks_per_second() {
        0 => 100.0,
        hz => hz as f64,
    };
    Some((utime + stime) / hz)
}

#[cfg(test)]
mod cpu_tests {
    #[test]
    fn own_cpu_time_is_readable() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(super::proc_cpu_secs(std::process::id()).is_some());
    }
}
