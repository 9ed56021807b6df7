//! Per-project resources: files, cached contents, batches and tuned models belong to the Google Cloud
//! project of the key that created them, and only a key of that project may use them (any other gets
//! 403 "You do not have permission to access the File ... or it may not exist"). This module reads
//! which resources a request names and which ones an answer created; the store keeps who owns them
//! (table `resources`), and the claim of a request naming a known one takes only keys of its owner's
//! quota scope (see the README, "Resources and affinity").
//!
//! Invariants:
//! - Pure: no I/O, no clock (the caller passes `now`); a body that is not JSON names nothing.
//! - A name is always `KIND/ID` with KIND one of [`KINDS`], whatever form the request used (a path
//!   `/v1beta/files/abc:download`, a `fileData.fileUri` of
//!   `https://generativelanguage.googleapis.com/v1beta/files/abc`, a `cachedContent` field).
//! - An upload session is named `uploads/<digest of its upload_id>` (a name of ours, never sent
//!   upstream; the id itself is a capability, never stored): the key that started it owns the file its
//!   last chunk creates, though the chunks carry no key.

use serde_json::Value;

/// The kinds of resources that belong to a project, as they start their names.
pub const KINDS: [&str; 4] = ["files", "cachedContents", "batches", "tunedModels"];

/// The kind of our names for resumable upload sessions (`uploads/<digest>`, see [`upload_session`]).
pub const UPLOADS: &str = "uploads";

/// How long Gemini keeps an uploaded file (48 h), when the answer does not say.
pub const FILE_LIFETIME_MS: i64 = 48 * 3_600_000;

/// How long a cached content lives by default (1 h), when the answer does not say.
pub const CACHE_LIFETIME_MS: i64 = 3_600_000;

/// How long a resumable upload session may be resumed (Google's are good for a week).
pub const UPLOAD_LIFETIME_MS: i64 = 7 * 24 * 3_600_000;

/// Body fields whose value names a resource, by the kind they name.
const BODY_FIELDS: [(&str, &str); 6] = [
    ("fileUri", "files"),
    ("file_uri", "files"),
    ("cachedContent", "cachedContents"),
    ("cached_content", "cachedContents"),
    ("model", "tunedModels"),
    ("tunedModel", "tunedModels"),
];

/// The owner of a resource a request names, as the database recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The resource, `KIND/ID`.
    pub name: String,
    /// The key whose answer created it.
    pub key_name: String,
    /// That key's quota scope now (its project, or `key:NAME`): a request naming the resource claims
    /// only keys of this scope.
    pub quota_scope: String,
    /// When the mapping stops counting (unix ms; `None`: no known end).
    pub expires_at: Option<i64>,
}

/// A resource an answer created, to be recorded as its key's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// `KIND/ID`.
    pub name: String,
    /// When it expires (unix ms; `None`: no known end).
    pub expires_at: Option<i64>,
}

/// Every resource `path_and_query` and the JSON `body` name, path first, without repeats.
pub fn named_in(path_and_query: &str, body: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = in_path(path_and_query).into_iter().collect();
    for name in in_body(body) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The resource a request path names: `files/abc` from `/v1beta/files/abc` or `/v1beta/files/abc:download`,
/// `tunedModels/m` from `/v1beta/tunedModels/m:generateContent` or `/v1beta/tunedModels/m/operations/o`.
/// A collection (`/v1beta/files`) and the upload endpoint (`/upload/v1beta/files`) name none.
pub fn in_path(path_and_query: &str) -> Option<String> {
    let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
    if path.starts_with("/upload/") {
        return None;
    }
    let segments: Vec<&str> = path.split('/').collect();
    segments.windows(2).find_map(|pair| {
        let kind = KINDS.iter().find(|kind| **kind == pair[0])?;
        let id = pair[1].split(':').next().unwrap_or_default();
        valid_id(id).then(|| format!("{kind}/{id}"))
    })
}

/// The resources a JSON body names: `fileData.fileUri` (a full URI or `files/abc`), `cachedContent`,
/// a `model` that is a tuned model. Fields are looked for at any depth (`contents[].parts[]`).
pub fn in_body(body: &[u8]) -> Vec<String> {
    // Most bodies name nothing: skip parsing them (they may be megabytes of inline data).
    let Ok(text) = std::str::from_utf8(body) else { return Vec::new() };
    let hints = ["fileUri", "file_uri", "cachedContent", "cached_content", "tunedModels/"];
    if !hints.iter().any(|hint| text.contains(hint)) {
        return Vec::new();
    }
    let Ok(json) = serde_json::from_str::<Value>(text) else { return Vec::new() };
    let mut names = Vec::new();
    walk(&json, &mut names);
    names
}

fn walk(value: &Value, names: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (field, value) in map {
                if let (Some((_, kind)), Some(text)) =
                    (BODY_FIELDS.iter().find(|(name, _)| name == field), value.as_str())
                    && let Some(name) = name_in_text(text, kind)
                    && !names.contains(&name)
                {
                    names.push(name);
                }
                walk(value, names);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| walk(item, names)),
        _ => {}
    }
}

