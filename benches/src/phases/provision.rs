//! `provision` (automatic when `--accounts` holds fewer than `--conns` accounts, or forced by
//! naming it in `--phases`): registers accounts, `--provision-concurrency` at a time, through
//! the daemon's file SMS provider, and caches them in `--accounts` with the server's key.
//! Figure: registrations/s. Runs before the workers of the other phases start.
//!
//! With `--devices` > 1 (or `--publish-keys`) setup goes on with the link step: every primary
//! publishes identity keys and prekeys, and the companions each account lacks are linked
//! (`LinkRequest` → `LinkCode` → `LinkApprove` → `DeviceLinked` / `Registered` → `Login` →
//! `PrekeyUpload`), by `--workers` workers; the companions are cached with the accounts.
//! Figures: links/s.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::accounts::{generate_identity, Account, AccountsFile, Companion};
use crate::controller::ctx::{lat_json, lat_line, rate_per_s};
use crate::controller::setup::{base_spec, data_dir, probe_server_key};
use crate::controller::{Ctx, Pool};
use crate::phase::{Cmd, WorkerSpec};

/// Loads the cached accounts, checks they belong to this server, registers what is missing.
pub(crate) fn ensure_accounts(ctx: &mut Ctx, run_id: u32) -> Result<Vec<Account>> {
    let n = ctx.users;
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
    let upto = file.accounts.len().min(n);
    let linked = if ctx.publishes_keys() {
        let r = link(
            ctx,
            run_id,
            file.accounts.get_mut(..upto).unwrap_or_default(),
            &mut prov,
        );
        if let Some(p) = &ctx.args.accounts {
            file.save(p)
                .with_context(|| format!("saving the accounts file {}", p.display()))?;
        }
        r?
    } else {
        0
    };
    prov.insert("linked".into(), json!(linked));
    ctx.report.insert("provision".into(), Value::Object(prov));
    file.accounts.truncate(n);
    check_devices(ctx, &file.accounts)?;
    Ok(file.accounts)
}

/// Refuses accounts whose server-side device list would not match the copies the messaging
/// phase sends (more companions linked than `--devices` − 1).
fn check_devices(ctx: &Ctx, accounts: &[Account]) -> Result<()> {
    if !(ctx.args.send_multi || ctx.devices > 1) {
        return Ok(());
    }
    if let Some(a) = accounts.iter().find(|a| a.linked() > ctx.devices - 1) {
        bail!(
            "account {} has {} companions linked on the server, more than --devices {} − 1: SendMulti would be refused as stale; use another --accounts file and data directory",
            a.phone,
            a.linked(),
            ctx.devices
        );
    }
    Ok(())
}

/// The link step: identity keys for every primary and the missing companions' keys, then
/// `Cmd::Link` on `--workers` workers; records the device ids the server assigned. Returns the
/// companions linked; fails unless every account has its `--devices` − 1 companions.
fn link(
    ctx: &mut Ctx,
    run_id: u32,
    accounts: &mut [Account],
    prov: &mut Map<String, Value>,
) -> Result<u64> {
    let d = ctx.devices;
    let mut needed = false;
    for a in accounts.iter_mut() {
        if a.identity.is_none() {
            a.identity = Some(generate_identity());
            needed = true;
        }
        // Linked companions first (by device id), then fresh ones for what is missing.
        a.companions
            .sort_by_key(|c| c.device.map_or(u32::MAX, u32::from));
        a.companions.retain(|c| c.device.is_some());
        while a.companions.len() < d - 1 {
            a.companions.push(Companion::generate());
            needed = true;
        }
    }
    if !needed {
        return Ok(0);
    }
    let dd = data_dir(ctx);
    let phones: Vec<u64> = accounts
        .iter()
        .flat_map(|a| std::iter::repeat_n(a.phone, d))
        .collect();
    let specs = ctx
        .ranges()
        .into_iter()
        .enumerate()
        .map(|(i, (lo, hi))| {
            let mut s = base_spec(ctx, &phones, accounts, i, lo, hi, run_id, dd.clone())?;
            s.multi = false;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut pool = Pool::start(specs, ctx.args.quiet)?;
    let limit = ctx.phase_deadline(ctx.args.phase_timeout.max(60) * 5);
    let per = (ctx.args.provision_concurrency / ctx.k).max(1);
    let cmds = (0..ctx.k)
        .map(|_| Cmd::Link {
            concurrency: per,
            deadline_ns: limit,
        })
        .collect();
    let o = pool.call("link", cmds, limit);
    pool.shutdown();
    let o = o?;
    for &(g, device) in &o.linked_devices {
        if let Some(c) = accounts
            .get_mut(g / d)
            .and_then(|a| (g % d).checked_sub(1).and_then(|j| a.companions.get_mut(j)))
        {
            c.device = Some(device);
        }
    }
    let secs = o.t_end_ns.saturating_sub(o.t_start_ns) as f64 / 1e9;
    let rate = rate_per_s(o.linked, o.t_start_ns, o.t_last_ok_ns);
    let (s, lj) = lat_json(&o.hist_handshake);
    prov.insert(
        "link".into(),
        json!({
            "devices_per_account": d, "companions_linked": o.linked, "keys_uploaded": o.keys_uploaded,
            "attempt_failures": o.attempt_failures, "gave_up": o.gave_up, "fail_reasons": o.fail_reasons,
            "errors": o.errors, "seconds": secs, "links_per_s": rate,
            "latency_primary_connect_to_welcome_and_companion_connect_to_keys_published": lj, "one_time_prekeys_per_device": ctx.args.setup_prekeys,
        }),
    );
    ctx.row(
        "provision",
        "linked",
        format!(
            "{} companions in {:.1} s ({:.0}/s), {} key uploads, {} failed attempts",
            o.linked, secs, rate, o.keys_uploaded, o.attempt_failures
        ),
    );
    ctx.row(
        "provision",
        "  connect → Welcome / keys published",
        lat_line(&s),
    );
    let short = accounts.iter().filter(|a| a.linked() < d - 1).count();
    if short > 0 {
        bail!(
            "{short} accounts lack companions after linking (failures: {:?}, errors: {:?})",
            o.fail_reasons,
            o.errors
        );
    }
    Ok(o.linked)
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
        devices: 1,
        slot_devices: Vec::new(),
        multi: false,
        group_size: 0,
        setup_prekeys: 0,
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
