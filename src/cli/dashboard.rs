//! `apijongler dashboard [--listen ADDR]`: the dashboard's page and data alone (see
//! [`serve::dashboard`](super::serve::dashboard)), for users who do not run the gateway. It sends no
//! request upstream and writes nothing: it reads the database, and the keyring if one is configured
//! (to show how it differs, as `status` does).
//!
//! The door is the gateway's, with its own checks reused: `Host` must be loopback on a loopback
//! listener (421), web pages of other origins are refused unless `--allow-origin` names them (403;
//! the dashboard answers no CORS preflight), and with a gateway token every data path wants it (401).
//! A non-loopback listener needs a token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::exit::Usage;
use super::serve::credentials::{GatewayToken, check_host, strip_credentials};
use super::serve::dashboard::{self, Body, Dashboard, Page, UI_PATH};
use super::serve::load_token;
use super::serve::origin::{AllowedOrigins, Verdict, add_cors_headers, is_preflight};
use super::signals::Signals;
use super::{Global, keyring_to_compare, open};

#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// The address to listen on, IP:PORT (port 0: any free port). A non-loopback address needs a
    /// gateway token (--token-file or APIJONGLER_GATEWAY_TOKEN).
    #[arg(long, default_value = "127.0.0.1:8791", value_name = "ADDR")]
    listen: SocketAddr,
    /// A file holding the token the page's data requests must present (as `serve`'s; open the page as
    /// http://ADDR/__apijongler/ui/#token=TOKEN). Default: APIJONGLER_GATEWAY_TOKEN.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Let web pages of this origin (scheme://host[:port]) read the dashboard's data; repeat for more.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allow_origin: Vec<String>,
}

/// What the door checks, as `serve` does.
#[derive(Debug)]
struct Door {
    token: Option<GatewayToken>,
    check_host: bool,
    origins: AllowedOrigins,
}

pub fn run(global: &Global, args: &DashboardArgs) -> anyhow::Result<ExitCode> {
    let token = load_token(args.token_file.as_deref())?;
    let origins = AllowedOrigins::parse(&args.allow_origin).map_err(Usage)?;
    let loopback = args.listen.ip().to_canonical().is_loopback();
    if !loopback && token.is_none() {
        return Err(Usage(format!(
            "--listen {} is not a loopback address, and no token is set: anyone who can reach it would see your \
             pool. Set one with --token-file PATH or {}, or listen on 127.0.0.1",
            args.listen,
            super::serve::TOKEN_ENV
        ))
        .into());
    }
    let coordinator = open(global)?;
    let keyring = keyring_to_compare(global);
    let door = Arc::new(Door { token, check_host: loopback, origins });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let dashboard = Arc::new(Dashboard::new(coordinator, keyring));
        let mut signals = Signals::install()?;
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}; choose another address with --listen", args.listen))?;
        let bound = listener.local_addr()?;
        eprintln!("apijongler dashboard: listening on http://{bound}{UI_PATH}");
        let mut connections = JoinSet::new();
        let signal = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (door, dashboard) = (Arc::clone(&door), Arc::clone(&dashboard));
                        connections.spawn(async move {
                            let service = service_fn(move |request| {
                                let (door, dashboard) = (Arc::clone(&door), Arc::clone(&dashboard));
                                async move { Ok::<_, std::convert::Infallible>(answer(&door, &dashboard, request).await) }
                            });
                            let served = http1::Builder::new()
                                .timer(TokioTimer::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                            if let Err(error) = served {
                                tracing::debug!(error = %error, "connection ended with an error");
                            }
                        });
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                signal = signals.next() => break signal,
            }
        };
        dashboard.close();
        connections.abort_all();
        if !global.quiet {
            eprintln!("apijongler dashboard: {}: stopped", signal.name());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One request through the door, then to the dashboard.
async fn answer(door: &Door, dashboard: &Dashboard, request: Request<Incoming>) -> Response<Body> {
    let (mut parts, _) = request.into_parts();
    if door.check_host
        && let Err(refused) = check_host(&parts.headers)
    {
        let message = refused.to_string();
        return dashboard::error(StatusCode::MISDIRECTED_REQUEST, message.trim_start_matches("apijongler: "));
    }
    let verdict = door.origins.judge(&parts.headers);
    if let Verdict::Refused(message) = &verdict {
        return dashboard::error(StatusCode::FORBIDDEN, message);
    }
    if is_preflight(&parts.method, &parts.headers) {
        return dashboard::error(StatusCode::FORBIDDEN, "the dashboard answers no CORS preflight: it is read with GET");
    }
    let path = parts.uri.path();
    let page = if path == "/" { Some(Page::Bare) } else { Page::of(path) };
    let Some(page) = page else {
        return dashboard::error(StatusCode::NOT_FOUND, &format!("only the dashboard is served here: open {UI_PATH}"));
    };
    let stripped = strip_credentials(&mut parts.headers, parts.uri.query());
    if page.needs_token()
        && let Some(token) = &door.token
        && !token.accepts(stripped.presented.as_ref())
    {
        return dashboard::error(
            StatusCode::UNAUTHORIZED,
            "the token is missing or wrong: open the page as /__apijongler/ui/#token=TOKEN",
        );
    }
    let mut response = dashboard.respond(page, &parts.method, stripped.query.as_deref()).await;
    if let Verdict::Allowed(origin) = &verdict {
        add_cors_headers(response.headers_mut(), origin);
    }
    response
}
