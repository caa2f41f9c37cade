//! `provision` (automatic when `--accounts` holds fewer than `--conns` accounts, or forced by
//! naming it in `--phases`): registers accounts, `--provision-concurrency` at a time, through
//! the daemon's file SMS provider, and caches them in `--accounts` with the server's key.
//! Figure: registrations/s. Runs before the workers of the other phases start.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::accounts::{Account, AccountsFile};
use crate::controller::ctx::{lat_json, lat_line, rate_per_s};
use crate::controller::setup::{data_dir, probe_server_key};
use crate::controller::{Ctx, Pool};
use crate::phase::{Cmd, WorkerSpec};

/// Loads the cached accounts, checks they belong to this server, registers what is missing.
pub(crate) fn ensure_accounts(ctx: &mut Ctx, run_id: u32) -> Result<Vec<Account>> {
    let n = ctx.n;
    let mut file = load_for_server(ctx)?;
    let have = file.accounts.len();
    let force = ctx.args.phases.iter().any(|p| p == "provision");
    let mut prov = Map::new();
    prov.insert("cached".into(), json!(have.min(n)));
    if have < n || force {
        let dd = data_dir(ctx).context("provisioning needs the daemon's --data-dir (registration codes are read from <data-dir>/sms/) or --spawn-daemon")?;
        let next_phone = file
            .accounts
            .iter()
            .map(|a| a.phone + 1)
            .max()
            .unwrap_or(ctx.args.phone_base)
            .max(ctx.args.phone_base);
        let fresh: Vec<Account> = (0..n.saturating_sub(have))
            .map(|i| Account::generate(next_phone + i as u64))
            .collect();
        if !fresh.is_empty() {
            register(ctx, run_id, &fresh, dd, &mut prov)?;
            file.accounts.extend(fresh);
        }
        if let Some(p) = &ctx.args.accounts {
            file.save(p)
                .with_context(|| format!("saving the accounts file {}", p.display()))?;
        }
    }
    ctx.report.insert("provision".into(), Value::Object(prov));
    file.accounts.truncate(n);
    Ok(file.accounts)
}

/// The `--accounts` file (or an empty one), emptied if it was made for another server key.
fn load_for_server(ctx: &mut Ctx) -> Result<AccountsFile> {
    let server = probe_server_key(ctx.target)?;
    let mut file = match &ctx.args.accounts {
        Some(p) => AccountsFile::load(p)
            .with_context(|| format!("loading the accounts file {}", p.display()))?,
        None => AccountsFile::default(),
    };
    if !file.server.is_empty() && file.server != server {
        ctx.notes.push(format!(
            "accounts file was for server key {}…, this server is {}…: provisioning afresh",
            &file.server[..8.min(file.server.len())],
            &server[..8]
        ));
        file.accounts.clear();
    }
    file.server = server;
    Ok(file)
}

/// Registers `fresh` with one worker and records the figures in `prov` and the table. Fails
/// unless every registration succeeded.
fn register(
    ctx: &mut Ctx,
    run_id: u32,
    fresh: &[Account],
    dd: PathBuf,
    prov: &mut Map<String, Value>,
) -> Result<()> {
    let phones: Vec<u64> = fresh.iter().map(|a| a.phone).collect();
    let spec = WorkerSpec {
        index: 0,
        workers: 1,
        target: ctx.target,
        source_ips: Vec::new(),
        phones,
        base: 0,
        accounts: fresh.to_vec(),
        run_id,
        keepalive_ms: 0,
        connect_timeout_ms: ctx.args.connect_timeout_ms,
        max_attempts: ctx.args.max_attempts,
        data_dir: Some(dd),
        hard_deadline_ns: ctx.deadline,
    };
    let mut pool = Pool::start(vec![spec], ctx.args.quiet)?;
    let limit = ctx.phase_deadline(ctx.args.phase_timeout.max(60) * 5);
    let o = pool.call(
        "provision",
        vec![Cmd::Provision {
            concurrency: ctx.args.provision_concurrency,
            deadline_ns: limit,
        }],
        limit,
    );
    pool.shutdown();
    let o = o?;
    let secs = o.t_end_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let (s, lj) = lat_json(&o.hist_handshake);
    prov.insert("registered".into(), json!(o.registered));
    prov.insert("attempt_failures".into(), json!(o.attempt_failures));
    prov.insert("fail_reasons".into(), json!(o.fail_reasons));
    prov.insert("errors".into(), json!(o.errors));
    prov.insert("seconds".into(), json!(secs));
    prov.insert(
        "registrations_per_s".into(),
        json!(rate_per_s(o.registered, o.t_start_ns, o.t_last_ok_ns)),
    );
    prov.insert("latency_connect_to_registered".into(), lj);
    ctx.row(
        "provision",
        "registered",
        format!(
            "{} of {} in {:.1} s ({:.0}/s)",
            o.registered,
            fresh.len(),
            secs,
            rate_per_s(o.registered, o.t_start_ns, o.t_last_ok_ns)
        ),
    );
    ctx.row("provision", "connect → Registered", lat_line(&s));
    if o.registered < fresh.len() as u64 {
        bail!(
            "only {} of {} registrations succeeded (failures: {:?}, errors: {:?})",
            o.registered,
            fresh.len(),
            o.fail_reasons,
            o.errors
        );
    }
    Ok(())
}
