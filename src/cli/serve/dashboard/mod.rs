//! The dashboard: a read-only web page of the pool at `/__apijongler/ui/`, on `serve` and on its own
//! (`apijongler dashboard`). It shows every connector's keys with state, holder, lockdowns by model
//! (deadlines, reasons), quota group, and a strip of the last hour's attempts per key and model; a
//! key's row opens its recent history. It updates live: [`feed`] pushes a new snapshot within a
//! second of any commit by any process.
//!
//! Invariants:
//! - Read-only: nothing here writes the database or claims a key.
//! - No secret reaches the page: keys are named by name and fingerprint, as in `status --json`; the
//!   page puts every text in the DOM as text (`textContent`), never as HTML, and its
//!   Content-Security-Policy allows only its own script, style and data.
//! - The same door as the gateway's: the caller checks `Host` (loopback listeners), refuses web
//!   pages of other origins unless allowed, and asks for the gateway token (if one is set) on every
//!   data path ([`Page::needs_token`]). The page and its assets hold nothing and are served without
//!   it: a browser cannot send a header when it opens a URL, so the page reads the token from the
//!   URL's fragment (`#token=...`, which never leaves the browser) and sends it as
//!   `Authorization: Bearer` with each data request (server-sent events read with `fetch`, since
//!   `EventSource` cannot send that header).
//! - The assets are embedded in the binary: no CDN, works offline.

pub mod feed;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use api_jongler::pool::HistoryQuery;
use api_jongler::{Coordinator, Keyring};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;

use feed::Feed;

/// Where the page lives.
pub const UI_PATH: &str = "/__apijongler/ui/";

/// The page's policy: its own script, style and data only; no frames, forms, plugins or inline code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A comment line sent on an idle event stream, so proxies and the browser keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How many history rows a key's history shows.
const HISTORY_ROWS: u64 = 50;

/// A path of the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/__apijongler/ui`: redirected to the page.
    Bare,
    /// The page or one of its assets.
    Asset(&'static Asset),
    /// `events`: the snapshots as server-sent events.
    Events,
    /// `state`: the current snapshot, once.
    State,
    /// `history?connector=C&key=K`: a key's recent history.
    History,
    /// Another path under [`UI_PATH`].
    Missing,
}

impl Page {
    /// The dashboard path `path` names, if it is one.
    pub fn of(path: &str) -> Option<Self> {
        if path == UI_PATH.trim_end_matches('/') {
            return Some(Self::Bare);
        }
        let name = path.strip_prefix(UI_PATH)?;
        Some(match name {
            "events" => Self::Events,
            "state" => Self::State,
            "history" => Self::History,
            _ => ASSETS.iter().find(|asset| asset.name == name).map_or(Self::Missing, Self::Asset),
        })
    }

    /// Whether the path serves pool data, and so needs the gateway token when one is set.
    pub fn needs_token(self) -> bool {
        matches!(self, Self::Events | Self::State | Self::History)
    }
}

/// An embedded file of the page.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: [Asset; 3] = [
    Asset { name: "", content_type: "text/html; charset=utf-8", bytes: include_bytes!("assets/index.html") },
    Asset { name: "app.js", content_type: "text/javascript; charset=utf-8", bytes: include_bytes!("assets/app.js") },
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", bytes: include_bytes!("assets/style.css") },
];

/// The dashboard of one server: its live feed, and the coordinator it reads a key's history with.
#[derive(Debug)]
pub struct Dashboard {
    coordinator: Coordinator,
    keyring: Option<Keyring>,
    feed: Feed,
}

impl Dashboard {
    /// A dashboard of `coordinator`'s database, compared with `keyring` if given.
    pub fn new(coordinator: Coordinator, keyring: Option<Keyring>) -> Self {
        let feed = Feed::start(coordinator.clone(), keyring.clone());
        Self { coordinator, keyring, feed }
    }

    /// Ends every page's event stream (before a server stops).
    pub fn close(&self) {
        self.feed.close();
    }

    /// The answer to a request for `page` that passed the door.
    pub async fn respond(&self, page: Page, method: &Method, query: Option<&str>) -> Response<Body> {
        if !matches!(*method, Method::GET | Method::HEAD) {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "the dashboard is read-only: use GET");
            response.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match page {
            Page::Bare => {
                let mut response = reply(StatusCode::PERMANENT_REDIRECT, "text/plain; charset=utf-8", Body::empty());
                response.headers_mut().insert(LOCATION, HeaderValue::from_static(UI_PATH));
                response
            }
            Page::Asset(asset) => {
                let mut response =
                    reply(StatusCode::OK, asset.content_type, Body::full(Bytes::from_static(asset.bytes)));
                let headers = response.headers_mut();
                headers.insert(HeaderName::from_static("content-security-policy"), HeaderValue::from_static(CSP));
                headers.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
                response
            }
            Page::Events => self.events(),
            Page::State => {
                let (coordinator, keyring) = (self.coordinator.clone(), self.keyring.clone());
                let read = tokio::task::spawn_blocking(move || feed::snapshot(&coordinator, keyring.as_ref())).await;
                match read {
                    Ok(Ok(json)) => reply(StatusCode::OK, "application/json", Body::full(json.to_string().into())),
                    Ok(Err(error)) => self.unreadable(&error),
                    Err(error) => self.unreadable(&error),
                }
            }
            Page::History => self.history(query).await,
            Page::Missing => error(StatusCode::NOT_FOUND, &format!("no dashboard page here; open {UI_PATH}")),
        }
    }

