//! Per-project resources through real HTTP: keys of two Google Cloud projects (declared in the
//! keyring's `groups` section, and the same in the mock), a file uploaded with one project's key, then
//! used. A request naming a file apijongler saw created goes to a key of the owning project, so no key
//! gets the 403 "You do not have permission to access the File ..." and none is put in error; a mapping
//! past its expiry, or a file created outside apijongler, pins nothing; a file whose project has no key
//! left fails at once, saying so.

mod common;

use std::sync::Arc;
use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream};
use api_jongler::{Clock, CoordinatorOptions, Error, ManualClock, SystemClock};
use common::Sandbox;
use common::gateway::{GEMINI, Gateway, body_json, client};
use serde_json::{Value, json};

const C: &str = GEMINI;
const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
/// key0 and key1 are keys of project A, key2 and key3 of project B.
const PROJECTS: [(&str, &str); 4] = [("key0", "proj-a"), ("key1", "proj-a"), ("key2", "proj-b"), ("key3", "proj-b")];

fn secret(key: &str) -> String {
    format!("fake-secret-{C}-{key}-do-not-use")
}

fn project_of(key: &str) -> &'static str {
    PROJECTS.iter().find(|(name, _)| *name == key).map(|(_, project)| *project).expect("a known key")
}

fn keys_of(project: &str) -> Vec<String> {
    PROJECTS.iter().filter(|(_, p)| *p == project).map(|(key, _)| (*key).to_owned()).collect()
}

/// A keyring with the keys of `keys` (names from [`PROJECTS`]) and their groups, pointed at the mock.
fn sandbox_with(keys: &[&str], port: u16) -> Sandbox {
    let mut ini = format!("[{C}]\n");
    for key in keys {
        ini.push_str(&format!("{key} = {}\n", secret(key)));
    }
    ini.push_str(&format!("[{C} groups]\n"));
    for key in keys {
        ini.push_str(&format!("{key} = {}\n", project_of(key)));
    }
    let sandbox = Sandbox::with_keyring(&ini);
    sandbox.point_connector(C, "127.0.0.1", port, json!({ "backoff_ms": 5, "timeout_secs": 10.0 }));
    sandbox
}

/// The mock Gemini, instant, whose secrets belong to the projects of [`PROJECTS`].
async fn mock() -> MockUpstream {
    let projects = PROJECTS.iter().map(|(key, project)| (secret(key), (*project).to_owned())).collect();
    MockUpstream::start(MockConfig { latency: Duration::ZERO, projects, ..MockConfig::default() }).await.unwrap()
}

/// A generateContent body that uses `file_uri`.
fn using(file_uri: &str) -> String {
    json!({"contents": [{"role": "user", "parts": [
        {"text": "Summarise the file."},
        {"fileData": {"mimeType": "text/plain", "fileUri": file_uri}}
    ]}]})
    .to_string()
}

fn errors(sandbox: &Sandbox) -> i64 {
    sandbox.count("SELECT count(*) FROM keys WHERE state = 'error'")
}

/// The secrets that reached the mock with a request naming `file` (`files/ID`).
fn secrets_naming(upstream: &MockUpstream, file: &str) -> Vec<String> {
    (upstream.seen_requests().into_iter())
        .filter(|seen| seen.path_and_query.contains(file) || String::from_utf8_lossy(&seen.body).contains(file))
        .filter_map(|seen| seen.key)
        .collect()
}

