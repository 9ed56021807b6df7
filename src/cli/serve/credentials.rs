//! The client's side of the gateway's door: its credential, the gateway token, and the `Host` it used.
//!
//! Invariants:
//! - After [`strip_credentials`], none of the four slots a client may use is left on the request: the
//!   headers `x-goog-api-key`, `authorization` and `x-api-key` (every value) and every `key` query
//!   parameter. The pool key the gateway injects can therefore never meet a client's credential
//!   upstream, and the gateway token never leaves the machine.
//! - The rest of the query string is kept byte for byte, in order, encoding untouched.
//! - A credential is only ever held as a [`SecretString`] or a SHA-256 digest: no `Debug`, `Display` or
//!   error of this module can show one.
//! - The token check costs the same whatever the presented value: both sides are hashed to 32 bytes
//!   and every byte is compared.
//! - [`check_host`] lets through only names that cannot be an attacker's DNS name (DNS rebinding):
//!   `localhost`, `127.0.0.0/8` and the IPv6 loopback, each with or without a port.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::{HeaderMap, HeaderName, header::AUTHORIZATION, header::HOST};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The request headers that may carry a client's credential, all stripped.
pub const CREDENTIAL_HEADERS: [HeaderName; 3] =
    [HeaderName::from_static("x-goog-api-key"), AUTHORIZATION, HeaderName::from_static("x-api-key")];

/// Where a client put its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The `x-goog-api-key` header (google-genai).
    GoogApiKey,
    /// `Authorization: Bearer …` (openai, Hugging Face clients).
    Bearer,
    /// The `x-api-key` header.
    XApiKey,
    /// The `key` query parameter (older Google clients, curl examples).
    KeyParam,
}

/// The credential a client presented, for the token check. Its `Debug` shows the slot only.
#[derive(Debug)]
pub struct Presented {
    /// Where it was.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "shown by Debug and checked by the tests; the token check needs only the secret")
    )]
    pub slot: Slot,
    /// The value, without `Bearer ` and, for the query, percent-decoded.
    pub secret: SecretString,
}

/// What [`strip_credentials`] leaves and finds.
#[derive(Debug)]
pub struct Stripped {
    /// The query string to send upstream, without any `key` parameter; `None` when nothing is left.
    pub query: Option<String>,
    /// The first credential found, in the order of [`Slot`]: headers first, the query last.
    pub presented: Option<Presented>,
}

/// Removes every client credential from `headers` and `query` (the request's query string, without
/// the `?`).
///
/// Only `Bearer` counts as a credential in `authorization`, but the header goes whatever its scheme.
/// An empty value counts as absent. A query parameter is a key when its name, percent-decoded, is `key`
/// in any case: whether Google honours `KEY=` or not, a would-be credential must not travel upstream,
/// and no API behind the gateway has another parameter of that name.
pub fn strip_credentials(headers: &mut HeaderMap, query: Option<&str>) -> Stripped {
    let mut presented = None;
    for (name, slot) in CREDENTIAL_HEADERS.iter().zip([Slot::GoogApiKey, Slot::Bearer, Slot::XApiKey]) {
        let value = headers.get(name).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        headers.remove(name);
        let secret = value.as_deref().and_then(|value| match slot {
            Slot::Bearer => value
                .trim()
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token),
            _ => Some(value),
        });
        match secret.map(str::trim).filter(|secret| !secret.is_empty()) {
            Some(secret) if presented.is_none() => presented = Some(Presented { slot, secret: secret.into() }),
            _ => {}
        }
    }
    let (query, key) = match query {
        Some(query) => strip_key_param(query),
        None => (None, None),
    };
    if presented.is_none() {
        presented = key.map(|secret| Presented { slot: Slot::KeyParam, secret });
    }
    Stripped { query, presented }
}

/// Removes every `key` parameter from a query string (see [`strip_credentials`] for what counts);
/// returns the rest, byte for byte (`None` when nothing is left), and the first key's value, decoded as
/// a form value (`%XX`, `+` for space).
pub fn strip_key_param(query: &str) -> (Option<String>, Option<SecretString>) {
    let mut first = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(name).eq_ignore_ascii_case("key") {
            if first.is_none() {
                first = Some(SecretString::from(form_decode(value)));
            }
        } else {
            kept.push(pair);
        }
    }
    let rest = kept.join("&");
    ((!rest.is_empty()).then_some(rest), first)
}

fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if hex(i + 1).is_some() && hex(i + 2).is_some() => {
                out.push((hex(i + 1).unwrap_or_default() * 16 + hex(i + 2).unwrap_or_default()) as u8);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The gateway token, kept as its SHA-256 digest only. `Debug` shows nothing of it.
#[derive(Clone)]
pub struct GatewayToken {
    digest: [u8; 32],
}

impl GatewayToken {
    /// The token clients must present (`APIJONGLER_GATEWAY_TOKEN`).
    pub fn new(token: &SecretString) -> Self {
        GatewayToken { digest: Sha256::digest(token.expose_secret().as_bytes()).into() }
    }

    /// Whether the client presented the token, in time independent of what it presented.
    pub fn accepts(&self, presented: Option<&Presented>) -> bool {
        let Some(presented) = presented else { return false };
        let candidate: [u8; 32] = Sha256::digest(presented.secret.expose_secret().as_bytes()).into();
        let difference = candidate.iter().zip(&self.digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayToken(..)")
    }
}

/// A request whose `Host` the gateway refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostRefused {
    /// No `Host` header, or several.
    #[error(
        "apijongler: the request needs exactly one Host header; point the client at http://127.0.0.1:PORT or http://localhost:PORT"
    )]
    Missing,
    /// A `Host` that is not a loopback name.
    #[error(
        "apijongler: Host {host:?} refused: the gateway answers only to localhost, 127.0.0.1 or [::1] (DNS rebinding protection); point the client at http://127.0.0.1:PORT"
    )]
    NotLoopback {
        /// The `Host` value, cut to 100 characters.
        host: String,
    },
}

/// Checks the `Host` header of a request to a loopback listener (see [`is_loopback_host`]).
pub fn check_host(headers: &HeaderMap) -> Result<(), HostRefused> {
    let mut values = headers.get_all(HOST).iter();
    let (Some(host), None) = (values.next(), values.next()) else { return Err(HostRefused::Missing) };
    let host = String::from_utf8_lossy(host.as_bytes());
    if is_loopback_host(&host) {
        Ok(())
    } else {
        Err(HostRefused::NotLoopback { host: host.chars().take(100).collect() })
    }
}

