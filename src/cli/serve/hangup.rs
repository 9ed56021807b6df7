//! A client connection that tells a half-close from a departure.
//!
//! A client may shut down its sending side once its request is out (`shutdown(SHUT_WR)`, `nc -N`,
//! some proxies and scripts) and still read the answer. A read's end of file is the same whether the
//! client half-closed or went away, and hyper must not miss the second: a stream relayed to a client
//! that left holds its key until a write fails, and the next event may be a minute away. hyper's own
//! `half_close` option cannot help, since with it hyper stops watching for an end of file during an
//! answer altogether. [`Hangup`] tells the two apart by when the end of file comes, and hides a
//! half-close from hyper (which keeps its default, an end of file during an answer ends the
//! connection).
//!
//! Invariants:
//! - An end of file after the client sent bytes that nothing was written back to yet (a request not
//!   yet answered) is a half-close: hyper never sees it (the read stays pending), the request is
//!   answered, and [`HalfClosed`] says so, so that the answer closes the connection.
//! - Any other end of file (between requests, or once an answer has begun) reaches hyper: it ends the
//!   connection, dropping a response body in flight, which stops the relay and frees its key at once.
//! - A client that leaves entirely before its answer begins looks like a half-close (TCP cannot tell
//!   them apart without writing): its request goes on, and the answer is dropped when written.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection stream that hides a client's half-close from hyper (see the module docs).
#[derive(Debug)]
pub struct Hangup<T> {
    inner: T,
    state: State,
    half_closed: HalfClosed,
}

/// What the connection did last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing yet.
    Idle,
    /// Read bytes from the client (a request), nothing written since.
    Asked,
    /// Wrote bytes to the client (an answer), nothing read since.
    Answering,
    /// The client shut its side after a request: reads stay pending from now on.
    HalfClosed,
}

/// Whether the client of a connection half-closed it (shared with the request handler, which then
/// closes the connection after its answer: no further request can come).
#[derive(Debug, Clone, Default)]
pub struct HalfClosed(Arc<AtomicBool>);

impl HalfClosed {
    /// The client shut down its sending side after a request.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl<T> Hangup<T> {
    /// Wraps a fresh connection; the [`HalfClosed`] tells when its client half-closes.
    pub fn new(inner: T) -> (Self, HalfClosed) {
        let half_closed = HalfClosed::default();
        (Self { inner, state: State::Idle, half_closed: half_closed.clone() }, half_closed)
    }

    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) && self.state != State::HalfClosed {
            self.state = State::Answering;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Hangup<T> {
    fn poll_read(self: Pin<&mut Self>, context: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state == State::HalfClosed {
            // Nothing more can come; hyper is never woken for reading again on this connection.
            return Poll::Pending;
        }
        let (before, wanted) = (buf.filled().len(), buf.remaining() > 0);
        let read = Pin::new(&mut this.inner).poll_read(context, buf);
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.state = State::Asked,
            Poll::Ready(Ok(())) if wanted && this.state == State::Asked => {
                this.state = State::HalfClosed;
                this.half_closed.0.store(true, Ordering::Relaxed);
                return Poll::Pending;
            }
            _ => {}
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Hangup<T> {
    fn poll_write(self: Pin<&mut Self>, context: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(context, buf);
        this.wrote(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(context, bufs);
        this.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One read, without waiting: `None` when it is pending.
    async fn read_now(stream: &mut Hangup<tokio::io::DuplexStream>) -> Option<io::Result<usize>> {
        let mut bytes = [0; 64];
        poll_fn(|context| {
            let mut buf = ReadBuf::new(&mut bytes);
            Poll::Ready(match Pin::new(&mut *stream).poll_read(context, &mut buf) {
                Poll::Ready(read) => Some(read.map(|()| buf.filled().len())),
                Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn an_end_of_file_after_a_request_is_a_half_close() {
        let (client, server) = tokio::io::duplex(64);
        let (mut server, half_closed) = Hangup::new(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"request").await.unwrap();
        client_write.shutdown().await.unwrap();
        assert_eq!(read_now(&mut server).await.unwrap().unwrap(), 7);
        assert!(read_now(&mut server).await.is_none(), "hidden from hyper");
        assert!(half_closed.get());
        server.write_all(b"answer").await.unwrap();
        assert!(read_now(&mut server).await.is_none(), "still hidden while answering");
        let mut answer = [0; 6];
        client_read.read_exact(&mut answer).await.unwrap();
    }

    #[tokio::test]
    async fn an_end_of_file_once_answering_or_between_requests_reaches_hyper() {
        let (mut client, server) = tokio::io::duplex(64);
        let (mut server, half_closed) = Hangup::new(server);
        client.write_all(b"request").await.unwrap();
        assert_eq!(read_now(&mut server).await.unwrap().unwrap(), 7);
        server.write_all(b"answer begins").await.unwrap();
        drop(client);
        assert_eq!(read_now(&mut server).await.unwrap().unwrap(), 0, "the client left");
        assert!(!half_closed.get());
        let (client, server) = tokio::io::duplex(64);
        let (mut server, half_closed) = Hangup::new(server);
        drop(client);
        assert_eq!(read_now(&mut server).await.unwrap().unwrap(), 0, "connected and left without a request");
        assert!(!half_closed.get());
    }
}
