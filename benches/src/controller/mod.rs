//! The flood generator's controller: it parses the command line (`args`), starts the daemon
//! and the workers (`pool`), provisions accounts, runs the phases (one module each in
//! `crate::phases`) over the shared context (`ctx`), and prints the table and writes the
//! JSON report.

pub(crate) mod args;
pub(crate) mod ctx;
pub(crate) mod pool;
mod progress;
pub(crate) mod setup;

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::daemon::{self, Daemon};
use crate::phases::{self, provision::ensure_accounts, PHASES};
use crate::sys::{self, now_ns};
use crate::sysmem::ProcMem;

pub use args::Args;
pub(crate) use ctx::Ctx;
use ctx::{print_table, workers_cpu};
pub use pool::{worker_main, Pool};
use setup::{base_spec, data_dir, host_json};

/// One second in ns (the monotonic clock of [`sys::now_ns`]).
pub(crate) const SEC: u64 = 1_000_000_000;

/// Runs the controller. Returns the first failure, with its context.
pub fn run(args: Args) -> Result<()> {
    let t0 = now_ns();
    let (n, k) = check_limits(&args)?;
    let phases = parse_phases(&args)?;
    let daemon = spawn_daemon(&args)?;
    let gen_cpus = pin_generator(&args, daemon.is_some())?;
    let mut ctx = new_ctx(&args, daemon, n, k, t0 + args.max_seconds * SEC);
    record_start(&mut ctx, &args, &gen_cpus);
    let run_id = (sys::wall_ms() / 1000) as u32;
    let mut pool = start_workers(&mut ctx, run_id)?;
    let result = run_phases(&mut ctx, &mut pool, &phases);
    let cpu = workers_cpu(&pool);
    pool.shutdown();
    finish(&mut ctx, &args, t0, cpu)?;
    result
}

/// Connections and workers of the run; fails if a worker's share exceeds the open-file limit.
fn check_limits(args: &Args) -> Result<(usize, usize)> {
    let nofile = sys::raise_nofile().context("raising the open-file limit")?;
    let k = args.workers.max(1);
    ensure!(
        (1..=5).contains(&args.devices),
        "--devices {} out of range 1..=5 (the server's default devices_per_account_max)",
        args.devices
    );
    let n = args.conns.max(2) * args.devices;
    ensure!(
        n / k + 64 <= nofile as usize,
        "{} connections per worker exceed the open-file limit {nofile}; use more --workers",
        n / k
    );
    Ok((n, k))
}

/// `--phases`, trimmed and lower-cased; fails on an unknown one.
fn parse_phases(args: &Args) -> Result<Vec<String>> {
    let phases: Vec<String> = args
        .phases
        .iter()
        .map(|p| p.trim().to_lowercase())
        .collect();
    for p in &phases {
        if !PHASES.contains(&p.as_str()) {
            bail!("unknown phase {p:?}");
        }
        if args.devices > 1 && (p == "queue" || p == "drain") {
            bail!("phase {p} sends to device 0 only: run it with --devices 1");
        }
        if args.group_size > 0 && (p == "queue" || p == "drain") {
            bail!("phase {p} sends 1:1 messages: run it without --group-size");
        }
    }
    if args.group_size == 1 || args.group_size > protocol::group::GROUP_USERS_MAX {
        bail!(
            "--group-size {}: a group has 2..={} members",
            args.group_size,
            protocol::group::GROUP_USERS_MAX
        );
    }
    Ok(phases)
}

/// Starts the `--spawn-daemon` binary, if given.
fn spawn_daemon(args: &Args) -> Result<Option<Daemon>> {
    let Some(bin) = &args.spawn_daemon else {
        return Ok(None);
    };
    eprintln!(
        "switchboard-flood: starting {} (--shards {} --cpus {})",
        bin.display(),
        args.daemon_shards,
        args.daemon_cpus
    );
    let d = Daemon::spawn(
        bin,
        args.data_dir.as_deref(),
        args.daemon_shards,
        &args.daemon_cpus,
        &args.daemon_args,
    )
    .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Some(d))
}

