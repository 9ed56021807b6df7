//! `apijongler serve`: a long-lived local HTTP gateway that official SDKs point their base URL at.
//!
//! `http://ADDR/{connector}/{upstream path and query}` is sent upstream through the pool (see
//! [`proxy`] for what each request goes through). This module owns the process: the flags, the
//! gateway token, the listener, and the shutdown.
//!
//! The door checks are pure (no sockets, no database, no clock), each table-tested on its own:
//! [`credentials`] (the client's credential taken out of all four slots, the gateway token checked in
//! constant time, the `Host` check against DNS rebinding), [`headers`] (which headers cross the
//! gateway, and the `x-goog-upload-url` rewrite that brings resumable uploads back through it) and
//! [`origin`] (which web pages may use the gateway, CORS preflights answered at the door). Dependencies
//! run one way: `proxy` uses them, `headers` uses `credentials`, none reaches into the pool. What the
//! library's send path needs as well (the stream framer, the error dialects, the path check) lives in
//! the library: `api_jongler::stream` and `api_jongler::upstream_url`.
//!
//! Invariants:
//! - A listener on a non-loopback address never starts without a gateway token; a loopback one
//!   checks every request's `Host` (DNS rebinding). Web pages of other origins are refused unless
//!   `--allow-origin` names them, whatever the listener (see [`origin`]).
//! - A client that half-closes after its request gets its answer; one that goes away once its answer
//!   began is let go at once (see [`hangup`]).
//! - The token is held only as a digest ([`GatewayToken`]); no message, log line or error shows it.
//! - SIGTERM or SIGINT stops accepting at once; requests in flight get `--grace` to finish, then are
//!   cut off. Before exit every coordinator settles, so every key this process held is released in
//!   the database (a key whose end still cannot be written is freed by the next claimer, this process
//!   being gone). Exit 0 when every request in flight finished within the grace; 130/143 when some had
//!   to be cut off (the signal's code).

pub(super) mod credentials;
pub(super) mod dashboard;
mod hangup;
mod headers;
mod metrics;
pub(super) mod origin;
mod proxy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use api_jongler::{Connectors, Coordinator, CoordinatorOptions, Keyring};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::exit::Usage;
use super::signals::Signals;
use super::{Global, parse_duration};
use credentials::GatewayToken;
use origin::AllowedOrigins;
use proxy::{Gateway, GlobalPaths, Settings};

/// The variable holding the gateway token (`--token-file` wins over it).
pub const TOKEN_ENV: &str = "APIJONGLER_GATEWAY_TOKEN";

/// How long, at exit, the lease ends still owed may take to be written.
const SETTLE_ON_EXIT: Duration = Duration::from_secs(5);

/// The longest `--wait` (as `request`'s): a year.
const MAX_WAIT: Duration = Duration::from_secs(31_557_600);

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The address to listen on, IP:PORT (port 0: any free port). A non-loopback address needs a
    /// gateway token (--token-file or APIJONGLER_GATEWAY_TOKEN).
    #[arg(long, default_value = "127.0.0.1:8790", value_name = "ADDR")]
    listen: SocketAddr,
    /// Also serve this connector at `/`, for tools that can change only host and port.
    #[arg(long, value_name = "CONNECTOR")]
    root: Option<String>,
    /// A file holding the gateway token clients must present as their API key (a trailing newline is
    /// ignored; the file must not be readable by every user). Default: APIJONGLER_GATEWAY_TOKEN.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Let web pages of this origin (scheme://host[:port], like https://app.example) use the gateway
    /// from a browser; repeat for more. Pages of any other origin are refused with 403.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allow_origin: Vec<String>,
    /// How long a request may wait for a free key (shortened by the client's own deadline, from
    /// X-Server-Timeout or x-stainless-read-timeout); then 429 with Retry-After.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    wait: String,
    /// The largest request body (bytes; K, M, G or KiB, MiB, GiB); larger ones get 413.
    #[arg(long, default_value = "64MiB", value_name = "SIZE")]
    max_body: String,
    /// After SIGTERM or SIGINT, how long requests in flight may take to finish.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    grace: String,
    /// Route upstream traffic through Tor (socks5h://127.0.0.1:9050, or APIJONGLER_TOR_PROXY).
    #[arg(long)]
    tor: bool,
}

