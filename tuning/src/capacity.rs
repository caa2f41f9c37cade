//! Capacity arithmetic: pure functions from [`HostReadings`] and [`Params`] to a
//! [`Report`].
//!
//! Each *factor* caps the number of concurrent connections one gateway process
//! can hold; the smallest one *binds first*. *Checks* do not cap the count but
//! can stop the gateway from starting (io_uring, memlock) or from absorbing a
//! reconnect storm (accept backlog).

use serde::Serialize;

use crate::host::HostReadings;

/// Default connection target per box.
pub const DEFAULT_TARGET: u64 = 2_000_000;
/// Default file descriptors kept aside for listeners (one per shard), log
/// segments, the admin listener, io_uring ring fds, stdio and the data dir.
pub const DEFAULT_FD_RESERVE: u64 = 64;
/// Default user-space bytes per connection (connection state, session keys,
/// slab overhead). Placeholder until replaced by a measured figure.
pub const DEFAULT_BYTES_PER_CONN_USER: u64 = 2048;
/// Default kernel bytes per idle connection (struct tcp_sock, socket inode,
/// dentry, struct file), excluding socket buffers, which `tcp_mem` bounds.
/// Placeholder until replaced by a measured figure.
pub const DEFAULT_BYTES_PER_CONN_KERNEL: u64 = 4096;
/// Default reconnect-storm arrival rate per box: 2M clients coming back within
/// 40 s of a restart (jittered backoff) = 50,000 connections/s.
pub const DEFAULT_STORM_RATE: u64 = 50_000;
/// Default longest time a shard may go without calling `accept` (a compaction
/// batch or an fsync on the same core), in milliseconds.
pub const DEFAULT_ACCEPT_STALL_MS: u64 = 100;
/// Default backlog the gateway's listeners have: glommio 0.9's
/// `TcpListener::bind` calls `listen(fd, 1024)`. The kernel clamps it to
/// `net.core.somaxconn`; calling `listen(2)` again on the bound socket with a
/// larger value raises it (Linux updates the backlog of a listening socket).
pub const DEFAULT_LISTEN_BACKLOG: u64 = 1024;
/// Default gateway client port (matches the gateway's `listen_addr` default).
pub const DEFAULT_LISTEN_PORT: u16 = 7300;
/// glommio refuses to start an executor when `RLIMIT_MEMLOCK` is below this.
pub const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;
/// glommio registers a 10 MiB I/O arena per executor in each of its 3 rings;
/// every registration is charged to `RLIMIT_MEMLOCK` separately (unless the
/// process has `CAP_IPC_LOCK`). Below this, glommio skips registered buffers.
pub const GLOMMIO_MEMLOCK_PER_SHARD: u64 = 3 * 10 * 1024 * 1024;
/// Approximate kernel memory per conntrack entry (struct nf_conn + hash slot).
pub const CONNTRACK_ENTRY_BYTES: u64 = 320;
/// The value suggested for `somaxconn`/`tcp_max_syn_backlog` when a storm fits in it.
pub const RECOMMENDED_BACKLOG: u64 = 65_535;

/// Parameters of the evaluation (the `switchboard-preflight` flags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Params {
    /// Connections the box should hold.
    pub target: u64,
    /// File descriptors not available for client sockets.
    pub fd_reserve: u64,
    /// User-space bytes per connection (placeholder until measured).
    pub bytes_per_conn_user: u64,
    /// Kernel bytes per idle connection outside socket buffers (placeholder until measured).
    pub bytes_per_conn_kernel: u64,
    /// Reconnect-storm arrival rate per box, connections/s.
    pub storm_rate: u64,
    /// Longest accept stall per shard, ms.
    pub accept_stall_ms: u64,
    /// Shard count (one SO_REUSEPORT listener each); `None` = online cores.
    pub shards: Option<usize>,
    /// Backlog passed to `listen(2)`.
    pub listen_backlog: u64,
    /// Client port, used in the conntrack bypass rules.
    pub listen_port: u16,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            target: DEFAULT_TARGET,
            fd_reserve: DEFAULT_FD_RESERVE,
            bytes_per_conn_user: DEFAULT_BYTES_PER_CONN_USER,
            bytes_per_conn_kernel: DEFAULT_BYTES_PER_CONN_KERNEL,
            storm_rate: DEFAULT_STORM_RATE,
            accept_stall_ms: DEFAULT_ACCEPT_STALL_MS,
            shards: None,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            listen_port: DEFAULT_LISTEN_PORT,
        }
    }
}

/// A limit on the number of concurrent connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FactorKind {
    /// `RLIMIT_NOFILE` soft limit of the process.
    Nofile,
    /// `fs.nr_open`, the ceiling on any `RLIMIT_NOFILE`.
    NrOpen,
    /// `fs.file-max`, system-wide open files.
    FileMax,
    /// `MemAvailable` ÷ per-connection memory.
    Memory,
    /// `net.ipv4.tcp_mem` high mark ÷ per-socket buffer floor.
    TcpMem,
    /// `net.netfilter.nf_conntrack_max` (only when conntrack is loaded).
    Conntrack,
}

/// A requirement that does not cap the connection count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// io_uring can be set up.
    IoUring,
    /// `RLIMIT_MEMLOCK` is enough for glommio.
    Memlock,
    /// Accept/SYN backlog absorbs the reconnect storm.
    AcceptBacklog,
    /// Conntrack is not loaded (informational).
    Conntrack,
    /// Ephemeral port range (outbound / load generators only).
    EphemeralPorts,
    /// Cores and shards (informational).
    Cores,
}

/// Outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but degraded under the stated conditions; does not affect the exit code.
    Warn,
    /// The gateway cannot run as configured; the target is unreachable.
    Fail,
    /// Informational only.
    Info,
}

/// Where a change is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A sysctl (persist it in `/etc/sysctl.d/99-switchboard.conf`).
    Sysctl,
    /// A resource limit (systemd unit or limits.d).
    Rlimit,
    /// A firewall rule.
    Firewall,
    /// Gateway configuration or code.
    Gateway,
    /// Hardware or kernel.
    Host,
}

/// One exact change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Where the change is made.
    pub kind: ChangeKind,
    /// The exact command or configuration line.
    pub action: String,
    /// Why, with the arithmetic.
    pub reason: String,
}