/// Through `apijongler serve`: a resumable upload started with one project's key (the chunks go with
/// their `upload_id` only), then the file used eight times, by its full URI and by its name, and read
/// and deleted by its path. Every request succeeds on a key of the owning project, the mock refuses
/// none, no key is put in error, and the database knows the file as that key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_with_one_project_s_key_is_used_on_that_project_s_keys() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let gateway = Gateway::start(&sandbox, &["--wait", "10s"], &[]);
    let http = client();
    let start = http
        .post(gateway.url(&format!("/{C}/upload/v1beta/files")))
        .header("x-goog-api-key", "placeholder")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .body(r#"{"file":{"display_name":"notes"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 200);
    let uploader = start.headers()["x-apijongler-key"].to_str().unwrap().to_owned();
    let chunk_url = start.headers()["x-goog-upload-url"].to_str().unwrap().to_owned();
    assert!(chunk_url.starts_with(&gateway.url("/")), "{chunk_url}");
    let finish = http
        .post(&chunk_url)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body("some notes")
        .send()
        .await
        .unwrap();
    assert_eq!(finish.status(), 200);
    let file = body_json(finish).await;
    let (name, uri) = (file["file"]["name"].as_str().unwrap().to_owned(), file["file"]["uri"].as_str().unwrap());
    let owner = project_of(&uploader);
    assert_eq!(upstream.file_project(&name).as_deref(), Some(owner));
    for round in 0..8 {
        let reference = if round % 2 == 0 { uri.to_owned() } else { name.clone() };
        let response = http
            .post(gateway.url(&format!("/{C}{GENERATE}")))
            .header("x-goog-api-key", "placeholder")
            .body(using(&reference))
            .send()
            .await
            .unwrap();
        let key = response.headers()["x-apijongler-key"].to_str().unwrap().to_owned();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "round {round} on {key}: {body}");
        assert_eq!(project_of(&key), owner, "round {round} went to {key}");
    }
    let get = http.get(gateway.url(&format!("/{C}/v1beta/{name}"))).header("x-goog-api-key", "p").send().await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(project_of(get.headers()["x-apijongler-key"].to_str().unwrap()), owner);
    assert_eq!(upstream.file_refusals(), 0, "no request reached the mock on another project's key");
    assert_eq!(errors(&sandbox), 0, "no key put in error");
    let owners = sandbox.count(&format!(
        "SELECT count(*) FROM resources WHERE connector = '{C}' AND name = '{name}' AND key_name = '{uploader}'
            AND quota_scope = 'group:{owner}' AND expires_at > created_at"
    ));
    assert_eq!(owners, 1, "the file is recorded as the uploader's");
    let upload_id = chunk_url.split("upload_id=").nth(1).unwrap().split('&').next().unwrap();
    let session = format!("SELECT count(*) FROM resources WHERE name LIKE 'uploads/%' AND key_name = '{uploader}'");
    assert_eq!(sandbox.count(&session), 1, "the session is recorded as the uploader's");
    let leaked = format!("SELECT count(*) FROM resources WHERE name LIKE '%{upload_id}%'");
    assert_eq!(sandbox.count(&leaked), 0, "the upload_id, a capability, is not stored");
    let used = secrets_naming(&upstream, &name);
    assert_eq!(used.len(), 9);
    assert!(used.iter().all(|used| keys_of(owner).iter().any(|key| secret(key) == *used)), "{used:?}");
}

/// The library: a simple upload answered with the file's JSON, then the file used by name in the body
/// and in the path, whichever key is least recently used: always a key of the uploader's project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_pins_requests_naming_a_file_to_its_project() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let jongler = sandbox.jongler(C).wait(Duration::from_secs(10)).connect().await.unwrap();
    let upload = jongler.request("POST", "/upload/v1beta/files", "some notes").await.unwrap();
    assert_eq!(upload.status, 200, "{}", upload.body);
    let owner = project_of(upload.key_name.as_deref().unwrap());
    let file: Value = serde_json::from_str(&upload.body).unwrap();
    let name = file["file"]["name"].as_str().unwrap().to_owned();
    for round in 0..6 {
        let response = if round % 3 == 2 {
            jongler.request("GET", &format!("/v1beta/{name}"), "").await.unwrap()
        } else {
            jongler.request("POST", GENERATE, &using(&name)).await.unwrap()
        };
        assert_eq!(response.status, 200, "round {round}: {}", response.body);
        assert_eq!(project_of(response.key_name.as_deref().unwrap()), owner, "round {round}");
    }
    // Requests naming no file still take every key in turn.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        seen.insert(jongler.request("POST", GENERATE, "{}").await.unwrap().key_name.unwrap());
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(upstream.file_refusals(), 0);
    assert_eq!(errors(&sandbox), 0);
}

/// Holds every key of `project` with a coordinator of the test's own, so that a request pinned to that
/// project has to wait.
fn hold(sandbox: &Sandbox, project: &str) -> (api_jongler::Coordinator, Vec<api_jongler::Lease>) {
    let coordinator = sandbox.coordinator(sandbox.options());
    let others: Vec<String> =
        PROJECTS.iter().filter(|(_, p)| *p != project).map(|(key, _)| (*key).to_owned()).collect();
    let leases = keys_of(project)
        .iter()
        .map(|_| coordinator.claim(C, &others, Duration::from_secs(10)).expect("a key of the project"))
        .collect();
    (coordinator, leases)
}

