//! The mock's Gemini files and cached contents, per Google Cloud project: uploads (simple, and resumable
//! in sessions whose chunks carry no key) create files, and `POST …/cachedContents` cached contents,
//! owned by the project of the key used; reading, deleting or naming one in a request
//! (`fileData.fileUri`, `cachedContent`) with a key of another project, or after it expired, answers
//! Gemini's 403: "You do not have permission to access the File X or it may not exist." for a file,
//! "CachedContent not found (or permission denied)" for a cached content.
//!
//! Self-contained: `answer` takes the requests that are about files and leaves every other one (and a
//! request naming only files its key may use) to the rest of the mock, which meters it as usual.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};
use serde_json::json;

use super::{INVALID_KEY, MockBody, MockConfig, MockUpstream, SeenRequest, State, whole};

/// The files and upload sessions the mock knows, and how often it refused one.
#[derive(Debug, Default)]
pub(super) struct Files {
    next: u64,
    /// upload_id -> the project of the key that started the session.
    uploads: HashMap<String, String>,
    /// `files/ID` or `cachedContents/ID` -> the resource.
    files: HashMap<String, File>,
    /// 403s answered for a file or cached content of another project, expired or unknown.
    refusals: u64,
}

#[derive(Debug)]
struct File {
    project: String,
    expires: Instant,
    json: serde_json::Value,
}

impl MockUpstream {
    /// How many requests the mock refused with the 403 about a file (another project's, expired or
    /// unknown).
    pub fn file_refusals(&self) -> u64 {
        State::lock(&self.state).files.refusals
    }

    /// The project that owns file `name` (`files/ID`), if the mock made it.
    pub fn file_project(&self, name: &str) -> Option<String> {
        State::lock(&self.state).files.files.get(name).map(|file| file.project.clone())
    }
}