pub fn run(global: &Global, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let wait = parse_duration(&args.wait).map_err(|why| Usage(format!("--wait {why}")))?;
    if wait > MAX_WAIT {
        return Err(Usage(format!("--wait '{}' is longer than the longest wait, 1y", args.wait)).into());
    }
    let grace = parse_duration(&args.grace).map_err(|why| Usage(format!("--grace {why}")))?;
    let max_body = parse_size(&args.max_body).map_err(|why| Usage(format!("--max-body {why}")))?;
    let token = load_token(args.token_file.as_deref())?;
    let origins = AllowedOrigins::parse(&args.allow_origin).map_err(Usage)?;
    let loopback = args.listen.ip().to_canonical().is_loopback();
    if !loopback && token.is_none() {
        return Err(Usage(format!(
            "--listen {} is not a loopback address, and no gateway token is set: anyone who can reach it would \
             spend your keys. Set one with --token-file PATH or {TOKEN_ENV}, or listen on 127.0.0.1",
            args.listen
        ))
        .into());
    }
    let connectors = Connectors::load(global.connectors.as_deref())?;
    let keyring = match &global.config {
        Some(path) => Keyring::load(path)?,
        None => Keyring::from_env()?,
    };
    let served: Vec<String> = connectors
        .iter()
        .filter(|connector| !connector.requires_api_key || keyring.keys(&connector.name).is_ok())
        .map(|connector| connector.name.clone())
        .collect();
    if let Some(root) = &args.root
        && !served.contains(root)
    {
        return Err(Usage(format!(
            "--root {root}: no such connector with keys in {}; served: {}",
            keyring.path().display(),
            served.join(", ")
        ))
        .into());
    }
    let settings = Settings {
        paths: GlobalPaths {
            config: keyring.path().to_owned(),
            db: global.db.clone(),
            connectors: global.connectors.clone(),
        },
        root: args.root.clone(),
        token,
        check_host: loopback,
        origins,
        wait,
        max_body,
        tor: args.tor,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(serve(global, args.listen, grace, settings, connectors, keyring, served));
    // Requests cut off and streams whose relay was still running give their keys back as they are
    // dropped here; `settle` below writes what they left to the heartbeat thread.
    runtime.shutdown_timeout(SETTLE_ON_EXIT);
    let (code, coordinators) = outcome?;
    let deadline = Instant::now() + SETTLE_ON_EXIT;
    let left: usize = coordinators.iter().map(|coordinator| coordinator.settle(deadline)).sum();
    if left > 0 {
        eprintln!(
            "apijongler serve: {left} key releases could not be written; the next claimer frees those keys, this \
             process being gone"
        );
    } else if !global.quiet {
        eprintln!("apijongler serve: stopped; every key released");
    }
    Ok(code)
}

/// Serves until a signal; returns the exit code and every coordinator to settle before exit.
async fn serve(
    global: &Global,
    listen: SocketAddr,
    grace: Duration,
    settings: Settings,
    connectors: Connectors,
    keyring: Keyring,
    served: Vec<String>,
) -> anyhow::Result<(ExitCode, Vec<Coordinator>)> {
    let db = settings.paths.db.clone();
    // Opened and synced now, so a bad database stops the server before it listens, and so that
    // `/metrics` reads key states before any request came.
    let coordinator = tokio::task::spawn_blocking(move || {
        let coordinator = Coordinator::open(CoordinatorOptions { db_path: db, ..CoordinatorOptions::default() })?;
        coordinator.sync(&keyring)?;
        Ok::<_, api_jongler::Error>(coordinator)
    })
    .await??;
    // Installed before the address is announced: a signal from then on is a graceful stop.
    let mut signals = Signals::install()?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; choose another address with --listen"))?;
    let bound = listener.local_addr()?;
    let gateway = Arc::new(Gateway::new(settings, connectors, served, coordinator.clone()));
    eprintln!("apijongler serve: listening on http://{bound}");
    if !global.quiet {
        eprintln!("apijongler serve: serving {}", gateway.describe_routes(bound));
    }
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let signal = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let local = stream.local_addr().unwrap_or(bound);
                    connections.spawn(connection(Arc::clone(&gateway), stream, local, stopping.clone()));
                }
                Err(error) => {
                    // Out of file descriptors, say: back off a little instead of spinning.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            signal = signals.next() => break signal,
        }
    };
    drop(listener);
    let _ = stop.send(true);
    gateway.close_dashboard();
    if !global.quiet {
        eprintln!(
            "apijongler serve: {}: no longer accepting; {} connections finish within {}",
            signal.name(),
            connections.len(),
            humantime::format_duration(grace)
        );
    }
    let drained = tokio::select! {
        () = async { while connections.join_next().await.is_some() {} } => true,
        () = tokio::time::sleep(grace) => false,
        _ = signals.next() => false,
    };
    let code = if drained {
        ExitCode::SUCCESS
    } else {
        eprintln!("apijongler serve: {}: cutting off the requests still in flight", signal.name());
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        ExitCode::from(signal.exit_code())
    };
    let mut coordinators = gateway.coordinators().await;
    coordinators.push(coordinator);
    Ok((code, coordinators))
}

