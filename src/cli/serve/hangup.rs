//! A client connection that tells a half-close from a departure.
//!
//! A client may shut down its sending side once its request is out (`shutdown(SHUT_WR)`, `nc -N`,
//! some proxies and scripts) and still read the answer. A read's end of file is the same whether the
//! client half-closed or went away (an SDK that timed out, Ctrl-C), and the two must be told apart: a
//! request whose client left must not wait for a key nor go upstream (it would be paid for nothing,
//! and live clients would wait behind it), and a stream relayed to a client that left holds its key
//! until a write fails. hyper's own `half_close` option cannot help, since with it hyper stops
//! watching for an end of file altogether. [`Hangup`] asks the kernel: a client on this host whose
//! socket is still open (it appears in `/proc/net/tcp` with an inode) only half-closed; one whose
//! socket is orphaned (inode 0) or that this host cannot see left.
//!
//! Invariants:
//! - An end of file after the client sent bytes that nothing was written back to yet (a request not
//!   yet answered), from a client on this host that still holds its socket, is a half-close: hyper
//!   never sees it (the read stays pending), the request is answered, and [`HalfClosed`] says so, so
//!   that the answer closes the connection.
//! - Any other end of file (a client gone, between requests, once an answer has begun, or from a
//!   client on another host, whose socket this host cannot see) reaches hyper: it ends the
//!   connection, dropping the request's handling or a response body in flight, which gives up its
//!   wait or frees its key at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection stream that hides a client's half-close from hyper (see the module docs).
#[derive(Debug)]
pub struct Hangup<T> {
    inner: T,
    state: State,
    half_closed: HalfClosed,
    /// The client's address and ours, to look the client's socket up on this host.
    ends: Option<(SocketAddr, SocketAddr)>,
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
    /// Wraps a fresh connection from `client` to `server` (`None`: not a TCP connection, whose end of
    /// file always means the client left); the [`HalfClosed`] tells when its client half-closes.
    pub fn new(inner: T, ends: Option<(SocketAddr, SocketAddr)>) -> (Self, HalfClosed) {
        let half_closed = HalfClosed::default();
        (Self { inner, state: State::Idle, half_closed: half_closed.clone(), ends }, half_closed)
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
            Poll::Ready(Ok(()))
                if wanted
                    && this.state == State::Asked
                    && this.ends.is_some_and(|(client, server)| still_open_here(client, server)) =>
            {
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

/// Whether the client's end of a TCP connection from `client` to `server` is a socket a process on
/// this host still holds open (listed in `/proc/net/tcp{,6}` with an inode; an orphaned socket, one
/// its process closed, has inode 0). False when it cannot be seen: another host, or no `/proc`.
fn still_open_here(client: SocketAddr, server: SocketAddr) -> bool {
    let (client, server) = (unmapped(client), unmapped(server));
    let table = if client.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let Ok(text) = std::fs::read_to_string(table) else { return false };
    let (local, remote) = (proc_address(client), proc_address(server));
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 9 && fields[1] == local && fields[2] == remote && fields[9] != "0"
    })
}

/// An IPv4 address seen through an IPv6 socket (`::ffff:a.b.c.d`) as the IPv4 one it is.
fn unmapped(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(address, |v4| SocketAddr::new(IpAddr::V4(v4), address.port())),
        IpAddr::V4(_) => address,
    }
}

/// An address as `/proc/net/tcp{,6}` writes it: the address's 32-bit words in host byte order, in
/// hex, then the port.
fn proc_address(address: SocketAddr) -> String {
    let words: String = match address.ip() {
        IpAddr::V4(ip) => format!("{:08X}", u32::from_ne_bytes(ip.octets())),
        IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|word| format!("{:08X}", u32::from_ne_bytes([word[0], word[1], word[2], word[3]])))
            .collect(),
    };
    format!("{words}:{:04X}", address.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One read, without waiting: `None` when it is pending.
    async fn read_now<T: AsyncRead + Unpin>(stream: &mut Hangup<T>) -> Option<io::Result<usize>> {
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

    /// A real loopback connection: the client's stream, and the server's wrapped in a [`Hangup`].
    async fn connection() -> (tokio::net::TcpStream, Hangup<tokio::net::TcpStream>, HalfClosed) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let ends = Some((peer, server.local_addr().unwrap()));
        let (server, half_closed) = Hangup::new(server, ends);
        (client, server, half_closed)
    }

    /// Reads until `done` says so (the kernel delivers a FIN on its own time), for at most 10 s.
    async fn read_until<T: AsyncRead + Unpin>(
        stream: &mut Hangup<T>,
        mut done: impl FnMut(&Option<io::Result<usize>>) -> bool,
    ) -> Option<io::Result<usize>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let read = read_now(stream).await;
            if done(&read) || std::time::Instant::now() > deadline {
                return read;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn an_end_of_file_after_a_request_from_a_client_still_holding_its_socket_is_a_half_close() {
        let (mut client, mut server, half_closed) = connection().await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_until(&mut server, Option::is_some).await.unwrap().unwrap(), 7);
        let flag = half_closed.clone();
        assert!(read_until(&mut server, |_| flag.get()).await.is_none(), "hidden from hyper");
        assert!(half_closed.get());
        server.write_all(b"answer").await.unwrap();
        assert!(read_now(&mut server).await.is_none(), "still hidden while answering");
        let mut answer = [0; 6];
        client.read_exact(&mut answer).await.unwrap();
    }

    #[tokio::test]
    async fn an_end_of_file_after_a_request_from_a_client_that_closed_its_socket_reaches_hyper() {
        let (mut client, mut server, half_closed) = connection().await;
        client.write_all(b"request").await.unwrap();
        assert_eq!(read_until(&mut server, Option::is_some).await.unwrap().unwrap(), 7);
        drop(client);
        let end = read_until(&mut server, Option::is_some).await;
        assert_eq!(end.unwrap().unwrap(), 0, "the client left before its answer");
        assert!(!half_closed.get());
    }

    #[tokio::test]
    async fn an_end_of_file_once_answering_or_between_requests_reaches_hyper() {
        let (mut client, mut server, half_closed) = connection().await;
        client.write_all(b"request").await.unwrap();
        assert_eq!(read_until(&mut server, Option::is_some).await.unwrap().unwrap(), 7);
        server.write_all(b"answer begins").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_until(&mut server, Option::is_some).await.unwrap().unwrap(), 0, "shut while answered");
        assert!(!half_closed.get());
        let (client, mut server, half_closed) = connection().await;
        drop(client);
        let end = read_until(&mut server, Option::is_some).await;
        assert_eq!(end.unwrap().unwrap(), 0, "connected and left without a request");
        assert!(!half_closed.get());
    }

    #[test]
    fn addresses_are_written_as_proc_net_tcp_writes_them() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let expected = if cfg!(target_endian = "little") { "0100007F:1F90" } else { "7F000001:1F90" };
        assert_eq!(proc_address(v4), expected);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8080".parse().unwrap();
        assert_eq!(unmapped(mapped), v4);
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let expected = if cfg!(target_endian = "little") {
            "00000000000000000000000001000000:0050"
        } else {
            "00000000000000000000000000000001:0050"
        };
        assert_eq!(proc_address(v6), expected);
    }
}
