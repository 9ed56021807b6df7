//! Which web pages may use the gateway: the browser's `Origin` and `Sec-Fetch-Site`, the CORS
//! preflight answered at the door, and the CORS headers of an answer.
//!
//! Any page of any site can `fetch("http://127.0.0.1:8790/…")`: its `Host` is loopback and, without a
//! gateway token, any placeholder key passes. Browsers say where a request comes from in headers a
//! page cannot set (`Origin`, `Sec-Fetch-Site`), so the gateway refuses by them, before any key is
//! claimed; clients that are not browsers send neither and are not concerned.
//!
//! Invariants:
//! - [`AllowedOrigins::judge`]: `Sec-Fetch-Site: same-origin` (a page the gateway itself served) or
//!   `none` (a URL typed in the address bar, a bookmark) passes. Otherwise a request with an `Origin`,
//!   or with any other `Sec-Fetch-Site` (`cross-site`; `same-site` too, since another port of the same
//!   host is another origin), passes only when its `Origin` is one given to `--allow-origin`. A request
//!   with neither header passes.
//! - `Origin: null` (sandboxed frames, `file://` pages, cross-site redirects) could be any page: it is
//!   never allowed, nor can `--allow-origin` name it (or `*`).
//! - A CORS preflight is answered by the gateway ([`is_preflight`], [`preflight_headers`]), never sent
//!   upstream: it carries no credential and would be sent with a pool key.
//! - No `access-control-*` header of the upstream reaches a client (see
//!   [`headers`](super::headers)); an allowed origin gets the gateway's own ([`add_cors_headers`]): that
//!   origin, never `*`, and never `Access-Control-Allow-Credentials`.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use reqwest::Url;

/// `Sec-Fetch-Site`: where the browser says the request comes from.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
/// Chrome's Private Network Access asks this before a public page may reach a loopback address.
const REQUEST_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-request-private-network");
const ALLOW_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-allow-private-network");

/// The methods a preflight is told the gateway takes.
const METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";
/// The answer headers an allowed page may read: the gateway's own, retry hints, resumable uploads.
const EXPOSED: &str =
    "x-apijongler-key, x-apijongler-attempts, retry-after, retry-after-ms, x-goog-upload-url, x-goog-upload-status";
/// How long a browser may reuse a preflight's answer, in seconds.
const MAX_AGE: &str = "600";
/// The longest `Origin` a refusal repeats.
const SHOWN_ORIGIN: usize = 120;

/// The origins given to `--allow-origin`, serialised as browsers send them (`https://app.example`,
/// `http://localhost:5173`).
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<String>);

/// What [`AllowedOrigins::judge`] decided about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a page of another origin: no CORS headers.
    NotCrossOrigin,
    /// A page of this allowed origin (the `Origin` value to answer with).
    Allowed(HeaderValue),
    /// A page that is not allowed; the message names `--allow-origin`.
    Refused(String),
}

