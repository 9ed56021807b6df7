//! One answer seen on every key is not the keys' fault: through real HTTP against the loopback mock,
//! an answer that blames a key's credentials puts that key in error only once another key answered
//! the same request past its credentials; the same answer from two keys stops the request, with the
//! upstream's words and no key in error.

mod common;

use api_jongler::mock::{MockConfig, MockUpstream, UNAUTHENTICATED};
use api_jongler::pool::HistoryEvent;
use common::Sandbox;

/// A connector the user wrote for a Gemini-compatible endpoint, in the seed's documented format: no
/// `api_key_header`, so the keys go out as `Authorization: Bearer`, which Gemini's native paths refuse.
const PROXY: &str = "gemini-proxy";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

fn secret(connector: &str, index: usize) -> String {
    format!("fake-secret-{connector}-{index}-do-not-use")
}

fn keys_in_error(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .sql()
        .column("SELECT key_name FROM keys WHERE state = 'error' ORDER BY key_name", &[])
        .expect("keys in error")
}

/// A sandbox with `keys` keys for `connector`, pointed at `mock` through a connector file in the
/// seed's format (`seed_format`), or with the key in Gemini's header.
fn sandbox_for(connector: &str, keys: usize, mock: &MockUpstream, seed_format: bool) -> Sandbox {
    let sandbox = Sandbox::new(connector, keys);
    if seed_format {
        let dir = sandbox.connectors_dir();
        std::fs::create_dir_all(&dir).expect("mkdir connectors");
        let file = serde_json::json!({
            "name": connector, "host": "127.0.0.1", "port": mock.port(), "protocol": "http",
            "format": "json", "requires_api_key": true
        });
        std::fs::write(dir.join(format!("{connector}.json")), file.to_string()).expect("write connector");
    } else {
        sandbox.point_connector(connector, "127.0.0.1", mock.port(), serde_json::json!({ "backoff_ms": 5 }));
    }
    sandbox
}

async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(config).await.expect("start the mock")
}

#[tokio::test]
async fn a_connector_that_sends_the_key_wrong_puts_no_key_in_error() {
    let upstream = mock(MockConfig { gemini_auth: true, ..MockConfig::default() }).await;
    let sandbox = sandbox_for(PROXY, 4, &upstream, true);
    let jongler = sandbox.jongler(PROXY).connect().await.expect("jongler");
    for round in 1..=3 {
        let response = jongler.request("POST", ENDPOINT, "{}").await.expect("an answer");
        assert_eq!(response.status, 401, "round {round}: the upstream's status");
        assert_eq!(response.body, UNAUTHENTICATED, "round {round}: the upstream's own words");
        assert_eq!(response.attempts, 3, "round {round}: two keys alike, one more free at once, then it stops");
        assert_eq!(keys_in_error(&sandbox), Vec::<String>::new(), "round {round}: no key is at fault");
    }
    let seen = upstream.seen_requests();
    assert_eq!(seen.len(), 9, "three attempts per request");
    assert!(seen.iter().all(|request| request.headers.iter().any(|(name, _)| name == "authorization")));
}

#[tokio::test]
async fn a_bad_key_among_good_ones_goes_to_error_once_another_key_answers() {
    let connector = "gemini-direct";
    let bad = secret(connector, 0);
    let upstream = mock(MockConfig { bad_keys: [bad].into(), ..MockConfig::default() }).await;
    let sandbox = sandbox_for(connector, 3, &upstream, false);
    let jongler = sandbox.jongler(connector).connect().await.expect("jongler");
    // Every key is unused, so the first request may take any; three requests take each key once.
    for round in 1..=3 {
        let response = jongler.request("POST", ENDPOINT, "{}").await.expect("an answer");
        assert_eq!(response.status, 200, "round {round}: another key answered");
    }
    assert_eq!(keys_in_error(&sandbox), vec!["key0".to_owned()], "exactly the key at fault");
    let history = sandbox.history();
    let errored: Vec<_> = history.iter().filter(|row| row.event == HistoryEvent::Errored).collect();
    assert_eq!(errored.len(), 1, "{history:#?}");
    assert!(errored[0].reason.contains("API_KEY_INVALID"), "the answer's reason: {}", errored[0].reason);
    assert!(errored[0].reason.contains("confirmed"), "says why it is the key's: {}", errored[0].reason);
}

