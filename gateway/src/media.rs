//! The media endpoint: encrypted blobs over HTTP/1.1 (hyper) on `media_addr`, served by a
//! glommio executor of its own thread, unpinned, off the shards' cores (docs/protocol.md §19
//! has the API).
//!
//! The endpoint shares no state with the shards: every request carries a token
//! (`protocol::media::Token`) signed with the media secret, naming the user, the slot, the
//! exact size and SHA-256 the body must have, and its expiry. Uploads stream to a partial file
//! while hashing (never the whole blob in memory) and become a blob only after the length and
//! hash are checked and the file and its directory are fsync'd (`storage::blob`).
//!
//! Limits: `media_connections_max` connections (past it, closed at accept and counted), and a
//! connection on which nothing moves for `media_idle_timeout_ms` is closed (the partial stays
//! resumable). File IO is blocking `std::fs` on this thread: it delays other media requests,
//! never a shard.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::convert::Infallible;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use protocol::media::{Token, TokenError, TokenOp};
use storage::blob::{BlobError, BlobStore};

use crate::metrics::{MediaMetrics, MediaRefusal};

/// The media endpoint's settings.
#[derive(Clone, Debug)]
pub struct MediaSettings {
    /// Root of the blob store (`<data_dir>/media`).
    pub root: PathBuf,
    /// HMAC key of the tokens.
    pub secret: [u8; 32],
    /// `media_connections_max`.
    pub connections_max: usize,
    /// `media_idle_timeout_ms`.
    pub idle_timeout_ms: u64,
    /// `media_ttl_s`: blobs older than this are deleted.
    pub ttl_s: u64,
    /// `media_url_ttl_s`: a partial untouched for this long (plus a minute) can no longer be
    /// resumed with a valid token and is deleted.
    pub url_ttl_s: u64,
    /// `media_sweep_ms`: how often expired blobs are looked for.
    pub sweep_ms: u64,
}

/// Bytes read from a blob file per body chunk of a GET.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Binds `addr`, opens the store, and serves from a new `media` thread. Returns the bound
/// address.
pub fn spawn_media(
    addr: SocketAddr,
    settings: MediaSettings,
    metrics: Arc<MediaMetrics>,
) -> io::Result<SocketAddr> {
    let store = BlobStore::open(&settings.root)?;
    let (blobs, bytes) = store.usage();
    metrics.blobs.store(blobs, Relaxed);
    metrics.bytes_stored.store(bytes, Relaxed);
    let listener = crate::admin::bind_retrying(addr)?;
    let local = listener.local_addr()?;
    let fd = OwnedFd::from(listener);
    let _handle = LocalExecutorBuilder::new(Placement::Unbound)
        .name("media")
        .io_memory(64 * 1024)
        .ring_depth(256)
        .spawn(move || serve(fd, store, settings, metrics))
        .map_err(|e| io::Error::other(format!("starting the media thread: {e}")))?;
    Ok(local)
}

struct State {
    store: BlobStore,
    settings: MediaSettings,
    metrics: Arc<MediaMetrics>,
    open: Cell<usize>,
    /// Slots with a PUT in progress: a second concurrent PUT is refused.
    active: RefCell<HashSet<(u64, u64)>>,
}