impl AllowedOrigins {
    /// Parses `--allow-origin` values; the error names the bad value and the form to use.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let mut origins = Vec::with_capacity(values.len());
        for value in values {
            if value.trim() == "null" || value.trim() == "*" {
                return Err(format!(
                    "--allow-origin {value}: `null` and `*` stand for any page of any site; name the origin of \
                     your page, like https://app.example or http://localhost:5173"
                ));
            }
            let origin = serialise(value).ok_or_else(|| {
                format!(
                    "--allow-origin {value} is not an origin: write scheme://host[:port] with no path, like \
                     https://app.example or http://localhost:5173"
                )
            })?;
            origins.push(origin);
        }
        Ok(Self(origins))
    }

    /// Whether `headers` come from a page the gateway must refuse, may answer with CORS headers, or from
    /// no page of another origin (see the module docs).
    pub fn judge(&self, headers: &HeaderMap) -> Verdict {
        let site = headers.get(SEC_FETCH_SITE).map(|value| String::from_utf8_lossy(value.as_bytes()).to_lowercase());
        if matches!(site.as_deref().map(str::trim), Some("same-origin" | "none")) {
            return Verdict::NotCrossOrigin;
        }
        let Some(origin) = headers.get(ORIGIN) else {
            return match site {
                None => Verdict::NotCrossOrigin,
                Some(site) => Verdict::Refused(format!(
                    "requests from web pages of other sites are refused (this one says Sec-Fetch-Site: {}); a page of \
                     yours may use the gateway once its origin is allowed with --allow-origin ORIGIN",
                    shown(&site)
                )),
            };
        };
        let text = String::from_utf8_lossy(origin.as_bytes());
        if text.trim() == "null" {
            return Verdict::Refused(
                "requests from pages with no origin (`Origin: null`: a sandboxed frame, a file:// page) are refused, \
                 since such a page could be any site's; serve the page from an origin and allow that with \
                 --allow-origin ORIGIN"
                    .to_owned(),
            );
        }
        match serialise(&text) {
            Some(serialised) if self.0.contains(&serialised) => Verdict::Allowed(origin.clone()),
            _ => Verdict::Refused(format!(
                "requests from web pages are refused unless their origin is allowed, and this one comes from {0}: if \
                 that page is yours, start the gateway with --allow-origin {0}",
                shown(&text)
            )),
        }
    }
}

/// `https://App.Example:443/` → `https://app.example`: the origin as a browser serialises it; `None`
/// for anything with a path, query, fragment or user info, or no host.
fn serialise(text: &str) -> Option<String> {
    let text = text.trim();
    let bare = text.strip_suffix('/').unwrap_or(text);
    let (_, authority) = bare.split_once("://")?;
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', '\\']) {
        return None;
    }
    let url = Url::parse(bare).ok()?;
    url.host_str()?;
    Some(match url.scheme() {
        "http" | "https" => url.origin().ascii_serialization(),
        // Opaque to the URL standard (browser extensions): as written, without a trailing slash.
        _ => bare.to_ascii_lowercase(),
    })
}

/// At most [`SHOWN_ORIGIN`] characters of a header value, for a message.
fn shown(text: &str) -> String {
    text.chars().take(SHOWN_ORIGIN).collect()
}

/// A CORS preflight: `OPTIONS` with `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The headers of the gateway's answer to an allowed origin's preflight (with [`add_cors_headers`]): the
/// methods, the request headers the page asked for, how long to keep the answer, and private-network
/// access when Chrome asks for it.
pub fn preflight_headers(request: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(METHODS));
    if let Some(asked) = request.get(ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
    if request.get(REQUEST_PRIVATE_NETWORK).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true")) {
        headers.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
    }
    headers
}

