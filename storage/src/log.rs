//! The glommio-backed log writer: buffered appends, group commit, segment rotation, poisoning.
//!
//! A [`Log`] lives on one glommio executor (it is `!Send`) and every method takes `&self`, so
//! the shard can append through it (via [`Journal`] for `&Log` or `Rc<Log>`) while a separate
//! task runs [`Log::commit`] in a loop.
//!
//! # Durability contract
//!
//! * [`Log::append`] only encodes into an in-memory batch; nothing is durable and no I/O
//!   happens. It returns the record's [`Lsn`].
//! * [`Log::commit`] takes the whole pending batch, writes it, and `fdatasync`s every file it
//!   touched. When it returns `Ok(stats)`, every append with `append_id <= stats.up_to` is
//!   durable. Appends made while a commit runs go to the next batch.
//! * Segments touched by one commit are written and synced **in order, one at a time** (write
//!   segment *k*, `fdatasync` it, only then write segment *k + 1*). A crash mid-commit therefore
//!   leaves a prefix of the batch on disk, never a later record without an earlier one.
//! * A segment created by rotation is created with `O_CREAT | O_EXCL` (an existing file is
//!   never reused or appended to), its header and records are written in one `write_at`, the
//!   file is `fdatasync`ed, and then the directory is `fsync`ed so the new entry is durable.
//! * Deleting segments ([`Log::delete_segment`]) happens at the end of the next commit, after
//!   its data is durable: `unlink` each, then `fsync` the directory.
//! * Any failed write or sync **poisons** the log: the failing commit returns
//!   [`LogError::Io`], every later commit returns [`LogError::Poisoned`] without touching the
//!   disk, and appends are discarded. After a failed `fsync` the kernel may have dropped the
//!   dirty pages and cleared the error, so retrying could report success for data that is
//!   gone; the only honest reaction is to stop and let recovery read what is really on disk.
//!   A commit future dropped before it completes poisons the log as well (its batch is lost).
//!
//! Only one commit runs at a time: a second concurrent call returns
//! [`LogError::CommitInProgress`] immediately.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use glommio::io::{BufferedFile, OpenOptions};

use bytes::Bytes;

use crate::frame::{decode_frame, encode, encoded_len, FrameError};
use crate::segment::{
    create_dir_durable, encode_segment_header, fsync_dir, needs_rotation, segment_path,
    SEGMENT_HEADER_LEN,
};
use crate::{Encode, Journal, Lsn, RawRecord, ReadError, SegmentId};

pub use crate::segment::DEFAULT_SEGMENT_BYTES_MAX;
/// Bytes [`Log::read_record`] reads first: a message record of up to this size (header
/// included) costs one `read_at`.
pub const READ_AHEAD_BYTES: usize = 1024;
/// Default [`LogConfig::batch_bytes_max`]: 4 MiB.
pub const DEFAULT_BATCH_BYTES_MAX: usize = 4 << 20;

/// Where and how a [`Log`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// The shard's log directory (created if missing).
    pub dir: PathBuf,
    /// A segment is sealed and a new one started when the next record would make it larger
    /// than this (header included). A single record larger than this gets a segment of its
    /// own. Default [`DEFAULT_SEGMENT_BYTES_MAX`]; at most
    /// [`SEGMENT_OFFSET_MAX`](crate::SEGMENT_OFFSET_MAX) (record offsets are `u32`).
    pub segment_bytes_max: u64,
    /// Cap on the bytes of one `write_at` call. A commit issues one write per segment touched,
    /// or more when a segment's share of the batch exceeds this (a single record larger than
    /// the cap still goes in one write). Default [`DEFAULT_BATCH_BYTES_MAX`].
    pub batch_bytes_max: usize,
    /// Most sealed segment files [`Log::read_record`] keeps open for reading (least recently
    /// used closed first). Default [`DEFAULT_READ_FILES_MAX`].
    pub read_files_max: usize,
}

/// Default [`LogConfig::read_files_max`].
pub const DEFAULT_READ_FILES_MAX: usize = 8;

impl LogConfig {
    /// The default configuration for a log in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            segment_bytes_max: DEFAULT_SEGMENT_BYTES_MAX,
            batch_bytes_max: DEFAULT_BATCH_BYTES_MAX,
            read_files_max: DEFAULT_READ_FILES_MAX,
        }
    }
}

