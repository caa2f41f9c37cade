//! A glommio `TcpStream` seen through hyper's IO traits, for the HTTP endpoints that run on
//! their own glommio executors (`admin`: `/metrics`; `media`: uploads and downloads). No tokio.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// The stream, and optionally a clock every successful read and write sets (an idle
/// watchdog reads it).
pub(crate) struct HyperStream {
    stream: TcpStream,
    last_io: Option<Rc<Cell<Instant>>>,
}

impl HyperStream {
    /// A plain stream.
    pub(crate) fn new(stream: TcpStream) -> Self {
        HyperStream {
            stream,
            last_io: None,
        }
    }

    /// A stream whose reads and writes set `last_io` to now.
    pub(crate) fn watched(stream: TcpStream, last_io: Rc<Cell<Instant>>) -> Self {
        HyperStream {
            stream,
            last_io: Some(last_io),
        }
    }

    fn touch(&self) {
        if let Some(t) = &self.last_io {
            t.set(Instant::now());
        }
    }
}

impl hyper::rt::Read for HyperStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: the unfilled part is zeroed before it is viewed as `[u8]`, so no
        // uninitialised byte is ever read; `advance(n)` then marks exactly the `n` bytes the
        // read wrote as filled (`n` never exceeds the slice's length).
        let slice = unsafe {
            let unfilled = buf.as_mut();
            for b in unfilled.iter_mut() {
                b.write(0);
            }
            std::slice::from_raw_parts_mut(unfilled.as_mut_ptr().cast::<u8>(), unfilled.len())
        };
        match Pin::new(&mut self.stream).poll_read(cx, slice) {
            Poll::Ready(Ok(n)) => {
                self.touch();
                // SAFETY: the read initialised the first `n` bytes of the unfilled part.
                unsafe { buf.advance(n) };
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for HyperStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(_))) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_close(cx)
    }
}