#[tokio::test]
async fn every_key_refused_alike_is_the_configuration_and_the_caller_hears_the_upstream() {
    let connector = "gemini-direct";
    let bad = (0..3).map(|index| secret(connector, index)).collect();
    let upstream = mock(MockConfig { bad_keys: bad, ..MockConfig::default() }).await;
    let sandbox = sandbox_for(connector, 3, &upstream, false);
    let jongler = sandbox.jongler(connector).connect().await.expect("jongler");
    let response = jongler.request("POST", ENDPOINT, "{}").await.expect("an answer");
    assert_eq!(response.status, 400);
    assert!(response.body.contains("API key not valid"), "the upstream's words: {}", response.body);
    assert_eq!(response.attempts, 3, "two keys alike, then the third, free at once");
    assert_eq!(keys_in_error(&sandbox), Vec::<String>::new());
}

#[tokio::test]
async fn two_keys_refused_alike_and_no_third_free_stop_at_the_second() {
    let upstream = mock(MockConfig { gemini_auth: true, ..MockConfig::default() }).await;
    let sandbox = sandbox_for(PROXY, 2, &upstream, true);
    let jongler = sandbox.jongler(PROXY).connect().await.expect("jongler");
    let response = jongler.request("POST", ENDPOINT, "{}").await.expect("an answer");
    assert_eq!((response.status, response.attempts), (401, 2));
    assert_eq!(response.body, UNAUTHENTICATED);
    assert_eq!(keys_in_error(&sandbox), Vec::<String>::new());
    assert_eq!(sandbox.count("SELECT count(*) FROM keys WHERE state = 'locked'"), 0, "the suspect was let go");
}

#[tokio::test]
async fn a_pool_of_one_refused_key_answers_with_the_upstreams_words() {
    let connector = "gemini-direct";
    let upstream = mock(MockConfig { bad_keys: [secret(connector, 0)].into(), ..MockConfig::default() }).await;
    let sandbox = sandbox_for(connector, 1, &upstream, false);
    let jongler = sandbox.jongler(connector).connect().await.expect("jongler");
    let response = jongler.request("POST", ENDPOINT, "{}").await.expect("the upstream's answer, not 'no key'");
    assert_eq!(response.status, 400);
    assert!(response.body.contains("API key not valid"), "{}", response.body);
    assert_eq!(response.attempts, 1);
    assert_eq!(keys_in_error(&sandbox), Vec::<String>::new(), "no other key showed it is the key's fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_through_a_misconfigured_connector_all_end_with_no_key_in_error() {
    let upstream = mock(MockConfig { gemini_auth: true, ..MockConfig::default() }).await;
    let sandbox = sandbox_for(PROXY, 4, &upstream, true);
    let jongler = sandbox.jongler(PROXY).wait(std::time::Duration::from_secs(30)).connect().await.expect("jongler");
    // As many requests as keys, at once: each may hold a suspect while it looks for another key.
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let jongler = jongler.clone();
            tokio::spawn(async move { jongler.request("POST", ENDPOINT, "{}").await })
        })
        .collect();
    for request in requests {
        let response = request.await.expect("the task").expect("an answer, not 'no key'");
        assert_eq!(response.status, 401);
        assert_eq!(response.body, UNAUTHENTICATED);
    }
    assert_eq!(keys_in_error(&sandbox), Vec::<String>::new());
    assert_eq!(sandbox.count("SELECT count(*) FROM keys WHERE state = 'locked'"), 0, "every suspect was let go");
}

