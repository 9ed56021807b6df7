//! The model a request names, so that a key can be locked down for one model instead of for all.
//!
//! A connector file says where its requests name their model (its optional `model` field, a
//! [`ModelRule`]), else its API family's default rule does ([`crate::family::ApiFamily::model_rule`]:
//! [`ModelRule::gemini`], [`ModelRule::hugging_face`], [`ModelRule::body_only`]); [`requested_model`]
//! reads it. Nothing here knows a host: Gemini's
//! `/v1beta/models/{model}:generateContent` and Hugging Face's `/hf-inference/models/{org}/{name}`
//! differ only in their connector's rule. The function is pure: no I/O, no logging, no error.
//!
//! How a request is read:
//! - The path decides first. Query and fragment are dropped (`?alt=sse`), the rest is percent-decoded
//!   once (`%3A` is `:`, `%2F` is `/`; a `%` not followed by two hex digits stays as it is) and split
//!   on `/`. The first segment equal to one of `path_markers`, if at least `path_segments` segments
//!   follow it, names the model: those segments joined by `/`, cut before the first `:` (Google's
//!   custom method, `:generateContent`). Fewer segments (`GET /v1beta/models`, or `/models/gpt2` where
//!   two are expected) and the path names none.
//! - When the path names a model, the body is never read, even if the name is not sane (then the
//!   request names none). Otherwise, if the body's first non-blank byte is `{`, the string in its
//!   top-level field `body_field` is the name, in one pass that skips every other value without
//!   building it (a 50 MB body is scanned once and not copied). A marker and `/` at its start are
//!   dropped (`models/gemini-2.0-flash` is `gemini-2.0-flash`), so that both ways of naming a model
//!   agree. A value that is not a string, a field given twice, a nested field of that name only, or a
//!   body that is not one JSON object: no model.
//! - A provider suffix stays (`meta-llama/Llama-3.1-8B-Instruct:novita`): Hugging Face sends it to
//!   that provider, whose limits are its own, so `x:novita` and `x:together` are locked apart.
//! - A name is returned only if it is sane: 1 to [`MAX_LEN`] bytes of ASCII letters, digits and
//!   `-_.:/@+`, with no empty part between slashes. It goes to the database and the logs, so anything else is `None`, never echoed.
//!
//! `None` means "no model known": such a request can use any key that is not locked for all models.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The longest model name returned, in bytes.
pub const MAX_LEN: usize = 200;

/// Where a connector's requests name their model: the connector file's `model` field, e.g.
/// `{"path_markers": ["models", "tunedModels"], "path_segments": 1, "body_field": "model"}`.
/// Without that field the connector's API family's rule applies; the default value (`{}`) names none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = r#"an object such as {"path_markers": ["models"], "path_segments": 1, "body_field": "model"}"#
)]
pub struct ModelRule {
    /// Path segments the model's name follows (`models`), compared exactly; empty: the path never
    /// names a model.
    pub path_markers: Vec<String>,
    /// How many segments the name spans: 1 for Gemini, 2 for Hugging Face's `{org}/{name}` (default 1).
    pub path_segments: usize,
    /// The top-level JSON field of the body that names the model when the path does not (`model`);
    /// `None`: the body is never read.
    pub body_field: Option<String>,
}

impl Default for ModelRule {
    fn default() -> Self {
        Self { path_markers: Vec::new(), path_segments: 1, body_field: None }
    }
}

impl ModelRule {
    /// Gemini's rule (the `gemini` family's default): `models/{model}` or `tunedModels/{model}` in the
    /// path, else the body's `model` (`models/` dropped).
    pub fn gemini() -> Self {
        Self::markers(&["models", "tunedModels"], 1)
    }

    /// Hugging Face's rule (the `huggingface` family's default): `models/{org}/{name}` in the path,
    /// else the body's `model`.
    pub fn hugging_face() -> Self {
        Self::markers(&["models"], 2)
    }

    /// The body's `model` only (the `openai` family's default): OpenAI-compatible APIs name the model
    /// there, and their paths name none.
    pub fn body_only() -> Self {
        Self { path_markers: Vec::new(), path_segments: 1, body_field: Some("model".to_owned()) }
    }

    fn markers(markers: &[&str], path_segments: usize) -> Self {
        Self {
            path_markers: markers.iter().map(|marker| (*marker).to_owned()).collect(),
            path_segments,
            body_field: Some("model".to_owned()),
        }
    }

