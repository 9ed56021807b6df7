//! The request layer through the real HTTP path, against a loopback mock playing the real upstream
//! answers: what each answer does to the key and to the caller, the JSON API, the `requests` table,
//! and Tor through a SOCKS5 server that proves the traffic went through it.

mod common;
#[allow(dead_code)]
mod fixtures {
    include!("fixtures/upstream_bodies.rs");
}

use std::time::Duration;

use api_jongler::{Error, Jongler, JonglerBuilder, LeaseScope};
use common::Sandbox;
use common::socks::Socks5;
use fixtures::*;
use tokio::net::TcpListener;
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const GEMINI: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const MODEL: &str = "gemini-2.5-flash";

fn secret(index: usize) -> String {
    format!("fake-secret-{GEMINI}-{index}-do-not-use")
}

/// A sandbox whose Gemini connector points at `host:port` over plain HTTP, with quick backoffs.
fn gemini_sandbox(keys: usize, host: &str, port: u16) -> Sandbox {
    let sandbox = Sandbox::new(GEMINI, keys);
    let policy = serde_json::json!({ "backoff_ms": 5, "retries": 2, "timeout_secs": 2.0 });
    sandbox.point_connector(GEMINI, host, port, policy);
    sandbox
}

fn builder(sandbox: &Sandbox) -> JonglerBuilder {
    sandbox.jongler(GEMINI)
}

fn port(server: &MockServer) -> u16 {
    server.address().port()
}

/// Key 0 gets `first`, every other key gets 200.
async fn server_where_key0_gets(first: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("x-goog-api-key", secret(0).as_str()))
        .respond_with(first)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(r#"{"candidates":[]}"#, "application/json"))
        .mount(&server)
        .await;
    server
}

fn json(status: u16, body: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.to_owned(), "application/json")
}