/// One capacity factor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Factor {
    /// Which factor.
    pub kind: FactorKind,
    /// Human-readable name.
    pub name: String,
    /// The current setting(s), human-readable.
    pub current: String,
    /// Connections this factor allows.
    pub allows: u64,
    /// `allows >= target`.
    pub meets_target: bool,
    /// This is the smallest factor (ties: the first in table order).
    pub binding: bool,
    /// The arithmetic behind `allows`.
    pub explain: String,
    /// Changes that raise `allows` to the target (empty when it already meets it).
    pub changes: Vec<Change>,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Which check.
    pub kind: CheckKind,
    /// Human-readable name.
    pub name: String,
    /// The current setting(s), human-readable.
    pub current: String,
    /// Outcome.
    pub status: Status,
    /// The reasoning / arithmetic.
    pub explain: String,
    /// Suggested changes (for `Warn`/`Fail`; `Info` checks may carry advice).
    pub changes: Vec<Change>,
}

/// The full evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target connection count.
    pub target: u64,
    /// Parameters used.
    pub params: Params,
    /// What was read from the host.
    pub readings: HostReadings,
    /// Capacity factors, table order.
    pub factors: Vec<Factor>,
    /// The factor that binds first.
    pub binding: FactorKind,
    /// Connections the process can hold as configured (the binding factor's `allows`).
    pub max_connections: u64,
    /// Non-capacity checks.
    pub checks: Vec<Check>,
    /// Every factor allows the target and no check fails.
    pub target_reachable: bool,
    /// All changes needed for the target, in the order to apply them (factor
    /// changes in table order, then Warn/Fail check changes), de-duplicated.
    pub changes: Vec<Change>,
    /// Assumptions and caveats.
    pub notes: Vec<String>,
}

impl Report {
    /// Process exit code: 0 target reachable, 1 not reachable.
    pub fn exit_code(&self) -> i32 {
        if self.target_reachable {
            0
        } else {
            1
        }
    }
}

/// Formats an integer with thousands separators (`2000000` → `2,000,000`).
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    let first = match s.len() % 3 {
        0 => 3,
        r => r,
    };
    out.push_str(&s[..first]);
    let mut rest = &s[first..];
    while !rest.is_empty() {
        out.push(',');
        out.push_str(&rest[..3]);
        rest = &rest[3..];
    }
    out
}

