//! The admin endpoint: `/metrics` (Prometheus text) and `/healthz`, served by hyper (HTTP/1.1)
//! on a glommio executor of its own thread, unpinned, off the shards' cores. No tokio runtime.
//!
//! Each connection is its own task, so a slow or silent scraper holds only its own connection,
//! never the next scrape. Limits: at most `admin_connections_max` connections at once (past it
//! new ones are closed at accept, `switchboard_admin_refused_total`), and each must finish its
//! request and response within `admin_request_timeout_ms` (else it is closed,
//! `switchboard_admin_timeouts_total`). One request per connection (no keep-alive), as
//! Prometheus scrapes.

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

use crate::metrics::{self, AdminMetrics, MediaMetrics, ShardMetrics};

/// The admin endpoint's limits.
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// `admin_connections_max`.
    pub connections_max: usize,
    /// `admin_request_timeout_ms`.
    pub request_timeout_ms: u64,
}

/// Binds `addr` (errors are reported here, before the shards start) and serves it from a new
/// `admin` thread. Returns the bound address.
pub fn spawn_admin(
    addr: SocketAddr,
    limits: AdminLimits,
    shards: Arc<Vec<Arc<ShardMetrics>>>,
    media: Arc<MediaMetrics>,
) -> io::Result<SocketAddr> {
    let listener = bind_retrying(addr)?;
    let local = listener.local_addr()?;
    let fd = OwnedFd::from(listener);
    // The handle is not joined: the thread serves until the process exits.
    // The admin executor does no storage I/O: without these its io_uring rings and the 10 MiB
    // of registered I/O memory glommio preallocates by default cost ~15 MiB of RSS at idle.
    let _handle = LocalExecutorBuilder::new(Placement::Unbound)
        .name("admin")
        .io_memory(ADMIN_IO_MEMORY_BYTES)
        .ring_depth(ADMIN_RING_DEPTH)
        .spawn(move || serve(fd, limits, shards, media))
        .map_err(|e| io::Error::other(format!("starting the admin thread: {e}")))?;
    Ok(local)
}

/// How long start-up retries the admin bind while the address is in use. A daemon that just
/// exited can leave its admin listener behind for a moment (its descriptor sat in an io_uring
/// instance, which the kernel tears down asynchronously), so a restart right after a stop would
/// fail with "Address already in use"; a listener that is still there after this long belongs to
/// a live process, and start-up fails with that error.
const ADMIN_BIND_RETRY_MS: u64 = 5_000;

/// glommio's registered I/O memory for the admin executor (its minimum: the endpoint does no
/// file I/O).
const ADMIN_IO_MEMORY_BYTES: usize = 64 * 1024;

/// io_uring depth of the admin executor: it serves at most `admin_connections_max` sockets.
const ADMIN_RING_DEPTH: usize = 32;

pub(crate) fn bind_retrying(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(ADMIN_BIND_RETRY_MS);
    let mut warned = false;
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
            {
                if !warned {
                    tracing::warn!(%addr, "admin address in use; retrying (a stopped daemon's listener may linger)");
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

struct State {
    shards: Arc<Vec<Arc<ShardMetrics>>>,
    media: Arc<MediaMetrics>,
    metrics: AdminMetrics,
    open: Cell<usize>,
    limits: AdminLimits,
}

async fn serve(
    fd: OwnedFd,
    limits: AdminLimits,
    shards: Arc<Vec<Arc<ShardMetrics>>>,
    media: Arc<MediaMetrics>,
) {
    // SAFETY: a bound, listening socket whose descriptor was handed to this thread alone.
    let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
    let state = Rc::new(State {
        shards,
        media,
        metrics: AdminMetrics::default(),
        open: Cell::new(0),
        limits,
    });
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if state.open.get() >= state.limits.connections_max {
            state.metrics.refused_total.fetch_add(1, Relaxed);
            tracing::debug!("admin connection refused: admin_connections_max open");
            continue;
        }
        state.open.set(state.open.get() + 1);
        state.metrics.connections.fetch_add(1, Relaxed);
        let state = state.clone();
        glommio::spawn_local(async move {
            serve_connection(&state, stream).await;
            state.open.set(state.open.get().saturating_sub(1));
            state.metrics.connections.fetch_sub(1, Relaxed);
        })
        .detach();
    }
}

async fn serve_connection(state: &Rc<State>, stream: TcpStream) {
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = svc_state.clone();
        async move { Ok::<_, Infallible>(respond(&state, &req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(crate::hyper_io::HyperStream::new(stream), service);
    let timeout = Duration::from_millis(state.limits.request_timeout_ms);
    match glommio::timer::timeout(timeout, async { Ok(conn.await) }).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "admin connection failed"),
        Err(_) => {
            state.metrics.timeouts_total.fetch_add(1, Relaxed);
            tracing::debug!("admin connection closed: admin_request_timeout_ms passed");
        }
    }
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(&state.shards, &state.metrics, &state.media),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}