    /// Whether the rule can name a model at all (it has a path marker or a body field).
    pub fn names_any(&self) -> bool {
        !self.path_markers.is_empty() || self.body_field.is_some()
    }

    /// The first field that cannot work, dotted as in the connector file, and what is wrong with it.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(marker) = self.path_markers.iter().find(|marker| !is_marker(marker)) {
            return Err((
                "model.path_markers",
                format!(
                    "holds {marker:?}: each marker is one path segment of letters, digits and `-_.~`, e.g. \"models\""
                ),
            ));
        }
        if self.path_segments == 0 {
            return Err((
                "model.path_segments",
                "is 0: give how many path segments the model's name spans after its marker (1, or 2 for \"org/name\")"
                    .to_owned(),
            ));
        }
        if self.body_field.as_deref() == Some("") {
            return Err((
                "model.body_field",
                "is empty: name the top-level JSON field that holds the model, e.g. \"model\", or leave it out"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// `Some(name)` when the path names a model (`Some(None)` when that name is not sane), `None` when
    /// it names none.
    fn in_path(&self, path_and_query: &str) -> Option<Option<String>> {
        if self.path_markers.is_empty() {
            return None;
        }
        let end = path_and_query.find(['?', '#']).unwrap_or(path_and_query.len());
        let path = percent_decoded(&path_and_query[..end]);
        let segments: Vec<&str> = path.split('/').collect();
        let marker = segments.iter().position(|segment| self.path_markers.iter().any(|marker| marker == segment))?;
        let name = segments.get(marker + 1..)?.get(..self.path_segments)?.join("/");
        let name = name.split(':').next().unwrap_or_default();
        Some(sane(name))
    }

    fn in_body(&self, body: &[u8]) -> Option<String> {
        let field = self.body_field.as_deref()?;
        if body.iter().find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r')) != Some(&b'{') {
            return None;
        }
        let mut json = serde_json::Deserializer::from_slice(body);
        let name = TopLevelString { field }.deserialize(&mut json).ok()??;
        json.end().ok()?;
        let name = self
            .path_markers
            .iter()
            .find_map(|marker| name.strip_prefix(marker.as_str())?.strip_prefix('/'))
            .unwrap_or(&name);
        sane(name)
    }
}

/// The model a request names, by its connector's `rule` (see the module documentation); `None` when
/// it names none, or a name that is not sane.
pub fn requested_model(rule: &ModelRule, path_and_query: &str, body: &[u8]) -> Option<String> {
    match rule.in_path(path_and_query) {
        Some(named) => named,
        None => rule.in_body(body),
    }
}

fn is_marker(marker: &str) -> bool {
    !marker.is_empty() && marker.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte))
}

fn sane(name: &str) -> Option<String> {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || b"-_.:/@+".contains(&byte);
    let parts_not_empty = name.split('/').all(|part| !part.is_empty());
    (name.len() <= MAX_LEN && parts_not_empty && name.bytes().all(allowed)).then(|| name.to_owned())
}

/// `path` with each `%XY` decoded; bytes that are not UTF-8 become U+FFFD, which no sane name holds.
fn percent_decoded(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let hex = |byte: Option<&u8>| byte.and_then(|&byte| char::from(byte).to_digit(16));
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match (bytes[at], hex(bytes.get(at + 1)), hex(bytes.get(at + 2))) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                at += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                at += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&decoded).into_owned())
}

/// Reads a JSON object, keeping the string value of its top-level `field` and skipping every other
/// value unbuilt. `None` when the field is missing, not a string, or given twice.
struct TopLevelString<'a> {
    field: &'a str,
}