/// A mapping counts until its expiry (the file's `expirationTime`), then no longer: with the owning
/// project's keys all held, a request naming the file waits for them (and gives up after its wait)
/// while the mapping holds, and goes to another project's key once the jongler's clock is past it. The
/// expired row is deleted by the next resource recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_mapping_pins_nothing() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let options = CoordinatorOptions { clock: clock.clone(), ..sandbox.options() };
    let jongler = sandbox.jongler(C).coordinator(options).wait(Duration::from_millis(300)).connect().await.unwrap();
    let upload = jongler.request("POST", "/upload/v1beta/files", "some notes").await.unwrap();
    assert_eq!(upload.status, 200, "{}", upload.body);
    let owner = project_of(upload.key_name.as_deref().unwrap());
    let other = if owner == "proj-a" { "proj-b" } else { "proj-a" };
    let name = serde_json::from_str::<Value>(&upload.body).unwrap()["file"]["name"].as_str().unwrap().to_owned();
    let store = jongler.coordinator().store().clone();
    let names = [name.clone()];
    let known = store.resource_owner(C, &names, clock.now_ms()).unwrap().expect("the upload is recorded");
    assert_eq!(
        (known.key_name.as_str(), known.quota_scope),
        (upload.key_name.as_deref().unwrap(), format!("group:{owner}"))
    );
    let (_coordinator, leases) = hold(&sandbox, owner);
    match jongler.request("POST", GENERATE, &using(&name)).await {
        Err(Error::NoKeyAvailable(_)) => {}
        other => panic!("a request pinned to the held project waits, then gives up: {other:?}"),
    }
    assert!(secrets_naming(&upstream, &name).is_empty(), "nothing sent on another project's key");
    // 49 hours later (the file lives 48): the mapping no longer counts.
    clock.advance(49 * 3_600_000);
    let _ = jongler.request("POST", GENERATE, &using(&name)).await;
    let used = secrets_naming(&upstream, &name);
    assert!(!used.is_empty(), "an expired mapping does not hold the request back");
    assert!(keys_of(other).iter().any(|key| secret(key) == used[0]), "{used:?}");
    assert_eq!(store.resource_owner(C, &names, clock.now_ms()).unwrap(), None);
    drop(leases);
    // The next write of resources takes the expired row away (the new file, whose mock-given expiry is
    // already past on the jongler's clock, is not recorded either).
    let again = jongler.request("POST", "/upload/v1beta/files", "more notes").await.unwrap();
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(sandbox.count(&format!("SELECT count(*) FROM resources WHERE name = '{name}'")), 0);
}

/// A file created outside apijongler (uploaded straight to the mock with project B's secret) is
/// unknown: a request naming it is not pinned (with project A's keys held, it goes to a key of B, which
/// may use it), and nothing is recorded for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_unknown_to_apijongler_is_not_pinned() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let outside = client()
        .post(format!("{}/upload/v1beta/files", upstream.url()))
        .header("x-goog-api-key", secret("key2"))
        .body("made elsewhere")
        .send()
        .await
        .unwrap();
    let name = body_json(outside).await["file"]["name"].as_str().unwrap().to_owned();
    let jongler = sandbox.jongler(C).wait(Duration::from_secs(10)).connect().await.unwrap();
    let (_coordinator, leases) = hold(&sandbox, "proj-a");
    let response = jongler.request("POST", GENERATE, &using(&name)).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(project_of(response.key_name.as_deref().unwrap()), "proj-b");
    assert_eq!(sandbox.count("SELECT count(*) FROM resources"), 0);
    drop(leases);
}