    /// `text/event-stream` of snapshots: the latest at once, then each new one, with a comment line
    /// when idle; it ends when the dashboard closes or the page goes away.
    fn events(&self) -> Response<Body> {
        let (sender, receiver) = mpsc::channel::<Bytes>(4);
        let mut snapshots = self.feed.subscribe();
        let mut closing = self.feed.closing();
        tokio::spawn(async move {
            // The latest snapshot first, unless none was built yet (the feed builds one now that a
            // page listens, and `changed` sees it).
            snapshots.mark_changed();
            loop {
                let event = tokio::select! {
                    changed = snapshots.changed() => match changed {
                        Ok(()) => {
                            let json = snapshots.borrow_and_update().clone();
                            if json.is_empty() { continue; }
                            Bytes::from([b"data: ".as_slice(), &json, b"\n\n"].concat())
                        }
                        Err(_) => break,
                    },
                    () = tokio::time::sleep(KEEP_ALIVE) => Bytes::from_static(b": still here\n\n"),
                    _ = closing.wait_for(|closed| *closed) => break,
                };
                if sender.send(event).await.is_err() {
                    break; // The page went away.
                }
            }
        });
        let mut response = reply(StatusCode::OK, "text/event-stream", Body::Events(receiver));
        response.headers_mut().insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
        response
    }

    /// The last [`HISTORY_ROWS`] history rows of the key `?connector=C&key=K` names, newest first.
    async fn history(&self, query: Option<&str>) -> Response<Body> {
        let mut connector = None;
        let mut key = None;
        for (name, value) in reqwest::Url::parse(&format!("http://x/?{}", query.unwrap_or_default()))
            .map(|url| url.query_pairs().into_owned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            match name.as_str() {
                "connector" => connector = Some(value),
                "name" => key = Some(value),
                _ => {}
            }
        }
        let (Some(connector), Some(key)) = (connector, key) else {
            return error(StatusCode::BAD_REQUEST, "name the key: history?connector=CONNECTOR&name=KEY");
        };
        let query =
            HistoryQuery { connector: Some(connector), key_name: Some(key), since: None, limit: Some(HISTORY_ROWS) };
        let coordinator = self.coordinator.clone();
        let read = tokio::task::spawn_blocking(move || coordinator.store().history(&query)).await;
        match read {
            Ok(Ok(rows)) => {
                let rows: Vec<serde_json::Value> = rows.iter().map(crate::cli::history::row_json).collect();
                reply(StatusCode::OK, "application/json", Body::full(serde_json::Value::from(rows).to_string().into()))
            }
            Ok(Err(error)) => self.unreadable(&error),
            Err(error) => self.unreadable(&error),
        }
    }

    fn unreadable(&self, error: &dyn std::fmt::Display) -> Response<Body> {
        tracing::warn!(error = %error, "the dashboard could not read the database");
        error_response(StatusCode::SERVICE_UNAVAILABLE, "the database cannot be read: see the server's log")
    }
}

/// An error answer: `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    error_response(status, message)
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    reply(status, "application/json", Body::full(body.into()))
}

fn reply(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    response
}

/// A dashboard answer's body: whole, or an event stream until the page leaves or the server stops.
#[derive(Debug)]
pub enum Body {
    /// The whole body, until it is sent.
    Full(Option<Bytes>),
    /// Events as the feed sends them.
    Events(mpsc::Receiver<Bytes>),
}

impl Body {
    fn full(bytes: Bytes) -> Self {
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    fn empty() -> Self {
        Self::Full(None)
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            Self::Events(events) => events.poll_recv(context).map(|event| event.map(|bytes| Ok(Frame::data(bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64)),
            Self::Events(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(Page::of("/__apijongler/ui"), Some(Page::Bare));
        assert_eq!(Page::of("/__apijongler/ui/"), Some(Page::Asset(&ASSETS[0])));
        assert_eq!(Page::of("/__apijongler/ui/app.js"), Some(Page::Asset(&ASSETS[1])));
        assert_eq!(Page::of("/__apijongler/ui/events"), Some(Page::Events));
        assert_eq!(Page::of("/__apijongler/ui/nope"), Some(Page::Missing));
        assert_eq!(Page::of("/__apijongler/health"), None);
        assert_eq!(Page::of("/__apijongler/uix"), None);
        let data: Vec<&str> =
            ["/__apijongler/ui/", "/__apijongler/ui/state", "/__apijongler/ui/events", "/__apijongler/ui/history"]
                .into_iter()
                .filter(|path| Page::of(path).is_some_and(Page::needs_token))
                .collect();
        assert_eq!(data, ["/__apijongler/ui/state", "/__apijongler/ui/events", "/__apijongler/ui/history"]);
    }

    #[test]
    fn the_page_sets_no_html_from_data() {
        let script = std::str::from_utf8(ASSETS[1].bytes).expect("utf-8");
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!script.contains(sink), "app.js uses {sink}: every text goes in as textContent");
        }
        let page = std::str::from_utf8(ASSETS[0].bytes).expect("utf-8");
        assert!(!page.contains("<script>") && !page.contains("style="), "no inline code: the CSP forbids it");
        assert!(!page.contains("http://") && !page.contains("https://"), "no asset from elsewhere");
    }
}