/// Makes an answer readable by the allowed page of `origin`: `Access-Control-Allow-Origin` set to it,
/// the headers it may read, and `Vary: Origin` (once).
pub fn add_cors_headers(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
    let varies = headers.get_all(VARY).iter().any(|value| {
        String::from_utf8_lossy(value.as_bytes()).split(',').any(|name| name.trim().eq_ignore_ascii_case("origin"))
    });
    if !varies {
        headers.append(VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::super::headers::header_map;
    use super::*;

    #[test]
    fn allowed_origins_parse_as_browsers_send_them() {
        let cases: &[(&str, Option<&str>)] = &[
            ("https://app.example", Some("https://app.example")),
            ("https://App.Example/", Some("https://app.example")),
            ("https://app.example:443", Some("https://app.example")),
            ("http://localhost:5173", Some("http://localhost:5173")),
            ("http://[::1]:3000", Some("http://[::1]:3000")),
            ("chrome-extension://abcdef", Some("chrome-extension://abcdef")),
            ("null", None),
            ("*", None),
            ("app.example", None),
            ("https://app.example/path", None),
            ("https://app.example?x=1", None),
            ("https://user@app.example", None),
            ("https://", None),
        ];
        for (value, expected) in cases {
            let parsed = AllowedOrigins::parse(&[(*value).to_owned()]);
            match expected {
                Some(origin) => assert_eq!(parsed.unwrap().0, [*origin], "{value}"),
                None => assert!(parsed.unwrap_err().contains("--allow-origin"), "{value}"),
            }
        }
    }

    #[test]
    fn verdicts() {
        let allowed = AllowedOrigins::parse(&["https://app.example".to_owned()]).unwrap();
        let none = AllowedOrigins::default();
        let app = HeaderValue::from_static("https://app.example");
        type Case = (&'static str, &'static [(&'static str, &'static str)], Option<bool>);
        // None: not cross-origin; Some(true): allowed; Some(false): refused.
        let cases: &[Case] = &[
            ("an SDK", &[], None),
            ("same origin", &[("origin", "http://127.0.0.1:8790"), ("sec-fetch-site", "same-origin")], None),
            ("typed in the address bar", &[("sec-fetch-site", "none")], None),
            ("another site", &[("origin", "https://evil.example")], Some(false)),
            ("another site, no Origin", &[("sec-fetch-site", "cross-site")], Some(false)),
            ("another port", &[("origin", "http://127.0.0.1:3000"), ("sec-fetch-site", "same-site")], Some(false)),
            ("opaque", &[("origin", "null")], Some(false)),
            ("unknown Sec-Fetch-Site", &[("sec-fetch-site", "maybe")], Some(false)),
            ("allowed", &[("origin", "https://app.example"), ("sec-fetch-site", "cross-site")], Some(true)),
            ("allowed, old browser", &[("origin", "https://app.example")], Some(true)),
            ("a look-alike", &[("origin", "https://app.example.evil.example")], Some(false)),
            ("another scheme", &[("origin", "http://app.example")], Some(false)),
        ];
        for (name, headers, expected) in cases {
            let verdict = allowed.judge(&header_map(headers));
            match expected {
                None => assert_eq!(verdict, Verdict::NotCrossOrigin, "{name}"),
                Some(true) => assert_eq!(verdict, Verdict::Allowed(app.clone()), "{name}"),
                Some(false) => match verdict {
                    Verdict::Refused(message) => assert!(message.contains("--allow-origin"), "{name}: {message}"),
                    other => panic!("{name}: {other:?}"),
                },
            }
            if *expected == Some(true) {
                assert!(matches!(none.judge(&header_map(headers)), Verdict::Refused(_)), "{name}, nothing allowed");
            }
        }
    }

    #[test]
    fn preflights_and_answers() {
        assert!(is_preflight(&Method::OPTIONS, &header_map(&[("access-control-request-method", "POST")])));
        assert!(!is_preflight(&Method::OPTIONS, &header_map(&[])));
        assert!(!is_preflight(&Method::POST, &header_map(&[("access-control-request-method", "POST")])));
        let asked = header_map(&[
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type, x-goog-api-key"),
            ("access-control-request-private-network", "true"),
        ]);
        let mut headers = preflight_headers(&asked);
        add_cors_headers(&mut headers, &HeaderValue::from_static("https://app.example"));
        assert_eq!(headers["access-control-allow-origin"], "https://app.example");
        assert_eq!(headers["access-control-allow-headers"], "content-type, x-goog-api-key");
        assert_eq!(headers["access-control-allow-private-network"], "true");
        assert!(headers["access-control-allow-methods"].to_str().unwrap().contains("POST"));
        assert!(headers.get("access-control-allow-credentials").is_none());
        let mut answer = header_map(&[("vary", "Accept-Encoding, origin")]);
        add_cors_headers(&mut answer, &HeaderValue::from_static("https://app.example"));
        assert_eq!(answer.get_all("vary").iter().count(), 1, "Origin already varies");
        let mut answer = header_map(&[("vary", "X-Origin")]);
        add_cors_headers(&mut answer, &HeaderValue::from_static("https://app.example"));
        assert_eq!(answer.get_all("vary").iter().collect::<Vec<_>>(), ["X-Origin", "Origin"]);
    }
}