/// What one [`Log::commit`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Highest durable `append_id`: every append with an id `<=` this is durable. 0 when
    /// nothing has been appended since the log was opened.
    pub up_to: u64,
    /// Records written by this commit.
    pub records: usize,
    /// Bytes written by this commit (records, plus headers of segments it created).
    pub bytes: usize,
    /// Microseconds spent in `fdatasync` / directory `fsync`.
    pub fsync_us: u64,
    /// Microseconds spent in `write_at`.
    pub write_us: u64,
    /// `write_at` calls issued.
    pub writes: usize,
    /// `fdatasync` calls on segment files (one per file touched).
    pub fdatasyncs: usize,
    /// `fsync` calls on the directory (one per segment created, one for deletions).
    pub dir_syncs: usize,
    /// Segments created by rotation in this commit.
    pub segments_created: usize,
    /// Segment files unlinked by this commit.
    pub segments_deleted: usize,
}

/// Running totals over the life of a [`Log`] (including the work done by [`Log::open`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogCounters {
    /// Commits that succeeded.
    pub commits: u64,
    /// `fdatasync` calls on segment files.
    pub fdatasyncs: u64,
    /// `fsync` calls on the directory.
    pub dir_syncs: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Records read back by [`Log::read_record`] (from the pending batch or a file).
    pub records_read: u64,
    /// `read_at` calls issued by [`Log::read_record`].
    pub reads: u64,
    /// Segment files opened for reading.
    pub read_files_opened: u64,
}

/// Why a [`Log`] operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// An I/O operation failed. If it happened in a commit, the log is now poisoned.
    #[error("log {op} failed on {}: {source}", path.display())]
    Io {
        /// What was being done (`"write"`, `"fdatasync"`, `"create segment"`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed; the log writes nothing any more. Restart and recover.
    #[error("log poisoned: {0}")]
    Poisoned(String),
    /// [`Log::commit`] was called while another commit was still running.
    #[error("a commit is already in progress")]
    CommitInProgress,
    /// The configuration cannot work.
    #[error("invalid log configuration: {0}")]
    InvalidConfig(&'static str),
}

/// A contiguous run of encoded bytes destined for one segment at one offset; one `write_at`.
struct Chunk {
    segment: SegmentId,
    /// File offset of `buf[0]`.
    offset: u64,
    /// This chunk starts a segment created by rotation (`buf` begins with its header).
    creates: bool,
    buf: Vec<u8>,
}

/// The appends not yet handed to a commit.
#[derive(Default)]
struct Batch {
    chunks: Vec<Chunk>,
    records: usize,
    bytes: usize,
    last_append_id: u64,
}

/// Append-side bookkeeping.
struct State {
    next_append_id: u64,
    /// Segment new appends go to (may not exist on disk yet: the next commit creates it).
    active: SegmentId,
    /// Length the active segment will have once everything appended so far is written.
    active_len: u64,
    pending: Batch,
    deletes: Vec<SegmentId>,
    /// Capacity a new chunk starts with: the largest chunk of the last batch taken, so a
    /// steady load fills each chunk without growing it (a grown buffer is copied on every
    /// doubling, and its new pages are faulted in and zeroed).
    chunk_hint: usize,
}

/// The segment file commits currently write to.
struct OpenSegment {
    id: SegmentId,
    path: PathBuf,
    file: BufferedFile,
}

/// The per-shard log writer. See the [module docs](self) for the durability contract.
pub struct Log {
    config: LogConfig,
    state: RefCell<State>,
    /// Taken out by a running commit and put back when it succeeds.
    current: RefCell<Option<OpenSegment>>,
    durable_up_to: Cell<u64>,
    committing: Cell<bool>,
    poisoned: RefCell<Option<String>>,
    inject_failure: Cell<bool>,
    counters: Cell<LogCounters>,
    /// Segment files open for reading, most recently used last (at most `read_files_max`).
    readers: RefCell<Vec<(SegmentId, Rc<BufferedFile>)>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.config.dir)
            .field("active_segment", &self.active_segment())
            .field("durable_up_to", &self.durable_up_to.get())
            .field("pending_bytes", &self.pending_bytes())
            .field("poisoned", &*self.poisoned.borrow())
            .finish()
    }
}

