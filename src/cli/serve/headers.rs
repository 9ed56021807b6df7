//! Which headers cross the gateway, each way, and the one response header it rewrites.
//!
//! Invariants:
//! - Hop-by-hop headers never cross: `connection`, `keep-alive`, `te`, `trailer(s)`,
//!   `transfer-encoding`, `upgrade`, every `proxy-*`, and every header a `connection` value names.
//! - Upstream, the gateway also drops what it sets itself or must not forward: `host`,
//!   `content-length` (recomputed from the buffered body), `accept-encoding` (the caller asks for
//!   `identity` so that SSE and error bodies can be read), `expect` (the body is already buffered) and
//!   the four credential headers of [`credentials`](super::credentials) (defence in depth: the caller
//!   strips them first to read the client's credential).
//! - Downstream, `content-length` goes (the body is re-framed) and so does `alt-svc` (it advertises the
//!   upstream's origin, not the gateway's); `content-encoding` stays, since the gateway never decodes.
//!   Every `access-control-*` header goes too: the upstream's CORS answer (often `*`) would let any
//!   web page read what the pool answered; the gateway sets its own for allowed origins only (see
//!   [`origin`](super::origin)).
//! - Every other header crosses unchanged: same names, same values, same order, repeated values kept.
//! - Only an `x-goog-upload-url` that points at the connector's own upstream (same scheme, host, port
//!   and base path) is rewritten to come back through the gateway; any other URL is left alone.

use std::net::SocketAddr;

use http::header::{
    ACCEPT_ENCODING, ALT_SVC, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use super::credentials::CREDENTIAL_HEADERS;

/// The header in which Gemini's resumable upload answers where to send the chunks.
pub const X_GOOG_UPLOAD_URL: HeaderName = HeaderName::from_static("x-goog-upload-url");

/// The headers to send upstream, from the client's request headers.
pub fn upstream_request_headers(incoming: &HeaderMap) -> HeaderMap {
    let [goog, authorization, x_api_key] = &CREDENTIAL_HEADERS;
    filtered(incoming, &[&HOST, &CONTENT_LENGTH, &ACCEPT_ENCODING, &EXPECT, goog, authorization, x_api_key])
}

/// The headers to send back to the client, from the upstream's response headers.
pub fn downstream_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut kept = filtered(upstream, &[&CONTENT_LENGTH, &ALT_SVC]);
    let cors: Vec<HeaderName> =
        kept.keys().filter(|name| name.as_str().starts_with("access-control-")).cloned().collect();
    for name in cors {
        kept.remove(name);
    }
    kept
}