/// Pins the generator to `--gen-cpus` (default with a spawned daemon: CPU 1, when there is
/// more than one). Returns the CPUs.
fn pin_generator(args: &Args, spawned: bool) -> Result<Vec<usize>> {
    let mut gen_cpus = args.gen_cpus.clone();
    if gen_cpus.is_empty() && spawned && sys::online_cpus() > 1 {
        gen_cpus = vec![1];
    }
    if !gen_cpus.is_empty() {
        sys::pin_to_cpus(&gen_cpus).with_context(|| format!("pinning to CPUs {gen_cpus:?}"))?;
    }
    Ok(gen_cpus)
}

fn new_ctx(args: &Args, daemon: Option<Daemon>, n: usize, k: usize, deadline: u64) -> Ctx {
    let (target, admin) = match &daemon {
        Some(d) => (d.listen, d.admin),
        None => (args.target, args.admin),
    };
    let daemon_pid = daemon.as_ref().and_then(|d| d.pid()).or(args.daemon_pid);
    Ctx {
        args: args.clone(),
        daemon,
        target,
        admin,
        daemon_pid,
        n,
        users: n / args.devices.max(1),
        devices: args.devices.max(1),
        k,
        report: Map::new(),
        table: Vec::new(),
        deadline,
        baseline: None,
        worker_baseline: ProcMem::default(),
        queued: None,
        notes: Vec::new(),
    }
}

/// The report's parameters, host, start time and daemon (version, configuration).
fn record_start(ctx: &mut Ctx, args: &Args, gen_cpus: &[usize]) {
    ctx.report.insert(
        "params".into(),
        serde_json::to_value(args).unwrap_or(Value::Null),
    );
    ctx.report.insert("generator_cpus".into(), json!(gen_cpus));
    ctx.report.insert("host".into(), host_json());
    ctx.report
        .insert("started_unix_ms".into(), json!(sys::wall_ms()));
    // The daemon: version and configuration.
    let page = ctx.metrics();
    let version = page.as_deref().and_then(daemon::build_version);
    let bin = args.daemon_bin.clone().or(args.spawn_daemon.clone());
    let cfg_args = ctx
        .daemon
        .as_ref()
        .map(|d| d.args.clone())
        .unwrap_or_else(|| args.daemon_args.clone());
    let config = bin
        .as_ref()
        .and_then(|b| daemon::print_config(b, &cfg_args));
    let (target, admin, daemon_pid) = (ctx.target, ctx.admin, ctx.daemon_pid);
    ctx.report.insert(
        "daemon".into(),
        json!({
            "version": version, "target": target.to_string(), "admin": admin.to_string(), "pid": daemon_pid,
            "spawned": ctx.daemon.as_ref().map(|d| json!({"bin": d.bin, "args": d.args, "data_dir": d.data_dir, "log": d.log_path})),
            "print_config": config, "metrics_at_start": if config.is_none() { page.clone() } else { None },
            "rss_at_start": ctx.daemon_rss_now(),
        }),
    );
}

