//! A SOCKS5 server on loopback (RFC 1928, with RFC 1929 user/password as Tor isolation sends it),
//! standing in for Tor: it remembers who asked for what, can hold every handshake after the CONNECT
//! request came until the test opens its gate, and counts the bytes each connection forwarded.
//!
//! Invariant: connection `i` of [`Socks5::connections`] is the `i`-th accepted, whether or not its
//! handshake finished.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What the server knows of one connection.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// The (RFC 1929 username, requested host) of its CONNECT, once the handshake got that far; the
    /// username is empty when the client offered no user/password.
    pub request: Option<(String, String)>,
    /// The bytes forwarded from the client to the upstream, once the client closed its side (0 when
    /// the handshake failed).
    pub forwarded: Option<usize>,
}

/// A running SOCKS5 server.
pub struct Socks5 {
    port: u16,
    gate: watch::Sender<bool>,
    /// One message per connection whose CONNECT request came, sent before it waits at the gate.
    pub held: mpsc::UnboundedReceiver<()>,
    connections: Arc<Mutex<Vec<Connection>>>,
}

impl Socks5 {
    /// A server that sends every connection to `upstream`, whatever host was asked for (so a name
    /// only the proxy can resolve still works), with its gate open.
    pub async fn redirecting_to(upstream: SocketAddr) -> Self {
        let server = Self::start(Some(upstream)).await;
        server.open();
        server
    }

    /// A server that connects where each client asked, holding every handshake until [`Self::open`].
    pub async fn holding() -> Self {
        Self::start(None).await
    }

    async fn start(upstream: Option<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind socks");
        let port = listener.local_addr().expect("socks address").port();
        let (gate, opened) = watch::channel(false);
        let (announce, held) = mpsc::unbounded_channel();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (opened, announce, log) = (opened.clone(), announce.clone(), Arc::clone(&log));
                let index = {
                    let mut log = log.lock().expect("connections");
                    log.push(Connection::default());
                    log.len() - 1
                };
                tokio::spawn(async move {
                    let gated = Gated { opened, announce, log: Arc::clone(&log), index };
                    let forwarded = tunnel(client, upstream, gated).await.unwrap_or(0);
                    log.lock().expect("connections")[index].forwarded = Some(forwarded);
                });
            }
        });
        Self { port, gate, held, connections }
    }

    /// The proxy URL for the connector's Tor option.
    pub fn url(&self) -> String {
        format!("socks5h://127.0.0.1:{}", self.port)
    }

    /// Lets every held handshake, and all later ones, go on.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Every connection so far, in the order they were accepted.
    pub fn connections(&self) -> Vec<Connection> {
        self.connections.lock().expect("connections").clone()
    }

    /// The (username, requested host) of every connection whose CONNECT request came.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.connections().into_iter().filter_map(|connection| connection.request).collect()
    }

    /// The bytes connection `index` forwarded to the upstream, once it is closed.
    pub fn forwarded(&self, index: usize) -> Option<usize> {
        self.connections().get(index).and_then(|connection| connection.forwarded)
    }
}

/// A connection's link back to its server: the gate, the announcement, and its record.
struct Gated {
    opened: watch::Receiver<bool>,
    announce: mpsc::UnboundedSender<()>,
    log: Arc<Mutex<Vec<Connection>>>,
    index: usize,
}

/// One connection: the handshake, a wait at the gate, then bytes both ways; returns how many went
/// to the upstream (`upstream`, or the host the client asked for).
async fn tunnel(mut client: TcpStream, upstream: Option<SocketAddr>, mut gated: Gated) -> std::io::Result<usize> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut methods).await?;
    let mut user = String::new();
    if methods.contains(&2) {
        client.write_all(&[5, 2]).await?;
        let mut version_and_length = [0u8; 2];
        client.read_exact(&mut version_and_length).await?;
        let mut name = vec![0u8; usize::from(version_and_length[1])];
        client.read_exact(&mut name).await?;
        let mut password = vec![0u8; usize::from(client.read_u8().await?)];
        client.read_exact(&mut password).await?;
        user = String::from_utf8_lossy(&name).into_owned();
        client.write_all(&[1, 0]).await?;
    } else {
        client.write_all(&[5, 0]).await?;
    }
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut name = vec![0u8; usize::from(client.read_u8().await?)];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        // A panic, not an error: the connection then never counts as closed, so no test passes on it.
        other => panic!("the test proxy speaks IPv4 and names only, not address type {other}"),
    };
    let port = client.read_u16().await?;
    gated.log.lock().expect("connections")[gated.index].request = Some((user, host.clone()));
    let _ = gated.announce.send(());
    let _ = gated.opened.wait_for(|open| *open).await;
    let upstream = match upstream {
        Some(address) => TcpStream::connect(address).await?,
        None => TcpStream::connect((host.as_str(), port)).await?,
    };
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    tokio::spawn(async move { tokio::io::copy(&mut upstream_read, &mut client_write).await });
    let (mut buffer, mut forwarded) = (vec![0u8; 16 * 1024], 0);
    // Counted by hand: a connection reset still tells how much had gone through.
    while let Ok(read @ 1..) = client_read.read(&mut buffer).await {
        forwarded += read;
        if upstream_write.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = upstream_write.shutdown().await;
    Ok(forwarded)
}
