//! Connector definitions: where an API lives, how its key is sent, and how its answers are read.
//!
//! The shipped connectors (`connectors/*.json`) are embedded in the binary. A directory named by
//! `APIJONGLER_CONNECTORS` may add connectors or override shipped ones: a file there defines the
//! connector named by its `name` field (or, without one, by its file name) and wins over an embedded
//! connector of the same name. The JSON fields are the seed's (`name`, `host`, `port`, `protocol`,
//! `format`, `requires_api_key`, `api_key_header`, `api_key_prefix`) plus `base_path` and `policy`;
//! unknown fields (the seed's `default_model`, say) are ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The environment variable naming the directory of user connector files.
pub const CONNECTORS_ENV: &str = "APIJONGLER_CONNECTORS";

/// The environment variable overriding the default per-attempt timeout, in seconds (the seed's).
pub const TIMEOUT_ENV: &str = "APIJONGLER_TIMEOUT";

const EMBEDDED: &[(&str, &str)] = &[
    ("generativelanguage.googleapis.com.json", include_str!("../connectors/generativelanguage.googleapis.com.json")),
    ("api-inference.huggingface.co.json", include_str!("../connectors/api-inference.huggingface.co.json")),
    ("router.huggingface.co.json", include_str!("../connectors/router.huggingface.co.json")),
    ("httpbin.org.json", include_str!("../connectors/httpbin.org.json")),
];

/// Where a connector definition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Shipped inside the binary.
    Embedded,
    /// A file in the user's connector directory.
    File(PathBuf),
}

/// How answers of this API are read and retried; every field has a default that suits Gemini and
/// Hugging Face.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Statuses that mean "this key is rate-limited" (default 429 and 509).
    pub rate_limit_statuses: Vec<u16>,
    /// Lockdown when a rate limit gives no hint, doubled for each consecutive lockdown (default 60 s).
    pub default_lockdown_secs: u64,
    /// Cap of that doubling (default 1 h). Delays the answer asks for are honoured up to 48 h.
    pub max_lockdown_secs: u64,
    /// Lockdown when the quota is zero (the model is not on the key's tier) (default 24 h).
    pub zero_quota_lockdown_secs: u64,
    /// Lockdown when prepaid credits are used up (Hugging Face 402) (default 24 h).
    pub credits_lockdown_secs: u64,
    /// Retries of one request after overloads, 5xx, timeouts and connection errors (default 3).
    pub retries: u32,
    /// First backoff before such a retry, doubled each time (default 500 ms).
    pub backoff_ms: u64,
    /// Per-attempt timeout (default 60 s, or `APIJONGLER_TIMEOUT`).
    pub timeout_secs: Option<f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rate_limit_statuses: vec![429, 509],
            default_lockdown_secs: 60,
            max_lockdown_secs: 3_600,
            zero_quota_lockdown_secs: 86_400,
            credits_lockdown_secs: 86_400,
            retries: 3,
            backoff_ms: 500,
            timeout_secs: None,
        }
    }
}

impl Policy {
    /// The per-attempt timeout: the connector's, else `APIJONGLER_TIMEOUT`, else 60 s.
    pub fn timeout(&self) -> Duration {
        let from_env = || std::env::var(TIMEOUT_ENV).ok()?.trim().parse::<f64>().ok();
        let seconds = self.timeout_secs.or_else(from_env).filter(|s| s.is_finite() && *s > 0.0).unwrap_or(60.0);
        Duration::from_secs_f64(seconds)
    }
}

/// One API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Connector {
    /// The connector's name: the keyring section and the name callers use.
    #[serde(default)]
    pub name: String,
    /// Host name.
    pub host: String,
    /// Port; default 443 for https and 80 for http.
    #[serde(default)]
    pub port: Option<u16>,
    /// `https` (default) or `http`.
    #[serde(default = "https")]
    pub protocol: String,
    /// `json` (default): bodies are sent as `application/json`; anything else as `application/xml`.
    #[serde(default = "json")]
    pub format: String,
    /// Whether a key is needed; `false` means none is claimed (default true).
    #[serde(default = "yes")]
    pub requires_api_key: bool,
    /// The header the key goes in (default `Authorization`).
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// What precedes the key in that header (default `Bearer ` for `Authorization`, else nothing).
    #[serde(default)]
    pub api_key_prefix: Option<String>,
    /// A path prefixed to every endpoint (default none).
    #[serde(default)]
    pub base_path: String,
    /// How answers are read and retried.
    #[serde(default)]
    pub policy: Policy,
    /// Where this definition came from.
    #[serde(skip, default = "embedded")]
    pub origin: Origin,
}

fn https() -> String {
    "https".to_owned()
}
fn json() -> String {
    "json".to_owned()
}
fn yes() -> bool {
    true
}
fn embedded() -> Origin {
    Origin::Embedded
}

impl Connector {
    /// `protocol://host[:port]base_path`, leaving out the port only when it is the protocol's default.
    pub fn base_url(&self) -> String {
        let default_port = if self.protocol.eq_ignore_ascii_case("http") { 80 } else { 443 };
        let port = self.port.unwrap_or(default_port);
        let authority = if port == default_port { self.host.clone() } else { format!("{}:{port}", self.host) };
        format!("{}://{authority}{}", self.protocol.to_ascii_lowercase(), self.base_path.trim_end_matches('/'))
    }

    /// The header name and value prefix the key is sent with.
    pub fn key_header(&self) -> (&str, &str) {
        let header = self.api_key_header.as_deref().unwrap_or("Authorization");
        let default_prefix = if header.eq_ignore_ascii_case("authorization") { "Bearer " } else { "" };
        (header, self.api_key_prefix.as_deref().unwrap_or(default_prefix))
    }