async fn serve(fd: OwnedFd, store: BlobStore, settings: MediaSettings, metrics: Arc<MediaMetrics>) {
    // SAFETY: a bound, listening socket whose descriptor was handed to this thread alone.
    let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
    let state = Rc::new(State {
        store,
        settings,
        metrics,
        open: Cell::new(0),
        active: RefCell::new(HashSet::new()),
    });
    glommio::spawn_local(sweep_loop(state.clone())).detach();
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "media accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if state.open.get() >= state.settings.connections_max {
            state.metrics.refused(MediaRefusal::Connections);
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

/// Deletes expired blobs and stale partials every `media_sweep_ms`.
async fn sweep_loop(state: Rc<State>) {
    let s = &state.settings;
    let ttl = Duration::from_secs(s.ttl_s);
    let partial_ttl = Duration::from_secs(s.url_ttl_s.saturating_add(60));
    loop {
        glommio::timer::sleep(Duration::from_millis(s.sweep_ms)).await;
        let swept = state.store.sweep(SystemTime::now(), ttl, partial_ttl);
        let m = &state.metrics;
        m.expired_total.fetch_add(swept.blobs, Relaxed);
        m.expired_bytes_total.fetch_add(swept.bytes, Relaxed);
        let (blobs, bytes) = state.store.usage();
        m.blobs.store(blobs, Relaxed);
        m.bytes_stored.store(bytes, Relaxed);
        if swept.blobs > 0 || swept.partials > 0 {
            tracing::info!(
                blobs = swept.blobs,
                bytes = swept.bytes,
                partials = swept.partials,
                "media expired"
            );
        }
    }
}

async fn serve_connection(state: &Rc<State>, stream: TcpStream) {
    let last_io = Rc::new(Cell::new(Instant::now()));
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = svc_state.clone();
        async move { Ok::<_, Infallible>(respond(&state, req).await) }
    });
    let io = crate::hyper_io::HyperStream::watched(stream, last_io.clone());
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    let idle = Duration::from_millis(state.settings.idle_timeout_ms);
    let watchdog = async {
        loop {
            glommio::timer::sleep(idle / 4 + Duration::from_millis(1)).await;
            if last_io.get().elapsed() >= idle {
                return Err(());
            }
        }
    };
    match futures_lite::future::or(async { Ok(conn.await) }, watchdog).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "media connection failed"),
        Err(()) => tracing::debug!("media connection closed: media_idle_timeout_ms passed"),
    }
}

/// A response body: nothing, a short text, or a range of a blob file read in chunks.
enum MediaBody {
    Text(Option<Bytes>),
    File {
        file: std::fs::File,
        left: u64,
        metrics: Arc<MediaMetrics>,
    },
}

impl hyper::body::Body for MediaBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            MediaBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
            MediaBody::File {
                file,
                left,
                metrics,
            } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                let want = usize::try_from((*left).min(READ_CHUNK_BYTES as u64))
                    .unwrap_or(READ_CHUNK_BYTES);
                let mut buf = vec![0u8; want];
                if let Err(e) = file.read_exact(&mut buf) {
                    return Poll::Ready(Some(Err(e)));
                }
                *left -= want as u64;
                metrics.download_bytes_total.fetch_add(want as u64, Relaxed);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MediaBody::Text(t) => t.is_none(),
            MediaBody::File { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MediaBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            MediaBody::File { left, .. } => SizeHint::with_exact(*left),
        }
    }
}