/// One client connection: requests until it closes, or until the stop, after which the request in
/// flight finishes and the connection closes.
async fn connection(
    gateway: Arc<Gateway>,
    stream: tokio::net::TcpStream,
    local: SocketAddr,
    mut stopping: watch::Receiver<bool>,
) {
    // A client that shut its sending side after its request is answered, then the connection closes
    // (no request can follow); one that leaves while being answered ends the connection at once.
    let ends = stream.peer_addr().ok().zip(stream.local_addr().ok());
    let (stream, half_closed) = hangup::Hangup::new(stream, ends);
    let service = service_fn(move |request| {
        let (gateway, half_closed) = (Arc::clone(&gateway), half_closed.clone());
        async move {
            let mut response = gateway.handle(request, local).await;
            if half_closed.get() {
                response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    // The timer gives hyper its default header read timeout (30 s) against idle half-open clients.
    // hyper's `half_close` stays off: with it hyper would stop noticing clients that leave mid-answer.
    let connection = http1::Builder::new().timer(TokioTimer::new()).serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = served {
        tracing::debug!(error = %error, "connection ended with an error");
    }
}

/// The gateway token: from `--token-file` (which must not be readable by every user; one trailing
/// newline, CRLF included, is ignored), else from `APIJONGLER_GATEWAY_TOKEN` (empty: unset).
pub(super) fn load_token(file: Option<&Path>) -> Result<Option<GatewayToken>, Usage> {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = file else {
        return match std::env::var(TOKEN_ENV) {
            Ok(token) if token.is_empty() => Ok(None),
            Ok(token) => Ok(Some(GatewayToken::new(&SecretString::from(token)))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Usage(format!("{TOKEN_ENV} is not UTF-8 text"))),
        };
    };
    let shown = path.display();
    let unreadable = |error: std::io::Error| Usage(format!("--token-file {shown}: cannot read it ({error})"));
    let mode = std::fs::metadata(path).map_err(unreadable)?.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(Usage(format!(
            "--token-file {shown} is readable by every user (mode {:o}), so any of them could use the gateway; \
             run `chmod o-rwx {shown}`",
            mode & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let token = text.strip_suffix('\n').map_or(text.as_str(), |line| line.strip_suffix('\r').unwrap_or(line));
    if token.is_empty() {
        return Err(Usage(format!("--token-file {shown} is empty; write the token in it")));
    }
    Ok(Some(GatewayToken::new(&SecretString::from(token.to_owned()))))
}

/// `64MiB`, `512K`, `1G`, `1000`: bytes, with an optional binary unit (K, M, G, KiB, MiB, GiB, any case).
fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let problem = || format!("'{text}' is not a size; write it like 64MiB, 512K or 1000000");
    let number: u64 = number.parse().map_err(|_| problem())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(problem()),
    };
    number.checked_mul(1 << shift).ok_or_else(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("64MiB", Some(64 << 20)),
            ("64 mib", Some(64 << 20)),
            ("512K", Some(512 << 10)),
            ("1G", Some(1 << 30)),
            ("1000", Some(1000)),
            ("0", Some(0)),
            ("7b", Some(7)),
            ("64MB", None),
            ("MiB", None),
            ("-1", None),
            ("1.5M", None),
            ("99999999999999999999G", None),
            ("18446744073709551615G", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text).ok(), *expected, "{text}");
        }
    }

    #[test]
    fn token_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let presented = |value: &str| credentials::Presented { slot: credentials::Slot::Bearer, secret: value.into() };
        for (text, accepted) in [("tok\n", "tok"), ("tok\r\n", "tok"), ("tok", "tok"), (" tok \n\n", " tok \n")] {
            let token = load_token(Some(&write("t", text, 0o600))).unwrap().unwrap();
            assert!(token.accepts(Some(&presented(accepted))), "{text:?}");
        }
        assert!(load_token(Some(&write("g", "tok\n", 0o640))).is_ok(), "a group may share it");
        let refused = load_token(Some(&write("w", "tok\n", 0o644))).unwrap_err().0;
        assert!(refused.contains("readable by every user") && refused.contains("chmod"), "{refused}");
        assert!(!refused.contains("tok\n"));
        assert!(load_token(Some(&write("e", "\n", 0o600))).unwrap_err().0.contains("empty"));
        assert!(load_token(Some(&dir.path().join("missing"))).unwrap_err().0.contains("cannot read"));
    }
}
