//! Reading the live host.
//!
//! [`read_host`] is the only function in this crate with side effects: it
//! calls `getrlimit`, `uname`, `sched_getaffinity` (through `rustix`), reads
//! the page size from the auxiliary vector, reads `/proc`,
//! and creates (and immediately drops) an 8-entry io_uring to prove
//! `io_uring_setup(2)` works for this process.

use serde::{Deserialize, Serialize};

use crate::parse;
use crate::{Error, Result};

/// `CAP_IPC_LOCK` bit in the capability mask (exempts io_uring pinned buffers
/// from `RLIMIT_MEMLOCK` accounting).
pub const CAP_IPC_LOCK: u32 = 14;
/// `CAP_SYS_ADMIN` bit (exempts the holder from `fs.file-max`).
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_SYS_RESOURCE` bit (allows raising a hard rlimit).
pub const CAP_SYS_RESOURCE: u32 = 24;

/// A resource limit pair. `None` means `RLIM_INFINITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Soft (enforced) limit; a process may raise it up to `hard` without privilege.
    pub soft: Option<u64>,
    /// Hard limit; raising it needs `CAP_SYS_RESOURCE`.
    pub hard: Option<u64>,
}

/// Conntrack table state, present only when `nf_conntrack` is loaded
/// (built in or as a module) in this network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conntrack {
    /// `net.netfilter.nf_conntrack_max`.
    pub max: u64,
    /// `net.netfilter.nf_conntrack_count` (entries in use now), if readable.
    pub count: Option<u64>,
}

/// Result of probing io_uring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoUringStatus {
    /// Whether `io_uring_setup(2)` succeeded for an 8-entry ring.
    pub setup_ok: bool,
    /// The error from `io_uring_setup(2)` when it failed.
    pub error: Option<String>,
    /// `kernel.io_uring_disabled` (Linux 6.6+): 0 enabled, 1 only for
    /// `kernel.io_uring_group` members / CAP_SYS_ADMIN, 2 disabled. `None` when
    /// the sysctl does not exist.
    pub io_uring_disabled: Option<u64>,
    /// Why the gateway's ring connection core (`connection_core = "uring"`: multishot receive
    /// and provided-buffer rings, Linux >= 6.0) cannot run here; `None` when it can.
    #[serde(default)]
    pub ring_core_error: Option<String>,
    /// Why the ring core's default `uring_task_work = "defer"` (`IORING_SETUP_DEFER_TASKRUN`
    /// with `SINGLE_ISSUER`, Linux >= 6.1) cannot be set up here, in which case the gateway
    /// falls back to `coop`; `None` when it can.
    #[serde(default)]
    pub task_work_error: Option<String>,
}

/// Effective capabilities of the reading process (from `/proc/self/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `CAP_SYS_RESOURCE`: may raise hard rlimits (e.g. `ulimit -Hn`).
    pub sys_resource: bool,
    /// `CAP_IPC_LOCK`: io_uring pinned memory is not charged to `RLIMIT_MEMLOCK`.
    pub ipc_lock: bool,
    /// `CAP_SYS_ADMIN`: `fs.file-max` does not apply.
    pub sys_admin: bool,
}

impl Capabilities {
    /// Decodes an effective-capability bitmask.
    pub fn from_mask(mask: u64) -> Self {
        let has = |bit: u32| mask & (1u64 << bit) != 0;
        Capabilities {
            sys_resource: has(CAP_SYS_RESOURCE),
            ipc_lock: has(CAP_IPC_LOCK),
            sys_admin: has(CAP_SYS_ADMIN),
        }
    }
}