impl<'de> DeserializeSeed<'de> for TopLevelString<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevelString<'_> {
    type Value = Option<String>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = 0;
        let mut name = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == self.field {
                seen += 1;
                name = map.next_value::<serde_json::Value>()?.as_str().map(str::to_owned);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(if seen == 1 { name } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemini() -> ModelRule {
        ModelRule::gemini()
    }

    fn hugging_face() -> ModelRule {
        ModelRule::hugging_face()
    }

    fn check(rule: &ModelRule, cases: &[(&str, &str, Option<&str>)]) {
        for &(path, body, expected) in cases {
            assert_eq!(requested_model(rule, path, body.as_bytes()).as_deref(), expected, "{path} {body}");
        }
    }

    #[test]
    fn gemini_names_the_model_in_the_path_or_the_body() {
        let long = "m".repeat(MAX_LEN);
        let too_long = format!("/v1beta/models/{long}m:generateContent");
        let chat = r#"{"messages": [{"role": "user", "content": "hi"}], "model": "gemini-2.5-flash"}"#;
        check(
            &gemini(),
            &[
                ("/v1beta/models/gemini-2.5-flash:generateContent", "{}", Some("gemini-2.5-flash")),
                ("/v1/models/gemini-2.5-flash:generateContent", "", Some("gemini-2.5-flash")),
                ("/v1alpha/models/gemini-2.5-pro:countTokens", "", Some("gemini-2.5-pro")),
                ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "", Some("gemini-2.5-flash")),
                ("/v1beta/models/gemini-2.5-flash:generateContent#frag", "", Some("gemini-2.5-flash")),
                ("/v1/models/gemini-embedding-001:batchEmbedContents", "", Some("gemini-embedding-001")),
                ("/v1beta/tunedModels/my-tuned-7x:generateContent", "", Some("my-tuned-7x")),
                ("/v1beta/models/gemini-2.5-flash", "", Some("gemini-2.5-flash")),
                ("/v1beta/models", "", None),
                ("/v1beta/models?pageSize=5", "", None),
                ("/v1beta/models/gemini-2.5-flash?fields=name", "", Some("gemini-2.5-flash")),
                ("/v1beta/files?pageToken=/models/x", "", None),
                ("/v1beta/files#/models/x", "", None),
                ("/v1beta/models/", "", None),
                ("/v1beta/models/:generateContent", "", None),
                ("/v1beta/models/gemini-2.5-flash%3AgenerateContent", "", Some("gemini-2.5-flash")),
                ("/v1beta/models%2Fgemini-2.5-flash%3agenerateContent", "", Some("gemini-2.5-flash")),
                ("/v1beta/models/gemini%zz:generateContent", "", None),
                ("/v1beta/models/gemini%FF:generateContent", "", None),
                ("/v1beta/models/gemini 2.5:generateContent", "", None),
                ("/v1beta/models/gemini%0A2.5:generateContent", "", None),
                (&format!("/v1beta/models/{long}:generateContent"), "", Some(&long)),
                (&too_long, "", None),
                // The path names a model, so the body is not read, even when the path's name is bad.
                ("/v1beta/models/gemini-2.5-pro:generateContent", chat, Some("gemini-2.5-pro")),
                ("/v1beta/models/:generateContent", chat, None),
                ("/v1beta/openai/chat/completions", chat, Some("gemini-2.5-flash")),
                (
                    "/v1beta/openai/chat/completions",
                    r#"{"model": "models/gemini-2.0-flash"}"#,
                    Some("gemini-2.0-flash"),
                ),
                ("/v1beta/openai/chat/completions", r#"{"model": "tunedModels/t-1"}"#, Some("t-1")),
                ("/v1beta/openai/chat/completions", r#"{"model": "models/"}"#, None),
                ("/v1/interactions", r#" {"input": "hi", "model": "gemini-2.5-flash"}"#, Some("gemini-2.5-flash")),
                ("/v1beta/openai/models", "", None),
                ("/v1beta/files", r#"{"file": {"displayName": "x"}}"#, None),
            ],
        );
    }

    #[test]
    fn hugging_face_names_org_and_name() {
        let chat = r#"{"model": "meta-llama/Llama-3.1-8B-Instruct:novita", "messages": []}"#;
        check(
            &hugging_face(),
            &[
                ("/hf-inference/models/google/gemma-2-9b-it", "{}", Some("google/gemma-2-9b-it")),
                ("/hf-inference/models/google/gemma-2-9b-it/v1/chat/completions", chat, Some("google/gemma-2-9b-it")),
                (
                    "/hf-inference/models/sentence-transformers/all-MiniLM-L6-v2/pipeline/feature-extraction",
                    "",
                    Some("sentence-transformers/all-MiniLM-L6-v2"),
                ),
                ("/models/google/gemma-2-9b-it", r#"{"inputs": "hi"}"#, Some("google/gemma-2-9b-it")),
                ("/models/google%2Fgemma-2-9b-it", "", Some("google/gemma-2-9b-it")),
                ("/v1/chat/completions", chat, Some("meta-llama/Llama-3.1-8B-Instruct:novita")),
                (
                    "/v1/chat/completions",
                    r#"{"model": "openai/gpt-oss-120b:fastest"}"#,
                    Some("openai/gpt-oss-120b:fastest"),
                ),
                // One segment where two are expected: the path names none, so the body decides.
                ("/models/onlyorg", "", None),
                ("/models/onlyorg", r#"{"model": "org/name"}"#, Some("org/name")),
                ("/models/org/", "", None),
                ("/v1/models", "", None),
            ],
        );
    }

    #[test]
    fn the_body_field_is_a_top_level_string_given_once() {
        let path = "/v1/chat/completions";
        let big = format!(r#"{{"messages": [{{"content": "{}"}}], "model": "m-1"}}"#, "x".repeat(8 << 20));
        check(
            &gemini(),
            &[
                (path, r#"{"model": 42}"#, None),
                (path, r#"{"model": null}"#, None),
                (path, r#"{"model": ["gemini-2.5-flash"]}"#, None),
                (path, r#"{"model": {"name": "gemini-2.5-flash"}}"#, None),
                (path, r#"{"config": {"model": "gemini-2.5-flash"}}"#, None),
                (path, r#"{"requests": [{"model": "models/gemini-embedding-001"}]}"#, None),
                (path, r#"{"model": "a", "model": "b"}"#, None),
                (path, r#"{"model": "a", "x": [1, {"model": "b"}]}"#, Some("a")),
                (path, r#"{"mod\u0065l": "escaped-key"}"#, Some("escaped-key")),
                (path, r#"{"model": "gemini-2.5-flash"} trailing"#, None),
                (path, r#"{"model": "gemini-2.5-flash", "#, None),
                (path, r#"{"model": "gemini 2.5 flash"}"#, None),
                (path, r#"{"model": "<script>"}"#, None),
                (path, r#"{"model": ""}"#, None),
                (path, r#"{"model": "/m"}"#, None),
                (path, r#"{"model": "org//name"}"#, None),
                (path, r#"["model", "gemini-2.5-flash"]"#, None),
                (path, r#""model""#, None),
                (path, "model=gemini-2.5-flash", None),
                (path, "\u{feff}{\"model\": \"m\"}", None),
                (path, "", None),
                (path, &big, Some("m-1")),
            ],
        );
        // serde_json skips a value without recursing, and builds the field's own value with a depth limit.
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        let deep = format!(r#"{{"x": {open}1{close}, "model": "m"}}"#);
        assert_eq!(requested_model(&gemini(), path, deep.as_bytes()).as_deref(), Some("m"));
        let deep = format!(r#"{{"model": {open}"m"{close}}}"#);
        assert_eq!(requested_model(&gemini(), path, deep.as_bytes()), None);
        let binary = [0xff, 0xd8, 0xff, 0xe0, b'{'];
        assert_eq!(requested_model(&gemini(), path, &binary), None);
    }

    #[test]
    fn a_rule_names_only_what_it_describes() {
        let none = ModelRule::default();
        let path_only = ModelRule { body_field: None, ..gemini() };
        let body_only = ModelRule { path_markers: Vec::new(), ..gemini() };
        let chat = r#"{"model": "models/gemini-2.5-flash"}"#;
        let call = "/v1beta/models/gemini-2.5-pro:generateContent";
        check(&none, &[(call, chat, None), ("/v1/chat/completions", chat, None)]);
        check(&path_only, &[(call, chat, Some("gemini-2.5-pro")), ("/v1/chat/completions", chat, None)]);
        // Without markers nothing is stripped from the body's name either.
        check(&body_only, &[(call, chat, Some("models/gemini-2.5-flash"))]);
    }

    #[test]
    fn rules_that_cannot_work_name_their_field() {
        let field = |rule: ModelRule| rule.check().err().map(|(field, _)| field);
        assert_eq!(field(gemini()), None);
        assert_eq!(field(hugging_face()), None);
        assert_eq!(field(ModelRule::default()), None);
        for marker in ["", "mod/els", "models ", "models:", "mod%65ls"] {
            let rule = ModelRule { path_markers: vec![marker.to_owned()], ..gemini() };
            assert_eq!(field(rule), Some("model.path_markers"), "{marker:?}");
        }
        assert_eq!(field(ModelRule { path_segments: 0, ..gemini() }), Some("model.path_segments"));
        assert_eq!(field(ModelRule { body_field: Some(String::new()), ..gemini() }), Some("model.body_field"));
    }
}