/// Provisions the accounts, starts one worker per share of them and takes the memory
/// baselines.
fn start_workers(ctx: &mut Ctx, run_id: u32) -> Result<Pool> {
    let accounts = ensure_accounts(ctx, run_id)?;
    ctx.report.insert(
        "daemon_rss_after_provisioning".into(),
        json!(ctx.daemon_rss_now()),
    );
    setup_memory(ctx);
    let d = ctx.devices;
    let phones: Vec<u64> = accounts
        .iter()
        .flat_map(|a| std::iter::repeat_n(a.phone, d))
        .collect();
    let slot_devices = slot_devices(&accounts, d);
    let dd = data_dir(ctx);
    let specs = ctx
        .ranges()
        .into_iter()
        .enumerate()
        .map(|(i, (lo, hi))| {
            let mut s = base_spec(ctx, &phones, &accounts, i, lo, hi, run_id, dd.clone())?;
            s.slot_devices = slot_devices.clone();
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    drop(accounts);
    let pool = Pool::start(specs, ctx.args.quiet)?;
    std::thread::sleep(Duration::from_millis(300));
    ctx.worker_baseline = ctx.read_mem(&pool).workers;
    ctx.baseline = Some(ctx.read_mem(&pool));
    Ok(pool)
}

/// The device id of every global slot: per account the primary (0), then its companions.
fn slot_devices(accounts: &[crate::accounts::Account], d: usize) -> Vec<u16> {
    accounts
        .iter()
        .flat_map(|a| {
            std::iter::once(0)
                .chain((0..d - 1).map(|j| a.companions.get(j).and_then(|c| c.device).unwrap_or(0)))
        })
        .collect()
}

/// The daemon's memory after account setup (registration, key publishing, linking), all
/// connections of the setup closed, after `--settle-seconds`: (RSS after − RSS at start) per
/// account and per device. Only meaningful when this run set the accounts up on a fresh
/// daemon (`fresh` says how many it registered and linked).
fn setup_memory(ctx: &mut Ctx) {
    let start = ctx
        .report
        .get("daemon")
        .and_then(|d| d.get("rss_at_start"))
        .and_then(|v| v.as_u64());
    std::thread::sleep(Duration::from_secs(ctx.args.settle_seconds));
    let after = ctx.daemon_rss_now();
    let prov = ctx.report.get("provision");
    let get = |k: &str| prov.and_then(|p| p.get(k)).and_then(|v| v.as_u64());
    let registered = get("registered").unwrap_or(0);
    let linked = get("linked").unwrap_or(0);
    let (users, d) = (ctx.users as f64, ctx.devices as f64);
    let delta = match (start, after) {
        (Some(a), Some(b)) => Some(b as i64 - a as i64),
        _ => None,
    };
    let per_account = delta.map(|x| x as f64 / users);
    ctx.report.insert(
        "setup_memory".into(),
        json!({
            "accounts": ctx.users, "devices_per_account": ctx.devices,
            "registered_this_run": registered, "companions_linked_this_run": linked,
            "keys_published": ctx.publishes_keys(), "settle_seconds": ctx.args.settle_seconds,
            "daemon_rss_at_start": start, "daemon_rss_after_setup": after, "daemon_rss_delta": delta,
            "daemon_rss_per_account_bytes": per_account,
            "daemon_rss_per_device_bytes": per_account.map(|x| x / d),
        }),
    );
    if let (Some(delta), Some(per)) = (delta, per_account) {
        ctx.row(
            "setup",
            "daemon RSS / account",
            format!(
                "{per:.0} B ({:.0} B per device; Δ {:.1} MiB for {} accounts × {} devices, {} registered + {} linked in this run)",
                per / d,
                delta as f64 / f64::from(1u32 << 20),
                ctx.users,
                ctx.devices,
                registered,
                linked
            ),
        );
    }
}

/// Runs the phases in order until one fails or `--max-seconds` passes.
fn run_phases(ctx: &mut Ctx, pool: &mut Pool, phases: &[String]) -> Result<()> {
    for p in phases {
        if now_ns() > ctx.deadline {
            ctx.notes
                .push(format!("--max-seconds reached before phase {p}"));
            break;
        }
        if let Err(e) = phases::run(p, ctx, pool) {
            ctx.notes.push(format!("phase {p} failed: {e:#}"));
            return Err(e.context(format!("phase {p}")));
        }
    }
    Ok(())
}

/// Closes the report, prints the table and writes the JSON.
fn finish(ctx: &mut Ctx, args: &Args, t0: u64, cpu: Option<f64>) -> Result<()> {
    ctx.report
        .insert("generator_cpu_seconds".into(), json!(cpu));
    ctx.report.insert(
        "loadavg_at_end".into(),
        json!(std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()),
    );
    ctx.report.insert(
        "elapsed_seconds".into(),
        json!((now_ns() - t0) as f64 / 1e9),
    );
    ctx.report.insert("notes".into(), json!(ctx.notes));
    print_table(ctx);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&Value::Object(ctx.report.clone()))
            .context("encoding the JSON report")?;
        std::fs::write(path, text)
            .with_context(|| format!("writing the JSON report {}", path.display()))?;
        eprintln!("switchboard-flood: wrote {}", path.display());
    }
    if let Some(d) = &ctx.daemon {
        eprintln!("switchboard-flood: daemon log: {}", d.log_path.display());
    }
    Ok(())
}