fn filtered(source: &HeaderMap, also_drop: &[&HeaderName]) -> HeaderMap {
    let named: Vec<String> = source
        .get_all(CONNECTION)
        .iter()
        .flat_map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .map(|name| name.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut kept = HeaderMap::with_capacity(source.len());
    for (name, value) in source {
        let hop_by_hop = [&CONNECTION, &TE, &TRAILER, &TRANSFER_ENCODING, &UPGRADE].contains(&name)
            || matches!(name.as_str(), "keep-alive" | "trailers")
            || name.as_str().starts_with("proxy-");
        if !hop_by_hop && !also_drop.contains(&name) && !named.iter().any(|named| named == name.as_str()) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// Where the gateway serves a connector: `http://{listen}/{connector}` (IPv6 addresses bracketed).
pub fn gateway_base(listen: SocketAddr, connector: &str) -> String {
    format!("http://{listen}/{connector}")
}

/// Rewrites a URL on the connector's upstream (`upstream_base`, the connector's base URL, base path
/// included) to the same path and query under `gateway_base` (see [`gateway_base`]); `None` when the URL
/// points anywhere else, or carries user info. The path's rest and the query are kept byte for byte.
///
/// `https://generativelanguage.googleapis.com/upload/v1/files?upload_id=X` with the base
/// `https://generativelanguage.googleapis.com` becomes
/// `http://127.0.0.1:8080/generativelanguage.googleapis.com/upload/v1/files?upload_id=X`.
pub fn rewrite_upload_url(value: &str, upstream_base: &str, gateway_base: &str) -> Option<String> {
    let url: Uri = value.parse().ok()?;
    let base: Uri = upstream_base.parse().ok()?;
    let port = |uri: &Uri| {
        uri.port_u16().or(match uri.scheme_str()? {
            scheme if scheme.eq_ignore_ascii_case("https") => Some(443),
            scheme if scheme.eq_ignore_ascii_case("http") => Some(80),
            _ => None,
        })
    };
    let same_origin = url.scheme_str()?.eq_ignore_ascii_case(base.scheme_str()?)
        && url.host()?.eq_ignore_ascii_case(base.host()?)
        && port(&url)? == port(&base)?
        && !url.authority()?.as_str().contains('@');
    if !same_origin {
        return None;
    }
    let rest = url.path().strip_prefix(base.path().trim_end_matches('/'))?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    // A key in the upload URL's query (Google puts none there) would hand the pool's secret to the
    // client: it is dropped, the rest kept byte for byte.
    let query = url.query().and_then(|query| super::credentials::strip_key_param(query).0);
    let query = query.map(|query| format!("?{query}")).unwrap_or_default();
    Some(format!("{gateway_base}{rest}{query}"))
}

/// Applies [`rewrite_upload_url`] to every `x-goog-upload-url` in `headers`, leaving values that point
/// elsewhere unchanged.
pub fn rewrite_upload_url_header(headers: &mut HeaderMap, upstream_base: &str, gateway_base: &str) {
    let values: Vec<HeaderValue> = headers.get_all(&X_GOOG_UPLOAD_URL).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    headers.remove(&X_GOOG_UPLOAD_URL);
    for value in values {
        let rewritten = value
            .to_str()
            .ok()
            .and_then(|url| rewrite_upload_url(url, upstream_base, gateway_base))
            .and_then(|url| HeaderValue::from_str(&url).ok());
        headers.append(X_GOOG_UPLOAD_URL, rewritten.unwrap_or(value));
    }
}

/// A header map of `pairs`, in their order (a repeated name appends), for the gateway's unit tests.
#[cfg(test)]
pub(crate) fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        map.iter().map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned())).collect()
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
    }

    #[test]
    fn request_headers() {
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: &[(&str, Pairs, Pairs)] = &[
            (
                "an SDK request keeps its end-to-end headers",
                &[
                    ("host", "127.0.0.1:8080"),
                    ("content-type", "application/json"),
                    ("user-agent", "google-genai-sdk/3.4.0"),
                    ("x-goog-api-client", "google-genai-sdk/3.4.0 gl-python/3.12"),
                    ("x-server-timeout", "60"),
                    ("x-goog-api-key", "gateway-token"),
                    ("content-length", "42"),
                    ("accept-encoding", "gzip, deflate"),
                ],
                &[
                    ("content-type", "application/json"),
                    ("user-agent", "google-genai-sdk/3.4.0"),
                    ("x-goog-api-client", "google-genai-sdk/3.4.0 gl-python/3.12"),
                    ("x-server-timeout", "60"),
                ],
            ),
            (
                "hop-by-hop and the headers Connection names",
                &[
                    ("connection", "keep-alive, X-Custom-Hop"),
                    ("connection", "x-second"),
                    ("keep-alive", "timeout=5"),
                    ("te", "trailers"),
                    ("trailer", "x-checksum"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("proxy-authorization", "Basic abc"),
                    ("proxy-connection", "keep-alive"),
                    ("x-custom-hop", "1"),
                    ("x-second", "2"),
                    ("x-goog-upload-protocol", "resumable"),
                    ("x-goog-upload-command", "start"),
                ],
                &[("x-goog-upload-protocol", "resumable"), ("x-goog-upload-command", "start")],
            ),
            (
                "credentials and expect go, repeated values stay in order",
                &[
                    ("authorization", "Bearer t"),
                    ("x-api-key", "t"),
                    ("expect", "100-continue"),
                    ("x-stainless-retry-count", "0"),
                    ("accept", "application/json"),
                    ("accept", "text/event-stream"),
                ],
                &[("x-stainless-retry-count", "0"), ("accept", "application/json"), ("accept", "text/event-stream")],
            ),
        ];
        for (name, incoming, expected) in cases {
            assert_eq!(pairs(&upstream_request_headers(&header_map(incoming))), owned(expected), "{name}");
        }
    }

    #[test]
    fn response_headers() {
        let upstream = header_map(&[
            ("content-type", "text/event-stream"),
            ("content-encoding", "gzip"),
            ("content-length", "1000"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("alt-svc", "h3=\":443\"; ma=2592000"),
            ("vary", "Origin"),
            ("vary", "X-Origin"),
            ("x-goog-upload-url", "https://generativelanguage.googleapis.com/upload/v1/files?upload_id=A"),
            ("server-timing", "gfet4t7; dur=812"),
            ("proxy-authenticate", "Basic"),
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("Access-Control-Expose-Headers", "*"),
        ]);
        let expected = owned(&[
            ("content-type", "text/event-stream"),
            ("content-encoding", "gzip"),
            ("vary", "Origin"),
            ("vary", "X-Origin"),
            ("x-goog-upload-url", "https://generativelanguage.googleapis.com/upload/v1/files?upload_id=A"),
            ("server-timing", "gfet4t7; dur=812"),
        ]);
        assert_eq!(pairs(&downstream_response_headers(&upstream)), expected);
    }

    #[test]
    fn upload_urls() {
        let google = "https://generativelanguage.googleapis.com";
        let hf = "https://router.huggingface.co/hf-inference";
        let gw = "http://127.0.0.1:8080/c";
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "https://generativelanguage.googleapis.com/upload/v1/files?upload_id=AB%2Fc&upload_protocol=resumable",
                google,
                Some("http://127.0.0.1:8080/c/upload/v1/files?upload_id=AB%2Fc&upload_protocol=resumable"),
            ),
            (
                "https://GenerativeLanguage.googleapis.com:443/upload/v1/files",
                google,
                Some("http://127.0.0.1:8080/c/upload/v1/files"),
            ),
            (
                "https://generativelanguage.googleapis.com/upload/v1/files?b=2&a=1",
                &format!("{google}/"),
                Some("http://127.0.0.1:8080/c/upload/v1/files?b=2&a=1"),
            ),
            (
                "https://generativelanguage.googleapis.com/upload/v1/files?upload_id=A&key=POOL-SECRET",
                google,
                Some("http://127.0.0.1:8080/c/upload/v1/files?upload_id=A"),
            ),
            ("https://generativelanguage.googleapis.com:8443/upload/v1/files", google, None),
            ("http://generativelanguage.googleapis.com/upload/v1/files", google, None),
            ("https://storage.googleapis.com/upload/v1/files?upload_id=A", google, None),
            ("https://generativelanguage.googleapis.com.evil.com/upload", google, None),
            ("https://user@generativelanguage.googleapis.com/upload", google, None),
            ("/upload/v1/files?upload_id=A", google, None),
            ("not a url", google, None),
            (
                "https://router.huggingface.co/hf-inference/models/x?y=1",
                hf,
                Some("http://127.0.0.1:8080/c/models/x?y=1"),
            ),
            ("https://router.huggingface.co/hf-inference", hf, Some("http://127.0.0.1:8080/c")),
            ("https://router.huggingface.co/hf-inferencex/models", hf, None),
            ("https://router.huggingface.co/v1/models", hf, None),
        ];
        for (url, base, expected) in cases {
            assert_eq!(rewrite_upload_url(url, base, gw).as_deref(), *expected, "{url} on {base}");
        }
    }

    #[test]
    fn upload_url_headers_and_gateway_bases() {
        let listen: SocketAddr = "[::1]:9000".parse().unwrap();
        let base = gateway_base(listen, "generativelanguage.googleapis.com");
        assert_eq!(base, "http://[::1]:9000/generativelanguage.googleapis.com");
        assert_eq!(gateway_base("127.0.0.1:80".parse().unwrap(), "c"), "http://127.0.0.1:80/c");
        let mut headers = header_map(&[
            ("x-goog-upload-url", "https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=Z"),
            ("x-goog-upload-status", "active"),
            ("x-goog-upload-url", "https://elsewhere.example/upload?upload_id=Z"),
        ]);
        rewrite_upload_url_header(&mut headers, "https://generativelanguage.googleapis.com", &base);
        let urls: Vec<_> = headers.get_all(&X_GOOG_UPLOAD_URL).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(
            urls,
            [
                "http://[::1]:9000/generativelanguage.googleapis.com/upload/v1beta/files?upload_id=Z",
                "https://elsewhere.example/upload?upload_id=Z"
            ]
        );
        assert_eq!(headers.get("x-goog-upload-status").unwrap(), "active");
    }
}
