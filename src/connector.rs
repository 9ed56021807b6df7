//! Connector definitions: where an API lives, which API it speaks, how its key is sent, and how its
//! answers are read.
//!
//! The shipped connectors (`connectors/*.json`) are embedded in the binary. A directory named by
//! `APIJONGLER_CONNECTORS` may add connectors or change shipped ones: a file there defines the
//! connector named by its `name` field (or, without one, by its file name). A file named like a shipped
//! connector is merged onto it (the fields it gives win, objects such as `policy` and `model` merge
//! field by field, `null` unsets a field that may be unset, the rest of the shipped definition stays),
//! so pointing Gemini at a proxy keeps its key header, API family and model rule.
//! The JSON fields are the seed's (`name`, `host`, `port`, `protocol`, `format`, `requires_api_key`,
//! `api_key_header`, `api_key_prefix`) plus `api` (the API family, see [`crate::family`]), `base_path`,
//! `policy` and `model` (where a request names its model, see [`crate::model`]; without it, the
//! family's rule); unknown fields (the seed's `default_model`, `description`) are ignored.
//!
//! A connector without `api` (a file in the seed's format) gets its family per request: from its host
//! (Google's API hosts are Gemini's), else from the request's path (`:generateContent` is Gemini's,
//! `/chat/completions` OpenAI's), else `plain`. The family gives the request's dialect (error shape,
//! stream end), its model rule when the file has no `model`, and whether quotas meter it.
//!
//! A definition is checked when it is loaded, so that a mistake is a configuration error naming the
//! file and the field rather than a network error later, or worse, a request sent without its key:
//! `api` is one of the family words, `host` is a bare host name or IP address, `port` is not 0,
//! `base_path` is empty or starts with `/`, `api_key_header` is a valid HTTP header name,
//! `api_key_prefix` a valid header value (so prefix and secret, itself checked by the keyring, always
//! make a valid header), `policy.timeout_secs` a positive number, `model` a rule that can match (see
//! [`ModelRule`]). A field of the wrong type is refused with its line and column in the user's file,
//! before any merge. Two files of the user's directory that define the same connector are an error, not
//! a silent winner. `APIJONGLER_TIMEOUT` is checked at load too, since every timeout falls back on it.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::borrow::Cow;

use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::family::ApiFamily;
use crate::model::{self, ModelRule};
use crate::stream::Dialect;

/// The environment variable naming the directory of user connector files.
pub const CONNECTORS_ENV: &str = "APIJONGLER_CONNECTORS";

/// The environment variable overriding the default per-attempt timeout: seconds (the seed's), or a
/// duration such as `0.5s`, `30s` or `2m`.
pub const TIMEOUT_ENV: &str = "APIJONGLER_TIMEOUT";

/// The per-attempt timeout when neither the connector nor `APIJONGLER_TIMEOUT` sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

const TIMEOUT_EXPECTED: &str = "write a positive number of seconds, or a duration such as 0.5s, 30s or 2m";

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
    /// A file in the user's connector directory, merged onto the shipped connector of its name.
    Merged(PathBuf),
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
    /// Per-attempt timeout in seconds, positive (default `APIJONGLER_TIMEOUT`, else 60 s).
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
    /// The per-attempt timeout: the connector's, else `APIJONGLER_TIMEOUT`, else 60 s; an error naming
    /// the variable when it is set to something that is not a positive duration.
    pub fn try_timeout(&self) -> Result<Duration> {
        match self.timeout_secs.and_then(positive_seconds) {
            Some(timeout) => Ok(timeout),
            None => Ok(timeout_from_env()?.unwrap_or(DEFAULT_TIMEOUT)),
        }
    }

    /// [`try_timeout`](Self::try_timeout), with 60 s for a bad `APIJONGLER_TIMEOUT`. Loading connectors
    /// ([`Connectors::load`]) has already refused one, so this is only a fallback.
    pub fn timeout(&self) -> Duration {
        self.try_timeout().unwrap_or(DEFAULT_TIMEOUT)
    }
}

