//! The upstream URL of a request, exactly as the request wrote it, or a refusal.
//!
//! The model a request counts against is read from its path as written. The URL that goes upstream
//! is `base_url + path_and_query` parsed as a WHATWG URL (what reqwest does), and that parse changes
//! some paths: `\` becomes `/`, `.` and `..` segments are resolved (`%2e` counts as `.`), characters a
//! URL must escape are percent-encoded, a `#` starts a fragment that is never sent. A request for
//! `models/x\..\gemini-2.5-pro` would be counted as naming the model `x\..\gemini-2.5-pro` (or none)
//! and reach `gemini-2.5-pro`, past that model's lockdown; `..` would also step out of a connector's
//! base path. So the path is normalised once, here, and a request whose path or query changes under
//! it is refused.
//!
//! Invariants:
//! - [`upstream_url`] returns a URL only when its path and query are byte for byte the base URL's path
//!   followed by `path_and_query`, its scheme, host and port are the base URL's, and it has no
//!   fragment: what the model was read from is what is sent.
//! - A percent-encoded `/`, `\` or `.` (`%2F`, `%5C`, `%2E`, any case) in the path is refused too, though
//!   the parse keeps it: an upstream that decodes before it routes would see other segments than the
//!   model was read from. The query may hold them (it is not routed on).
//! - A refusal's message shows the path as given and as it would be sent, never the query (which may
//!   carry a credential).

use std::fmt;

use reqwest::Url;

use crate::error::Error;

/// Why a request's path cannot be sent as given. Its message names what was refused and what to send
/// instead; it never holds the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRefused {
    problem: String,
}

impl fmt::Display for PathRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem)
    }
}

impl std::error::Error for PathRefused {}

impl From<PathRefused> for Error {
    fn from(refused: PathRefused) -> Self {
        Error::InvalidRequest { problem: refused.problem }
    }
}