/// Gemini's answer to a request naming a file (or a cached content) its key may not use.
pub fn file_denied_body(name: &str) -> String {
    let message = match name.strip_prefix("files/") {
        Some(id) => format!("You do not have permission to access the File {id} or it may not exist."),
        None => "CachedContent not found (or permission denied)".to_owned(),
    };
    json!({"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}).to_string()
}

/// The kinds of resources the mock keeps per project.
fn kept(name: &str) -> bool {
    name.starts_with("files/") || name.starts_with("cachedContents/")
}

/// The answer to a request about files, or `None` to let the rest of the mock answer it.
pub(super) fn answer(
    state: &Mutex<State>,
    config: &MockConfig,
    parts: &Parts,
    key: &str,
    body: &Bytes,
) -> Option<Response<MockBody>> {
    let path = parts.uri.path();
    let valid = !key.is_empty() && !config.bad_keys.contains(key);
    let project = config.projects.get(key).map_or(key, String::as_str).to_owned();
    let upload = path.starts_with("/upload/") && path.ends_with("/files");
    let caching = parts.method == Method::POST && path.ends_with("/cachedContents");
    let named = crate::resource::in_path(path).filter(|name| kept(name));
    let used: Vec<String> = if valid && !upload && named.is_none() {
        crate::resource::in_body(body).into_iter().filter(|name| kept(name)).collect()
    } else {
        Vec::new()
    };
    if !upload && !caching && named.is_none() && used.is_empty() {
        return None;
    }
    let mut state = State::lock(state);
    let response = respond(&mut state.files, config, parts, (valid, project), (upload, caching, named, used), body)?;
    // Recorded and counted only when answered here: the rest of the mock records the others.
    state.requests += 1;
    state.seen.push(SeenRequest {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map_or_else(|| path.to_owned(), ToString::to_string),
        headers: (parts.headers.iter())
            .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect(),
        key: (!key.is_empty()).then(|| key.to_owned()),
        body: body.clone(),
    });
    Some(response)
}

/// The answer of the files' part of the mock (see [`answer`]).
fn respond(
    files: &mut Files,
    config: &MockConfig,
    parts: &Parts,
    (valid, project): (bool, String),
    (upload, caching, named, used): (bool, bool, Option<String>, Vec<String>),
    body: &Bytes,
) -> Option<Response<MockBody>> {
    let (path, query) = (parts.uri.path(), parts.uri.query().unwrap_or_default());
    let now = Instant::now();
    let session = query.split('&').find_map(|pair| pair.strip_prefix("upload_id=")).map(str::to_owned);
    let command = parts.headers.get("x-goog-upload-command").and_then(|value| value.to_str().ok()).unwrap_or("");
    if upload {
        if let Some(session) = session {
            let Some(owner) = files.uploads.get(&session).cloned() else {
                return Some(whole(StatusCode::NOT_FOUND, super::error_body(404)));
            };
            if !command.contains("finalize") {
                return Some(with_status(whole(StatusCode::OK, String::new()), "active"));
            }
            files.uploads.remove(&session);
            let file = files.create(config, &owner, &base(parts), body.len(), now);
            return Some(with_status(whole(StatusCode::OK, json!({ "file": file }).to_string()), "final"));
        }
        if !valid {
            return Some(whole(StatusCode::BAD_REQUEST, INVALID_KEY.to_owned()));
        }
        if command.trim() == "start" {
            files.next += 1;
            let id = format!("up{}-{}", files.next, std::process::id());
            files.uploads.insert(id.clone(), project);
            let url = format!("{}{path}?upload_id={id}&upload_protocol=resumable", base(parts));
            let mut response = with_status(whole(StatusCode::OK, String::new()), "active");
            if let Ok(url) = HeaderValue::from_str(&url) {
                response.headers_mut().insert("x-goog-upload-url", url);
            }
            return Some(response);
        }
        let file = files.create(config, &project, &base(parts), body.len(), now);
        return Some(whole(StatusCode::OK, json!({ "file": file }).to_string()));
    }
    if !valid {
        return Some(whole(StatusCode::BAD_REQUEST, INVALID_KEY.to_owned()));
    }
    if let Some(name) = named {
        if !files.usable(&name, &project, now) {
            files.refusals += 1;
            return Some(whole(StatusCode::FORBIDDEN, file_denied_body(&name)));
        }
        if parts.method == Method::DELETE {
            files.files.remove(&name);
            return Some(whole(StatusCode::OK, "{}".to_owned()));
        }
        let file = files.files.get(&name).map(|file| file.json.clone()).unwrap_or_default();
        return Some(whole(StatusCode::OK, file.to_string()));
    }
    if let Some(denied) = used.iter().find(|name| !files.usable(name, &project, now)) {
        files.refusals += 1;
        return Some(whole(StatusCode::FORBIDDEN, file_denied_body(denied)));
    }
    if !caching {
        return None;
    }
    let cache = files.cache(config, &project, body, now);
    Some(whole(StatusCode::OK, cache.to_string()))
}

impl Files {
    /// A new file of `project`, expiring after the configured lifetime; its JSON.
    fn create(
        &mut self,
        config: &MockConfig,
        project: &str,
        base: &str,
        size: usize,
        now: Instant,
    ) -> serde_json::Value {
        self.next += 1;
        let id = format!("mockfile{}", self.next);
        let name = format!("files/{id}");
        let created = chrono::DateTime::<chrono::Utc>::from(SystemTime::now());
        let expires = created + chrono::Duration::from_std(config.file_lifetime).unwrap_or(chrono::Duration::zero());
        let json = json!({
            "name": name, "mimeType": "text/plain", "sizeBytes": size.to_string(),
            "createTime": created.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "updateTime": created.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "expirationTime": expires.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "uri": format!("{base}/v1beta/{name}"), "state": "ACTIVE", "source": "UPLOADED"
        });
        let file = File { project: project.to_owned(), expires: now + config.file_lifetime, json: json.clone() };
        self.files.insert(name, file);
        json
    }

    /// A new cached content of `project`, living the body's `ttl` (`"300s"`; default 1 h); its JSON.
    fn cache(&mut self, config: &MockConfig, project: &str, body: &Bytes, now: Instant) -> serde_json::Value {
        let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let ttl = (request["ttl"].as_str())
            .and_then(|ttl| ttl.strip_suffix('s')?.parse::<f64>().ok())
            .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds).ok())
            .unwrap_or(std::time::Duration::from_secs(3600))
            .min(config.file_lifetime);
        self.next += 1;
        let name = format!("cachedContents/mockcache{}", self.next);
        let created = chrono::DateTime::<chrono::Utc>::from(SystemTime::now());
        let expires = created + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero());
        let json = json!({
            "name": name, "model": request["model"].clone(),
            "createTime": created.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "expireTime": expires.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "usageMetadata": {"totalTokenCount": 4096}
        });
        let cache = File { project: project.to_owned(), expires: now + ttl, json: json.clone() };
        self.files.insert(name, cache);
        json
    }

    /// Whether a key of `project` may use file (or cached content) `name` now.
    fn usable(&self, name: &str, project: &str, now: Instant) -> bool {
        self.files.get(name).is_some_and(|file| file.project == project && now < file.expires)
    }
}

/// `http://HOST:PORT` as the client reached the mock.
fn base(parts: &Parts) -> String {
    let host = parts.headers.get(hyper::header::HOST).and_then(|value| value.to_str().ok());
    format!("http://{}", host.unwrap_or("127.0.0.1"))
}

fn with_status(mut response: Response<MockBody>, status: &'static str) -> Response<MockBody> {
    response.headers_mut().insert("x-goog-upload-status", HeaderValue::from_static(status));
    response
}
