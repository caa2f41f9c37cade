//! The runtime: the process around the shards. It checks the data directory, loads the server
//! key, starts the admin endpoint and the side-effect worker, runs one pinned glommio executor
//! per shard ([`crate::executor`]) with the channel mesh between them, and waits for them to
//! drain.
//!
//! Architecture invariants:
//! * A shard's state (its `Shard`, its connections, its log) is touched only by its own
//!   executor thread. Nothing here takes a lock.
//! * Shards talk only through glommio's channel mesh (bounded SPSC rings), carrying
//!   [`crate::mesh::GatewayMsg`]s. The only things shared across threads are the read-only [`Config`], the
//!   server key, each shard's metrics (written by that shard only) and the drain flag.
//!
//! Module map: [`crate::datadir`] (server key, `SHARDS`, shard directories),
//! [`crate::executor`] (one shard's tasks), [`crate::ctx`] (a shard's context and the
//! event/action glue), [`crate::accept`] (listener, caps, handshake), [`crate::handshake`],
//! [`crate::preauth`], [`crate::connection`] (a connection's data), [`crate::conn_task`] (the
//! task that drives it), [`crate::conn_table`], [`crate::mesh`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use protocol::noise::StaticKeypair;
use shards::ShardId;

use crate::admin::{self, AdminLimits};
use crate::config::Config;
use crate::datadir;
use crate::executor::{self, Mesh, Shared};
use crate::media::{self, MediaSettings};
use crate::metrics::{MediaMetrics, ShardMetrics};
use crate::sidecar::{Providers, Sidecar};

/// Runs the daemon until SIGTERM/SIGINT has drained it. Returns the process exit status.
pub fn run(mut cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    cfg.validate()?;
    apply_heap_huge_pages(&cfg);
    resolve_connection_core(&mut cfg)?;
    let n = cfg.shard_count();
    // Read what the directory holds before writing anything to it.
    let inventory = datadir::Inventory::read(&cfg.data_dir)?;
    datadir::create_dir_durable(&cfg.data_dir)?;
    let key = Arc::new(datadir::load_server_key(
        &cfg.data_dir,
        &inventory,
        cfg.new_server_key,
    )?);
    datadir::check_layout(&cfg.data_dir, n, &inventory)?;
    let shared = Arc::new(start_shared(cfg, key)?);
    let handles = spawn_shards(&shared)?;
    join_shards(handles)
}

/// `heap_huge_pages = false`: no transparent huge pages for this process from now on
/// (`PR_SET_THP_DISABLE`, which also covers the allocator's arena reserved before `main`).
fn apply_heap_huge_pages(cfg: &Config) {
    if cfg.heap_huge_pages {
        return;
    }
    // SAFETY: prctl(2) with integer arguments only; the result is checked.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "heap_huge_pages = false: PR_SET_THP_DISABLE failed; huge pages stay as the host sets them"
        );
    }
}

/// Checks the kernel for the ring connection core: `uring` refuses to start without it (rather
/// than start shards that cannot serve a connection), `auto` falls back to `task` and says why.
fn resolve_connection_core(cfg: &mut Config) -> Result<(), String> {
    match cfg.connection_core.as_str() {
        "uring" => crate::uring::check_kernel(),
        "auto" => {
            match crate::uring::check_kernel() {
                Ok(()) => cfg.connection_core = "uring".to_owned(),
                Err(why) => {
                    tracing::warn!(reason = %why, "connection_core = auto: using the task core");
                    cfg.connection_core = "task".to_owned();
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Starts what the shards share: metrics and the admin endpoint, the side-effect worker, and
/// the drain flag on SIGTERM/SIGINT.
fn start_shared(
    cfg: Config,
    key: Arc<StaticKeypair>,
) -> Result<Shared, Box<dyn std::error::Error>> {
    let n = cfg.shard_count();
    let metrics: Arc<Vec<Arc<ShardMetrics>>> =
        Arc::new((0..n).map(|_| Arc::new(ShardMetrics::new(n))).collect());
    let limits = AdminLimits {
        connections_max: cfg.admin_connections_max,
        request_timeout_ms: cfg.admin_request_timeout_ms,
    };
    let media = Arc::new(MediaMetrics::default());
    let admin = admin::spawn_admin(cfg.admin_addr, limits, metrics.clone(), media.clone())?;
    if let Some(addr) = cfg.media_socket_addr() {
        let settings = MediaSettings {
            root: cfg.data_dir.join("media"),
            secret: datadir::load_media_secret(&cfg.data_dir)?,
            connections_max: cfg.media_connections_max,
            idle_timeout_ms: cfg.media_idle_timeout_ms,
            ttl_s: cfg.media_ttl_s,
            url_ttl_s: cfg.media_url_ttl_s,
            sweep_ms: cfg.media_sweep_ms,
        };
        let bound = media::spawn_media(addr, settings, media)?;
        tracing::info!(media = %bound, url = %cfg.media_url_base(), "media endpoint listening");
    }
    let (sidecar, _sidecar_thread) = Sidecar::spawn(Providers {
        sms: cfg.sms_provider.clone(),
        sms_url: cfg.sms_webhook_url.clone(),
        push: cfg.push_provider.clone(),
        push_url: cfg.push_webhook_url.clone(),
        data_dir: cfg.data_dir.clone(),
    })?;
    let drain = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, drain.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, drain.clone())?;
    tracing::info!(
        listen = %cfg.listen_addr, admin = %admin, shards = n, data_dir = %cfg.data_dir.display(),
        server_key = %hex::encode(key.public), connection_core = %cfg.connection_core,
        uring_task_work = %cfg.uring_task_work, "switchboard starting"
    );
    Ok(Shared {
        cfg: Arc::new(cfg),
        key,
        metrics,
        sidecar,
        drain,
    })
}

/// Where shard `i` runs: CPU `cpus[i % len]` (or CPU i), or anywhere when pinning is off.
fn placement(cfg: &Config, i: usize) -> Placement {
    if !cfg.pin_cpus {
        return Placement::Unbound;
    }
    let cpu = if cfg.cpus.is_empty() {
        i
    } else {
        cfg.cpus.get(i % cfg.cpus.len()).copied().unwrap_or(i)
    };
    Placement::Fixed(cpu)
}

type ShardHandle = ExecutorJoinHandle<Result<(), String>>;

/// One executor thread per shard, all joined to one full channel mesh.
fn spawn_shards(shared: &Arc<Shared>) -> Result<Vec<ShardHandle>, Box<dyn std::error::Error>> {
    let cfg = &shared.cfg;
    let n = cfg.shard_count();
    let mesh: Mesh = MeshBuilder::full(n, cfg.mesh_channel_capacity);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let shared = shared.clone();
        let mesh = mesh.clone();
        let h = LocalExecutorBuilder::new(placement(cfg, i))
            .name(&format!("shard-{i}"))
            .spawn(move || async move { executor::shard_main(i as ShardId, shared, mesh).await })?;
        handles.push(h);
    }
    Ok(handles)
}

/// Waits for every shard; the last failure, if any, is the process's.
fn join_shards(handles: Vec<ShardHandle>) -> Result<(), Box<dyn std::error::Error>> {
    let mut failed = None;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(shard = i, error = %e, "shard failed");
                failed = Some(e);
            }
            Err(e) => {
                tracing::error!(shard = i, error = %e, "shard executor failed");
                failed = Some(e.to_string());
            }
        }
    }
    match failed {
        None => {
            tracing::info!("drained; exiting");
            Ok(())
        }
        Some(e) => Err(e.into()),
    }
}