fn io_error(op: &'static str, path: &Path, source: impl Into<io::Error>) -> LogError {
    LogError::Io {
        op,
        path: path.to_path_buf(),
        source: source.into(),
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl Log {
    /// Opens the log for writing by creating segment `next_segment` (normally
    /// [`Recovery::next_segment`](crate::recovery::Recovery::next_segment)).
    ///
    /// Never appends to an existing segment: if `seg-{next_segment}.log` exists this fails.
    /// The new segment's header is written and `fdatasync`ed and the directory is `fsync`ed
    /// before this returns. Must run inside a glommio executor.
    pub async fn open(config: LogConfig, next_segment: SegmentId) -> Result<Log, LogError> {
        if config.segment_bytes_max <= SEGMENT_HEADER_LEN as u64 {
            return Err(LogError::InvalidConfig(
                "segment_bytes_max must exceed the segment header length",
            ));
        }
        if config.segment_bytes_max > crate::SEGMENT_OFFSET_MAX {
            return Err(LogError::InvalidConfig(
                "segment_bytes_max must fit record offsets in a u32 (at most 4 GiB - 1)",
            ));
        }
        if config.read_files_max == 0 {
            return Err(LogError::InvalidConfig("read_files_max must be positive"));
        }
        if config.batch_bytes_max == 0 {
            return Err(LogError::InvalidConfig("batch_bytes_max must be positive"));
        }
        create_dir_durable(&config.dir)
            .map_err(|e| io_error("create directory", &config.dir, e))?;
        let log = Log {
            state: RefCell::new(State {
                next_append_id: 1,
                active: next_segment,
                active_len: SEGMENT_HEADER_LEN as u64,
                pending: Batch::default(),
                deletes: Vec::new(),
                chunk_hint: 0,
            }),
            current: RefCell::new(None),
            durable_up_to: Cell::new(0),
            committing: Cell::new(false),
            poisoned: RefCell::new(None),
            inject_failure: Cell::new(false),
            counters: Cell::new(LogCounters::default()),
            readers: RefCell::new(Vec::new()),
            config,
        };
        let mut stats = CommitStats::default();
        let seg = log.create_segment(next_segment).await?;
        log.write_all(
            &seg,
            encode_segment_header(next_segment).to_vec(),
            0,
            &mut stats,
        )
        .await?;
        log.sync_file(&seg, &mut stats).await?;
        log.sync_dir(&mut stats).await?;
        tracing::debug!(segment = next_segment, dir = %log.config.dir.display(), "log opened");
        *log.current.borrow_mut() = Some(seg);
        Ok(log)
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Buffers `rec` for the next commit and says where it will land. No I/O. Decides
    /// rotation: if the record would push the active segment past
    /// [`LogConfig::segment_bytes_max`], it goes to the next segment id, which the next
    /// commit creates.
    ///
    /// Once the log is poisoned, appends are counted but discarded (nothing will be written).
    ///
    /// # Panics
    ///
    /// As [`encode`]: a body above [`MAX_BODY_LEN`](crate::frame::MAX_BODY_LEN).
    pub fn append(&self, rec: &dyn Encode) -> Lsn {
        let poisoned = self.poisoned.borrow().is_some();
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let append_id = st.next_append_id;
        st.next_append_id += 1;
        let n = encoded_len(rec);
        if needs_rotation(st.active_len, n, self.config.segment_bytes_max) {
            if let Some(next) = st.active.checked_add(1) {
                st.active = next;
                st.active_len = SEGMENT_HEADER_LEN as u64;
                if !poisoned {
                    st.pending.chunks.push(Chunk {
                        segment: next,
                        offset: 0,
                        creates: true,
                        buf: encode_segment_header(next).to_vec(),
                    });
                    st.pending.bytes += SEGMENT_HEADER_LEN;
                }
            }
        }
        let offset = st.active_len;
        let lsn = Lsn {
            append_id,
            segment: st.active,
            // `open` refused a `segment_bytes_max` above u32::MAX and a record starts inside
            // its segment, so this always fits.
            offset: u32::try_from(offset).unwrap_or(u32::MAX),
        };
        st.active_len += n as u64;
        if poisoned {
            return lsn;
        }
        let cap = self.config.batch_bytes_max;
        let fits = matches!(
            st.pending.chunks.last(),
            Some(c) if c.segment == st.active && c.buf.len() + n <= cap
        );
        if !fits {
            st.pending.chunks.push(Chunk {
                segment: st.active,
                offset,
                creates: false,
                buf: Vec::with_capacity(n.max(cap.min(st.chunk_hint.max(64 << 10)))),
            });
        }
        if let Some(chunk) = st.pending.chunks.last_mut() {
            encode(rec, &mut chunk.buf);
        }
        st.pending.records += 1;
        st.pending.bytes += n;
        st.pending.last_append_id = append_id;
        lsn
    }

    /// Queues segment `segment` for deletion by the next commit, after that commit's data is
    /// durable. Ignored (with a warning) for the active segment or a later one.
    pub fn delete_segment(&self, segment: SegmentId) {
        let mut st = self.state.borrow_mut();
        if segment >= st.active {
            tracing::warn!(
                segment,
                active = st.active,
                "refusing to delete the active (or a future) segment"
            );
            return;
        }
        if !st.deletes.contains(&segment) {
            st.deletes.push(segment);
        }
        drop(st);
        // Its reader would keep the deleted file's blocks allocated.
        self.readers.borrow_mut().retain(|(id, _)| *id != segment);
    }

    /// Reads back the record whose header is at `offset` in `segment`, CRCs checked.
    ///
    /// A record still in the pending batch is served from memory. Otherwise the segment file
    /// is read (through a small cache of read-only files, [`LogConfig::read_files_max`]): one
    /// `read_at` of [`READ_AHEAD_BYTES`] bytes, and a second one when the record is longer.
    /// Meant for durable records (a record of a commit still being written may read as torn,
    /// which is reported, not hidden). Never poisons the log: a read failure says nothing about
    /// what was written.
    pub async fn read_record(
        &self,
        segment: SegmentId,
        offset: u32,
    ) -> Result<RawRecord, ReadError> {
        if let Some(rec) = self.read_pending(segment, offset) {
            self.bump(|c| c.records_read += 1);
            return rec;
        }
        let file = self.reader(segment, offset).await?;
        let io = |e: glommio::GlommioError<()>| {
            let e = io::Error::from(e);
            ReadError::Io {
                segment,
                offset,
                kind: e.kind(),
                message: e.to_string(),
            }
        };
        let frame_error = |error| ReadError::Frame {
            segment,
            offset,
            error,
        };
        let pos = u64::from(offset);
        self.bump(|c| c.reads += 1);
        let mut buf = file.read_at(pos, READ_AHEAD_BYTES).await.map_err(io)?;
        if let Err(FrameError::Incomplete {
            needed,
            header_sound: true,
            ..
        }) = decode_frame(&buf)
        {
            self.bump(|c| c.reads += 1);
            buf = file.read_at(pos, needed).await.map_err(io)?;
        }
        let frame = decode_frame(&buf).map_err(frame_error)?;
        self.bump(|c| c.records_read += 1);
        Ok(RawRecord {
            segment,
            offset: pos,
            tag: frame.tag,
            body: Bytes::copy_from_slice(frame.body),
        })
    }

    /// The record at `offset` of `segment` if it is in the pending (not yet committed) batch.
    fn read_pending(
        &self,
        segment: SegmentId,
        offset: u32,
    ) -> Option<Result<RawRecord, ReadError>> {
        let st = self.state.borrow();
        let pos = u64::from(offset);
        let chunk = st.pending.chunks.iter().find(|c| {
            c.segment == segment && c.offset <= pos && pos < c.offset + c.buf.len() as u64
        })?;
        let at = usize::try_from(pos - chunk.offset).ok()?;
        let bytes = chunk.buf.get(at..).unwrap_or(&[]);
        Some(match decode_frame(bytes) {
            Ok(frame) => Ok(RawRecord {
                segment,
                offset: pos,
                tag: frame.tag,
                body: Bytes::copy_from_slice(frame.body),
            }),
            Err(error) => Err(ReadError::Frame {
                segment,
                offset,
                error,
            }),
        })
    }

    /// A read-only handle on `segment`, from the cache or newly opened (evicting the least
    /// recently used one past [`LogConfig::read_files_max`]).
    async fn reader(&self, segment: SegmentId, offset: u32) -> Result<Rc<BufferedFile>, ReadError> {
        {
            let mut readers = self.readers.borrow_mut();
            if let Some(i) = readers.iter().position(|(id, _)| *id == segment) {
                let hit = readers.remove(i);
                let file = hit.1.clone();
                readers.push(hit);
                return Ok(file);
            }
        }
        let path = segment_path(&self.config.dir, segment);
        let file = match BufferedFile::open(&path).await {
            Ok(f) => Rc::new(f),
            Err(e) => {
                let e = io::Error::from(e);
                if e.kind() == io::ErrorKind::NotFound {
                    return Err(ReadError::NoSegment { segment });
                }
                return Err(ReadError::Io {
                    segment,
                    offset,
                    kind: e.kind(),
                    message: e.to_string(),
                });
            }
        };
        self.bump(|c| c.read_files_opened += 1);
        let mut readers = self.readers.borrow_mut();
        // Another read may have opened it meanwhile: keep one handle.
        readers.retain(|(id, _)| *id != segment);
        readers.push((segment, file.clone()));
        while readers.len() > self.config.read_files_max {
            readers.remove(0);
        }
        Ok(file)
    }

    /// The segment new appends go to.
    pub fn active_segment(&self) -> SegmentId {
        self.state.borrow().active
    }

    /// Whether a commit has work to do: appended records or queued deletions.
    pub fn has_pending(&self) -> bool {
        let st = self.state.borrow();
        st.pending.records > 0 || !st.deletes.is_empty()
    }

    /// Bytes the next commit would write (records plus headers of segments it creates).
    pub fn pending_bytes(&self) -> usize {
        self.state.borrow().pending.bytes
    }

    /// Highest durable append id (0 if none yet).
    pub fn durable_up_to(&self) -> u64 {
        self.durable_up_to.get()
    }

    /// Why the log is poisoned, if it is. A poisoned log never writes again.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned.borrow().clone()
    }

    /// Running totals (writes, syncs, bytes) since the log was opened.
    pub fn counters(&self) -> LogCounters {
        self.counters.get()
    }

    /// Makes the next `fdatasync` fail with `EIO`, as a real fsync failure would: the commit
    /// doing it returns [`LogError::Io`] and the log is poisoned. Tests only.
    #[doc(hidden)]
    pub fn inject_failure_for_test(&self) {
        self.inject_failure.set(true);
    }

    /// Group commit: makes every append made so far durable, then performs queued segment
    /// deletions. See the [module docs](self).
    ///
    /// Takes the whole pending batch at once (appends made while it runs go to the next
    /// batch), writes it with one `write_at` per segment touched (more only if a segment's
    /// share exceeds [`LogConfig::batch_bytes_max`]), creates rotated segments, issues one
    /// `fdatasync` per file touched, then unlinks queued segments and `fsync`s the directory.
    ///
    /// Only one commit may run at a time; a concurrent call returns
    /// [`LogError::CommitInProgress`]. A failure returns [`LogError::Io`] and poisons the log;
    /// later calls return [`LogError::Poisoned`]. A short write is treated as a failure (on a
    /// regular file it means the device is full).
    pub async fn commit(&self) -> Result<CommitStats, LogError> {
        if let Some(reason) = self.poisoned() {
            return Err(LogError::Poisoned(reason));
        }
        if self.committing.replace(true) {
            return Err(LogError::CommitInProgress);
        }
        let mut guard = CommitGuard {
            log: self,
            finished: false,
        };
        let (batch, deletes) = {
            let mut st = self.state.borrow_mut();
            let largest = st.pending.chunks.iter().map(|c| c.buf.len()).max();
            // Follow the load down as well as up: a burst's size is not kept for ever.
            st.chunk_hint = largest.map_or(0, |l| l.saturating_add(l / 4));
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.deletes),
            )
        };
        let result = self.commit_batch(batch, deletes).await;
        // Failures inside `commit_batch` have already poisoned the log with the real reason.
        guard.finished = true;
        result
    }

    async fn commit_batch(
        &self,
        batch: Batch,
        deletes: Vec<SegmentId>,
    ) -> Result<CommitStats, LogError> {
        let mut stats = CommitStats {
            records: batch.records,
            bytes: batch.bytes,
            ..CommitStats::default()
        };
        let mut cur = self.current.borrow_mut().take();
        let mut dirty = false;
        let mut created = false;
        for chunk in batch.chunks {
            if cur.as_ref().map(|c| c.id) != Some(chunk.segment) {
                if let Some(old) = cur.take() {
                    if dirty {
                        self.sync_file(&old, &mut stats).await?;
                    }
                    if created {
                        self.sync_dir(&mut stats).await?;
                    }
                    if let Err(e) = old.file.close().await {
                        // Its data is already durable (synced above); a close error changes
                        // nothing about that.
                        tracing::warn!(segment = old.id, error = %e, "closing a sealed segment failed");
                    }
                }
                if !chunk.creates {
                    let reason = format!(
                        "internal: batch writes to segment {} which is neither open nor created",
                        chunk.segment
                    );
                    self.poison(reason.clone());
                    return Err(LogError::Poisoned(reason));
                }
                cur = Some(self.create_segment(chunk.segment).await?);
                stats.segments_created += 1;
                created = true;
                dirty = false;
            }
            let Some(seg) = cur.as_ref() else {
                continue; // unreachable: set just above
            };
            self.write_all(seg, chunk.buf, chunk.offset, &mut stats)
                .await?;
            dirty = true;
        }
        if let Some(seg) = cur.as_ref() {
            if dirty {
                self.sync_file(seg, &mut stats).await?;
            }
            if created {
                self.sync_dir(&mut stats).await?;
            }
        }
        if batch.records > 0 {
            self.durable_up_to.set(batch.last_append_id);
        }
        let open_id = cur.as_ref().map(|c| c.id);
        *self.current.borrow_mut() = cur;
        stats.up_to = self.durable_up_to.get();

        if !deletes.is_empty() {
            self.delete_segments(deletes, open_id, &mut stats).await?;
        }

        let mut c = self.counters.get();
        c.commits += 1;
        self.counters.set(c);
        Ok(stats)
    }

    /// Unlinks `deletes` (never the open or active segment) and fsyncs the directory.
    async fn delete_segments(
        &self,
        deletes: Vec<SegmentId>,
        open_id: Option<SegmentId>,
        stats: &mut CommitStats,
    ) -> Result<(), LogError> {
        let active = self.active_segment();
        let mut deletes = deletes;
        // Oldest first, like the shard asks: a crash part-way leaves no gap.
        deletes.sort_unstable();
        let mut paths = Vec::with_capacity(deletes.len());
        for id in deletes {
            if Some(id) == open_id || id >= active {
                tracing::warn!(segment = id, "not deleting the open/active segment");
                continue;
            }
            paths.push((id, segment_path(&self.config.dir, id)));
        }
        if paths.is_empty() {
            return Ok(());
        }
        let dir = self.config.dir.clone();
        let start = Instant::now();
        let (removed, dir_sync) = glommio::executor()
            .spawn_blocking(move || {
                let mut removed = 0usize;
                for (id, path) in &paths {
                    match std::fs::remove_file(path) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            tracing::debug!(segment = id, "segment to delete is already gone");
                        }
                        Err(e) => {
                            // Not a durability problem: the data it held is dead. It stays on
                            // disk and recovery will read it again. Stop here: deleting a
                            // younger segment past it would leave a gap, which recovery takes
                            // for lost data (segments die oldest-first).
                            tracing::warn!(segment = id, error = %e, "deleting a segment failed; later deletions skipped");
                            break;
                        }
                    }
                }
                let dir_sync = if removed > 0 {
                    Some(fsync_dir(&dir))
                } else {
                    None
                };
                (removed, dir_sync)
            })
            .await;
        stats.segments_deleted = removed;
        if let Some(res) = dir_sync {
            stats.fsync_us += micros(start);
            stats.dir_syncs += 1;
            self.bump(|c| c.dir_syncs += 1);
            res.map_err(|e| self.fail("fsync directory", &self.config.dir, e))?;
        }
        Ok(())
    }

    /// Commits anything pending, then closes the open segment.
    ///
    /// Returns [`LogError::Poisoned`] if the log is poisoned (even with nothing pending: its
    /// state on disk is not what was appended).
    pub async fn close(self) -> Result<(), LogError> {
        let mut result = if self.has_pending() {
            self.commit().await.map(|_| ())
        } else {
            match self.poisoned() {
                Some(reason) => Err(LogError::Poisoned(reason)),
                None => Ok(()),
            }
        };
        let seg = self.current.borrow_mut().take();
        if let Some(seg) = seg {
            if let Err(e) = seg.file.close().await {
                if result.is_ok() {
                    result = Err(io_error("close", &seg.path, e));
                }
            }
        }
        result
    }

    // --- I/O helpers. Every failure poisons the log. ---

    fn poison(&self, reason: String) {
        let mut p = self.poisoned.borrow_mut();
        if p.is_none() {
            tracing::error!(dir = %self.config.dir.display(), %reason, "log poisoned");
            *p = Some(reason);
        }
        drop(p);
        // Nothing will be written any more: drop what was appended meanwhile.
        if let Ok(mut st) = self.state.try_borrow_mut() {
            st.pending = Batch::default();
            st.deletes.clear();
        }
    }

    fn fail(&self, op: &'static str, path: &Path, source: impl Into<io::Error>) -> LogError {
        let err = io_error(op, path, source);
        self.poison(err.to_string());
        err
    }

    fn bump(&self, f: impl FnOnce(&mut LogCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    async fn create_segment(&self, id: SegmentId) -> Result<OpenSegment, LogError> {
        let path = segment_path(&self.config.dir, id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .buffered_open(&path)
            .await
            .map_err(|e| self.fail("create segment", &path, e))?;
        tracing::debug!(segment = id, "segment created");
        Ok(OpenSegment { id, path, file })
    }

    async fn write_all(
        &self,
        seg: &OpenSegment,
        buf: Vec<u8>,
        offset: u64,
        stats: &mut CommitStats,
    ) -> Result<(), LogError> {
        let len = buf.len();
        let start = Instant::now();
        let res = seg.file.write_at(buf, offset).await;
        stats.write_us += micros(start);
        stats.writes += 1;
        let written = res.map_err(|e| self.fail("write", &seg.path, e))?;
        self.bump(|c| {
            c.writes += 1;
            c.bytes_written += written as u64;
        });
        if written != len {
            return Err(self.fail(
                "write",
                &seg.path,
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {written} of {len} bytes at offset {offset}"),
                ),
            ));
        }
        Ok(())
    }

    async fn sync_file(&self, seg: &OpenSegment, stats: &mut CommitStats) -> Result<(), LogError> {
        let start = Instant::now();
        let res = if self.inject_failure.replace(false) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            seg.file.fdatasync().await.map_err(io::Error::from)
        };
        stats.fsync_us += micros(start);
        stats.fdatasyncs += 1;
        self.bump(|c| c.fdatasyncs += 1);
        res.map_err(|e| self.fail("fdatasync", &seg.path, e))
    }

    // IMPORTANT: fsync the directory so the new file's entry is durable. Without it a crash
    // can lose the whole segment even though its contents were fdatasync'ed.
    async fn sync_dir(&self, stats: &mut CommitStats) -> Result<(), LogError> {
        let dir = self.config.dir.clone();
        let start = Instant::now();
        // A real fsync(2) of the directory, on glommio's blocking thread pool.
        let res = glommio::executor()
            .spawn_blocking(move || fsync_dir(&dir))
            .await;
        stats.fsync_us += micros(start);
        stats.dir_syncs += 1;
        self.bump(|c| c.dir_syncs += 1);
        res.map_err(|e| self.fail("fsync directory", &self.config.dir, e))
    }
}

/// Releases the one-commit-at-a-time flag; poisons the log if the commit future was dropped
/// before finishing (its batch is gone and its file state unknown).
struct CommitGuard<'a> {
    log: &'a Log,
    finished: bool,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        self.log.committing.set(false);
        if !self.finished {
            self.log
                .poison("a commit was cancelled before it completed".to_string());
        }
    }
}

impl Journal for &Log {
    fn append(&mut self, rec: &dyn Encode) -> Lsn {
        Log::append(self, rec)
    }
    fn delete_segment(&mut self, segment: SegmentId) {
        Log::delete_segment(self, segment)
    }
    fn active_segment(&self) -> SegmentId {
        Log::active_segment(self)
    }
}

impl Journal for Rc<Log> {
    fn append(&mut self, rec: &dyn Encode) -> Lsn {
        Log::append(self, rec)
    }
    fn delete_segment(&mut self, segment: SegmentId) {
        Log::delete_segment(self, segment)
    }
    fn active_segment(&self) -> SegmentId {
        Log::active_segment(self)
    }
}