/// `KIND/ID` from a name (`files/abc`) or a URI that carries one
/// (`https://generativelanguage.googleapis.com/v1beta/files/abc`); `None` for other URIs (`gs://`, a
/// video link).
fn name_in_text(text: &str, kind: &str) -> Option<String> {
    let marker = format!("{kind}/");
    let rest = if let Some(rest) = text.strip_prefix(&marker) {
        rest
    } else if text.starts_with("https://") || text.starts_with("http://") {
        let (_, rest) = text.rsplit_once(&format!("/{marker}"))?;
        rest
    } else {
        return None;
    };
    let id = rest.split(['/', '?', '#', ':']).next().unwrap_or_default();
    valid_id(id).then(|| format!("{kind}/{id}"))
}

/// Resource ids are short URL-safe words.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
}

/// The resources a successful answer created, with their expiry: a file upload's
/// `{"file":{"name":"files/abc","expirationTime":"..."}}`, a created cached content
/// `{"name":"cachedContents/x","expireTime":"..."}`, a batch `{"name":"batches/x",...}`, a tuned model's
/// operation `{"name":"tunedModels/m/operations/o","metadata":{"tunedModel":"tunedModels/m"}}`. Without an
/// expiry in the answer, a file gets 48 h and a cached content 1 h from `now_ms`; the others none.
pub fn created_in(body: &[u8], now_ms: i64) -> Vec<Created> {
    let Ok(text) = std::str::from_utf8(body) else { return Vec::new() };
    if !KINDS.iter().any(|kind| text.contains(&format!("\"{kind}/"))) {
        return Vec::new();
    }
    let Ok(json) = serde_json::from_str::<Value>(text) else { return Vec::new() };
    let candidates = [&json["file"], &json, &json["metadata"]];
    let mut created: Vec<Created> = Vec::new();
    for object in candidates {
        let names = [object["name"].as_str(), object["tunedModel"].as_str()];
        for name in names.into_iter().flatten() {
            let Some(name) = in_path(&format!("/{name}")) else { continue };
            if created.iter().any(|known| known.name == name) {
                continue;
            }
            let stated = ["expirationTime", "expireTime"].iter().find_map(|field| object[*field].as_str());
            let expires_at = stated.and_then(parse_time).or_else(|| default_lifetime(&name).map(|ms| now_ms + ms));
            created.push(Created { name, expires_at });
        }
    }
    created
}

/// An RFC 3339 time (`2026-12-05T03:04:05.123456Z`) in unix ms.
fn parse_time(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|time| time.timestamp_millis())
}

fn default_lifetime(name: &str) -> Option<i64> {
    match name.split('/').next() {
        Some("files") => Some(FILE_LIFETIME_MS),
        Some("cachedContents") => Some(CACHE_LIFETIME_MS),
        _ => None,
    }
}