type Resp = Response<MediaBody>;

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(MediaBody::Text(Some(Bytes::from(format!("{body}\n")))));
    *r.status_mut() = status;
    set(r.headers_mut(), "content-type", "text/plain");
    r
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// A refusal: the status, the reason in `Media-Error` and the body, counted.
fn refuse(state: &State, status: StatusCode, why: MediaRefusal, detail: &str) -> Resp {
    state.metrics.refused(why);
    let mut r = text(status, &format!("{}: {detail}", why.name()));
    set(r.headers_mut(), "media-error", why.name());
    r
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn respond(state: &Rc<State>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let (op, token) = if let Some(t) = path.strip_prefix("/v1/upload/") {
        (TokenOp::UPLOAD, t)
    } else if let Some(t) = path.strip_prefix("/v1/blob/") {
        (TokenOp::DOWNLOAD, t)
    } else {
        return refuse(
            state,
            StatusCode::NOT_FOUND,
            MediaRefusal::NotFound,
            "no such path",
        );
    };
    let token = match Token::verify(token, &state.settings.secret, op, now_s()) {
        Ok(t) => t,
        Err(e) => return token_refused(state, e),
    };
    match (op, req.method().clone()) {
        (TokenOp::UPLOAD, Method::PUT) => upload(state, &token, req).await,
        (TokenOp::UPLOAD, Method::HEAD) => upload_status(state, &token),
        (TokenOp::DOWNLOAD, Method::GET) => download(state, &token, req.headers(), true),
        (TokenOp::DOWNLOAD, Method::HEAD) => download(state, &token, req.headers(), false),
        _ => {
            let mut r = refuse(
                state,
                StatusCode::METHOD_NOT_ALLOWED,
                MediaRefusal::NotFound,
                "method not allowed",
            );
            let allow = if op == TokenOp::UPLOAD {
                "PUT, HEAD"
            } else {
                "GET, HEAD"
            };
            set(r.headers_mut(), "allow", allow);
            r
        }
    }
}

fn token_refused(state: &State, e: TokenError) -> Resp {
    match e {
        TokenError::Malformed | TokenError::BadMac => refuse(
            state,
            StatusCode::UNAUTHORIZED,
            MediaRefusal::BadToken,
            &e.to_string(),
        ),
        TokenError::Expired => refuse(
            state,
            StatusCode::FORBIDDEN,
            MediaRefusal::Expired,
            &e.to_string(),
        ),
        TokenError::WrongOp => refuse(
            state,
            StatusCode::FORBIDDEN,
            MediaRefusal::WrongOp,
            &e.to_string(),
        ),
    }
}

/// `HEAD /v1/upload/<token>`: how many bytes the server has (`Upload-Offset`).
fn upload_status(state: &State, t: &Token) -> Resp {
    let mut r = text(StatusCode::OK, "");
    *r.body_mut() = MediaBody::Text(None);
    let (done, have) = if state.store.slot_done(t.user, t.slot_id) {
        (true, t.size)
    } else {
        (false, state.store.partial_len(t.user, t.slot_id))
    };
    let h = r.headers_mut();
    set(h, "upload-offset", &have.to_string());
    set(h, "upload-length", &t.size.to_string());
    set(h, "upload-complete", if done { "?1" } else { "?0" });
    set(h, "cache-control", "no-store");
    r
}

/// `Content-Range: bytes <first>-<last>/<total>` of a PUT.
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total) = (
        first.trim().parse().ok()?,
        last.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (first <= last).then_some((first, last, total))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A refusal decided before the response is built: status, reason, detail.
type Refusal = (StatusCode, MediaRefusal, String);

/// Checks a PUT's headers against the slot before any byte of the body is read: returns
/// where the body starts and how long it is.
fn check_put(t: &Token, h: &HeaderMap) -> Result<(u64, u64), Refusal> {
    let Some(len) = header_str(h, "content-length").and_then(|v| v.trim().parse::<u64>().ok())
    else {
        let detail = "Content-Length required".to_owned();
        return Err((
            StatusCode::LENGTH_REQUIRED,
            MediaRefusal::SizeMismatch,
            detail,
        ));
    };
    let Some(range) = header_str(h, "content-range") else {
        if len > t.size {
            let detail = format!("Content-Length {len} > slot size {}", t.size);
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                MediaRefusal::Oversize,
                detail,
            ));
        }
        if len < t.size {
            let detail = format!("Content-Length {len} != slot size {}", t.size);
            return Err((StatusCode::BAD_REQUEST, MediaRefusal::SizeMismatch, detail));
        }
        return Ok((0, len));
    };
    let Some((first, last, total)) = parse_content_range(range) else {
        let detail = "bad Content-Range".to_owned();
        return Err((StatusCode::BAD_REQUEST, MediaRefusal::Range, detail));
    };
    if total != t.size || last - first + 1 != len {
        let detail =
            "Content-Range total must be the slot size and span Content-Length bytes".to_owned();
        return Err((StatusCode::BAD_REQUEST, MediaRefusal::SizeMismatch, detail));
    }
    if last >= t.size {
        let detail = "range past the slot".to_owned();
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            MediaRefusal::Oversize,
            detail,
        ));
    }
    Ok((first, len))
}