/// The URL `path_and_query` (the endpoint after the connector's base path, with its query) reaches on
/// the upstream at `base_url` (`scheme://host[:port][/base/path]`), when it is sent as written; see the
/// module docs for what is refused.
pub fn upstream_url(base_url: &str, path_and_query: &str) -> Result<Url, PathRefused> {
    let refused = |problem: String| Err(PathRefused { problem });
    let given_path = path_and_query.split(['?', '#']).next().unwrap_or_default();
    let lowered = given_path.to_ascii_lowercase();
    if let Some(encoded) = ["%2f", "%5c", "%2e"].iter().find(|encoded| lowered.contains(*encoded)) {
        return refused(format!(
            "the path `{given_path}` has a percent-encoded `/`, `\\` or `.` ({}), which an upstream may decode \
             into other segments: the path the model is read from changes on the way; it is refused: send the \
             path it stands for",
            encoded.to_ascii_uppercase()
        ));
    }
    if given_path.contains("//") {
        return refused(format!(
            "the path `{given_path}` has an empty segment (`//`), which an upstream may merge away: the path the \
             model is read from changes on the way; it is refused: send it with single slashes"
        ));
    }
    let base = match Url::parse(base_url) {
        Ok(base) => base,
        Err(error) => return refused(format!("the connector's base URL `{base_url}` is not a URL ({error})")),
    };
    let url = match Url::parse(&format!("{base_url}{path_and_query}")) {
        Ok(url) => url,
        Err(error) => {
            return refused(format!("the path `{given_path}` makes no URL on the upstream ({error}); it is refused"));
        }
    };
    let same_upstream = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none();
    if !same_upstream {
        return refused(format!(
            "the path `{given_path}` changes the upstream's address when it is made a URL; it is refused: start \
             the path with `/`"
        ));
    }
    if url.fragment().is_some() {
        return refused(format!(
            "the request has a `#` after `{given_path}`, which changes it: a URL fragment is never sent upstream; \
             it is refused: percent-encode `#` as %23"
        ));
    }
    let mut given = format!("{}{path_and_query}", base.path().trim_end_matches('/'));
    if !given.starts_with('/') {
        given.insert(0, '/');
    }
    let given_path = given.split('?').next().unwrap_or_default();
    if url.path() != given_path {
        return refused(format!(
            "the path `{given_path}` changes when it is made a URL: it would be sent as `{}` (backslashes, `.` and \
             `..` segments, percent-encoded or not, and characters a URL must escape change a path); it is refused: \
             send the path it stands for",
            url.path()
        ));
    }
    if url.query() != given.split_once('?').map(|(_, query)| query) {
        return refused(
            "the query string changes when it is made a URL (characters such as `'`, `\"`, `<`, `>` or spaces are \
             percent-encoded on the way); it is refused: percent-encode them"
                .to_owned(),
        );
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOGLE: &str = "https://generativelanguage.googleapis.com";
    const BASED: &str = "https://router.huggingface.co/hf-inference";
    const LOCAL: &str = "http://127.0.0.1:8080";

    #[test]
    fn paths_sent_as_given() {
        let cases: &[(&str, &str, &str)] = &[
            (GOOGLE, "/v1beta/models/gemini-2.5-pro:generateContent", "/v1beta/models/gemini-2.5-pro:generateContent"),
            (
                GOOGLE,
                "/v1beta/models/m:streamGenerateContent?alt=sse",
                "/v1beta/models/m:streamGenerateContent?alt=sse",
            ),
            (
                GOOGLE,
                "/upload/v1beta/files?upload_id=AB%2Fc&x=%2e%2e",
                "/upload/v1beta/files?upload_id=AB%2Fc&x=%2e%2e",
            ),
            (GOOGLE, "/v1beta/files/a...b", "/v1beta/files/a...b"),
            (GOOGLE, "/x/.hidden/a..b", "/x/.hidden/a..b"),
            (GOOGLE, "/v1/models?pageSize=5&pageToken=a%20b", "/v1/models?pageSize=5&pageToken=a%20b"),
            (GOOGLE, "/v1/x?q=a\\b", "/v1/x?q=a\\b"),
            (GOOGLE, "/v1/x?", "/v1/x?"),
            (GOOGLE, "", "/"),
            (GOOGLE, "/", "/"),
            (GOOGLE, "?alt=json", "/?alt=json"),
            (BASED, "/models/org/model", "/hf-inference/models/org/model"),
            (BASED, "", "/hf-inference"),
            (BASED, "?a=1", "/hf-inference?a=1"),
            (LOCAL, "/v1/chat/completions", "/v1/chat/completions"),
            ("https://GenerativeLanguage.googleapis.com:443", "/v1/models", "/v1/models"),
        ];
        for (base, given, sent) in cases {
            let url = upstream_url(base, given).unwrap_or_else(|refused| panic!("{base} {given}: {refused}"));
            let got = match url.query() {
                Some(query) => format!("{}?{query}", url.path()),
                None => url.path().to_owned(),
            };
            assert_eq!(got, *sent, "{base} {given}");
        }
    }

    #[test]
    fn paths_that_change_are_refused() {
        let pro = "gemini-2.5-pro:generateContent";
        let cases: Vec<(&str, String, &str)> = vec![
            (GOOGLE, format!("/v1beta/models/x\\..\\{pro}"), "changes when it is made a URL"),
            (GOOGLE, format!("/v1beta/models/x\\{pro}"), "would be sent as `/v1beta/models/x/"),
            (GOOGLE, format!("/v1beta/models/a/../{pro}"), "changes"),
            (GOOGLE, format!("/v1beta/models/./{pro}"), "changes"),
            (GOOGLE, "/x/..".to_owned(), "changes"),
            (GOOGLE, "/x/.".to_owned(), "changes"),
            (GOOGLE, "/..".to_owned(), "changes"),
            (GOOGLE, format!("/v1beta/models/x/%2e%2e/{pro}"), "%2E"),
            (GOOGLE, format!("/v1beta/models/x/.%2E/{pro}"), "%2E"),
            (GOOGLE, format!("/v1beta/models/x%5c..%5c{pro}"), "%5C"),
            (GOOGLE, format!("/v1beta/models/x%2F..%2F{pro}"), "%2F"),
            (GOOGLE, format!("/v1beta/models//{pro}"), "empty segment"),
            (GOOGLE, "//v1beta/models".to_owned(), "empty segment"),
            (GOOGLE, "/v1beta/models/gemini 2.5:generateContent".to_owned(), "would be sent as"),
            (GOOGLE, "/v1beta/models/{m}:x".to_owned(), "would be sent as"),
            (GOOGLE, "/v1beta/models/\"m\":x".to_owned(), "would be sent as"),
            (GOOGLE, "/v1beta/models/m\t:x".to_owned(), "would be sent as"),
            (GOOGLE, "/v1beta/models/é:x".to_owned(), "would be sent as"),
            (GOOGLE, "/v1/models?filter='a'".to_owned(), "query string changes"),
            (GOOGLE, "/v1/models?q=a b".to_owned(), "query string changes"),
            (GOOGLE, "/v1beta/models/x#/../y".to_owned(), "fragment"),
            (GOOGLE, "/v1#".to_owned(), "fragment"),
            (GOOGLE, "@evil.example/v1".to_owned(), "address"),
            (GOOGLE, ".evil.example/v1".to_owned(), "address"),
            (GOOGLE, ":8443/v1".to_owned(), "address"),
            (BASED, "/../v1/models".to_owned(), "would be sent as `/v1/models`"),
            (BASED, "/x\\..\\..\\secret".to_owned(), "would be sent as `/secret`"),
            (BASED, "/%2e%2e/v1/models".to_owned(), "%2E"),
            (LOCAL, "/models/a\\..\\..\\..\\secret".to_owned(), "changes"),
        ];
        for (base, given, says) in &cases {
            let refused = upstream_url(base, given).expect_err(given).to_string();
            assert!(refused.contains(says), "{base} {given}: {refused}");
            assert!(refused.contains("refused"), "{refused}");
        }
    }

    #[test]
    fn a_refusal_never_shows_the_query() {
        for given in ["/a/../b?key=SECRET", "/a%2e?key=SECRET", "/a?key=SECRET&x='", "/a#?key=SECRET"] {
            let refused = upstream_url(GOOGLE, given).expect_err(given).to_string();
            assert!(!refused.contains("SECRET"), "{refused}");
        }
    }
}