/// `APIJONGLER_TIMEOUT`: `None` when unset or empty, an error naming the variable when it is neither a
/// positive number of seconds nor a positive duration (`0.5s`, `2m`, `1h 30m`).
pub fn timeout_from_env() -> Result<Option<Duration>> {
    parse_timeout(std::env::var_os(TIMEOUT_ENV).as_deref())
}

fn parse_timeout(value: Option<&OsStr>) -> Result<Option<Duration>> {
    let Some(value) = value.filter(|value| !value.is_empty()) else { return Ok(None) };
    let invalid = || Error::InvalidEnv {
        variable: TIMEOUT_ENV,
        value: value.to_string_lossy().into_owned(),
        expected: TIMEOUT_EXPECTED,
    };
    let text = value.to_str().ok_or_else(invalid)?.trim();
    let timeout = match text.parse::<f64>() {
        Ok(seconds) => positive_seconds(seconds),
        Err(_) => humantime::parse_duration(text).ok().filter(|timeout| !timeout.is_zero()),
    };
    timeout.map(Some).ok_or_else(invalid)
}

/// `seconds` as a duration if it is a positive, finite number a duration can hold.
fn positive_seconds(seconds: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(seconds).ok().filter(|timeout| !timeout.is_zero())
}

/// One API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Connector {
    /// The connector's name: the keyring section and the name callers use.
    #[serde(default)]
    pub name: String,
    /// Host name (required: empty is refused, unless a shipped connector of the same name gives it).
    #[serde(default)]
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
    /// The API family the file declares (`api`); `None`: inferred per request (see the module docs).
    #[serde(skip)]
    pub api: Option<ApiFamily>,
    /// The file's `api` as written, checked into [`Connector::api`] at load.
    #[serde(default, rename = "api")]
    api_given: Option<Value>,
    /// Where a request names its model; `None`: where its API family's requests do.
    #[serde(default)]
    pub model: Option<ModelRule>,
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

    /// The API family of a request to `path_and_query` (the endpoint, without `base_path`): the
    /// declared one, else the host's (Google's API hosts are Gemini's), else the path's
    /// ([`ApiFamily::infer`]), else `plain`.
    pub fn family_for(&self, path_and_query: &str) -> ApiFamily {
        self.api
            .or_else(|| ApiFamily::of_host(&self.host))
            .or_else(|| ApiFamily::infer(path_and_query))
            .unwrap_or(ApiFamily::Plain)
    }

    /// The dialect of a request to `path_and_query`: its error shape and how its streams end.
    pub fn dialect_for(&self, path_and_query: &str) -> Dialect {
        self.family_for(path_and_query).dialect(path_and_query)
    }

    /// Where a request to `path_and_query` names its model: the file's `model`, else its family's rule.
    pub fn model_rule_for(&self, path_and_query: &str) -> Cow<'_, ModelRule> {
        match &self.model {
            Some(rule) => Cow::Borrowed(rule),
            None => Cow::Owned(self.family_for(path_and_query).model_rule()),
        }
    }

    /// The model a request to `path_and_query` (the endpoint, without `base_path`) with `body` names,
    /// by [`model_rule_for`](Self::model_rule_for); `None` when it names none (see [`crate::model`]).
    pub fn model_of(&self, path_and_query: &str, body: &[u8]) -> Option<String> {
        model::requested_model(&self.model_rule_for(path_and_query), path_and_query, body)
    }

    /// Whether quotas meter a `method` request to `path_and_query` (see [`ApiFamily::meters`]): only
    /// such a request is kept from a key whose quota for its model is locked down. Listing, getting a
    /// model and counting tokens are not.
    pub fn meters(&self, method: &Method, path_and_query: &str) -> bool {
        self.family_for(path_and_query).meters(method, path_and_query)
    }

    /// Whether this connector can tell any request's model at all: its `model` rule names one, or its
    /// family's does; a connector without `api` may, by the family each request shows.
    pub fn names_models(&self) -> bool {
        match (&self.model, self.api) {
            (Some(rule), _) => rule.names_any(),
            (None, Some(family)) => family.model_rule().names_any(),
            (None, None) => true,
        }
    }

    /// The JSON object of a connector file. The file alone must already be a connector with fields of
    /// the right types, so that a mistake is shown at its line and column, before any merge.
    fn read(text: &str, path: &Path) -> Result<Map<String, Value>> {
        let at = |error: serde_json::Error| Error::ConnectorFile {
            path: path.to_owned(),
            line: error.line(),
            column: error.column(),
            message: error.to_string(),
        };
        serde_json::from_str::<Connector>(text).map_err(at)?;
        match serde_json::from_str::<Value>(text).map_err(at)? {
            Value::Object(object) => Ok(object),
            _ => unreachable!("a text that reads as a connector is a JSON object"),
        }
    }

    /// The connector a file's JSON object names: its `name`, else the file name without `.json`.
    fn name_in(object: &Map<String, Value>, path: &Path) -> String {
        match object.get("name").and_then(Value::as_str).filter(|name| !name.is_empty()) {
            Some(name) => name.to_owned(),
            None => {
                let file = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
                file.strip_suffix(".json").unwrap_or(file).to_owned()
            }
        }
    }

    #[cfg(test)]
    fn parse(text: &str, path: &Path, origin: Origin) -> Result<Self> {
        Self::from_object(Self::read(text, path)?, path, origin)
    }

    /// The connector of a (maybe merged) JSON object read from `path`, checked.
    fn from_object(mut object: Map<String, Value>, path: &Path, origin: Origin) -> Result<Self> {
        let name = Self::name_in(&object, path);
        object.insert("name".to_owned(), Value::String(name));
        let mut connector: Connector = serde_json::from_value(Value::Object(object)).map_err(|error| {
            Error::ConnectorFile { path: path.to_owned(), line: 0, column: 0, message: error.to_string() }
        })?;
        let field = |(field, problem)| Error::ConnectorField { path: path.to_owned(), field, problem };
        connector.api = connector.api_given.as_ref().map(family_named).transpose().map_err(field)?;
        connector.check().map_err(field)?;
        connector.origin = origin;
        Ok(connector)
    }

    /// The first field that cannot work, and what is wrong with it (see the module documentation).
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if !matches!(self.protocol.to_ascii_lowercase().as_str(), "http" | "https") {
            return Err(("protocol", format!("must be \"http\" or \"https\", not {:?}", self.protocol)));
        }
        if self.host.trim().is_empty() {
            return Err(("host", "is empty: write the API's host name, e.g. \"api.example.com\"".to_owned()));
        }
        if !is_bare_host(&self.host) {
            return Err((
                "host",
                format!(
                    "must be a bare host name or IP address (no scheme, port, path or spaces; the port has its own field), not {:?}",
                    self.host
                ),
            ));
        }
        if self.port == Some(0) {
            return Err(("port", "is 0: give the API's port, or leave it out for 443 (https) or 80 (http)".to_owned()));
        }
        if !self.base_path.is_empty() && !self.base_path.starts_with('/') {
            return Err(("base_path", format!("must start with `/`, not {:?}", self.base_path)));
        }
        if self.base_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(("base_path", format!("must not hold spaces or control characters: {:?}", self.base_path)));
        }
        let (header, prefix) = self.key_header();
        if HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err((
                "api_key_header",
                format!(
                    "is not a valid HTTP header name (letters, digits and `-`, no spaces, not empty): {header:?}; without a valid name every request would go out without its key"
                ),
            ));
        }
        if HeaderValue::from_str(prefix).is_err() {
            return Err((
                "api_key_prefix",
                "holds a control character (a line break, say), which an HTTP header cannot carry; without a valid header every request would go out without its key".to_owned(),
            ));
        }
        if let Some(seconds) = self.policy.timeout_secs
            && positive_seconds(seconds).is_none()
        {
            return Err(("policy.timeout_secs", format!("must be a positive number of seconds, not {seconds}")));
        }
        self.model.as_ref().map_or(Ok(()), ModelRule::check)
    }
}