    /// The content type request bodies are sent with.
    pub fn content_type(&self) -> &'static str {
        if self.format.eq_ignore_ascii_case("json") { "application/json" } else { "application/xml" }
    }

    fn parse(text: &str, path: &Path, origin: Origin) -> Result<Self> {
        let mut connector: Connector = serde_json::from_str(text).map_err(|error| Error::ConnectorFile {
            path: path.to_owned(),
            line: error.line(),
            column: error.column(),
            message: error.to_string(),
        })?;
        if connector.name.is_empty() {
            let stem = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            connector.name = stem.strip_suffix(".json").unwrap_or(stem).to_owned();
        }
        if !matches!(connector.protocol.to_ascii_lowercase().as_str(), "http" | "https") {
            return Err(Error::ConnectorFile {
                path: path.to_owned(),
                line: 0,
                column: 0,
                message: format!("protocol must be \"http\" or \"https\", not {:?}", connector.protocol),
            });
        }
        connector.origin = origin;
        Ok(connector)
    }
}

/// The known connectors: embedded ones, overridden or extended by a user directory.
#[derive(Debug, Clone)]
pub struct Connectors {
    by_name: BTreeMap<String, Connector>,
}

impl Connectors {
    /// The embedded connectors plus those in `APIJONGLER_CONNECTORS`, if set.
    pub fn from_env() -> Result<Self> {
        let dir = std::env::var_os(CONNECTORS_ENV).filter(|dir| !dir.is_empty()).map(PathBuf::from);
        Self::load(dir.as_deref())
    }

    /// The embedded connectors plus the `*.json` files of `dir`.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        for (file, text) in EMBEDDED {
            let connector = Connector::parse(text, Path::new(file), Origin::Embedded)?;
            by_name.insert(connector.name.clone(), connector);
        }
        if let Some(dir) = dir {
            let unreadable = |source| Error::ConnectorsDir { path: dir.to_owned(), source };
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(unreadable)?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
                .collect();
            files.sort();
            for path in files {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| Error::ConnectorsDir { path: path.clone(), source })?;
                let connector = Connector::parse(&text, &path, Origin::File(path.clone()))?;
                by_name.insert(connector.name.clone(), connector);
            }
        }
        Ok(Self { by_name })
    }

    /// The connector called `name`; the error lists the known ones.
    pub fn get(&self, name: &str) -> Result<&Connector> {
        self.by_name.get(name).ok_or_else(|| Error::UnknownConnector {
            name: name.to_owned(),
            known: self.by_name.keys().cloned().collect(),
        })
    }

    /// Every known connector, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Connector> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_connectors_send_keys_in_headers() {
        let connectors = Connectors::load(None).expect("embedded connectors parse");
        let gemini = connectors.get("generativelanguage.googleapis.com").expect("gemini");
        assert_eq!(gemini.key_header(), ("x-goog-api-key", ""));
        assert_eq!(gemini.base_url(), "https://generativelanguage.googleapis.com");
        let legacy = connectors.get("api-inference.huggingface.co").expect("legacy hf");
        assert_eq!(legacy.base_url(), "https://router.huggingface.co/hf-inference");
        assert_eq!(legacy.key_header(), ("Authorization", "Bearer "));
        assert!(!connectors.get("httpbin.org").expect("httpbin").requires_api_key);
    }

    #[test]
    fn ports_follow_the_protocol() {
        let parse = |json: &str| Connector::parse(json, Path::new("x.json"), Origin::Embedded).expect("valid");
        assert_eq!(parse(r#"{"host": "h", "protocol": "http"}"#).base_url(), "http://h");
        assert_eq!(parse(r#"{"host": "h"}"#).base_url(), "https://h");
        assert_eq!(parse(r#"{"host": "h", "protocol": "http", "port": 443}"#).base_url(), "http://h:443");
        assert_eq!(parse(r#"{"host": "h", "protocol": "https", "port": 80}"#).base_url(), "https://h:80");
        assert_eq!(parse(r#"{"host": "h", "port": 8080, "base_path": "/v1/"}"#).base_url(), "https://h:8080/v1");
        assert_eq!(parse(r#"{"host": "h"}"#).name, "x", "name defaults to the file name");
    }

    #[test]
    fn unknown_connector_lists_the_known_ones() {
        let message = Connectors::load(None).expect("embedded").get("gemini").expect_err("unknown").to_string();
        assert!(message.contains("generativelanguage.googleapis.com") && message.contains("httpbin.org"), "{message}");
        assert!(message.contains("APIJONGLER_CONNECTORS"), "{message}");
    }

    #[test]
    fn user_files_override_and_extend() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mine.json"), r#"{"name": "httpbin.org", "host": "127.0.0.1", "port": 9}"#)
            .expect("write");
        std::fs::write(dir.path().join("extra.json"), r#"{"host": "example.invalid", "protocol": "http"}"#)
            .expect("write");
        let connectors = Connectors::load(Some(dir.path())).expect("load");
        let overridden = connectors.get("httpbin.org").expect("overridden");
        assert_eq!(overridden.base_url(), "https://127.0.0.1:9");
        assert_eq!(overridden.origin, Origin::File(dir.path().join("mine.json")));
        assert_eq!(connectors.get("extra").expect("added").base_url(), "http://example.invalid");
    }

    #[test]
    fn malformed_file_names_file_and_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.json"), "{\n  \"host\": \"h\",\n  \"port\": \"eighty\"\n}").expect("write");
        let message = Connectors::load(Some(dir.path())).expect_err("malformed").to_string();
        assert!(message.contains("bad.json:3:"), "{message}");
    }
}