/// `PUT /v1/upload/<token>`.
async fn upload(state: &Rc<State>, t: &Token, req: Request<Incoming>) -> Resp {
    let slot = (t.user, t.slot_id);
    if state.store.slot_done(t.user, t.slot_id) {
        let why = MediaRefusal::AlreadyUploaded;
        return refuse(state, StatusCode::CONFLICT, why, "slot already uploaded");
    }
    if state.active.borrow().contains(&slot) {
        let why = MediaRefusal::AlreadyUploaded;
        return refuse(
            state,
            StatusCode::CONFLICT,
            why,
            "an upload to this slot is running",
        );
    }
    let (offset, len) = match check_put(t, req.headers()) {
        Ok(v) => v,
        Err((status, why, detail)) => return refuse(state, status, why, &detail),
    };
    let writer = match state.store.writer(t.user, t.slot_id, offset) {
        Ok(w) => w,
        Err(e) => return blob_refused(state, t, e),
    };
    state.active.borrow_mut().insert(slot);
    let r = receive(state, t, writer, offset + len, req.into_body()).await;
    state.active.borrow_mut().remove(&slot);
    r
}

/// Streams the body into `writer` (up to `end`), then finishes the blob when complete.
async fn receive(
    state: &Rc<State>,
    t: &Token,
    mut writer: storage::blob::PartialWriter,
    end: u64,
    mut body: Incoming,
) -> Resp {
    let started = Instant::now();
    let m = &state.metrics;
    while writer.len() < end {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                let detail = format!("body broken at {}: {e}", writer.len());
                return refuse(
                    state,
                    StatusCode::BAD_REQUEST,
                    MediaRefusal::Incomplete,
                    &detail,
                );
            }
            None => break,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // Content-Length frames the body, so it cannot run past `end`; checked anyway.
        if writer.len() + data.len() as u64 > end {
            state.store.discard_partial(t.user, t.slot_id);
            return refuse(
                state,
                StatusCode::PAYLOAD_TOO_LARGE,
                MediaRefusal::Oversize,
                "body too long",
            );
        }
        if let Err(e) = writer.write(&data) {
            return blob_refused(state, t, e);
        }
        m.upload_bytes_total.fetch_add(data.len() as u64, Relaxed);
    }
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    m.upload_us_total.fetch_add(elapsed_us, Relaxed);
    if writer.len() < end {
        let detail = format!("body ended at {}", writer.len());
        return refuse(
            state,
            StatusCode::BAD_REQUEST,
            MediaRefusal::Incomplete,
            &detail,
        );
    }
    if writer.len() < t.size {
        // A chunk of a resumable upload: more to come.
        let mut r = text(StatusCode::NO_CONTENT, "");
        *r.body_mut() = MediaBody::Text(None);
        set(r.headers_mut(), "upload-offset", &writer.len().to_string());
        return r;
    }
    match state
        .store
        .finish(writer, (t.user, t.slot_id), t.size, &t.sha256)
    {
        Ok(()) => {
            m.uploads_total.fetch_add(1, Relaxed);
            let (blobs, bytes) = state.store.usage();
            m.blobs.store(blobs, Relaxed);
            m.bytes_stored.store(bytes, Relaxed);
            let mut r = text(StatusCode::CREATED, "stored");
            set(r.headers_mut(), "upload-offset", &t.size.to_string());
            r
        }
        Err(e) => blob_refused(state, t, e),
    }
}

fn blob_refused(state: &State, t: &Token, e: BlobError) -> Resp {
    let detail = e.to_string();
    match e {
        BlobError::DiskFull => {
            state.store.discard_partial(t.user, t.slot_id);
            tracing::error!("media store: disk full");
            refuse(
                state,
                StatusCode::INSUFFICIENT_STORAGE,
                MediaRefusal::DiskFull,
                &detail,
            )
        }
        BlobError::SizeMismatch { .. } => refuse(
            state,
            StatusCode::BAD_REQUEST,
            MediaRefusal::SizeMismatch,
            &detail,
        ),
        BlobError::HashMismatch => refuse(
            state,
            StatusCode::UNPROCESSABLE_ENTITY,
            MediaRefusal::HashMismatch,
            &detail,
        ),
        BlobError::OffsetMismatch { have } => {
            let mut r = refuse(
                state,
                StatusCode::CONFLICT,
                MediaRefusal::OffsetMismatch,
                &detail,
            );
            set(r.headers_mut(), "upload-offset", &have.to_string());
            r
        }
        BlobError::Io(e) => {
            tracing::warn!(error = %e, "media store IO error");
            refuse(
                state,
                StatusCode::INTERNAL_SERVER_ERROR,
                MediaRefusal::Io,
                &detail,
            )
        }
    }
}