/// The family a connector file's `api` value names; the error lists the words allowed.
fn family_named(given: &Value) -> std::result::Result<ApiFamily, (&'static str, String)> {
    given.as_str().and_then(ApiFamily::from_word).ok_or_else(|| {
        ("api", format!("must be one of {}, not {given}; or leave it out to infer it per request", ApiFamily::words()))
    })
}

/// Applies `patch` to `target`: objects merge field by field, any other value (`null` included, which
/// unsets a field that may be unset) replaces.
fn merge_patch(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (field, value) in patch {
                merge_patch(target.entry(field).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

/// Whether `host` is a host name or IP address and nothing more: parsed as a URL's host, it comes back
/// the same (a port, a path, user info or a scheme would not).
fn is_bare_host(host: &str) -> bool {
    reqwest::Url::parse(&format!("http://{host}/"))
        .is_ok_and(|url| url.host_str().is_some_and(|parsed| parsed.eq_ignore_ascii_case(host)))
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

    /// The embedded connectors plus the `*.json` files of `dir`, each merged onto the shipped connector
    /// of its name if there is one (see the module docs); also checks `APIJONGLER_TIMEOUT`, which every
    /// connector's timeout falls back on.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        timeout_from_env()?;
        let mut by_name = BTreeMap::new();
        let mut shipped = BTreeMap::new();
        for (file, text) in EMBEDDED {
            let object = Connector::read(text, Path::new(file))?;
            let connector = Connector::from_object(object.clone(), Path::new(file), Origin::Embedded)?;
            shipped.insert(connector.name.clone(), object);
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
            let mut defined_by: BTreeMap<String, PathBuf> = BTreeMap::new();
            for path in files {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| Error::ConnectorsDir { path: path.clone(), source })?;
                let object = Connector::read(&text, &path)?;
                let name = Connector::name_in(&object, &path);
                match defined_by.entry(name.clone()) {
                    Entry::Occupied(first) => {
                        let (name, first) = first.remove_entry();
                        return Err(Error::DuplicateConnector { name, first, second: path });
                    }
                    Entry::Vacant(slot) => slot.insert(path.clone()),
                };
                let (object, origin) = match shipped.get(&name) {
                    Some(base) => {
                        let mut merged = Value::Object(base.clone());
                        merge_patch(&mut merged, Value::Object(object));
                        let Value::Object(merged) = merged else { unreachable!("an object patched by an object") };
                        (merged, Origin::Merged(path.clone()))
                    }
                    None => (object, Origin::File(path.clone())),
                };
                let connector = Connector::from_object(object, &path, origin)?;
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
    fn shipped_connectors_know_where_requests_name_their_model() {
        let connectors = Connectors::load(None).expect("embedded connectors parse");
        let model_of =
            |name: &str, path: &str, body: &str| connectors.get(name).expect(name).model_of(path, body.as_bytes());
        let chat = r#"{"model": "models/gemini-2.0-flash", "messages": []}"#;
        let gemini = "generativelanguage.googleapis.com";
        assert_eq!(
            model_of(gemini, "/v1beta/models/gemini-2.5-flash:generateContent", "{}").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(model_of(gemini, "/v1beta/tunedModels/t-1:generateContent", "{}").as_deref(), Some("t-1"));
        assert_eq!(model_of(gemini, "/v1beta/openai/chat/completions", chat).as_deref(), Some("gemini-2.0-flash"));
        assert_eq!(model_of(gemini, "/v1beta/models", "").as_deref(), None);
        for hf in ["router.huggingface.co", "api-inference.huggingface.co"] {
            assert_eq!(
                model_of(hf, "/models/google/gemma-2-9b-it", "{}").as_deref(),
                Some("google/gemma-2-9b-it"),
                "{hf}"
            );
            let chat = r#"{"model": "meta-llama/Llama-3.1-8B-Instruct:novita"}"#;
            let expected = Some("meta-llama/Llama-3.1-8B-Instruct:novita");
            assert_eq!(model_of(hf, "/v1/chat/completions", chat).as_deref(), expected, "{hf}");
        }
        assert_eq!(model_of("httpbin.org", "/models/a:b", r#"{"model": "m"}"#), None, "no `model` field: no model");
    }

    #[test]
    fn shipped_connectors_declare_their_family() {
        let connectors = Connectors::load(None).expect("embedded connectors parse");
        let family = |name: &str| connectors.get(name).expect(name).api;
        assert_eq!(family("generativelanguage.googleapis.com"), Some(ApiFamily::Gemini));
        assert_eq!(family("router.huggingface.co"), Some(ApiFamily::HuggingFace));
        assert_eq!(family("api-inference.huggingface.co"), Some(ApiFamily::HuggingFace));
        assert_eq!(family("httpbin.org"), Some(ApiFamily::Plain));
        assert!(connectors.iter().all(|connector| connector.model.is_none()), "the families' rules apply");
        assert!(!connectors.get("httpbin.org").expect("httpbin").names_models());
    }

    /// The seed README's example, pointed at a proxy: no `api`, no `model`.
    const SEED: &str = r#"{"name": "proxy", "host": "127.0.0.1", "port": 8080, "protocol": "http",
        "format": "json", "requires_api_key": true, "api_key_header": "x-goog-api-key"}"#;

    #[test]
    fn a_seed_format_file_gets_its_family_per_request() {
        let proxy = Connector::parse(SEED, Path::new("proxy.json"), Origin::Embedded).expect("valid");
        assert_eq!(proxy.api, None);
        assert!(proxy.names_models());
        let generate = "/v1beta/models/gemini-2.5-pro:generateContent";
        let stream = "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse";
        let chat = r#"{"model": "gemini-2.5-flash", "stream": true}"#;
        let cases: &[(&str, &str, ApiFamily, Dialect, Option<&str>)] = &[
            (generate, "{}", ApiFamily::Gemini, Dialect::Google, Some("gemini-2.5-pro")),
            (stream, "{}", ApiFamily::Gemini, Dialect::Google, Some("gemini-2.5-pro")),
            ("/v1beta/openai/chat/completions", chat, ApiFamily::OpenAi, Dialect::OpenAi, Some("gemini-2.5-flash")),
            ("/v1/chat/completions", chat, ApiFamily::OpenAi, Dialect::OpenAi, Some("gemini-2.5-flash")),
            ("/v1beta/models", "", ApiFamily::Plain, Dialect::Plain, None),
            ("/anything", chat, ApiFamily::Plain, Dialect::Plain, None),
        ];
        for (path, body, family, dialect, model) in cases {
            assert_eq!(proxy.family_for(path), *family, "{path}");
            assert_eq!(proxy.dialect_for(path), *dialect, "{path}");
            assert_eq!(proxy.model_of(path, body.as_bytes()).as_deref(), *model, "{path}");
        }
        assert!(proxy.meters(&Method::POST, generate));
        assert!(!proxy.meters(&Method::POST, "/v1beta/models/gemini-2.5-pro:countTokens"));
        assert!(!proxy.meters(&Method::GET, "/v1beta/models/gemini-2.5-pro"));
        // A Google host is Gemini's whatever the path.
        let google = r#"{"name": "g", "host": "generativelanguage.googleapis.com"}"#;
        let google = Connector::parse(google, Path::new("g.json"), Origin::Embedded).expect("valid");
        assert_eq!(google.dialect_for("/v1beta/models"), Dialect::Google);
        assert_eq!(google.dialect_for("/v1beta/openai/chat/completions"), Dialect::OpenAi);
    }

    #[test]
    fn a_declared_family_and_a_model_rule_win_over_inference() {
        let parse = |json: &str| Connector::parse(json, Path::new("x.json"), Origin::Embedded).expect("valid");
        let path = "/v1beta/models/gemini-2.5-pro:streamGenerateContent";
        let plain = parse(r#"{"host": "127.0.0.1", "api": "plain"}"#);
        assert_eq!((plain.dialect_for(path), plain.model_of(path, b"{}")), (Dialect::Plain, None));
        assert!(!plain.names_models());
        let hf = parse(r#"{"host": "127.0.0.1", "api": "huggingface"}"#);
        assert_eq!(hf.dialect_for("/models/google/gemma-2-9b-it"), Dialect::HuggingFace);
        assert_eq!(hf.model_of("/models/google/gemma-2-9b-it", b"").as_deref(), Some("google/gemma-2-9b-it"));
        let ruled = parse(r#"{"host": "127.0.0.1", "model": {"body_field": "engine"}}"#);
        assert_eq!(ruled.model_of(path, br#"{"engine": "e-1"}"#).as_deref(), Some("e-1"), "the file's rule");
        let none = parse(r#"{"host": "127.0.0.1", "api": "gemini", "model": {}}"#);
        assert_eq!(none.model_of(path, b"{}"), None, "an empty rule names nothing");
        assert!(!none.names_models());
    }

    #[test]
    fn a_user_file_named_like_a_shipped_one_merges_onto_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seed = r#"{"name": "generativelanguage.googleapis.com", "host": "127.0.0.1", "port": 8080,
            "protocol": "http", "policy": {"retries": 0}, "default_model": "gemini-pro"}"#;
        std::fs::write(dir.path().join("gemini.json"), seed).expect("write");
        // No host: the shipped one stays; a `model` field merges field by field.
        let hf = r#"{"name": "router.huggingface.co", "model": {"path_segments": 1, "path_markers": ["models"]}}"#;
        std::fs::write(dir.path().join("hf.json"), hf).expect("write");
        // `null` unsets a shipped field that may be unset: no `api`, so the family is inferred per request.
        std::fs::write(dir.path().join("legacy.json"), r#"{"name": "api-inference.huggingface.co", "api": null}"#)
            .expect("write");
        let connectors = Connectors::load(Some(dir.path())).expect("load");
        let gemini = connectors.get("generativelanguage.googleapis.com").expect("merged");
        assert_eq!(gemini.base_url(), "http://127.0.0.1:8080");
        assert_eq!(gemini.key_header(), ("x-goog-api-key", ""), "the shipped header is kept");
        assert_eq!((gemini.api, gemini.policy.retries), (Some(ApiFamily::Gemini), 0));
        assert_eq!(gemini.policy.backoff_ms, Policy::default().backoff_ms);
        assert_eq!(gemini.origin, Origin::Merged(dir.path().join("gemini.json")));
        let generate = "/v1beta/models/gemini-2.5-flash:generateContent";
        assert_eq!(gemini.model_of(generate, b"{}").as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(gemini.dialect_for("/v1beta/models/m:streamGenerateContent"), Dialect::Google);
        let router = connectors.get("router.huggingface.co").expect("merged");
        assert_eq!(router.base_url(), "https://router.huggingface.co");
        let rule = router.model.as_ref().expect("the user's rule");
        assert_eq!((rule.path_segments, rule.body_field.as_deref()), (1, None), "no shipped `model` to merge onto");
        let legacy = connectors.get("api-inference.huggingface.co").expect("merged");
        assert_eq!((legacy.api, legacy.base_url().as_str()), (None, "https://router.huggingface.co/hf-inference"));
    }

    #[test]
    fn a_merging_file_s_mistakes_name_its_own_file_and_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = "{\n  \"name\": \"httpbin.org\",\n  \"port\": \"eighty\"\n}";
        std::fs::write(dir.path().join("mine.json"), bad).expect("write");
        let message = Connectors::load(Some(dir.path())).expect_err("typed").to_string();
        assert!(message.contains("mine.json:3:"), "{message}");
        std::fs::write(dir.path().join("mine.json"), r#"{"name": "httpbin.org", "api": "http"}"#).expect("write");
        let message = Connectors::load(Some(dir.path())).expect_err("bad api").to_string();
        assert!(message.contains("mine.json") && message.contains("`api` must be one of"), "{message}");
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
        assert_eq!(overridden.origin, Origin::Merged(dir.path().join("mine.json")));
        assert!(!overridden.requires_api_key, "merged onto the shipped httpbin.org");
        let extra = connectors.get("extra").expect("added");
        assert_eq!(extra.base_url(), "http://example.invalid");
        assert_eq!(extra.origin, Origin::File(dir.path().join("extra.json")));
    }

    /// The message for a connector file holding `json`, or `None` if it is valid.
    fn problem(json: &str) -> Option<String> {
        Connector::parse(json, Path::new("/conf/mine.json"), Origin::Embedded).err().map(|error| error.to_string())
    }

    #[test]
    fn fields_that_cannot_work_are_refused_by_file_and_field() {
        let cases = [
            (r#"{"host": "h", "protocol": "ftp"}"#, "`protocol` must be \"http\" or \"https\""),
            (r#"{"host": ""}"#, "`host` is empty"),
            (r#"{"host": "  "}"#, "`host` is empty"),
            (r#"{"host": "exa mple.com"}"#, "`host` must be a bare host name"),
            (r#"{"host": "https://example.com"}"#, "`host` must be a bare host name"),
            (r#"{"host": "example.com/v1"}"#, "`host` must be a bare host name"),
            (r#"{"host": "example.com:8080"}"#, "`host` must be a bare host name"),
            (r#"{"host": "user@example.com"}"#, "`host` must be a bare host name"),
            (r#"{"host": "h", "port": 0}"#, "`port` is 0"),
            (r#"{"host": "h", "base_path": "v1"}"#, "`base_path` must start with `/`"),
            (r#"{"host": "h", "base_path": "/v1 beta"}"#, "`base_path` must not hold spaces"),
            (
                r#"{"host": "h", "api_key_header": "x-goog-api-key "}"#,
                "`api_key_header` is not a valid HTTP header name",
            ),
            (r#"{"host": "h", "api_key_header": "x goog"}"#, "`api_key_header` is not a valid HTTP header name"),
            (r#"{"host": "h", "api_key_header": ""}"#, "`api_key_header` is not a valid HTTP header name"),
            (r#"{"host": "h", "api_key_prefix": "Bearer\n"}"#, "`api_key_prefix` holds a control character"),
            (r#"{"host": "h", "api_key_header": "Authorization", "api_key_prefix": "B\u0000 "}"#, "`api_key_prefix`"),
            (r#"{"host": "h", "policy": {"timeout_secs": 0}}"#, "`policy.timeout_secs` must be a positive number"),
            (r#"{"host": "h", "policy": {"timeout_secs": -2.5}}"#, "`policy.timeout_secs` must be a positive number"),
            (r#"{"host": "h", "policy": {"timeout_secs": 1e300}}"#, "`policy.timeout_secs` must be a positive number"),
            (r#"{"host": "h", "model": {"path_markers": ["models/"]}}"#, "`model.path_markers` holds \"models/\""),
            (r#"{"host": "h", "model": {"path_markers": [""]}}"#, "`model.path_markers` holds \"\""),
            (
                r#"{"host": "h", "model": {"path_markers": ["models"], "path_segments": 0}}"#,
                "`model.path_segments` is 0",
            ),
            (r#"{"host": "h", "model": {"body_field": ""}}"#, "`model.body_field` is empty"),
            (
                r#"{"host": "h", "api": "gemeni"}"#,
                r#"`api` must be one of "gemini", "openai", "huggingface", "plain", not "gemeni""#,
            ),
            (r#"{"host": "h", "api": 7}"#, "`api` must be one of"),
            (r#"{"host": "h", "api": ["gemini"]}"#, "`api` must be one of"),
            (r#"{"port": 8080}"#, "`host` is empty"),
        ];
        for (json, expected) in cases {
            let message = problem(json).unwrap_or_else(|| panic!("accepted: {json}"));
            assert!(message.starts_with(&format!("/conf/mine.json: {expected}")), "{json}: {message}");
        }
        for fine in [
            r#"{"host": "api.example.com", "port": 8443, "base_path": "/v1/"}"#,
            r#"{"host": "127.0.0.1", "protocol": "HTTP"}"#,
            r#"{"host": "[::1]", "api_key_header": "X-Api-Key", "api_key_prefix": "Token "}"#,
            r#"{"host": "Example.COM", "policy": {"timeout_secs": 0.5}}"#,
            r#"{"host": "h", "model": {}}"#,
            r#"{"host": "h", "model": {"body_field": "model"}}"#,
            r#"{"host": "h", "model": {"path_markers": ["models", "tunedModels"], "path_segments": 2}}"#,
            r#"{"host": "h", "api": "gemini"}"#,
            r#"{"host": "h", "api": null}"#,
        ] {
            assert_eq!(problem(fine), None, "{fine}");
        }
    }

    #[test]
    fn a_valid_connector_and_a_valid_secret_always_make_a_header() {
        // What `Jongler::send` relies on: it cannot report a header that fails to parse.
        let keyring =
            crate::Keyring::parse(Path::new("k.ini"), "[c]\na = fake-secret\tone\nb = x\u{e9}~!\n").expect("keyring");
        let connectors = Connectors::load(None).expect("embedded");
        let custom = Connector::parse(
            r#"{"host": "h", "api_key_header": "X-K", "api_key_prefix": "K \t"}"#,
            Path::new("c.json"),
            Origin::Embedded,
        )
        .expect("valid");
        for connector in connectors.iter().chain([&custom]) {
            let (header, prefix) = connector.key_header();
            assert!(HeaderName::from_bytes(header.as_bytes()).is_ok(), "{}", connector.name);
            for key in keyring.keys("c").expect("keys") {
                let value = format!("{prefix}{}", secrecy::ExposeSecret::expose_secret(key.secret()));
                assert!(HeaderValue::from_str(&value).is_ok(), "{} with {}", connector.name, key.name());
            }
        }
    }

    #[test]
    fn two_files_defining_one_connector_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.json"), r#"{"name": "b", "host": "one.example"}"#).expect("write");
        std::fs::write(dir.path().join("b.json"), r#"{"host": "two.example"}"#).expect("write");
        let message = Connectors::load(Some(dir.path())).expect_err("duplicate").to_string();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        assert!(
            message.starts_with(&format!("{} and {} both define connector 'b'", a.display(), b.display())),
            "{message}"
        );
    }

    #[test]
    fn timeout_variable_is_seconds_or_a_duration() {
        let parse = |value: &str| parse_timeout(Some(OsStr::new(value)));
        assert_eq!(parse_timeout(None).expect("unset"), None);
        for (value, expected) in [
            ("", None),
            ("30", Some(30_000)),
            (" 1.5 ", Some(1_500)),
            ("0.5s", Some(500)),
            ("2m", Some(120_000)),
            ("1h 30m", Some(5_400_000)),
            ("250ms", Some(250)),
        ] {
            let timeout = parse(value).unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(timeout.map(|t| t.as_millis()), expected, "{value:?}");
        }
        for bad in ["abc", "0", "0s", "-1", "-1s", "NaN", "inf", "1e400", "30 s please", "1e-12"] {
            let message = parse(bad).expect_err(bad).to_string();
            assert!(
                message.starts_with(&format!("APIJONGLER_TIMEOUT={bad:?} is not valid: write a positive number")),
                "{message}"
            );
        }
    }

    #[test]
    fn the_connector_timeout_wins_over_the_default() {
        let policy = Policy { timeout_secs: Some(2.5), ..Policy::default() };
        assert_eq!(policy.try_timeout().expect("valid"), Duration::from_millis(2_500));
    }

    #[test]
    fn malformed_file_names_file_and_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.json"), "{\n  \"host\": \"h\",\n  \"port\": \"eighty\"\n}").expect("write");
        let message = Connectors::load(Some(dir.path())).expect_err("malformed").to_string();
        assert!(message.contains("bad.json:3:"), "{message}");
    }

    #[test]
    fn a_model_rule_of_the_wrong_shape_names_file_and_position() {
        let cases = [
            (r#"{"host": "h", "model": "gemini-pro"}"#, "an object such as {\"path_markers\""),
            (r#"{"host": "h", "model": {"body": "model"}}"#, "unknown field `body`"),
            (r#"{"host": "h", "model": {"path_markers": "models"}}"#, "invalid type"),
            (r#"{"host": "h", "model": {"path_segments": -1}}"#, "invalid value"),
        ];
        for (json, expected) in cases {
            let message = problem(json).unwrap_or_else(|| panic!("accepted: {json}"));
            assert!(message.starts_with("/conf/mine.json:1:") && message.contains(expected), "{json}: {message}");
        }
    }
}