/// Everything the capacity arithmetic needs, as read from a host.
///
/// All fields are plain data so tests can build one by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReadings {
    /// `uname -r`.
    pub kernel_release: String,
    /// `RLIMIT_NOFILE` of the reading process.
    pub nofile: Rlimit,
    /// `RLIMIT_MEMLOCK` of the reading process, bytes.
    pub memlock: Rlimit,
    /// `fs.file-max`: system-wide open-file ceiling.
    pub file_max: u64,
    /// File handles allocated system-wide now (`fs.file-nr` first field), if readable.
    pub files_allocated: Option<u64>,
    /// `fs.nr_open`: ceiling on any process's `RLIMIT_NOFILE`.
    pub nr_open: u64,
    /// `net.core.somaxconn`: clamp on every `listen(2)` backlog.
    pub somaxconn: u64,
    /// `net.ipv4.tcp_max_syn_backlog`.
    pub tcp_max_syn_backlog: u64,
    /// `net.ipv4.tcp_syncookies` (0 off, 1 on overflow, 2 always), if readable.
    pub tcp_syncookies: Option<u64>,
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub ip_local_port_range: (u32, u32),
    /// `net.ipv4.tcp_mem`: low, pressure, high, in pages.
    pub tcp_mem_pages: [u64; 3],
    /// `net.ipv4.tcp_rmem`: min, default, max, bytes.
    pub tcp_rmem: [u64; 3],
    /// `net.ipv4.tcp_wmem`: min, default, max, bytes.
    pub tcp_wmem: [u64; 3],
    /// Conntrack, when loaded.
    pub conntrack: Option<Conntrack>,
    /// `MemTotal`, bytes.
    pub mem_total_bytes: u64,
    /// `MemAvailable`, bytes.
    pub mem_available_bytes: u64,
    /// CPUs this process may run on (`sched_getaffinity`), i.e. the default shard count.
    pub online_cores: usize,
    /// Page size in bytes (`sysconf(_SC_PAGESIZE)`); `tcp_mem` is in these units.
    pub page_size: u64,
    /// Effective capabilities, if `/proc/self/status` was readable.
    pub capabilities: Option<Capabilities>,
    /// io_uring probe.
    pub io_uring: IoUringStatus,
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_opt(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn sysctl_u64(path: &str) -> Result<u64> {
    parse::parse_u64(path, &read(path)?)
}

fn sysctl_u64_opt(path: &str) -> Option<u64> {
    read_opt(path).and_then(|s| parse::parse_u64(path, &s).ok())
}

fn sysctl_triple(path: &str) -> Result<[u64; 3]> {
    parse::parse_u64_array::<3>(path, &read(path)?)
}

/// Reads one resource limit of the calling process via `getrlimit(2)`.
///
/// `rustix` reports `RLIM_INFINITY` as `None` and cannot fail for a valid resource; the
/// `Result` and the call's name (for an error) stay for callers.
pub fn getrlimit(resource: rustix::process::Resource, _name: &'static str) -> Result<Rlimit> {
    let r = rustix::process::getrlimit(resource);
    Ok(Rlimit {
        soft: r.current,
        hard: r.maximum,
    })
}

/// The running kernel's release string (`uname(2)` `release`, as `uname -r`).
pub fn kernel_release() -> Result<String> {
    Ok(rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned())
}

/// CPUs in this process's affinity mask (falls back to
/// `available_parallelism`, then 1).
pub fn online_cores() -> usize {
    if let Ok(set) = rustix::thread::sched_getaffinity(None) {
        let n = set.count();
        if n > 0 {
            return n as usize;
        }
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Page size in bytes (from the auxiliary vector, as `sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Tries `io_uring_setup(2)` with an 8-entry ring and reports the outcome,
/// plus `kernel.io_uring_disabled` when that sysctl exists.
pub fn probe_io_uring() -> IoUringStatus {
    let io_uring_disabled = sysctl_u64_opt("/proc/sys/kernel/io_uring_disabled");
    match io_uring::IoUring::new(8) {
        Ok(ring) => {
            let ring_core_error = probe_ring_core(&ring);
            drop(ring);
            let task_work_error = io_uring::IoUring::<io_uring::squeue::Entry>::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(8)
                .err()
                .map(|e| {
                    format!(
                        "deferred completion work (IORING_SETUP_DEFER_TASKRUN, Linux >= 6.1): {e}"
                    )
                });
            IoUringStatus {
                setup_ok: true,
                error: None,
                io_uring_disabled,
                ring_core_error,
                task_work_error,
            }
        }
        Err(e) => IoUringStatus {
            setup_ok: false,
            error: Some(e.to_string()),
            io_uring_disabled,
            ring_core_error: Some("io_uring_setup(2) failed".to_owned()),
            task_work_error: Some("io_uring_setup(2) failed".to_owned()),
        },
    }
}

/// What the gateway checks before it runs connections on its own ring: a kernel with
/// multishot receive (`IORING_RECV_MULTISHOT`, 6.0) and a provided-buffer ring that registers
/// (`IORING_REGISTER_PBUF_RING`, 5.19). `None` when both are there.
fn probe_ring_core(ring: &io_uring::IoUring) -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match crate::parse::parse_kernel_version(release) {
        Some(v) if v >= (6, 0) => {}
        Some(_) => {
            return Some(format!(
                "multishot receive (IORING_RECV_MULTISHOT) and provided-buffer rings \
                 (IORING_REGISTER_PBUF_RING) need Linux >= 6.0; this kernel is {release}"
            ))
        }
        None => {}
    }
    let layout = std::alloc::Layout::from_size_align(4096, 4096).ok()?;
    // SAFETY: a non-zero-sized layout; the result is checked for null and freed below.
    let mem = unsafe { std::alloc::alloc_zeroed(layout) };
    if mem.is_null() {
        return Some("allocating a probe buffer ring failed".to_owned());
    }
    // SAFETY: `mem` is a live, page-aligned, zeroed page holding 8 ring entries; it is
    // unregistered before it is freed.
    let r = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(mem as u64, 8, 1, 0)
    };
    let out = match r {
        Ok(()) => {
            let _ = ring.submitter().unregister_buf_ring(1);
            None
        }
        Err(e) => Some(format!(
            "provided-buffer rings (IORING_REGISTER_PBUF_RING) unavailable: {e}"
        )),
    };
    // SAFETY: allocated above with this layout, no longer registered.
    unsafe { std::alloc::dealloc(mem, layout) };
    out
}

/// Reads the live host.
///
/// Fails (with the offending path) only when a value the arithmetic cannot do
/// without is missing; conntrack, `file-nr`, `tcp_syncookies`, capabilities and
/// `io_uring_disabled` are optional.
pub fn read_host() -> Result<HostReadings> {
    let meminfo = parse::parse_meminfo(&read("/proc/meminfo")?)?;
    let conntrack =
        sysctl_u64_opt("/proc/sys/net/netfilter/nf_conntrack_max").map(|max| Conntrack {
            max,
            count: sysctl_u64_opt("/proc/sys/net/netfilter/nf_conntrack_count"),
        });
    let port_path = "/proc/sys/net/ipv4/ip_local_port_range";
    Ok(HostReadings {
        kernel_release: kernel_release()?,
        nofile: getrlimit(
            rustix::process::Resource::Nofile,
            "getrlimit(RLIMIT_NOFILE)",
        )?,
        memlock: getrlimit(
            rustix::process::Resource::Memlock,
            "getrlimit(RLIMIT_MEMLOCK)",
        )?,
        file_max: sysctl_u64("/proc/sys/fs/file-max")?,
        files_allocated: read_opt("/proc/sys/fs/file-nr")
            .and_then(|s| parse::parse_file_nr(&s).ok()),
        nr_open: sysctl_u64("/proc/sys/fs/nr_open")?,
        somaxconn: sysctl_u64("/proc/sys/net/core/somaxconn")?,
        tcp_max_syn_backlog: sysctl_u64("/proc/sys/net/ipv4/tcp_max_syn_backlog")?,
        tcp_syncookies: sysctl_u64_opt("/proc/sys/net/ipv4/tcp_syncookies"),
        ip_local_port_range: parse::parse_port_range(port_path, &read(port_path)?)?,
        tcp_mem_pages: sysctl_triple("/proc/sys/net/ipv4/tcp_mem")?,
        tcp_rmem: sysctl_triple("/proc/sys/net/ipv4/tcp_rmem")?,
        tcp_wmem: sysctl_triple("/proc/sys/net/ipv4/tcp_wmem")?,
        conntrack,
        mem_total_bytes: meminfo.total_bytes,
        mem_available_bytes: meminfo.available_bytes,
        online_cores: online_cores(),
        page_size: page_size(),
        capabilities: read_opt("/proc/self/status")
            .and_then(|s| parse::parse_cap_eff(&s).ok())
            .map(Capabilities::from_mask),
        io_uring: probe_io_uring(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{evaluate, FactorKind, Params};

    #[test]
    fn capabilities_from_mask() {
        let c = Capabilities::from_mask((1 << CAP_IPC_LOCK) | (1 << CAP_SYS_ADMIN));
        assert!(c.ipc_lock && c.sys_admin && !c.sys_resource);
        assert_eq!(
            Capabilities::from_mask(0),
            Capabilities {
                sys_resource: false,
                ipc_lock: false,
                sys_admin: false
            }
        );
    }

    /// Reads the real host. Where the hard nofile limit is ≤ 20,000 (the
    /// development box: hard 20,000, no CAP_SYS_RESOURCE) the file limit must be
    /// reported as the binding factor; elsewhere the assertion is skipped with a
    /// message (the readings are still sanity-checked).
    #[test]
    fn live_host_reports_nofile_binding_when_hard_limit_is_low() {
        let r = read_host().expect("read the live host");
        assert!(!r.kernel_release.is_empty());
        assert!(r.online_cores >= 1);
        assert!(r.page_size >= 4096);
        assert!(r.mem_available_bytes > 0 && r.mem_available_bytes <= r.mem_total_bytes);
        assert!(r.file_max > 0 && r.nr_open > 0);
        let rep = evaluate(&r, &Params::default());
        match r.nofile.hard {
            Some(hard) if hard <= 20_000 => {
                assert_eq!(rep.binding, FactorKind::Nofile, "{rep:#?}");
                let soft = r.nofile.soft.unwrap_or(hard);
                assert_eq!(rep.max_connections, soft.saturating_sub(64));
                assert!(!rep.target_reachable);
                assert_eq!(rep.exit_code(), 1);
            }
            other => eprintln!(
                "SKIP live nofile assertion: hard RLIMIT_NOFILE is {other:?} (> 20,000); \
                 binding factor here is {:?}",
                rep.binding
            ),
        }
    }
}
