//! Setting a run up: source addresses, the server's key, worker specs, the host.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use protocol::noise::ClientHandshake;
use protocol::wire;
use protocol::PREAMBLE;
use serde_json::{json, Value};

use crate::accounts::{hex, Account};
use crate::phase::WorkerSpec;
use crate::sys;

use super::{Ctx, SEC};

/// `--source-ips`: the source addresses to bind, round-robin (empty: let the kernel choose).
pub(crate) fn parse_ip_list(s: &str, target: SocketAddr, n: usize) -> Result<Vec<IpAddr>> {
    match s {
        "none" | "" => Ok(Vec::new()),
        "auto" => {
            if !target.ip().is_loopback() {
                return Ok(Vec::new());
            }
            let k = n.div_ceil(20_000).max(1);
            Ok((0..k)
                .map(|i| {
                    IpAddr::V4(Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(127, 0, 0, 2)) + i as u32,
                    ))
                })
                .collect())
        }
        _ if s.contains('-') && !s.contains(',') => {
            let (a, b) = s.split_once('-').context("bad range")?;
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 1 << 20 {
                bail!("bad address range {s:?}");
            }
            Ok((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect())
        }
        _ => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<IpAddr>()
                    .with_context(|| format!("bad address {x:?}"))
            })
            .collect(),
    }
}

/// Handshakes with the server once to learn its static key (hex).
pub(crate) fn probe_server_key(target: SocketAddr) -> Result<String> {
    let key = protocol::noise::StaticKeypair::generate();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("connecting to {target}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .context("setting a read timeout")?;
    let (st, msg1) = ClientHandshake::start(&key).context("starting a handshake")?;
    let mut out = PREAMBLE.to_vec();
    wire::put_len(&mut out, msg1.len());
    out.extend_from_slice(&msg1);
    s.write_all(&out)
        .with_context(|| format!("sending the handshake to {target}"))?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .with_context(|| format!("reading handshake from {target}"))?;
    let mut msg2 = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg2)
        .with_context(|| format!("reading handshake from {target}"))?;
    let (_, _, server) = st
        .read_hello(&msg2)
        .with_context(|| format!("handshake with {target}"))?;
    Ok(hex(&server))
}

/// The spec of worker `i`, which holds the global slots `lo..hi` (whole accounts of
/// `ctx.devices` slots; `phones` has one entry per slot, `accounts` one per account).
pub(crate) fn base_spec(
    ctx: &Ctx,
    phones: &[u64],
    accounts: &[Account],
    i: usize,
    lo: usize,
    hi: usize,
    run_id: u32,
    data_dir: Option<PathBuf>,
) -> Result<WorkerSpec> {
    Ok(WorkerSpec {
        index: i,
        workers: ctx.k,
        target: ctx.target,
        source_ips: parse_ip_list(&ctx.args.source_ips, ctx.target, ctx.n)?,
        phones: phones.to_vec(),
        base: lo,
        accounts: accounts
            .get(lo / ctx.devices..hi / ctx.devices)
            .with_context(|| format!("slots {lo}..{hi} of {} accounts", accounts.len()))?
            .to_vec(),
        run_id,
        keepalive_ms: ctx.args.keepalive_ms,
        connect_timeout_ms: ctx.args.connect_timeout_ms,
        max_attempts: ctx.args.max_attempts,
        data_dir,
        hard_deadline_ns: ctx.deadline + 30 * SEC,
        devices: ctx.devices,
        slot_devices: Vec::new(),
        multi: ctx.args.send_multi || ctx.devices > 1,
        group_size: ctx.args.group_size,
        setup_prekeys: ctx.args.setup_prekeys,
    })
}

/// The daemon's data directory (where its file SMS provider writes codes), if known.
pub(crate) fn data_dir(ctx: &Ctx) -> Option<PathBuf> {
    ctx.daemon
        .as_ref()
        .map(|d| d.data_dir.clone())
        .or_else(|| ctx.args.data_dir.clone())
}

/// The host the run is on, for the report.
pub(crate) fn host_json() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned());
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| l.to_owned());
    json!({
        "cpus": sys::online_cpus(),
        "cpu_model": model, "mem_total": mem, "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "somaxconn": read("/proc/sys/net/core/somaxconn").trim(), "tcp_mem": read("/proc/sys/net/ipv4/tcp_mem").trim(),
        "ip_local_port_range": read("/proc/sys/net/ipv4/ip_local_port_range").trim(),
        "loadavg_at_start": read("/proc/loadavg").trim(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_lists() {
        let t: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(parse_ip_list("none", t, 10).unwrap().is_empty());
        assert_eq!(parse_ip_list("auto", t, 45_000).unwrap().len(), 3);
        assert_eq!(
            parse_ip_list("127.0.0.2-127.0.0.50", t, 1).unwrap().len(),
            49
        );
        assert_eq!(parse_ip_list("127.0.0.2,::1", t, 1).unwrap().len(), 2);
        assert!(parse_ip_list("x", t, 1).is_err());
    }
}
