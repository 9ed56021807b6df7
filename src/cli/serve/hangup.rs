//! A client connection that tells a half-close from a departure.
//!
//! A client may shut down its sending side once its request is out (`shutdown(SHUT_WR)`, `nc -N`,
//! some proxies and scripts) and still read the answer; hyper answers it when `half_close` is on.
//! But the end of file a read meets is the same whether the client half-closed or went away, and with
//! `half_close` alone hyper would go on relaying a stream to a client that left, holding its key until
//! a write fails (the next event may be a minute away). [`Hangup`] tells them apart by when the end of
//! file comes.
//!
//! Invariants:
//! - An end of file before any byte of an answer was written (since the client last sent bytes) is a
//!   half-close: it reaches hyper as one, and the request is answered.
//! - An end of file once an answer has begun is a departure: the read fails (`ConnectionAborted`),
//!   hyper drops the connection and the response body with it, which stops the relay and frees the key
//!   at once.
//! - A client that leaves entirely before its answer begins looks like a half-close (TCP cannot tell
//!   them apart without writing): its request goes on, and the answer is dropped when written.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection stream that turns an end of file after the answer began into an error.
#[derive(Debug)]
pub struct Hangup<T> {
    inner: T,
    /// Bytes were written since the client last sent any.
    answering: bool,
}

impl<T> Hangup<T> {
    /// Wraps a fresh connection.
    pub fn new(inner: T) -> Self {
        Self { inner, answering: false }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Hangup<T> {
    fn poll_read(self: Pin<&mut Self>, context: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, wanted) = (buf.filled().len(), buf.remaining() > 0);
        match Pin::new(&mut this.inner).poll_read(context, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.answering = false;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if wanted && this.answering => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client closed its connection while being answered",
            ))),
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Hangup<T> {
    fn poll_write(self: Pin<&mut Self>, context: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(context, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.answering = true;
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(context, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.answering = true;
        }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_end_of_file_is_a_half_close_until_the_answer_begins() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = Hangup::new(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"request").await.unwrap();
        client_write.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.expect("a half-close reads as an end of file");
        assert_eq!(request, b"request");
        server.write_all(b"answer").await.unwrap();
        let mut answer = [0; 6];
        client_read.read_exact(&mut answer).await.unwrap();
        let error = server.read(&mut [0; 8]).await.expect_err("once answering, an end of file is a departure");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn a_new_request_after_an_answer_resets_it() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = Hangup::new(server);
        server.write_all(b"first answer").await.unwrap();
        client.write_all(b"second").await.unwrap();
        let mut request = [0; 6];
        server.read_exact(&mut request).await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut [0; 8]).await.unwrap(), 0, "a half-close again");
    }
}