fn state_of(sandbox: &Sandbox, key: &str) -> (String, Option<i64>, Option<String>) {
    let row = sandbox.sql().row("SELECT state, lockdown_until, reason FROM keys WHERE key_name = ?1", &[&key]);
    let row = row.expect("key row");
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn each_answer_does_what_the_policy_table_says_to_the_key_and_the_caller() {
    // (answer to key0, key0's state after, final status the caller sees, attempts)
    let rows: Vec<(&str, ResponseTemplate, &str, u16, u32)> = vec![
        ("200", json(200, r#"{"candidates":[]}"#), "vacant", 200, 1),
        ("429 per minute", json(429, GEMINI_429_MINUTE), "lockdown", 200, 2),
        ("429 per day", json(429, GEMINI_429_DAY), "lockdown", 200, 2),
        ("429 quota 0", json(429, GEMINI_429_ZERO), "lockdown", 200, 2),
        ("429 bare", json(429, GEMINI_429_BARE), "lockdown", 200, 2),
        ("429 Retry-After", json(429, HF_429).insert_header("retry-after", "120"), "lockdown", 200, 2),
        ("429 ratelimit t", json(429, HF_429).insert_header("ratelimit", "\"api\";r=0;t=55"), "lockdown", 200, 2),
        ("509", ResponseTemplate::new(509), "lockdown", 200, 2),
        ("400 API_KEY_INVALID", json(400, GEMINI_400_INVALID), "error", 200, 2),
        ("400 expired", json(400, GEMINI_400_EXPIRED), "error", 200, 2),
        ("401", json(401, HF_401), "error", 200, 2),
        ("403 leaked", json(403, GEMINI_403_LEAKED), "error", 200, 2),
        ("403 disabled", json(403, GEMINI_403_DISABLED), "error", 200, 2),
        ("402 credits", json(402, HF_402), "lockdown", 200, 2),
        ("400 location", json(400, GEMINI_400_LOCATION), "vacant", 400, 1),
        ("400 bad request", json(400, GEMINI_400_BAD_REQUEST), "vacant", 400, 1),
        ("404", json(404, GEMINI_404), "vacant", 404, 1),
        ("410", json(410, HF_410), "vacant", 410, 1),
        // Provider trouble on key0 only: backed off, retried on the least recently used key (key1).
        ("503 overload", json(503, GEMINI_503), "vacant", 200, 2),
        (
            "503 loading",
            json(503, r#"{"error":"Model x is currently loading","estimated_time":0.01}"#),
            "vacant",
            200,
            2,
        ),
        ("500", json(500, GEMINI_500), "vacant", 200, 2),
        ("504", json(504, GEMINI_504), "vacant", 200, 2),
    ];
    for (name, answer, key0_after, status, attempts) in rows {
        let server = server_where_key0_gets(answer).await;
        let sandbox = gemini_sandbox(2, "127.0.0.1", port(&server));
        let jongler = builder(&sandbox).connect().await.expect("connect");
        let response = jongler.request("POST", ENDPOINT, "{}").await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((response.status, response.attempts), (status, attempts), "{name}");
        // The state as the next request for the same model sees it: a 429 that names the model locks that
        // model (the key stays vacant for others), a 402 the whole key.
        let (stored, _, reason) = state_of(&sandbox, "key0");
        let for_model = jongler.key_states_for(Some(MODEL)).await.expect("states");
        let state = if for_model.lockdown.contains("key0") { "lockdown" } else { stored.as_str() };
        assert_eq!(state, key0_after, "{name}: key0 is {state} ({reason:?})");
        assert_eq!(state_of(&sandbox, "key1").0, "vacant", "{name}: key1 is released");
        if state == "lockdown" {
            let until =
                sandbox.count("SELECT max(until) FROM lockdowns WHERE scope = 'key:key0' OR scope LIKE '%key0'");
            assert!(until > jongler.coordinator().now_ms(), "{name}: deadline ahead");
        }
        assert_eq!(
            sandbox.count("SELECT count(*) FROM requests"),
            i64::from(attempts),
            "{name}: every attempt is recorded"
        );
    }
}

#[tokio::test]
async fn provider_outages_are_retried_a_bounded_number_of_times_and_blame_no_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(json(503, GEMINI_503)).mount(&server).await;
    let sandbox = gemini_sandbox(3, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    for _ in 0..5 {
        let response = jongler.request("POST", ENDPOINT, "{}").await.expect("an answer");
        assert_eq!((response.status, response.attempts), (503, 3), "1 try + 2 retries (the connector's budget)");
    }
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
}

#[tokio::test]
async fn every_key_rate_limited_gives_an_error_naming_the_states() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(json(429, GEMINI_429_MINUTE)).mount(&server).await;
    let sandbox = gemini_sandbox(2, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    let error = jongler.request("POST", ENDPOINT, "{}").await.expect_err("no key left");
    let message = error.to_string();
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error:?}");
    assert!(message.contains("2 locked down for it until"), "{message}");
    assert!(message.contains(&format!("free for {MODEL}")) && message.contains("per-minute quota"), "{message}");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 2, "each key was tried once");
}

#[tokio::test]
async fn a_bad_key_is_never_used_again_until_cleanup() {
    let server = server_where_key0_gets(json(400, GEMINI_400_INVALID)).await;
    let sandbox = gemini_sandbox(2, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    for _ in 0..6 {
        assert_eq!(jongler.request("POST", ENDPOINT, "{}").await.expect("ok").key_name.as_deref(), Some("key1"));
    }
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE key_name = 'key0'"), 1);
    assert_eq!(jongler.error_keys().await.expect("states"), ["key0"]);
    jongler.cleanup(false).await.expect("cleanup");
    assert!(jongler.error_keys().await.expect("states").is_empty());
}

#[tokio::test]
async fn timeouts_and_refused_connections_blame_no_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(json(200, "{}").set_delay(Duration::from_secs(5))).mount(&server).await;
    let sandbox = gemini_sandbox(2, "127.0.0.1", port(&server));
    // Allowed to send a timed-out POST again (see tests/upstream_limits.rs for the default: once).
    let jongler =
        builder(&sandbox).timeout(Duration::from_millis(200)).retry_timeouts(true).connect().await.expect("connect");
    let error = jongler.request("POST", ENDPOINT, "{}").await.expect_err("times out");
    assert!(matches!(error, Error::Transport { attempts: 3, .. }), "{error:?}");
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"));
    let outcomes: Vec<String> = sandbox.sql().column("SELECT outcome FROM requests", &[]).expect("outcomes");
    assert_eq!(outcomes, ["timeout", "timeout", "timeout"]);

    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let sandbox = gemini_sandbox(2, "127.0.0.1", closed_port);
    let jongler = builder(&sandbox).connect().await.expect("connect");
    let error = jongler.request("POST", ENDPOINT, "{}").await.expect_err("refused");
    assert!(matches!(error, Error::Transport { .. }), "{error:?}");
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"));
}

#[tokio::test]
async fn request_json_returns_data_or_a_typed_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path("/ok"))
        .respond_with(json(200, r#"{"answer":42}"#))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path("/text"))
        .respond_with(ResponseTemplate::new(200).set_body_string("plain words"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path("/missing"))
        .respond_with(json(404, GEMINI_404))
        .mount(&server)
        .await;
    let sandbox = gemini_sandbox(1, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    let body = serde_json::json!({"contents": []});
    assert_eq!(jongler.request_json("/ok", &body).await.expect("json"), serde_json::json!({"answer": 42}));
    match jongler.request_json("/missing?alt=json", &body).await {
        Err(Error::Upstream { status: 404, body, .. }) => assert_eq!(body["error"]["status"], "NOT_FOUND"),
        other => panic!("expected an upstream error, got {other:?}"),
    }
    match jongler.request_json("/text", &body).await {
        Err(Error::NotJson { status: 200, text }) => assert_eq!(text, "plain words"),
        other => panic!("expected not-json, got {other:?}"),
    }
    let endpoints: Vec<String> =
        sandbox.sql().column("SELECT endpoint FROM requests ORDER BY id", &[]).expect("endpoints");
    assert_eq!(endpoints, ["/ok", "/missing", "/text"], "recorded without the query string");
}

#[tokio::test]
async fn per_connection_scope_holds_one_key_until_it_is_rate_limited() {
    // key0 answers 200 three times, then Gemini's 429; every other key answers 200.
    let server = MockServer::start().await;
    let ok = || json(200, r#"{"candidates":[]}"#);
    let key0 = || Mock::given(method("POST")).and(header("x-goog-api-key", secret(0).as_str()));
    key0().respond_with(ok()).up_to_n_times(3).with_priority(1).mount(&server).await;
    let limited = json(429, r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#);
    key0().respond_with(limited).with_priority(2).mount(&server).await;
    Mock::given(method("POST")).respond_with(ok()).with_priority(3).mount(&server).await;

    let sandbox = gemini_sandbox(2, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).scope(LeaseScope::PerConnection).connect().await.expect("connect");
    assert_eq!(jongler.locked_keys().await.expect("states"), ["key0"], "claimed at connect");
    for _ in 0..3 {
        assert_eq!(jongler.request("POST", ENDPOINT, "{}").await.expect("ok").key_name.as_deref(), Some("key0"));
    }
    assert_eq!(jongler.locked_keys().await.expect("states"), ["key0"], "still held between requests");
    // The 429 puts key0 in lockdown; the request goes through on key1, which is kept from then on.
    let response = jongler.request("POST", ENDPOINT, "{}").await.expect("answered");
    assert_eq!((response.status, response.key_name.as_deref(), response.attempts), (200, Some("key1"), 2));
    let for_model = jongler.key_states_for(Some(MODEL)).await.expect("states");
    assert_eq!(for_model.lockdown.into_iter().collect::<Vec<_>>(), ["key0"], "the rate-limited key is not kept");
    assert_eq!(jongler.locked_keys().await.expect("states"), ["key1"]);
    assert_eq!(jongler.request("POST", ENDPOINT, "{}").await.expect("ok").key_name.as_deref(), Some("key1"));
    jongler.disconnect().await.expect("disconnect");
    assert!(jongler.locked_keys().await.expect("states").is_empty());
}

#[tokio::test]
async fn keyless_connectors_claim_nothing() {
    let server = MockServer::start().await;
    Mock::given(method("GET")).respond_with(json(200, r#"{"origin":"127.0.0.1"}"#)).mount(&server).await;
    let sandbox = Sandbox::with_keyring("[other]\nk = fake\n");
    let dir = sandbox.dir.path().join("connectors");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let connector = serde_json::json!({"name": "httpbin.org", "host": "127.0.0.1", "port": port(&server),
        "protocol": "http", "requires_api_key": false});
    std::fs::write(dir.join("httpbin.json"), connector.to_string()).expect("write");
    let missing_keyring = sandbox.dir.path().join("none.ini");
    let jongler = Jongler::builder("httpbin.org")
        .keyring(&missing_keyring)
        .database(&sandbox.db)
        .connectors_dir(&dir)
        .connect()
        .await
        .expect("no keyring needed");
    let response = jongler.request("GET", "/ip", "").await.expect("ok");
    assert_eq!((response.status, response.key_name), (200, None));
}

#[tokio::test]
async fn unknown_connectors_and_methods_are_explained() {
    let sandbox = Sandbox::new(GEMINI, 1);
    let error = Jongler::builder("gemini").keyring(&sandbox.keyring).database(&sandbox.db).connect().await;
    let message = error.expect_err("unknown").to_string();
    assert!(message.contains("unknown connector 'gemini'") && message.contains(GEMINI), "{message}");
    let server = MockServer::start().await;
    let sandbox = sandbox_at(&server);
    let jongler = builder(&sandbox).connect().await.expect("connect");
    let message = jongler.request("GE T", ENDPOINT, "").await.expect_err("bad method").to_string();
    assert!(message.contains("not an HTTP method"), "{message}");
}

fn sandbox_at(server: &MockServer) -> Sandbox {
    gemini_sandbox(1, "127.0.0.1", port(server))
}

#[tokio::test]
async fn tor_sends_everything_through_socks_and_a_location_refusal_gets_a_new_circuit() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json(400, GEMINI_400_LOCATION))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(json(200, "{}")).mount(&server).await;
    let socks = Socks5::redirecting_to(*server.address()).await;
    // A host name that only the proxy can resolve: the request works only if DNS went through it too.
    let sandbox = gemini_sandbox(1, "gemini.through-tor.invalid", 80);
    let jongler = builder(&sandbox).tor_proxy(socks.url()).connect().await.expect("connect");
    let response = jongler.request("POST", ENDPOINT, "{}").await.expect("answer");
    assert_eq!((response.status, response.attempts), (200, 2), "retried after the location refusal");
    let seen = socks.requests();
    assert_eq!(seen.len(), 2, "both attempts went through the SOCKS server: {seen:?}");
    assert!(seen.iter().all(|(_, host)| host == "gemini.through-tor.invalid"), "{seen:?}");
    assert_ne!(seen[0].0, seen[1].0, "the retry used new credentials, so a new circuit");
    assert_eq!(state_of(&sandbox, "key0").0, "vacant", "the location refusal is not the key's fault");
}

#[test]
fn the_blocking_wrapper_needs_no_runtime_of_its_own() {
    let server_runtime = tokio::runtime::Runtime::new().expect("runtime");
    let config = api_jongler::mock::MockConfig::default();
    let mock = server_runtime.block_on(api_jongler::mock::MockUpstream::start(config)).expect("mock");
    let sandbox = gemini_sandbox(2, "127.0.0.1", mock.port());
    let jongler = api_jongler::BlockingJongler::connect(builder(&sandbox)).expect("connect");
    let answer = jongler.request_json(ENDPOINT, &serde_json::json!({"contents": []})).expect("json");
    assert_eq!(answer["candidates"][0]["finishReason"], "STOP");
    assert_eq!(jongler.available_keys().expect("keys"), ["key0", "key1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_connection_jongler_dropped_without_disconnect_gives_its_key_back() {
    let server = server_where_key0_gets(json(200, "{}")).await;
    let sandbox = gemini_sandbox(1, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).scope(LeaseScope::PerConnection).connect().await.expect("connect");
    assert_eq!(jongler.locked_keys().await.expect("states"), ["key0"]);
    drop(jongler);
    let db = sandbox.db.clone();
    let released = move || {
        common::Sql::open(&db).value::<String>("SELECT state FROM keys", &[]).is_ok_and(|state| state == "vacant")
    };
    tokio::task::spawn_blocking(move || common::wait_until(Duration::from_secs(60), "the key released", released))
        .await
        .expect("join");
}

#[tokio::test]
async fn a_key_whose_secret_another_keyring_changed_is_never_sent_with_the_old_one() {
    let server = server_where_key0_gets(json(200, "{}")).await;
    let sandbox = gemini_sandbox(1, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    let other = sandbox.dir.path().join("other.ini");
    std::fs::write(&other, format!("[{GEMINI}]\nkey0 = fake-rotated-secret\n")).expect("write");
    let coordinator = api_jongler::Coordinator::open(sandbox.options()).expect("open");
    coordinator.sync_as_truth(&api_jongler::Keyring::load(&other).expect("keyring")).expect("sync");
    let error = jongler.request("POST", ENDPOINT, "{}").await.expect_err("stale keyring");
    if common::on_postgres() {
        // A host sharing the pool passes over a key it has another secret for (tests/shared_keyrings.rs).
        assert!(matches!(error, Error::NoKeyAvailable(_)), "{error:?}");
        assert!(error.to_string().contains("can be used from this host"), "{error}");
    } else {
        assert!(matches!(error, Error::KeyringDiffers { .. }), "{error:?}");
        assert!(error.to_string().contains("another secret"), "{error}");
    }
    assert!(server.received_requests().await.expect("recorded").is_empty(), "nothing was sent");
}

/// A value the caller left in the connector's key header never goes upstream: the header carries the
/// pool key, once.
#[tokio::test]
async fn the_key_header_carries_the_pool_key_and_nothing_else() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(json(200, r#"{"candidates":[]}"#)).mount(&server).await;
    let sandbox = gemini_sandbox(1, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    let mut outgoing = api_jongler::Outgoing::new(reqwest::Method::POST, ENDPOINT, "{}");
    outgoing.headers.insert("x-goog-api-key", "the-client-s-own-value".parse().expect("value"));
    assert_eq!(jongler.send(outgoing).await.expect("answer").status, 200);
    let received = server.received_requests().await.expect("recorded");
    let values: Vec<&str> =
        received[0].headers.get_all("x-goog-api-key").iter().map(|value| value.to_str().expect("text")).collect();
    assert_eq!(values, [secret(0).as_str()]);
}

/// The `requests` table's outcome is one word of the pool's vocabulary: it reads back as the word it
/// was written as, and a word the pool does not know (a typo, a newer version's) fails the read
/// instead of passing through as text.
#[tokio::test]
async fn stored_outcomes_read_back_and_unknown_words_are_refused() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(json(200, "{}")).mount(&server).await;
    let sandbox = gemini_sandbox(1, "127.0.0.1", port(&server));
    let jongler = builder(&sandbox).connect().await.expect("connect");
    assert_eq!(jongler.request("POST", ENDPOINT, "{}").await.expect("request").status, 200);
    let attempts = jongler.coordinator().store().attempts(None).expect("attempts");
    let outcomes: Vec<String> = attempts.iter().map(|attempt| attempt.outcome.to_string()).collect();
    assert_eq!(outcomes, ["success"]);
    sandbox.sql().execute("UPDATE requests SET outcome = 'sucess'", &[]).expect("update");
    let error = jongler.coordinator().store().attempts(None).expect_err("an unknown outcome is refused");
    let mut chain = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        chain = format!("{chain}: {inner}");
        cause = inner.source();
    }
    assert!(chain.contains("unknown request outcome \"sucess\""), "{chain}");
}