/// Formats a byte count in binary units (`1536` → `1.5 KiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = "B";
    for next in UNITS.iter().skip(1) {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = next;
    }
    if unit == "B" {
        format!("{n} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

fn div_ceil(a: u64, b: u64) -> u64 {
    if b == 0 {
        return u64::MAX;
    }
    a.div_ceil(b)
}

fn round_up(n: u64, to: u64) -> u64 {
    div_ceil(n, to).saturating_mul(to)
}

/// The `RLIMIT_NOFILE` to configure for `target` connections: target + 25 %
/// (a dying socket and its reconnecting replacement briefly hold two fds during
/// churn), rounded up to 10,000, and never below `target + reserve`.
/// 2,000,000 → 2,500,000.
pub fn recommended_nofile(target: u64, reserve: u64) -> u64 {
    let with_headroom = round_up(target.saturating_add(target / 4), 10_000);
    with_headroom.max(target.saturating_add(reserve))
}

/// The `fs.file-max` to configure: twice [`recommended_nofile`], room for a
/// second gateway process during an upgrade (SO_REUSEPORT lets the new one
/// bind while the old drains) plus the rest of the system. 2,000,000 → 5,000,000.
pub fn recommended_file_max(target: u64, reserve: u64) -> u64 {
    recommended_nofile(target, reserve).saturating_mul(2)
}

/// The `net.ipv4.tcp_mem` triple (pages) giving every one of `target` sockets
/// its `floor_bytes` (tcp_rmem min + tcp_wmem min) at the high mark, rounded up
/// to a whole GiB; pressure at 3/4 and low at 1/2 of it.
/// 2M × 8 KiB = 15.3 GiB → 16 GiB → `[2097152, 3145728, 4194304]` 4 KiB pages.
pub fn recommended_tcp_mem(target: u64, floor_bytes: u64, page_size: u64) -> [u64; 3] {
    let page = page_size.max(1);
    let exact = div_ceil(target.saturating_mul(floor_bytes), page);
    let high = round_up(exact, ((1u64 << 30) / page).max(1));
    [high / 2, high / 4 * 3 + (high % 4) * 3 / 4, high]
}

/// Queued connections one listener must hold during a storm:
/// `ceil(storm_rate × stall_ms / 1000 / shards)`.
pub fn storm_queue_per_listener(storm_rate: u64, stall_ms: u64, shards: u64) -> u64 {
    div_ceil(
        storm_rate.saturating_mul(stall_ms),
        1000u64.saturating_mul(shards.max(1)),
    )
}

fn sysctl_change(key: &str, value: &str, reason: String) -> Change {
    let v = if value.contains(' ') {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    };
    Change {
        kind: ChangeKind::Sysctl,
        action: format!(
            "sysctl -w {key}={v}   (persist: `{key} = {value}` in /etc/sysctl.d/99-switchboard.conf)"
        ),
        reason,
    }
}

fn nr_open_change(rec: u64) -> Change {
    sysctl_change(
        "fs.nr_open",
        &rec.to_string(),
        format!(
            "setrlimit(RLIMIT_NOFILE) above fs.nr_open fails with EPERM (systemd then refuses to \
             start a unit with LimitNOFILE={rec}, and pam_limits can break logins); \
             {rec} = recommended nofile"
        ),
    )
}

fn factor(
    kind: FactorKind,
    name: &str,
    current: String,
    allows: u64,
    target: u64,
    explain: String,
    changes: Vec<Change>,
) -> Factor {
    let meets = allows >= target;
    Factor {
        kind,
        name: name.to_owned(),
        current,
        allows,
        meets_target: meets,
        binding: false,
        explain,
        changes: if meets { Vec::new() } else { changes },
    }
}

fn fmt_rlimit(v: Option<u64>) -> String {
    v.map(thousands).unwrap_or_else(|| "unlimited".to_owned())
}

fn nofile_factor(r: &HostReadings, p: &Params) -> Factor {
    // RLIMIT_NOFILE cannot be infinite in practice (capped by nr_open); treat it so.
    let soft = r.nofile.soft.unwrap_or(r.nr_open);
    let hard = r.nofile.hard.unwrap_or(r.nr_open);
    let allows = soft.saturating_sub(p.fd_reserve);
    let needed = p.target.saturating_add(p.fd_reserve);
    let rec = recommended_nofile(p.target, p.fd_reserve);
    let mut changes = Vec::new();
    if rec > r.nr_open {
        changes.push(nr_open_change(rec));
    }
    let headroom_note = format!(
        "need ≥ {} = target {} + {} reserved fds; {} adds 25% headroom for reconnect churn",
        thousands(needed),
        thousands(p.target),
        p.fd_reserve,
        thousands(rec)
    );
    if hard >= needed {
        let to = rec.min(hard);
        changes.push(Change {
            kind: ChangeKind::Rlimit,
            action: format!(
                "raise the soft limit up to the hard limit (no privilege needed): `ulimit -Sn {to}` \
                 in the launching shell, or LimitNOFILE={to} in the systemd unit"
            ),
            reason: headroom_note,
        });
    } else {
        let cap = match r.capabilities {
            Some(c) if !c.sys_resource => {
                "; this process lacks CAP_SYS_RESOURCE, so `ulimit -n` here cannot go past it"
            }
            _ => "",
        };
        changes.push(Change {
            kind: ChangeKind::Rlimit,
            action: format!(
                "raise the hard limit: LimitNOFILE={rec} in the systemd unit \
                 (tuning/systemd/switchboard.service), or `switchboard hard nofile {rec}` and \
                 `switchboard soft nofile {rec}` in /etc/security/limits.d/switchboard.conf \
                 (next login) — needs CAP_SYS_RESOURCE/root at login or service start"
            ),
            reason: format!(
                "`ulimit -n` can't exceed the hard limit {}{cap}; {headroom_note}",
                thousands(hard)
            ),
        });
    }
    factor(
        FactorKind::Nofile,
        "open files (RLIMIT_NOFILE)",
        format!(
            "soft {} / hard {}",
            fmt_rlimit(r.nofile.soft),
            fmt_rlimit(r.nofile.hard)
        ),
        allows,
        p.target,
        format!(
            "1 fd per connection: soft {} − {} reserved (listeners, log segments, admin, rings) = {}",
            thousands(soft),
            p.fd_reserve,
            thousands(allows)
        ),
        changes,
    )
}

fn nr_open_factor(r: &HostReadings, p: &Params) -> Factor {
    let allows = r.nr_open.saturating_sub(p.fd_reserve);
    factor(
        FactorKind::NrOpen,
        "fs.nr_open (nofile ceiling)",
        thousands(r.nr_open),
        allows,
        p.target,
        format!(
            "no process's RLIMIT_NOFILE may exceed fs.nr_open: {} − {} reserved = {}",
            thousands(r.nr_open),
            p.fd_reserve,
            thousands(allows)
        ),
        vec![nr_open_change(recommended_nofile(p.target, p.fd_reserve))],
    )
}

fn file_max_factor(r: &HostReadings, p: &Params) -> Factor {
    let used = r.files_allocated.unwrap_or(0);
    let allows = r.file_max.saturating_sub(used).saturating_sub(p.fd_reserve);
    let rec = recommended_file_max(p.target, p.fd_reserve)
        .max(used.saturating_add(recommended_nofile(p.target, p.fd_reserve)));
    let mut explain = format!(
        "system-wide: fs.file-max {} − {} handles open elsewhere − {} reserved = {}",
        thousands(r.file_max),
        thousands(used),
        p.fd_reserve,
        thousands(allows)
    );
    if matches!(r.capabilities, Some(c) if c.sys_admin) {
        explain.push_str(
            " (this process has CAP_SYS_ADMIN and is exempt; the service user switchboard is not)",
        );
    }
    factor(
        FactorKind::FileMax,
        "fs.file-max (system)",
        thousands(r.file_max),
        allows,
        p.target,
        explain,
        vec![sysctl_change(
            "fs.file-max",
            &rec.to_string(),
            format!(
                "{} = 2 × recommended nofile {}: an upgrading second gateway process plus the rest \
                 of the system; a ceiling, costs nothing until used",
                thousands(rec),
                thousands(recommended_nofile(p.target, p.fd_reserve))
            ),
        )],
    )
}

fn memory_factor(r: &HostReadings, p: &Params) -> Factor {
    let per = p
        .bytes_per_conn_user
        .saturating_add(p.bytes_per_conn_kernel)
        .max(1);
    let allows = r.mem_available_bytes / per;
    let need = p.target.saturating_mul(per);
    factor(
        FactorKind::Memory,
        "memory (MemAvailable)",
        format!(
            "{} available of {}",
            human_bytes(r.mem_available_bytes),
            human_bytes(r.mem_total_bytes)
        ),
        allows,
        p.target,
        format!(
            "{} B available ÷ ({} B user + {} B kernel per connection, placeholders until measured) \
             = {}",
            thousands(r.mem_available_bytes),
            thousands(p.bytes_per_conn_user),
            thousands(p.bytes_per_conn_kernel),
            thousands(allows)
        ),
        vec![Change {
            kind: ChangeKind::Host,
            action: format!(
                "provide ≥ {} MemAvailable (add RAM or stop other workloads), or lower the \
                 per-connection cost",
                human_bytes(need)
            ),
            reason: format!(
                "{} connections × {} B = {} B, before socket buffers (bounded by tcp_mem)",
                thousands(p.target),
                thousands(per),
                thousands(need)
            ),
        }],
    )
}

fn tcp_mem_factor(r: &HostReadings, p: &Params) -> Factor {
    let page = r.page_size.max(1);
    let mut floor = r.tcp_rmem[0].saturating_add(r.tcp_wmem[0]);
    if floor == 0 {
        floor = 2 * page;
    }
    let high_bytes = r.tcp_mem_pages[2].saturating_mul(page);
    let allows = high_bytes / floor;
    let rec = recommended_tcp_mem(p.target, floor, page);
    let rec_bytes = rec[2].saturating_mul(page);
    let mut reason = format!(
        "high = {} sockets × {} B floor = {} → rounded up to {} = {} pages of {} B; \
         pressure = 3/4, low = 1/2 of high",
        thousands(p.target),
        thousands(floor),
        human_bytes(p.target.saturating_mul(floor)),
        human_bytes(rec_bytes),
        thousands(rec[2]),
        page
    );
    if rec_bytes > r.mem_total_bytes / 2 {
        reason.push_str(&format!(
            "; WARNING: that is more than half of MemTotal {}",
            human_bytes(r.mem_total_bytes)
        ));
    }
    let mut changes = vec![sysctl_change(
        "net.ipv4.tcp_mem",
        &format!("{} {} {}", rec[0], rec[1], rec[2]),
        reason,
    )];
    if floor > 2 * 4096 {
        changes.push(sysctl_change(
            "net.ipv4.tcp_rmem",
            &format!("4096 {} {}", r.tcp_rmem[1].min(8192), r.tcp_rmem[2]),
            format!(
                "a {} B per-socket floor (tcp_rmem min + tcp_wmem min) is large for idle \
                 messaging sockets; 4 KiB each would halve tcp_mem needs",
                thousands(floor)
            ),
        ));
        changes.push(sysctl_change(
            "net.ipv4.tcp_wmem",
            &format!("4096 {} {}", r.tcp_wmem[1].min(8192), r.tcp_wmem[2]),
            "see tcp_rmem".to_owned(),
        ));
    }
    factor(
        FactorKind::TcpMem,
        "tcp_mem (socket buffers)",
        format!(
            "high {} pages ({})",
            thousands(r.tcp_mem_pages[2]),
            human_bytes(high_bytes)
        ),
        allows,
        p.target,
        format!(
            "tcp_mem high {} pages × {} B = {} ÷ {} B per-socket floor (rmem min {} + wmem min {}) \
             = {}",
            thousands(r.tcp_mem_pages[2]),
            page,
            human_bytes(high_bytes),
            thousands(floor),
            r.tcp_rmem[0],
            r.tcp_wmem[0],
            thousands(allows)
        ),
        changes,
    )
}

fn conntrack_factor(r: &HostReadings, p: &Params) -> Option<Factor> {
    let ct = r.conntrack?;
    let used = ct.count.unwrap_or(0);
    let allows = ct.max.saturating_sub(used);
    let rec = recommended_nofile(p.target, p.fd_reserve);
    let port = p.listen_port;
    Some(factor(
        FactorKind::Conntrack,
        "nf_conntrack_max",
        format!("{} ({} in use)", thousands(ct.max), thousands(used)),
        allows,
        p.target,
        format!(
            "conntrack is loaded: once any stateful rule (ct state, NAT, a container runtime) \
             is active every connection holds one entry, so it counts even with 0 in use now: \
             {} − {} in use = {}",
            thousands(ct.max),
            thousands(used),
            thousands(allows)
        ),
        vec![
            Change {
                kind: ChangeKind::Firewall,
                action: format!(
                    "preferred — don't track gateway traffic: `nft add table inet sb_raw; \
                     nft add chain inet sb_raw pre '{{ type filter hook prerouting priority raw; }}'; \
                     nft add rule inet sb_raw pre tcp dport {port} notrack; \
                     nft add chain inet sb_raw out '{{ type filter hook output priority raw; }}'; \
                     nft add rule inet sb_raw out tcp sport {port} notrack` \
                     (or unload nf_conntrack if nothing needs it)"
                ),
                reason: "a full conntrack table drops new SYNs box-wide (\"nf_conntrack: table \
                         full, dropping packet\"); untracked sockets cost no entry"
                    .to_owned(),
            },
            sysctl_change(
                "net.netfilter.nf_conntrack_max",
                &rec.to_string(),
                format!(
                    "ALTERNATIVE to the notrack rules, only if tracking must stay: {} entries × ~{} B = {}; also \
                     `echo {} > /sys/module/nf_conntrack/parameters/hashsize` (max/4 buckets)",
                    thousands(rec),
                    CONNTRACK_ENTRY_BYTES,
                    human_bytes(rec.saturating_mul(CONNTRACK_ENTRY_BYTES)),
                    rec / 4
                ),
            ),
        ],
    ))
}

fn io_uring_check(r: &HostReadings) -> Check {
    let u = &r.io_uring;
    let version = crate::parse::parse_kernel_version(&r.kernel_release);
    let disabled = u
        .io_uring_disabled
        .map(|d| d.to_string())
        .unwrap_or_else(|| "absent".to_owned());
    let mut changes = Vec::new();
    if matches!(u.io_uring_disabled, Some(d) if d != 0) {
        changes.push(sysctl_change(
            "kernel.io_uring_disabled",
            "0",
            "1 limits io_uring to kernel.io_uring_group / CAP_SYS_ADMIN, 2 disables it; \
             glommio needs it"
                .to_owned(),
        ));
    }
    let old = matches!(version, Some(v) if v < (5, 8));
    if old {
        changes.push(Change {
            kind: ChangeKind::Host,
            action: "upgrade the kernel to ≥ 5.8 (glommio's minimum; ≥ 6.1 recommended)".to_owned(),
            reason: format!("running {}", r.kernel_release),
        });
    }
    let (status, what) = if !u.setup_ok {
        (
            Status::Fail,
            format!(
                "io_uring_setup(8) failed: {}",
                u.error.as_deref().unwrap_or("unknown error")
            ),
        )
    } else if old {
        (
            Status::Warn,
            "io_uring_setup(8) ok, but kernel is older than 5.8".to_owned(),
        )
    } else if let Some(why) = &u.ring_core_error {
        changes.push(Change {
            kind: ChangeKind::Host,
            action: "upgrade the kernel to ≥ 6.0 for the ring connection core, or set \
                     connection_core = \"task\""
                .to_owned(),
            reason: format!(
                "{why}: connection_core = \"auto\" falls back to one task per connection \
                 (~5–6 KB per idle connection instead of < 1 KB), \"uring\" refuses to start"
            ),
        });
        (
            Status::Warn,
            format!("io_uring_setup(8) ok; ring connection core unavailable: {why}"),
        )
    } else if let Some(why) = &u.task_work_error {
        (
            Status::Ok,
            format!(
                "io_uring_setup(8) ok; multishot receive and provided-buffer rings available \
                 (connection_core = \"uring\"); {why}: uring_task_work falls back to \"coop\""
            ),
        )
    } else {
        (
            Status::Ok,
            "io_uring_setup(8) ok; multishot receive, provided-buffer rings and deferred \
             completion work available (connection_core = \"uring\", uring_task_work = \"defer\")"
                .to_owned(),
        )
    };
    if status == Status::Fail && changes.is_empty() {
        changes.push(Change {
            kind: ChangeKind::Host,
            action: "allow io_uring_setup(2): check seccomp profiles (containers block it by \
                     default) and kernel.io_uring_disabled"
                .to_owned(),
            reason: "the gateway's glommio executors cannot start without io_uring".to_owned(),
        });
    }
    Check {
        kind: CheckKind::IoUring,
        name: "io_uring".to_owned(),
        current: format!(
            "kernel {}, io_uring_disabled={}",
            r.kernel_release, disabled
        ),
        status,
        explain: what,
        changes,
    }
}

fn memlock_check(r: &HostReadings, shards: u64) -> Check {
    let soft = r.memlock.soft;
    let ipc_lock = matches!(r.capabilities, Some(c) if c.ipc_lock);
    let full = shards.saturating_mul(GLOMMIO_MEMLOCK_PER_SHARD);
    let have = soft.unwrap_or(u64::MAX);
    let change = Change {
        kind: ChangeKind::Rlimit,
        action: "LimitMEMLOCK=infinity in the systemd unit, or `switchboard - memlock unlimited` \
                 in /etc/security/limits.d/switchboard.conf"
            .to_owned(),
        reason: format!(
            "glommio needs ≥ {} to start and {} shards × {} = {} for registered I/O buffers",
            human_bytes(GLOMMIO_MIN_MEMLOCK),
            shards,
            human_bytes(GLOMMIO_MEMLOCK_PER_SHARD),
            human_bytes(full)
        ),
    };
    let (status, explain) = if have < GLOMMIO_MIN_MEMLOCK {
        (
            Status::Fail,
            format!(
                "below glommio's {} minimum: executors refuse to start",
                human_bytes(GLOMMIO_MIN_MEMLOCK)
            ),
        )
    } else if have >= full {
        (
            Status::Ok,
            format!("≥ {} needed for {} shards", human_bytes(full), shards),
        )
    } else if ipc_lock {
        (
            Status::Ok,
            format!(
                "below the {} registered buffers need, but this process has CAP_IPC_LOCK so \
                 pinned memory is not charged (the service user switchboard lacks it: use \
                 LimitMEMLOCK=infinity)",
                human_bytes(full)
            ),
        )
    } else {
        (
            Status::Warn,
            format!(
                "below {} ({} shards × 3 rings × 10 MiB): glommio skips registered buffers \
                 (slower I/O)",
                human_bytes(full),
                shards
            ),
        )
    };
    Check {
        kind: CheckKind::Memlock,
        name: "RLIMIT_MEMLOCK (io_uring)".to_owned(),
        current: format!(
            "soft {} / hard {}",
            soft.map(human_bytes)
                .unwrap_or_else(|| "unlimited".to_owned()),
            r.memlock
                .hard
                .map(human_bytes)
                .unwrap_or_else(|| "unlimited".to_owned())
        ),
        status,
        explain,
        changes: if status == Status::Ok {
            Vec::new()
        } else {
            vec![change]
        },
    }
}

fn backlog_check(r: &HostReadings, p: &Params, shards: u64) -> Check {
    let need = storm_queue_per_listener(p.storm_rate, p.accept_stall_ms, shards);
    let effective = r.somaxconn.min(p.listen_backlog);
    let cookies = r.tcp_syncookies.unwrap_or(1) != 0;
    let syn_ok = cookies || r.tcp_max_syn_backlog >= need;
    let ok = effective >= need && syn_ok;
    let rec = if need <= RECOMMENDED_BACKLOG {
        RECOMMENDED_BACKLOG
    } else {
        round_up(need, 1024)
    };
    let mut changes = Vec::new();
    if !ok {
        if r.somaxconn < need {
            changes.push(sysctl_change(
                "net.core.somaxconn",
                &rec.to_string(),
                format!(
                    "accept queue per listener must hold {} (see check)",
                    thousands(need)
                ),
            ));
        }
        // With syncookies on, a full SYN queue falls back to cookies; the
        // tcp_max_syn_backlog drop rule only applies with cookies off.
        if !cookies && r.tcp_max_syn_backlog < need {
            changes.push(sysctl_change(
                "net.ipv4.tcp_max_syn_backlog",
                &rec.to_string(),
                "with syncookies off, SYNs are dropped once the SYN queue nears \
                 tcp_max_syn_backlog; size it like the accept queue"
                    .to_owned(),
            ));
        }
        if !cookies {
            changes.push(sysctl_change(
                "net.ipv4.tcp_syncookies",
                "1",
                "fall back to SYN cookies instead of dropping when the SYN queue overflows"
                    .to_owned(),
            ));
        }
        if p.listen_backlog < need {
            changes.push(Change {
                kind: ChangeKind::Gateway,
                action: format!(
                    "raise the listeners' backlog to {rec}: after glommio's TcpListener::bind \
                     (which calls listen(fd, {})), call `libc::listen(listener.as_raw_fd(), {rec})` \
                     on each shard's listener",
                    p.listen_backlog
                ),
                reason: format!(
                    "the accept queue is min(listen backlog {}, somaxconn); Linux updates the \
                     backlog of an already-listening socket; need ≥ {}",
                    thousands(p.listen_backlog),
                    thousands(need)
                ),
            });
        }
    }
    Check {
        kind: CheckKind::AcceptBacklog,
        name: "accept backlog (connect storm)".to_owned(),
        current: format!(
            "somaxconn {}, tcp_max_syn_backlog {}, syncookies {}",
            thousands(r.somaxconn),
            thousands(r.tcp_max_syn_backlog),
            r.tcp_syncookies
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".to_owned())
        ),
        status: if ok { Status::Ok } else { Status::Warn },
        explain: format!(
            "storm {} conn/s ÷ {} shard listeners × {} ms accept stall = {} queued per listener; \
             accept queue = min(somaxconn {}, listen() {}) = {}{}",
            thousands(p.storm_rate),
            shards,
            p.accept_stall_ms,
            thousands(need),
            thousands(r.somaxconn),
            thousands(p.listen_backlog),
            thousands(effective),
            if ok {
                ""
            } else {
                " — overflowing SYNs are dropped and clients back off (1 s, 3 s, …)"
            }
        ),
        changes,
    }
}

fn port_check(r: &HostReadings, p: &Params) -> Check {
    let (lo, hi) = r.ip_local_port_range;
    let ports = u64::from(hi - lo) + 1;
    let ips = div_ceil(p.target, ports);
    let wide = 65535 - 1024 + 1;
    Check {
        kind: CheckKind::EphemeralPorts,
        name: "ephemeral ports (outbound only)".to_owned(),
        current: format!("{lo}-{hi}"),
        status: Status::Info,
        explain: format!(
            "inbound gateway sockets use no ephemeral port; a load generator gets {} ports per \
             (source IP → gateway IP:port), so {} connections need ⌈{} ÷ {}⌉ = {} source IPs",
            thousands(ports),
            thousands(p.target),
            thousands(p.target),
            thousands(ports),
            ips
        ),
        changes: vec![sysctl_change(
            "net.ipv4.ip_local_port_range",
            "1024 65535",
            format!(
                "on load generators: {} ports → {} source IPs for {}",
                thousands(wide),
                div_ceil(p.target, wide),
                thousands(p.target)
            ),
        )],
    }
}

fn cores_check(r: &HostReadings, p: &Params, shards: u64) -> Check {
    Check {
        kind: CheckKind::Cores,
        name: "cores / shards".to_owned(),
        current: format!("{} online, {} shards", r.online_cores, shards),
        status: Status::Info,
        explain: format!(
            "one shard per core: {} ÷ {} = {} connections per shard (reference box: 32 cores → \
             62,500)",
            thousands(p.target),
            shards,
            thousands(div_ceil(p.target, shards))
        ),
        changes: Vec::new(),
    }
}

/// Evaluates the readings against the parameters.
pub fn evaluate(r: &HostReadings, p: &Params) -> Report {
    let shards = p.shards.unwrap_or(r.online_cores).max(1) as u64;
    let mut factors = vec![
        nofile_factor(r, p),
        nr_open_factor(r, p),
        file_max_factor(r, p),
        memory_factor(r, p),
        tcp_mem_factor(r, p),
    ];
    factors.extend(conntrack_factor(r, p));

    // The first factor with the smallest `allows` binds (`min_by_key` keeps the first of equals).
    let bound = factors
        .iter_mut()
        .min_by_key(|f| f.allows)
        .expect("the five factors above are always evaluated");
    bound.binding = true;
    let binding = bound.kind;
    let max_connections = bound.allows;

    let mut checks = vec![
        io_uring_check(r),
        memlock_check(r, shards),
        backlog_check(r, p, shards),
    ];
    if r.conntrack.is_none() {
        checks.push(Check {
            kind: CheckKind::Conntrack,
            name: "conntrack".to_owned(),
            current: "not loaded".to_owned(),
            status: Status::Info,
            explain: "no conntrack table to fill: keep it that way on gateway boxes".to_owned(),
            changes: Vec::new(),
        });
    }
    checks.push(port_check(r, p));
    checks.push(cores_check(r, p, shards));

    let target_reachable =
        factors.iter().all(|f| f.meets_target) && checks.iter().all(|c| c.status != Status::Fail);

    let mut changes: Vec<Change> = Vec::new();
    let from_factors = factors.iter().flat_map(|f| f.changes.iter());
    let from_checks = checks
        .iter()
        .filter(|c| matches!(c.status, Status::Warn | Status::Fail))
        .flat_map(|c| c.changes.iter());
    for c in from_factors.chain(from_checks) {
        if !changes.iter().any(|x| x.action == c.action) {
            changes.push(c.clone());
        }
    }

    let notes = vec![
        format!(
            "Per-connection memory ({} B user + {} B kernel) is a placeholder to be replaced by \
             measured figures; pass them with --bytes-per-conn-user / --bytes-per-conn-kernel.",
            thousands(p.bytes_per_conn_user),
            thousands(p.bytes_per_conn_kernel)
        ),
        "Limits are this process's: run the preflight under the gateway's own limits (it is \
         ExecStartPre in tuning/systemd/switchboard.service) to see the service's view."
            .to_owned(),
        "tcp_mem assumes idle sockets shrink to the tcp_rmem/tcp_wmem minimum under memory \
         pressure; sockets with queued data hold more."
            .to_owned(),
    ];

    Report {
        target: p.target,
        params: p.clone(),
        readings: r.clone(),
        factors,
        binding,
        max_connections,
        checks,
        target_reachable,
        changes,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Capabilities, Conntrack, IoUringStatus, Rlimit};

    const GIB: u64 = 1 << 30;

    /// The development box this crate was written on (2 cores, 24 GiB, nofile 20,000).
    fn this_box() -> HostReadings {
        HostReadings {
            kernel_release: "6.18.44-fc-v669".to_owned(),
            nofile: Rlimit {
                soft: Some(20_000),
                hard: Some(20_000),
            },
            memlock: Rlimit {
                soft: Some(8 << 20),
                hard: Some(8 << 20),
            },
            file_max: 2_466_170,
            files_allocated: Some(485),
            nr_open: 1_048_576,
            somaxconn: 4096,
            tcp_max_syn_backlog: 2048,
            tcp_syncookies: Some(1),
            ip_local_port_range: (32768, 60999),
            tcp_mem_pages: [287_898, 383_867, 575_796],
            tcp_rmem: [4096, 131_072, 33_554_432],
            tcp_wmem: [4096, 16_384, 4_194_304],
            conntrack: Some(Conntrack {
                max: 262_144,
                count: Some(0),
            }),
            mem_total_bytes: 24_684_084 * 1024,
            mem_available_bytes: 24_295_244 * 1024,
            online_cores: 2,
            page_size: 4096,
            capabilities: Some(Capabilities::from_mask(0x1fffeffffff)),
            io_uring: IoUringStatus {
                setup_ok: true,
                error: None,
                io_uring_disabled: Some(0),
                ring_core_error: None,
                task_work_error: None,
            },
        }
    }

    /// The reference box with tuning/ applied (64 GiB, 32 cores).
    fn tuned_box() -> HostReadings {
        HostReadings {
            nofile: Rlimit {
                soft: Some(2_500_000),
                hard: Some(2_500_000),
            },
            memlock: Rlimit {
                soft: None,
                hard: None,
            },
            file_max: 5_000_000,
            files_allocated: Some(2_000),
            nr_open: 2_500_000,
            somaxconn: 65_535,
            tcp_max_syn_backlog: 65_535,
            ip_local_port_range: (1024, 65535),
            tcp_mem_pages: [2_097_152, 3_145_728, 4_194_304],
            tcp_rmem: [4096, 8192, 4_194_304],
            tcp_wmem: [4096, 8192, 4_194_304],
            conntrack: None,
            mem_total_bytes: 64 * GIB,
            mem_available_bytes: 60 * GIB,
            online_cores: 32,
            capabilities: Some(Capabilities::from_mask(0)),
            ..this_box()
        }
    }

    fn get(r: &Report, k: FactorKind) -> &Factor {
        r.factors.iter().find(|f| f.kind == k).unwrap()
    }

    fn check(r: &Report, k: CheckKind) -> &Check {
        r.checks.iter().find(|c| c.kind == k).unwrap()
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_000_000), "2,000,000");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(16 * GIB), "16.0 GiB");
    }

    #[test]
    fn recommendations() {
        assert_eq!(recommended_nofile(2_000_000, 64), 2_500_000);
        assert_eq!(recommended_nofile(10, 64), 10_000);
        assert_eq!(recommended_nofile(100, 20_000), 20_100);
        assert_eq!(recommended_file_max(2_000_000, 64), 5_000_000);
        // 2M sockets × (4 KiB + 4 KiB) = 15.3 GiB → 16 GiB = 4,194,304 pages of 4 KiB.
        assert_eq!(
            recommended_tcp_mem(2_000_000, 8192, 4096),
            [2_097_152, 3_145_728, 4_194_304]
        );
        assert_eq!(
            recommended_tcp_mem(3, 4096, 4096),
            [131_072, 196_608, 262_144]
        );
        assert_eq!(recommended_tcp_mem(2_000_000, 8192, 65536)[2], 262_144);
        assert_eq!(storm_queue_per_listener(50_000, 100, 2), 2_500);
        assert_eq!(storm_queue_per_listener(50_000, 100, 32), 157);
        assert_eq!(storm_queue_per_listener(1, 1, 0), 1);
    }

    #[test]
    fn this_box_binds_on_nofile() {
        let rep = evaluate(&this_box(), &Params::default());
        assert_eq!(rep.binding, FactorKind::Nofile);
        assert_eq!(rep.max_connections, 19_936);
        assert!(!rep.target_reachable);
        assert_eq!(rep.exit_code(), 1);

        let nofile = get(&rep, FactorKind::Nofile);
        assert!(nofile.binding);
        // Hard limit too low: the change must be the hard limit, not `ulimit -n`.
        let text: Vec<&str> = nofile.changes.iter().map(|c| c.action.as_str()).collect();
        assert!(text.iter().any(|a| a.contains("raise the hard limit")
            && a.contains("LimitNOFILE=2500000")
            && a.contains("hard nofile 2500000")));
        assert!(nofile
            .changes
            .iter()
            .any(|c| c.reason.contains("CAP_SYS_RESOURCE")));
        // nr_open (1,048,576) is below 2.5M, so it must be raised first.
        assert!(text
            .iter()
            .any(|a| a.starts_with("sysctl -w fs.nr_open=2500000")));

        assert_eq!(get(&rep, FactorKind::NrOpen).allows, 1_048_512);
        assert_eq!(get(&rep, FactorKind::FileMax).allows, 2_466_170 - 485 - 64);
        assert!(get(&rep, FactorKind::FileMax).meets_target);
        assert_eq!(
            get(&rep, FactorKind::Memory).allows,
            24_295_244 * 1024 / 6144
        );
        // 575,796 pages × 4096 / 8192 = 287,898.
        assert_eq!(get(&rep, FactorKind::TcpMem).allows, 287_898);
        assert_eq!(get(&rep, FactorKind::Conntrack).allows, 262_144);

        // Only one binding factor.
        assert_eq!(rep.factors.iter().filter(|f| f.binding).count(), 1);

        // Aggregated changes: nr_open before the rlimit that needs it, de-duplicated.
        assert!(rep.changes[0]
            .action
            .starts_with("sysctl -w fs.nr_open=2500000"));
        assert_eq!(rep.changes[1].kind, ChangeKind::Rlimit);
        assert_eq!(
            rep.changes
                .iter()
                .filter(|c| c.action.starts_with("sysctl -w fs.nr_open="))
                .count(),
            1
        );
        assert!(rep.changes.iter().any(|c| c
            .action
            .starts_with("sysctl -w net.ipv4.tcp_mem=\"2097152 3145728 4194304\"")));
        // file-max already fine: no change for it.
        assert!(!rep.changes.iter().any(|c| c.action.contains("fs.file-max")));

        // Checks on this box.
        assert_eq!(check(&rep, CheckKind::IoUring).status, Status::Ok);
        // 8 MiB < 2 shards × 30 MiB, but root has CAP_IPC_LOCK.
        assert_eq!(check(&rep, CheckKind::Memlock).status, Status::Ok);
        // 50k/s ÷ 2 × 0.1 s = 2,500 ≤ somaxconn 4,096, but > glommio's listen(1024).
        let c = check(&rep, CheckKind::AcceptBacklog);
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.changes.len(), 1, "{:#?}", c.changes);
        assert_eq!(c.changes[0].kind, ChangeKind::Gateway);
        assert!(c.changes[0]
            .action
            .contains("libc::listen(listener.as_raw_fd(), 65535)"));
        let p = Params {
            listen_backlog: 65_535,
            ..Params::default()
        };
        assert_eq!(
            check(&evaluate(&this_box(), &p), CheckKind::AcceptBacklog).status,
            Status::Ok
        );
    }

    #[test]
    fn tuned_reference_box_reaches_target() {
        let rep = evaluate(&tuned_box(), &Params::default());
        assert!(rep.target_reachable, "{:#?}", rep.factors);
        assert_eq!(rep.exit_code(), 0);
        assert!(rep.changes.is_empty(), "{:#?}", rep.changes);
        // tcp_mem allows exactly 16 GiB / 8 KiB = 2,097,152; the tightest factor.
        assert_eq!(rep.binding, FactorKind::TcpMem);
        assert_eq!(rep.max_connections, 2_097_152);
        assert_eq!(get(&rep, FactorKind::Nofile).allows, 2_499_936);
        assert!(rep.factors.iter().all(|f| f.kind != FactorKind::Conntrack));
        assert!(rep.checks.iter().any(|c| c.kind == CheckKind::Conntrack));
        assert_eq!(check(&rep, CheckKind::Memlock).status, Status::Ok);
    }

    #[test]
    fn soft_below_hard_suggests_ulimit() {
        let mut r = tuned_box();
        r.nofile.soft = Some(1024);
        let rep = evaluate(&r, &Params::default());
        assert_eq!(rep.binding, FactorKind::Nofile);
        assert_eq!(rep.max_connections, 960);
        let f = get(&rep, FactorKind::Nofile);
        assert_eq!(f.changes.len(), 1);
        assert!(f.changes[0].action.contains("ulimit -Sn 2500000"));
        assert!(f.changes[0].action.contains("no privilege"));
    }

    #[test]
    fn memory_binds_on_small_box() {
        let mut r = tuned_box();
        r.mem_available_bytes = 4 * GIB;
        let rep = evaluate(&r, &Params::default());
        assert_eq!(rep.binding, FactorKind::Memory);
        assert_eq!(rep.max_connections, 4 * GIB / 6144);
        let p = Params {
            bytes_per_conn_user: 1024,
            bytes_per_conn_kernel: 1024,
            ..Params::default()
        };
        let rep = evaluate(&r, &p);
        assert_eq!(get(&rep, FactorKind::Memory).allows, 2_097_152);
    }

    #[test]
    fn conntrack_binds_and_offers_notrack() {
        let mut r = tuned_box();
        r.conntrack = Some(Conntrack {
            max: 262_144,
            count: Some(144),
        });
        let rep = evaluate(&r, &Params::default());
        assert_eq!(rep.binding, FactorKind::Conntrack);
        assert_eq!(rep.max_connections, 262_000);
        let f = get(&rep, FactorKind::Conntrack);
        assert!(f.changes[0].action.contains("tcp dport 7300 notrack"));
        assert!(f.changes[1]
            .action
            .starts_with("sysctl -w net.netfilter.nf_conntrack_max=2500000"));
    }

    #[test]
    fn smaller_target_is_reachable_here() {
        let p = Params {
            target: 19_000,
            ..Params::default()
        };
        let rep = evaluate(&this_box(), &p);
        assert!(rep.target_reachable);
        assert_eq!(rep.exit_code(), 0);
        assert!(rep.factors.iter().all(|f| f.changes.is_empty()));
    }

    #[test]
    fn io_uring_failure_makes_target_unreachable() {
        let mut r = tuned_box();
        r.io_uring = IoUringStatus {
            setup_ok: false,
            error: Some("Operation not permitted (os error 1)".to_owned()),
            io_uring_disabled: Some(2),
            ring_core_error: Some("io_uring_setup(2) failed".to_owned()),
            task_work_error: None,
        };
        let rep = evaluate(&r, &Params::default());
        assert_eq!(check(&rep, CheckKind::IoUring).status, Status::Fail);
        assert!(!rep.target_reachable);
        assert!(rep
            .changes
            .iter()
            .any(|c| c.action.starts_with("sysctl -w kernel.io_uring_disabled=0")));
    }

    #[test]
    fn memlock_thresholds() {
        let mut r = tuned_box();
        r.memlock.soft = Some(64 * 1024);
        let rep = evaluate(&r, &Params::default());
        assert_eq!(check(&rep, CheckKind::Memlock).status, Status::Fail);
        assert!(!rep.target_reachable);

        r.memlock.soft = Some(8 << 20);
        let rep = evaluate(&r, &Params::default());
        let c = check(&rep, CheckKind::Memlock);
        assert_eq!(c.status, Status::Warn);
        assert!(c.changes[0].action.contains("LimitMEMLOCK=infinity"));
        // Warnings do not change the verdict.
        assert!(rep.target_reachable);

        r.capabilities = Some(Capabilities::from_mask(1 << 14));
        let rep = evaluate(&r, &Params::default());
        assert_eq!(check(&rep, CheckKind::Memlock).status, Status::Ok);
    }

    #[test]
    fn storm_backlog() {
        let mut r = tuned_box();
        r.somaxconn = 4096;
        r.tcp_max_syn_backlog = 2048;
        let p = Params {
            storm_rate: 2_000_000,
            accept_stall_ms: 100,
            listen_backlog: 65_535,
            ..Params::default()
        };
        // 2M/s ÷ 32 × 0.1 s = 6,250 > 4,096.
        let rep = evaluate(&r, &p);
        let c = check(&rep, CheckKind::AcceptBacklog);
        assert_eq!(c.status, Status::Warn);
        assert!(c.explain.contains("6,250 queued per listener"));
        assert!(c
            .changes
            .iter()
            .any(|x| x.action.starts_with("sysctl -w net.core.somaxconn=65535")));
        // Cookies are on: the SYN-queue length does not drop connections.
        assert!(!c
            .changes
            .iter()
            .any(|x| x.action.contains("tcp_max_syn_backlog")));
        let mut no_cookies = r.clone();
        no_cookies.tcp_syncookies = Some(0);
        let rep2 = evaluate(&no_cookies, &p);
        let c2 = check(&rep2, CheckKind::AcceptBacklog);
        assert!(c2.changes.iter().any(|x| x
            .action
            .starts_with("sysctl -w net.ipv4.tcp_max_syn_backlog=65535")));
        assert!(c2
            .changes
            .iter()
            .any(|x| x.action.starts_with("sysctl -w net.ipv4.tcp_syncookies=1")));
        assert!(
            rep.target_reachable,
            "a storm warning does not fail the target"
        );

        // Explicit single shard and a huge storm: recommendation above 65,535.
        let p = Params {
            storm_rate: 1_000_000,
            accept_stall_ms: 100,
            shards: Some(1),
            listen_backlog: 1024,
            ..Params::default()
        };
        let rep = evaluate(&r, &p);
        let c = check(&rep, CheckKind::AcceptBacklog);
        assert!(c
            .changes
            .iter()
            .any(|x| x.action.starts_with("sysctl -w net.core.somaxconn=100352")));
        assert!(c.changes.iter().any(|x| x.kind == ChangeKind::Gateway));
    }

    #[test]
    fn tcp_mem_large_floor_suggests_smaller_minimums() {
        let mut r = tuned_box();
        r.tcp_rmem = [65536, 131_072, 6_291_456];
        r.tcp_mem_pages = [100, 200, 300];
        let rep = evaluate(&r, &Params::default());
        let f = get(&rep, FactorKind::TcpMem);
        assert_eq!(f.allows, 300 * 4096 / (65536 + 4096));
        assert!(f.changes.iter().any(|c| c
            .action
            .starts_with("sysctl -w net.ipv4.tcp_rmem=\"4096 8192 6291456\"")));
    }

    #[test]
    fn report_serializes_to_json() {
        let rep = evaluate(&this_box(), &Params::default());
        let v: serde_json::Value = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["binding"], "nofile");
        assert_eq!(v["max_connections"], 19_936);
        assert_eq!(v["target_reachable"], false);
        assert_eq!(v["factors"][0]["kind"], "nofile");
        assert_eq!(v["readings"]["nofile"]["hard"], 20_000);
        assert_eq!(v["checks"][0]["status"], "ok");
    }
}
