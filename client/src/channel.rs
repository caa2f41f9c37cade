//! Blocking record IO over a `TcpStream`: raw records for the handshake, sealed frames after.
//!
//! Reads use the socket's read timeout to honour a deadline; a timed-out read loses nothing
//! (bytes that did arrive stay in the receive buffer). A write that fails or times out part
//! way leaves the record stream unrecoverable, so every write error closes the channel.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use protocol::noise::Transport;
use protocol::wire::{self, Check, LEN_PREFIX_BYTES, RECORD_BODY_MAX, TAG_BYTES};
use protocol::Frame;

use crate::error::{Error, ProtocolError, Result};

/// Bytes asked of the kernel per read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Smallest transport record: a 1-byte frame kind plus the tag.
const TRANSPORT_RECORD_MIN_BYTES: usize = 1 + TAG_BYTES;

/// Shortest read timeout used; `set_read_timeout` refuses zero, and a deadline already passed
/// still gets one short look at the socket (so a zero timeout polls).
const READ_TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// A TCP stream with a receive buffer.
pub(crate) struct RawStream {
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: BytesMut,
    closed: bool,
}

impl RawStream {
    pub(crate) fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            rbuf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            closed: false,
        }
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Closes both directions; later calls fail with [`Error::Closed`].
    pub(crate) fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    /// Closes this side for writing, then reads and discards until the server closes or
    /// `linger` passes. Closing a socket that still has unread bytes makes the kernel send a
    /// reset, which can destroy data the server has not read yet; draining first avoids that.
    pub(crate) fn close_gracefully(&mut self, linger: Duration) {
        if self.closed {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + linger;
        let mut sink = [0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if self
                .stream
                .set_read_timeout(Some((deadline - now).max(READ_TIMEOUT_MIN)))
                .is_err()
            {
                break;
            }
            match self.stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.close();
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        match self.stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.close();
                Err(match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout { what: "write" },
                    ErrorKind::BrokenPipe
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted => Error::Closed,
                    _ => Error::Io {
                        op: "write",
                        source: e,
                    },
                })
            }
        }
    }

    /// Reads once, waiting until `deadline` (`None`: forever). `Ok(true)` if bytes arrived,
    /// `Ok(false)` if the deadline passed first.
    pub(crate) fn fill(&mut self, deadline: Option<Instant>) -> Result<bool> {
        if self.closed {
            return Err(Error::Closed);
        }
        let timeout = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(READ_TIMEOUT_MIN)
        });
        if let Err(e) = self.stream.set_read_timeout(timeout) {
            self.close();
            return Err(Error::Io {
                op: "set read timeout",
                source: e,
            });
        }
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.close();
                    return Err(Error::Closed);
                }
                Ok(n) => {
                    self.rbuf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(false)
                }
                Err(e) => {
                    self.close();
                    return Err(match e.kind() {
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Error::Closed,
                        _ => Error::Io {
                            op: "read",
                            source: e,
                        },
                    });
                }
            }
        }
    }

    /// Splits one whole record (prefix included) off the receive buffer, if present.
    fn take_record(&mut self, min_body: usize) -> Result<Option<BytesMut>> {
        if self.closed {
            return Err(Error::Closed);
        }
        match wire::check(&self.rbuf, min_body, RECORD_BODY_MAX) {
            Ok(Check::Complete { total }) => Ok(Some(self.rbuf.split_to(total))),
            Ok(Check::Incomplete { .. }) => Ok(None),
            Err(e) => {
                self.close();
                Err(ProtocolError::Wire(e).into())
            }
        }
    }

    /// Reads one handshake record body, failing with [`Error::Timeout`] (and closing) after
    /// `deadline`.
    pub(crate) fn read_handshake_record(&mut self, deadline: Instant) -> Result<BytesMut> {
        loop {
            if let Some(mut record) = self.take_record(1)? {
                return Ok(record.split_off(LEN_PREFIX_BYTES));
            }
            if !self.fill(Some(deadline))? {
                self.close();
                return Err(Error::Timeout { what: "handshake" });
            }
        }
    }
}

/// An established Noise channel: one [`Frame`] per record.
pub(crate) struct Channel {
    raw: RawStream,
    transport: Transport,
    wbuf: Vec<u8>,
}

impl Channel {
    pub(crate) fn new(raw: RawStream, transport: Transport) -> Self {
        Self {
            raw,
            transport,
            wbuf: Vec::new(),
        }
    }

    pub(crate) fn raw(&self) -> &RawStream {
        &self.raw
    }

    pub(crate) fn raw_mut(&mut self) -> &mut RawStream {
        &mut self.raw
    }

    /// Seals and writes `frames` with one write call.
    pub(crate) fn send_all(&mut self, frames: &[Frame]) -> Result<()> {
        if self.raw.is_closed() {
            return Err(Error::Closed);
        }
        self.wbuf.clear();
        for f in frames {
            if let Err(e) = self.transport.seal_frame(f, &mut self.wbuf) {
                self.raw.close();
                return Err(ProtocolError::Transport(e).into());
            }
        }
        let result = self.raw.write_all(&self.wbuf);
        // Do not keep a large payload's buffer around.
        if self.wbuf.capacity() > 4 * READ_CHUNK_BYTES {
            self.wbuf = Vec::new();
        }
        result
    }

    /// Seals and writes one frame.
    pub(crate) fn send(&mut self, frame: &Frame) -> Result<()> {
        self.send_all(std::slice::from_ref(frame))
    }

    /// The next frame, waiting until `deadline` (`None`: forever). `Ok(None)` when the
    /// deadline passed. A record that fails to authenticate or decode closes the channel.
    pub(crate) fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<Frame>> {
        if self.raw.is_closed() {
            return Err(Error::Closed);
        }
        loop {
            if let Some(frame) = self.try_decode()? {
                return Ok(Some(frame));
            }
            if !self.raw.fill(deadline)? {
                return Ok(None);
            }
        }
    }

    /// A frame already in the receive buffer, without reading the socket.
    fn try_decode(&mut self) -> Result<Option<Frame>> {
        let Some(mut record) = self.raw.take_record(TRANSPORT_RECORD_MIN_BYTES)? else {
            return Ok(None);
        };
        let mut body = record.split_off(LEN_PREFIX_BYTES);
        let n = match self.transport.open_record(&mut body) {
            Ok(n) => n,
            Err(e) => {
                self.raw.close();
                return Err(ProtocolError::Transport(e).into());
            }
        };
        body.truncate(n);
        match Frame::decode(body.freeze()) {
            Ok(frame) => Ok(Some(frame)),
            Err(e) => {
                self.raw.close();
                Err(ProtocolError::Decode(e).into())
            }
        }
    }
}