/// When no key of the owning project is left (they left the keyring), a request naming the file fails
/// at once with a 409 in Gemini's shape that names the file and its key, instead of trying keys of
/// another project (each would get the 403) or waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_project_has_no_key_left_fails_at_once_naming_it() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let jongler = sandbox.jongler(C).connect().await.unwrap();
    let upload = jongler.request("POST", "/upload/v1beta/files", "some notes").await.unwrap();
    let uploader = upload.key_name.clone().unwrap();
    let owner = project_of(&uploader);
    let name = serde_json::from_str::<Value>(&upload.body).unwrap()["file"]["name"].as_str().unwrap().to_owned();
    drop(jongler);
    // The keyring keeps only the other project's keys: the owner's are retired at the next sync.
    let kept: Vec<&str> = PROJECTS.iter().filter(|(_, p)| *p != owner).map(|(key, _)| *key).collect();
    let mut ini = format!("[{C}]\n");
    kept.iter().for_each(|key| ini.push_str(&format!("{key} = {}\n", secret(key))));
    ini.push_str(&format!("[{C} groups]\n"));
    kept.iter().for_each(|key| ini.push_str(&format!("{key} = {}\n", project_of(key))));
    std::fs::write(&sandbox.keyring, ini).unwrap();
    // Applied as the truth: on a shared store (PostgreSQL) the gateway's own sync would retire nothing.
    let synced = sandbox.apijongler().args(["--quiet", "sync", "--as-truth"]).output().unwrap();
    assert!(synced.status.success(), "{}", String::from_utf8_lossy(&synced.stderr));
    let gateway = Gateway::start(&sandbox, &["--wait", "60s"], &[]);
    let started = std::time::Instant::now();
    let response = client()
        .post(gateway.url(&format!("/{C}{GENERATE}")))
        .header("x-goog-api-key", "placeholder")
        .body(using(&name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body = body_json(response).await;
    assert!(started.elapsed() < Duration::from_secs(30), "failed at once, not after the 60 s wait");
    assert_eq!(body["error"]["code"], 409, "{body}");
    assert_eq!(body["error"]["status"], "ABORTED", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&name) && message.contains(&uploader) && message.contains(owner), "{message}");
    assert!(secrets_naming(&upstream, &name).is_empty(), "no other project's key was tried");
    assert_eq!(errors(&sandbox), 0);
}

/// While every key of the owning project is held, a request naming the file waits (it takes no key
/// of the other project, though both are free), and gets the first key of the project given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_request_waits_for_a_key_of_the_owning_project() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let jongler = sandbox.jongler(C).wait(Duration::from_secs(30)).connect().await.unwrap();
    let upload = jongler.request("POST", "/upload/v1beta/files", "some notes").await.unwrap();
    let owner = project_of(upload.key_name.as_deref().unwrap());
    let name = serde_json::from_str::<Value>(&upload.body).unwrap()["file"]["name"].as_str().unwrap().to_owned();
    let (_coordinator, mut leases) = hold(&sandbox, owner);
    let given_back = leases[0].key_name().to_owned();
    let jongler = Arc::new(jongler);
    let waiting = tokio::spawn({
        let (jongler, body) = (Arc::clone(&jongler), using(&name));
        async move { jongler.request("POST", GENERATE, &body).await }
    });
    // The request waits: nothing reaches the upstream while the owner's keys are held.
    let waiters = "SELECT count(*) FROM history WHERE event = 'claimed'";
    let claims_before = sandbox.count(waiters);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(secrets_naming(&upstream, &name).is_empty(), "sent on another project's key");
    assert_eq!(sandbox.count(waiters), claims_before, "no key claimed for it meanwhile");
    leases.remove(0).release().unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), waiting).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.key_name.as_deref(), Some(given_back.as_str()), "the owner's key given back");
    assert_eq!(errors(&sandbox), 0);
}

/// A jongler that keeps its key per connection gives it back when a request names a file of another
/// project, and claims a key of that project instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_kept_per_connection_is_given_back_for_another_project_s_file() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let kept = sandbox.jongler(C).scope(api_jongler::LeaseScope::PerConnection).connect().await.unwrap();
    let first = kept.request("POST", GENERATE, "{}").await.unwrap();
    let held = first.key_name.clone().unwrap();
    let other = if project_of(&held) == "proj-a" { "proj-b" } else { "proj-a" };
    // Another jongler uploads with a key of the other project (the held one's sibling is held too).
    let sibling: Vec<String> = keys_of(project_of(&held)).into_iter().filter(|key| *key != held).collect();
    let coordinator = sandbox.coordinator(sandbox.options());
    let not_sibling: Vec<String> =
        PROJECTS.iter().map(|(key, _)| (*key).to_owned()).filter(|key| !sibling.contains(key)).collect();
    let sibling_lease = coordinator.claim(C, &not_sibling, Duration::from_secs(10)).unwrap();
    assert_eq!(sibling_lease.key_name(), sibling[0]);
    let uploader = sandbox.jongler(C).connect().await.unwrap();
    let upload = uploader.request("POST", "/upload/v1beta/files", "notes").await.unwrap();
    assert_eq!(project_of(upload.key_name.as_deref().unwrap()), other);
    let name = serde_json::from_str::<Value>(&upload.body).unwrap()["file"]["name"].as_str().unwrap().to_owned();
    drop(uploader);
    let response = kept.request("POST", GENERATE, &using(&name)).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(project_of(response.key_name.as_deref().unwrap()), other);
    assert_eq!(upstream.file_refusals(), 0);
    assert_eq!(errors(&sandbox), 0);
    drop(sibling_lease);
}