/// A single `Range: bytes=` spec resolved against `len`: `Some(Ok((first, last)))`,
/// `Some(Err(()))` when unsatisfiable, `None` when absent or not a single byte range (then
/// the whole blob is served, as RFC 9110 allows).
fn parse_range(h: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header_str(h, "range")?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let n: u64 = last.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        return Some(Ok((len.saturating_sub(n), len - 1)));
    }
    let first: u64 = first.parse().ok()?;
    let last: u64 = if last.is_empty() {
        u64::MAX
    } else {
        last.parse().ok()?
    };
    if first > last {
        return None;
    }
    if first >= len {
        return Some(Err(()));
    }
    Some(Ok((first, last.min(len - 1))))
}

/// `GET`/`HEAD /v1/blob/<token>`.
fn download(state: &State, t: &Token, h: &HeaderMap, with_body: bool) -> Resp {
    let Some(len) = state.store.blob_len(&t.sha256) else {
        return refuse(
            state,
            StatusCode::NOT_FOUND,
            MediaRefusal::NotFound,
            "no such blob",
        );
    };
    if !state.store.may_download(&t.sha256, t.user) {
        let why = MediaRefusal::NotAudience;
        return refuse(
            state,
            StatusCode::FORBIDDEN,
            why,
            "not in the audience of this blob",
        );
    }
    let (status, first, last) = match parse_range(h, len) {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            let mut r = refuse(
                state,
                StatusCode::RANGE_NOT_SATISFIABLE,
                MediaRefusal::Range,
                "range not satisfiable",
            );
            set(r.headers_mut(), "content-range", &format!("bytes */{len}"));
            return r;
        }
    };
    let count = if len == 0 { 0 } else { last - first + 1 };
    let body = if with_body {
        let file = state.store.open_blob(&t.sha256).and_then(|mut f| {
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(first))?;
            Ok(f)
        });
        match file {
            Ok(file) => MediaBody::File {
                file,
                left: count,
                metrics: state.metrics.clone(),
            },
            Err(e) => {
                let detail = e.to_string();
                return refuse(
                    state,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    MediaRefusal::Io,
                    &detail,
                );
            }
        }
    } else {
        MediaBody::Text(None)
    };
    if with_body {
        state.metrics.downloads_total.fetch_add(1, Relaxed);
    }
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let hm = r.headers_mut();
    set(hm, "content-type", "application/octet-stream");
    set(hm, "accept-ranges", "bytes");
    set(hm, "content-length", &count.to_string());
    set(
        hm,
        "etag",
        &format!("\"{}\"", storage::blob::hex(&t.sha256)),
    );
    set(hm, "cache-control", "private, no-transform");
    if status == StatusCode::PARTIAL_CONTENT {
        set(hm, "content-range", &format!("bytes {first}-{last}/{len}"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_like_rfc_9110() {
        let mut h = HeaderMap::new();
        let mut range = |v: &str| {
            h.insert("range", HeaderValue::from_str(v).unwrap());
            parse_range(&h, 100)
        };
        assert_eq!(range("bytes=0-9"), Some(Ok((0, 9))));
        assert_eq!(range("bytes=90-"), Some(Ok((90, 99))));
        assert_eq!(range("bytes=-10"), Some(Ok((90, 99))));
        assert_eq!(range("bytes=95-200"), Some(Ok((95, 99))));
        assert_eq!(range("bytes=100-"), Some(Err(())));
        assert_eq!(range("bytes=0-1,5-6"), None);
        assert_eq!(range("bytes=9-1"), None);
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 9, 100)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
    }
}