/// Whether a `Host` value names this machine's loopback: `localhost` (any case), an IPv4 address in
/// `127.0.0.0/8` in dotted-quad form, or a bracketed IPv6 loopback (`[::1]`, also written out or
/// IPv4-mapped), each with an optional port. Subdomains of `localhost` and a trailing dot are refused:
/// they need a resolver, and a hostile resolver may answer anything for them.
pub fn is_loopback_host(host: &str) -> bool {
    let bracketed = host.strip_prefix('[');
    let (name, port) = match bracketed {
        Some(rest) => match rest.split_once(']') {
            Some(split) => split,
            None => return false,
        },
        None => host.find(':').map_or((host, ""), |colon| host.split_at(colon)),
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok());
    let name_ok = match bracketed {
        Some(_) => name.parse::<Ipv6Addr>().is_ok_and(|ip| IpAddr::V6(ip).to_canonical().is_loopback()),
        None => name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback()),
    };
    port_ok && name_ok
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn key_params() {
        // (query, rest, first key)
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            ("key=s1", None, Some("s1")),
            ("key=s1&alt=sse", Some("alt=sse"), Some("s1")),
            ("alt=sse&key=s1", Some("alt=sse"), Some("s1")),
            ("alt=sse&key=s1&pageSize=5", Some("alt=sse&pageSize=5"), Some("s1")),
            ("b=2&a=1&key=s1&c=%2F+x", Some("b=2&a=1&c=%2F+x"), Some("s1")),
            ("key=s1&key=s2", None, Some("s1")),
            ("KEY=s1&alt=sse", Some("alt=sse"), Some("s1")),
            ("Key=s1", None, Some("s1")),
            ("%6Bey=s1&x", Some("x"), Some("s1")),
            ("key=a%2Bb+c%3D", None, Some("a+b c=")),
            ("key", None, Some("")),
            ("key=", None, Some("")),
            ("keys=1&monkey=2&key_id=3", Some("keys=1&monkey=2&key_id=3"), None),
            ("a=key&x=key%3D1", Some("a=key&x=key%3D1"), None),
            ("a=1&&key=s&", Some("a=1&&"), Some("s")),
            ("key=s1&", None, Some("s1")),
            ("", None, None),
        ];
        for (query, rest, key) in cases {
            let (got_rest, got_key) = strip_key_param(query);
            assert_eq!(got_rest.as_deref(), *rest, "{query}");
            assert_eq!(got_key.as_ref().map(|key| key.expose_secret()), *key, "{query}");
        }
    }

    #[test]
    fn every_slot_is_stripped_and_the_first_is_presented() {
        // (headers, query, presented slot and value, query left)
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, Option<(Slot, &'a str)>, Option<&'a str>);
        let cases: &[Case] = &[
            (&[("x-goog-api-key", "t1")], Some("alt=sse"), Some((Slot::GoogApiKey, "t1")), Some("alt=sse")),
            (&[("authorization", "Bearer t2")], None, Some((Slot::Bearer, "t2")), None),
            (&[("Authorization", "bearer   t2 ")], None, Some((Slot::Bearer, "t2")), None),
            (&[("authorization", "Basic dTpw")], Some("key=t4"), Some((Slot::KeyParam, "t4")), None),
            (&[("x-api-key", "t3")], None, Some((Slot::XApiKey, "t3")), None),
            (&[("x-api-key", "t3"), ("authorization", "Bearer t2")], None, Some((Slot::Bearer, "t2")), None),
            (&[("x-goog-api-key", "")], Some("key=t4&a=1"), Some((Slot::KeyParam, "t4")), Some("a=1")),
            (
                &[("x-goog-api-key", "t1"), ("x-goog-api-key", "t9")],
                Some("key=t4"),
                Some((Slot::GoogApiKey, "t1")),
                None,
            ),
            (&[("content-type", "application/json")], Some("a=1"), None, Some("a=1")),
        ];
        for (pairs, query, expected, rest) in cases {
            let mut map = headers(pairs);
            let stripped = strip_credentials(&mut map, *query);
            for name in &CREDENTIAL_HEADERS {
                assert!(!map.contains_key(name), "{pairs:?}: {name} left");
            }
            assert_eq!(map.len(), pairs.iter().filter(|(name, _)| name.eq_ignore_ascii_case("content-type")).count());
            let got = stripped.presented.as_ref().map(|p| (p.slot, p.secret.expose_secret()));
            assert_eq!(got, *expected, "{pairs:?} {query:?}");
            assert_eq!(stripped.query.as_deref(), *rest, "{pairs:?} {query:?}");
        }
    }

    #[test]
    fn nothing_shows_a_secret() {
        let mut map = headers(&[("authorization", "Bearer hunter2-secret")]);
        let stripped = strip_credentials(&mut map, Some("key=other-secret"));
        let token = GatewayToken::new(&SecretString::from("token-secret"));
        for text in [format!("{stripped:?}"), format!("{token:?}")] {
            for secret in ["hunter2", "other-secret", "token-secret"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[test]
    fn the_token_must_match_exactly() {
        let token = GatewayToken::new(&SecretString::from("s3cret-token"));
        let presented = |value: &str| Some(Presented { slot: Slot::Bearer, secret: value.into() });
        let cases: &[(Option<Presented>, bool)] = &[
            (presented("s3cret-token"), true),
            (presented("s3cret-toke"), false),
            (presented("s3cret-token "), false),
            (presented("S3cret-token"), false),
            (presented(""), false),
            (None, false),
        ];
        for (candidate, expected) in cases {
            assert_eq!(
                token.accepts(candidate.as_ref()),
                *expected,
                "{:?}",
                candidate.as_ref().map(|p| p.secret.expose_secret())
            );
        }
        // An empty token accepts an empty presented value, never an absent one.
        let empty = GatewayToken::new(&SecretString::from(""));
        assert!(empty.accepts(presented("").as_ref()) && !empty.accepts(None));
    }

    #[test]
    fn hosts() {
        let cases: &[(&str, bool)] = &[
            ("localhost", true),
            ("LocalHost:8080", true),
            ("127.0.0.1", true),
            ("127.0.0.1:8080", true),
            ("127.1.2.3:1", true),
            ("[::1]", true),
            ("[::1]:8080", true),
            ("[0:0:0:0:0:0:0:1]:80", true),
            ("[::ffff:127.0.0.1]", true),
            ("localhost:65535", true),
            ("localhost:65536", false),
            ("localhost:", false),
            ("localhost:80:80", false),
            ("localhost:+80", false),
            ("127.0.0.1.evil.com", false),
            ("localhost.evil.com", false),
            ("evil.localhost", false),
            ("localhost.", false),
            ("evil.com", false),
            ("127.1", false),
            ("127.000.0.1", false),
            ("128.0.0.1", false),
            ("0.0.0.0", false),
            ("::1", false),
            ("[::1", false),
            ("[::1]x", false),
            ("[::2]:80", false),
            ("[::ffff:10.0.0.1]", false),
            ("[fe80::1%25eth0]", false),
            ("", false),
            (":8080", false),
        ];
        for (host, expected) in cases {
            assert_eq!(is_loopback_host(host), *expected, "{host}");
        }
    }

    #[test]
    fn the_host_header_is_checked_once() {
        assert_eq!(check_host(&headers(&[("host", "127.0.0.1:8080")])), Ok(()));
        assert_eq!(check_host(&headers(&[])), Err(HostRefused::Missing));
        assert_eq!(check_host(&headers(&[("host", "localhost"), ("host", "evil.com")])), Err(HostRefused::Missing));
        let refused = check_host(&headers(&[("host", "rebind.evil.com:8080")])).unwrap_err();
        assert_eq!(refused, HostRefused::NotLoopback { host: "rebind.evil.com:8080".into() });
        assert!(refused.to_string().contains("http://127.0.0.1:PORT"));
    }
}