/// Our name for the upload session a URL or a path's query carries, from the `x-goog-upload-url` of a
/// start answer or the path of a chunk: `uploads/` and the first 32 hex digits of the SHA-256 of its
/// `upload_id`. The `upload_id` itself is a capability (whoever has it may upload into the session),
/// so like a secret it is never written to the database.
pub fn upload_session(url_or_path: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    let (_, query) = url_or_path.split_once('?')?;
    let query = query.split('#').next().unwrap_or_default();
    let id = query.split('&').find_map(|pair| pair.strip_prefix("upload_id="))?;
    if id.is_empty() || id.len() > 1024 {
        return None;
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest[..16].iter().map(|byte| format!("{byte:02x}")).collect();
    Some(format!("{UPLOADS}/{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_paths() {
        let cases: [(&str, Option<&str>); 13] = [
            ("/v1beta/files/abc", Some("files/abc")),
            ("/v1beta/files/abc-1_2?alt=json", Some("files/abc-1_2")),
            ("/v1beta/files/abc:download", Some("files/abc")),
            ("/v1/cachedContents/x9", Some("cachedContents/x9")),
            ("/v1beta/batches/b1:cancel", Some("batches/b1")),
            ("/v1beta/tunedModels/my-model:generateContent", Some("tunedModels/my-model")),
            ("/v1beta/tunedModels/m/operations/o", Some("tunedModels/m")),
            ("/v1beta/files", None),
            ("/v1beta/files/", None),
            ("/upload/v1beta/files", None),
            ("/upload/v1beta/files?upload_id=files/abc", None),
            ("/v1beta/models/gemini-2.5-flash:generateContent", None),
            ("/v1beta/openai/chat/completions", None),
        ];
        for (path, expected) in cases {
            assert_eq!(in_path(path).as_deref(), expected, "{path}");
        }
    }

    #[test]
    fn names_in_bodies() {
        let body = br#"{"contents":[{"parts":[{"text":"hi"},
            {"fileData":{"mimeType":"text/plain","fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc"}},
            {"file_data":{"file_uri":"files/def"}},
            {"fileData":{"fileUri":"gs://bucket/files/not-ours"}},
            {"fileData":{"fileUri":"https://www.youtube.com/watch?v=x"}},
            {"fileData":{"fileUri":"files/abc"}}]}],
            "cachedContent":"cachedContents/c1"}"#;
        let mut names = in_body(body);
        names.sort();
        assert_eq!(names, ["cachedContents/c1", "files/abc", "files/def"]);
        assert_eq!(in_body(br#"{"model":"tunedModels/t1","contents":[]}"#), ["tunedModels/t1"]);
        assert!(in_body(br#"{"model":"models/gemini-2.5-flash"}"#).is_empty());
        assert!(in_body(br#"{"contents":[{"parts":[{"text":"fileUri files/abc"}]}]}"#).is_empty(), "text is text");
        assert!(in_body(b"fileUri: files/abc, not JSON").is_empty());
        assert!(in_body(&[0xff, 0xfe]).is_empty());
        assert_eq!(
            named_in(
                "/v1beta/cachedContents/c1",
                br#"{"cachedContent":"cachedContents/c1","x":{"fileUri":"files/a"}}"#
            ),
            ["cachedContents/c1", "files/a"],
            "the path's first"
        );
    }

    #[test]
    fn resources_created_by_answers() {
        let now = 1_000_000;
        let file = br#"{"file":{"name":"files/abc","uri":"https://h/v1beta/files/abc",
                         "expirationTime":"1970-01-03T00:00:00.5Z","state":"ACTIVE"}}"#;
        assert_eq!(created_in(file, now), [Created { name: "files/abc".into(), expires_at: Some(172_800_500) }]);
        let bare_file = br#"{"file":{"name":"files/x"}}"#;
        assert_eq!(created_in(bare_file, now)[0].expires_at, Some(now + FILE_LIFETIME_MS));
        let cache = br#"{"name":"cachedContents/c1","model":"models/m","expireTime":"1970-01-01T01:00:00Z"}"#;
        assert_eq!(created_in(cache, now), [Created { name: "cachedContents/c1".into(), expires_at: Some(3_600_000) }]);
        let batch = br#"{"name":"batches/b1","metadata":{"@type":"x"}}"#;
        assert_eq!(created_in(batch, now), [Created { name: "batches/b1".into(), expires_at: None }]);
        let tuning = br#"{"name":"tunedModels/t1/operations/o1","metadata":{"tunedModel":"tunedModels/t1"}}"#;
        assert_eq!(created_in(tuning, now), [Created { name: "tunedModels/t1".into(), expires_at: None }]);
        assert!(created_in(br#"{"candidates":[{"content":{"parts":[{"text":"files/abc"}]}}]}"#, now).is_empty());
        assert!(created_in(br#"{"name":"models/gemini-2.5-flash"}"#, now).is_empty());
    }

    #[test]
    fn upload_sessions() {
        let url =
            "https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=AB%2Fc&upload_protocol=resumable";
        let session = upload_session(url).unwrap();
        assert_eq!(session.len(), "uploads/".len() + 32);
        assert!(session.starts_with("uploads/") && !session.contains("AB"), "{session}: the id is not kept");
        assert_eq!(upload_session("/upload/v1beta/files?x=1&upload_id=AB%2Fc#f"), Some(session), "same session");
        assert_ne!(upload_session("/upload/v1beta/files?upload_id=Z"), upload_session(url));
        assert_eq!(upload_session("/upload/v1beta/files"), None);
        assert_eq!(upload_session("/upload/v1beta/files?upload_id="), None);
    }
}