/// Cached contents are pinned the same way: one created with a key of one project (from a file of that
/// project, which pins the creation itself) serves requests naming it (`cachedContent`) on that
/// project's keys only, and is read and deleted there by its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_content_is_used_on_its_project_s_keys() {
    let upstream = mock().await;
    let sandbox = sandbox_with(&["key0", "key1", "key2", "key3"], upstream.port());
    let jongler = sandbox.jongler(C).wait(Duration::from_secs(10)).connect().await.unwrap();
    let upload = jongler.request("POST", "/upload/v1beta/files", "a long document").await.unwrap();
    let owner = project_of(upload.key_name.as_deref().unwrap());
    let file = serde_json::from_str::<Value>(&upload.body).unwrap()["file"]["name"].as_str().unwrap().to_owned();
    let create = json!({"model": "models/gemini-2.5-flash", "ttl": "600s", "contents": [{"role": "user", "parts": [
        {"fileData": {"mimeType": "text/plain", "fileUri": file}}]}]});
    let cached = jongler.request("POST", "/v1beta/cachedContents", &create.to_string()).await.unwrap();
    assert_eq!(cached.status, 200, "{}", cached.body);
    assert_eq!(project_of(cached.key_name.as_deref().unwrap()), owner, "the creation names the file");
    let name = serde_json::from_str::<Value>(&cached.body).unwrap()["name"].as_str().unwrap().to_owned();
    let using_cache = json!({"cachedContent": name, "contents": [{"role": "user", "parts": [{"text": "And?"}]}]});
    for round in 0..6 {
        let response = jongler.request("POST", GENERATE, &using_cache.to_string()).await.unwrap();
        assert_eq!(response.status, 200, "round {round}: {}", response.body);
        assert_eq!(project_of(response.key_name.as_deref().unwrap()), owner, "round {round}");
    }
    let read = jongler.request("GET", &format!("/v1beta/{name}"), "").await.unwrap();
    assert_eq!((read.status, project_of(read.key_name.as_deref().unwrap())), (200, owner), "{}", read.body);
    let deleted = jongler.request("DELETE", &format!("/v1beta/{name}"), "").await.unwrap();
    assert_eq!((deleted.status, project_of(deleted.key_name.as_deref().unwrap())), (200, owner));
    let expiry = sandbox.count(&format!(
        "SELECT count(*) FROM resources WHERE name = '{name}' AND expires_at - created_at BETWEEN 590000 AND 610000"
    ));
    assert_eq!(expiry, 1, "the cached content's expireTime is recorded");
    assert_eq!(upstream.file_refusals(), 0);
    assert_eq!(errors(&sandbox), 0);
}

/// The pinned claim is the same one statement: a pinned request walks its scope's keys alone, least
/// recently used first, on their own index (no sort, whatever the number of keys of other scopes), and
/// the unpinned walks are unchanged.
#[test]
fn the_pinned_claim_walks_the_scope_s_own_index() {
    let sandbox = Sandbox::new(C, 3);
    let coordinator = sandbox.coordinator(sandbox.options());
    let plan = coordinator.store().explain_claim().expect("plan");
    if common::store::on_postgres() {
        assert!(plan.iter().any(|step| step.contains("using keys_scope_lru on keys k")), "{plan:?}");
        assert!(plan.iter().any(|step| step.contains("using keys_lru on keys k")), "{plan:?}");
        assert!(!plan.iter().any(|step| step.contains("Sort")), "no sort: {plan:?}");
        return;
    }
    assert!(
        plan.iter().any(|step| step.contains("USING INDEX keys_scope_lru (connector=? AND quota_scope=?)")),
        "{plan:?}"
    );
    assert!(plan.iter().any(|step| step.contains("USING INDEX keys_lru")), "{plan:?}");
    assert!(plan.iter().any(|step| step.contains("USING INDEX keys_claim_order")), "{plan:?}");
    assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "no sort: {plan:?}");
}