#[tokio::test]
async fn an_answer_that_echoes_the_key_reaches_the_caller_without_it() {
    let connector = "gemini-echo";
    let secret = secret(connector, 0);
    let echoed = format!(
        r#"{{"error":{{"code":403,"message":"Consumer 'api_key:{secret}' has been suspended.","status":"PERMISSION_DENIED"}}}}"#
    );
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(403).set_body_raw(echoed, "application/json"))
        .mount(&server)
        .await;
    let sandbox = Sandbox::new(connector, 1);
    sandbox.point_connector(connector, "127.0.0.1", server.address().port(), serde_json::json!({ "backoff_ms": 5 }));
    let jongler = sandbox.jongler(connector).connect().await.expect("jongler");
    let response = jongler.request("POST", ENDPOINT, "{}").await.expect("the upstream's answer");
    assert_eq!(response.status, 403);
    assert!(!response.body.contains(&secret), "the secret reached the caller: {}", response.body);
    assert!(
        response.body.contains("Consumer 'api_key:[key withheld by apijongler]' has been suspended."),
        "{}",
        response.body
    );
}

/// A 5xx teaches nothing about a suspect, but the backoff after it is short (within the suspect's
/// hold): the request keeps its suspect through the pause, so a request that comes meanwhile does not
/// spend an attempt on a key that most likely is bad. Key 0 refuses; key 1 answers 503 once (a 300 ms
/// backoff follows), then 200. A second request sent during that pause gets key 1, never key 0; by the
/// time the pause is over key 0 is held or already in error, so this holds however late the second
/// request comes. (A pause longer than the hold lets the suspect go: tests/review15.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_is_kept_through_a_short_backoff() {
    use wiremock::matchers::{header, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let connector = "gemini-short-backoff";
    let server = MockServer::start().await;
    let json =
        |status: u16, body: &str| ResponseTemplate::new(status).set_body_raw(body.to_owned(), "application/json");
    let invalid = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;
    let overloaded =
        r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;
    let bad = secret(connector, 0);
    Mock::given(method("POST"))
        .and(header("x-goog-api-key", bad.as_str()))
        .respond_with(json(400, invalid))
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(json(503, overloaded)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("POST")).respond_with(json(200, r#"{"candidates":[]}"#)).mount(&server).await;
    let sandbox = Sandbox::new(connector, 2);
    let policy = serde_json::json!({ "backoff_ms": 300, "retries": 1 });
    sandbox.point_connector(connector, "127.0.0.1", server.address().port(), policy);
    let wait = std::time::Duration::from_secs(30);
    let jongler = sandbox.jongler(connector).wait(wait).connect().await.expect("jongler");
    // key0 is claimed first: key1 was used more recently.
    sandbox.sql().execute("UPDATE keys SET last_used_at = 1 WHERE key_name = 'key1'", &[]).expect("order");
    let first = tokio::spawn({
        let jongler = jongler.clone();
        async move { jongler.request("POST", ENDPOINT, "{}").await }
    });
    // The refusal and the 503 came: the first request now pauses, its suspect held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.received_requests().await.map_or(0, |seen| seen.len()) < 2 {
        assert!(std::time::Instant::now() < deadline, "the first request's two attempts within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let second = jongler.request("POST", ENDPOINT, "{}").await.expect("the second request");
    assert_eq!(second.status, 200, "the second request got the good key");
    let first = first.await.expect("join").expect("the first request");
    assert_eq!(first.status, 200, "the first request, after its pause");
    let seen = server.received_requests().await.expect("recorded");
    let asked_bad =
        seen.iter().filter(|seen| seen.headers.get("x-goog-api-key").is_some_and(|key| key == bad.as_str())).count();
    assert_eq!(asked_bad, 1, "the suspect was used by one request only");
    assert_eq!(keys_in_error(&sandbox), ["key0"], "the refusal was key 0's own");
}
