//! `apijongler serve`, the real binary, in front of loopback upstreams: the mock Gemini, a wiremock
//! server that records what reached it, and a gated upstream that answers only when a test says so.
//! Each test starts its own gateway on a free port (`--listen 127.0.0.1:0`) and reads the address
//! from its stderr.

mod common;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream};
use common::gateway::{GEMINI, Gateway, body_json, client, eventually, sandbox};
use serde_json::Value;
use wiremock::matchers::{any, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The connector every test serves (Gemini's name, pointed at a loopback upstream).
const C: &str = GEMINI;
const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const CHAT: &str = "/v1beta/openai/chat/completions";
const CLIENT_TOKEN: &str = "client-credential-7f3a";

fn secret(index: usize) -> String {
    format!("fake-secret-{C}-{index}-do-not-use")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|value| value.to_str().unwrap())
}

/// The mock Gemini with zero latency unless told otherwise.
async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_the_gateway_gets_the_upstream_answer_and_names_its_key() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(2, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let response = client()
        .post(gateway.url(&format!("/{C}{GENERATE}")))
        .header("x-goog-api-key", "placeholder")
        .body(r#"{"contents":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let key = header(&response, "x-apijongler-key").expect("x-apijongler-key").to_owned();
    assert!(key == "key0" || key == "key1", "{key}");
    assert_eq!(header(&response, "x-apijongler-attempts"), Some("1"));
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert!(response.headers().values().all(|value| !value.to_str().unwrap_or("").contains("fake-secret")));
    let body = body_json(response).await;
    assert!(body.get("candidates").is_some(), "{body}");
    let (total, keys) = upstream.stats();
    assert_eq!(total, 1);
    assert_eq!(keys.keys().collect::<Vec<_>>(), [&secret(key[3..].parse().unwrap())], "the pool key, nothing else");
    // The attempt is in the shared history, under the key's name.
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'"), 1);
}

/// What reached the recording upstream: every header value and the URL of each request.
async fn recorded(server: &MockServer) -> Vec<wiremock::Request> {
    server.received_requests().await.expect("recording on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_credential_never_reaches_the_upstream_in_any_slot() {
    let server = MockServer::start().await;
    Mock::given(any()).respond_with(ResponseTemplate::new(200).set_body_string("{}")).mount(&server).await;
    let sandbox = sandbox(1, server.address().port());
    for token in [Some(CLIENT_TOKEN), None] {
        let envs: Vec<(&str, &str)> = token.map(|token| ("APIJONGLER_GATEWAY_TOKEN", token)).into_iter().collect();
        let gateway = Gateway::start(&sandbox, &[], &envs);
        let http = client();
        let url = gateway.url(&format!("/{C}{GENERATE}"));
        let sends = [
            http.post(&url).header("x-goog-api-key", CLIENT_TOKEN),
            http.post(&url).bearer_auth(CLIENT_TOKEN),
            http.post(&url).header("x-api-key", CLIENT_TOKEN),
            http.post(format!("{url}?alt=sse&key={CLIENT_TOKEN}&pageSize=5")),
            // Every slot at once, the key parameter twice and in another case.
            http.post(format!("{url}?KEY={CLIENT_TOKEN}&key={CLIENT_TOKEN}"))
                .header("x-goog-api-key", CLIENT_TOKEN)
                .bearer_auth(CLIENT_TOKEN)
                .header("x-api-key", CLIENT_TOKEN),
        ];
        for send in sends {
            let response = send.header("x-server-timeout", "600").body("{}").send().await.unwrap();
            assert_eq!(response.status(), 200, "{token:?}: {}", response.text().await.unwrap());
        }
        drop(gateway);
    }
    let requests = recorded(&server).await;
    assert_eq!(requests.len(), 10);
    for request in &requests {
        assert!(!request.url.as_str().contains(CLIENT_TOKEN), "{}", request.url);
        assert!(!request.url.query_pairs().any(|(name, _)| name.eq_ignore_ascii_case("key")), "{}", request.url);
        for (name, value) in &request.headers {
            assert!(!value.to_str().unwrap_or("").contains(CLIENT_TOKEN), "{name} carried the client's credential");
        }
        assert!(request.headers.get("authorization").is_none() && request.headers.get("x-api-key").is_none());
        let keys: Vec<_> = request.headers.get_all("x-goog-api-key").iter().collect();
        assert_eq!(keys, [secret(0).as_str()], "exactly the pool key");
        assert_eq!(request.headers.get("accept-encoding").unwrap(), "identity");
        assert_eq!(request.headers.get("x-server-timeout").unwrap(), "600", "end-to-end headers cross");
        assert_eq!(request.url.path(), GENERATE);
    }
    let queries: Vec<_> = requests.iter().filter_map(|request| request.url.query()).collect();
    assert_eq!(queries, ["alt=sse&pageSize=5", "alt=sse&pageSize=5"], "the rest of the query, byte for byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_gateway_token_is_refused_in_the_route_s_dialect() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[("APIJONGLER_GATEWAY_TOKEN", CLIENT_TOKEN)]);
    let http = client();
    let google = gateway.url(&format!("/{C}{GENERATE}"));
    let openai = gateway.url(&format!("/{C}{CHAT}"));
    let chat = r#"{"model":"gemini-2.5-flash","messages":[]}"#;
    for send in [
        http.post(&google).header("x-goog-api-key", "wrong"),
        http.post(&google),
        http.post(&google).header("x-goog-api-key", format!("{CLIENT_TOKEN}x")),
    ] {
        let response = send.body("{}").send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body = body_json(response).await;
        assert_eq!(body["error"]["status"], "UNAUTHENTICATED", "{body}");
        assert_eq!(body["error"]["code"], 401);
        assert!(body["error"]["message"].as_str().unwrap().starts_with("apijongler: the gateway token"), "{body}");
    }
    let response = http.post(&openai).bearer_auth("wrong").body(chat).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let body = body_json(response).await;
    assert_eq!(body["error"]["type"], "authentication_error", "{body}");
    assert_eq!(upstream.stats().0, 0, "nothing reached the upstream");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 0, "no key was claimed");

    // The right token passes, in either dialect's slot; /metrics needs it too, health does not.
    let response = http.post(&google).header("x-goog-api-key", CLIENT_TOKEN).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = http.post(&openai).bearer_auth(CLIENT_TOKEN).body(chat).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(http.get(gateway.url("/metrics")).send().await.unwrap().status(), 401);
    let metrics = http.get(gateway.url("/metrics")).bearer_auth(CLIENT_TOKEN).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains(r#"apijongler_gateway_refused_total{reason="token"} 5"#));
    assert_eq!(http.get(gateway.url("/__apijongler/health")).send().await.unwrap().status(), 200);
    assert!(!gateway.stderr().contains(CLIENT_TOKEN), "the log never shows the token");
}

/// Sends `request` (raw HTTP/1.1) to `addr` and returns the whole answer as text.
fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A server that answers early and closes may reset the rest of the write: what it answered counts.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    for host in ["evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.1.evil.example"] {
        let response =
            http.post(gateway.url(&format!("/{C}{GENERATE}"))).header("host", host).body("{}").send().await.unwrap();
        assert_eq!(response.status(), 421, "{host}");
        let body = body_json(response).await;
        assert_eq!(body["error"]["status"], "INVALID_ARGUMENT", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("DNS rebinding"), "{body}");
    }
    let addr = gateway.addr;
    let answer = tokio::task::spawn_blocking(move || {
        raw_http(
            addr,
            format!("GET /{C}/v1beta/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    for host in [format!("localhost:{}", addr.port()), format!("127.0.0.1:{}", addr.port())] {
        let response =
            http.post(gateway.url(&format!("/{C}{GENERATE}"))).header("host", host.as_str()).body("{}").send().await;
        assert_eq!(response.unwrap().status(), 200, "{host}");
    }
    assert_eq!(upstream.stats().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_on_four_keys_never_use_a_key_twice_at_once() {
    let upstream = mock(MockConfig { latency: Duration::from_millis(20), ..MockConfig::default() }).await;
    let sandbox = sandbox(4, upstream.port());
    let gateway = Gateway::start(&sandbox, &["--wait", "2m"], &[]);
    let http = client();
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..64 {
        let (http, url) = (http.clone(), gateway.url(&format!("/{C}{GENERATE}")));
        clients.spawn(async move {
            let response = http.post(url).body(format!(r#"{{"client":{index}}}"#)).send().await.unwrap();
            let key = header(&response, "x-apijongler-key").map(str::to_owned);
            (response.status().as_u16(), key)
        });
    }
    let mut used = std::collections::BTreeMap::new();
    while let Some(answer) = clients.join_next().await {
        let (status, key) = answer.unwrap();
        assert_eq!(status, 200);
        *used.entry(key.expect("a key")).or_insert(0) += 1;
    }
    assert_eq!(used.values().sum::<i32>(), 64);
    let (total, keys) = upstream.stats();
    assert_eq!(total, 64);
    assert_eq!(keys.len(), 4, "every key served");
    for (secret, stats) in &keys {
        assert_eq!(stats.max_in_flight, 1, "{secret} was used by two requests at once");
    }
    common::check_leases(&sandbox.history());
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_in_time_is_a_429_saying_when_to_come_back() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(1, upstream.port());
    // This test process holds the only key.
    let coordinator = sandbox.coordinator(sandbox.options());
    let lease = coordinator.claim(C, &[], Duration::ZERO).unwrap();
    let gateway = Gateway::start(&sandbox, &["--wait", "0s"], &[]);
    let http = client();

    let response = http.post(gateway.url(&format!("/{C}{GENERATE}"))).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), Some("5"), "every key held: about one request's time");
    let body = body_json(response).await;
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED", "{body}");
    assert_eq!(body["error"]["details"][0]["retryDelay"], "5s", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("apijongler: no key of '{C}' is free")), "{message}");
    assert!(message.contains("1 locked"), "{message}");

    let chat = r#"{"model":"gemini-2.5-flash","messages":[]}"#;
    let response = http.post(gateway.url(&format!("/{C}{CHAT}"))).body(chat).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!((header(&response, "retry-after"), header(&response, "retry-after-ms")), (Some("5"), Some("5000")));
    assert_eq!(body_json(response).await["error"]["type"], "rate_limit_error");
    assert_eq!(upstream.stats().0, 0);
    drop(gateway);

    // A long --wait is cut to the client's own deadline (X-Server-Timeout 2 s: a wait of 1 s).
    let gateway = Gateway::start(&sandbox, &["--wait", "90s"], &[]);
    let started = Instant::now();
    let response = http
        .post(gateway.url(&format!("/{C}{GENERATE}")))
        .header("x-server-timeout", "2")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(started.elapsed() < Duration::from_secs(45), "waited {:?}", started.elapsed());
    let message = body_json(response).await["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("after waiting 1."), "{message}");
    lease.release().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_lockdown_tells_the_client_when_it_comes_back() {
    // One request per key per minute: the second gets Gemini's 429, which locks the key down.
    let upstream = mock(MockConfig { quota: Some(1), latency: Duration::ZERO, ..MockConfig::default() }).await;
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &["--wait", "0s"], &[]);
    let http = client();
    let url = gateway.url(&format!("/{C}{GENERATE}"));
    assert_eq!(http.post(&url).body("{}").send().await.unwrap().status(), 200);
    let response = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = header(&response, "retry-after").unwrap().parse().unwrap();
    assert!((50..=61).contains(&retry_after), "until the lockdown ends: {retry_after}");
    let body = body_json(response).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("1 locked down for it"), "{body}");
    let locked_down = "SELECT count(*) FROM lockdowns WHERE model = 'gemini-2.5-flash'";
    assert_eq!(sandbox.count(locked_down), 1, "the key is locked down for the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_cap_is_refused_without_reaching_the_upstream() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &["--max-body", "1KiB"], &[]);
    let http = client();
    let url = gateway.url(&format!("/{C}{GENERATE}"));
    let response = http.post(&url).body(vec![b' '; 1025]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let body = body_json(response).await;
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-body"), "{body}");
    let chat = gateway.url(&format!("/{C}{CHAT}"));
    let response = http.post(&chat).body(vec![b' '; 4096]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(body_json(response).await["error"]["type"], "invalid_request_error");
    // Chunked, with no length announced: refused once the bytes read pass the cap.
    let addr = gateway.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut request =
            format!("POST /{C}{GENERATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .into_bytes();
        for _ in 0..4 {
            request.extend_from_slice(format!("200\r\n{}\r\n", " ".repeat(512)).as_bytes());
        }
        request.extend_from_slice(b"0\r\n\r\n");
        raw_http(addr, &request)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A length announced over the cap is refused at once, before a byte of the body is read.
    let answer = tokio::task::spawn_blocking(move || {
        let request = format!("POST /{C}{GENERATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n{{");
        raw_http(addr, request.as_bytes())
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(upstream.stats().0, 0, "nothing reached the upstream");
    // At the cap exactly: sent.
    let at_cap = format!("{{}}{}", " ".repeat(1022));
    assert_eq!(http.post(&url).body(at_cap).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(2, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let health = http.get(gateway.url("/__apijongler/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health = body_json(health).await;
    assert_eq!(health["ok"], true);
    assert!(health["connectors"].as_array().unwrap().contains(&Value::from(C)), "{health}");

    let response = http.post(gateway.url(&format!("/{C}{GENERATE}"))).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let coordinator = sandbox.coordinator(sandbox.options());
    let lease = coordinator.claim(C, &[], Duration::ZERO).unwrap();
    let response = http.post(gateway.url("/nope/v1")).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404);
    let metrics = http.get(gateway.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(header(&metrics, "content-type").unwrap().starts_with("application/openmetrics-text"));
    let text = metrics.text().await.unwrap();
    for line in [
        format!(r#"apijongler_gateway_requests_total{{connector="{C}",model="gemini-2.5-flash",outcome="2xx"}} 1"#),
        r#"apijongler_gateway_refused_total{reason="route"} 1"#.to_owned(),
        format!(r#"apijongler_keys{{connector="{C}",state="vacant"}} 1"#),
        format!(r#"apijongler_keys{{connector="{C}",state="locked"}} 1"#),
        format!(r#"apijongler_keys{{connector="{C}",state="lockdown"}} 0"#),
        format!(r#"apijongler_gateway_claim_wait_seconds_count{{connector="{C}"}} 1"#),
        format!(r#"apijongler_gateway_upstream_seconds_count{{connector="{C}"}} 1"#),
    ] {
        assert!(text.lines().any(|got| got == line), "missing {line} in\n{text}");
    }
    lease.release().unwrap();
    let text = http.get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let vacant = format!(r#"apijongler_keys{{connector="{C}",state="vacant"}} 2"#);
    assert!(text.contains(&vacant), "read at each scrape:\n{text}");
    // One log line for the request: key by name, never a secret.
    let log = gateway.stderr();
    let line = log.lines().find(|line| line.contains("request") && line.contains("status=200")).expect(&log);
    assert!(
        line.contains("key=key") && line.contains("attempts=1") && line.contains("model=gemini-2.5-flash"),
        "{line}"
    );
    assert!(!log.contains("fake-secret"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_connector_is_also_served_at_slash_and_unknown_connectors_are_404() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let response = http.post(gateway.url(GENERATE)).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404, "no root without --root");
    let body = body_json(response).await;
    assert_eq!(body["error"]["status"], "NOT_FOUND", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no connector 'v1beta'"), "{message}");
    assert!(message.contains(&format!("http://{}/{C}", gateway.addr)), "names what is served: {message}");
    // A shipped connector without keys in the keyring is named as such.
    let response = http.get(gateway.url("/router.huggingface.co/v1/models")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let message = body_json(response).await["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("'router.huggingface.co' has no keys in the keyring"), "{message}");
    drop(gateway);

    let gateway = Gateway::start(&sandbox, &["--root", C], &[]);
    for path in [GENERATE.to_owned(), format!("/{C}{GENERATE}")] {
        let response = http.post(gateway.url(&path)).body("{}").send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    assert_eq!(upstream.stats().0, 2);
    let output = sandbox.apijongler().args(["serve", "--listen", "127.0.0.1:0", "--root", "nope"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--root nope"));
}

#[test]
fn a_non_loopback_listener_needs_a_token() {
    let sandbox = sandbox(1, 9);
    let output = sandbox.apijongler().args(["serve", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--token-file") && stderr.contains("APIJONGLER_GATEWAY_TOKEN"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_urls_come_back_through_the_gateway_and_chunks_go_without_a_key() {
    let server = MockServer::start().await;
    let upstream = format!("http://127.0.0.1:{}", server.address().port());
    Mock::given(path("/upload/v1beta/files"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-goog-upload-url", format!("{upstream}/upload/v1beta/files?upload_id=U1").as_str())
                .insert_header("x-goog-upload-status", "active"),
        )
        .mount(&server)
        .await;
    let sandbox = sandbox(1, server.address().port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let start = http
        .post(gateway.url(&format!("/{C}/upload/v1beta/files")))
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 200);
    let chunk_url = header(&start, "x-goog-upload-url").unwrap().to_owned();
    assert_eq!(chunk_url, gateway.url(&format!("/{C}/upload/v1beta/files?upload_id=U1")));
    let chunk = http.post(&chunk_url).header("x-goog-upload-command", "upload, finalize").body("bytes");
    assert_eq!(chunk.send().await.unwrap().status(), 200);
    let requests = recorded(&server).await;
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].headers.get("x-goog-api-key").unwrap(), secret(0).as_str(), "the start has a key");
    assert!(requests[1].headers.get("x-goog-api-key").is_none(), "the chunk goes with its upload_id only");
    assert_eq!(requests[1].url.query(), Some("upload_id=U1"));
    let keyless = "SELECT count(*) FROM requests WHERE key_name IS NULL AND outcome = 'success'";
    assert_eq!(sandbox.count(keyless), 1);
}

/// An upstream that holds every request until [`Gated::open`], counting arrivals.
struct Gated {
    port: u16,
    arrived: Arc<AtomicUsize>,
    gate: tokio::sync::watch::Sender<bool>,
}

impl Gated {
    async fn start() -> Gated {
        use hyper::server::conn::http1;
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let arrived = Arc::new(AtomicUsize::new(0));
        let (gate, opened) = tokio::sync::watch::channel(false);
        let counter = Arc::clone(&arrived);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (counter, opened) = (Arc::clone(&counter), opened.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        let mut opened = opened.clone();
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let _ = opened.wait_for(|open| *open).await.map(drop);
                            let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{\"ok\":1}"));
                            Ok::<_, Infallible>(hyper::Response::new(body))
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Gated { port, arrived, gate }
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_releases_every_key() {
    let upstream = Gated::start().await;
    let sandbox = sandbox(2, upstream.port);
    let gateway = Gateway::start(&sandbox, &["--grace", "2m"], &[]);
    let in_flight = tokio::spawn(client().post(gateway.url(&format!("/{C}{GENERATE}"))).body("{}").send());
    eventually(Duration::from_secs(30), "the request upstream", || upstream.arrived.load(Ordering::SeqCst) == 1).await;
    assert!(sandbox.states().iter().any(|(_, state)| state == "locked"));
    gateway.signal(rustix::process::Signal::TERM);
    eventually(Duration::from_secs(30), "the stop", || gateway.stderr().contains("no longer accepting")).await;
    // New connections are refused while the request in flight goes on.
    let addr = gateway.addr;
    eventually(Duration::from_secs(30), "the listener closed", || std::net::TcpStream::connect(addr).is_err()).await;
    assert!(!in_flight.is_finished());
    upstream.open();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"ok":1}"#);
    let (status, stderr) = gateway.exit().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("every key released"), "{stderr}");
    assert_eq!(sandbox.count("SELECT count(*) FROM keys WHERE state = 'locked'"), 0, "{:?}", sandbox.states());
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_in_flight_after_the_grace_are_cut_off_and_their_keys_released() {
    let upstream = Gated::start().await;
    let sandbox = sandbox(4, upstream.port);
    let gateway = Gateway::start(&sandbox, &["--grace", "0s"], &[]);
    let http = client();
    let in_flight: Vec<_> =
        (0..4).map(|_| tokio::spawn(http.post(gateway.url(&format!("/{C}{GENERATE}"))).body("{}").send())).collect();
    eventually(Duration::from_secs(30), "4 requests upstream", || upstream.arrived.load(Ordering::SeqCst) == 4).await;
    gateway.signal(rustix::process::Signal::INT);
    let (status, stderr) = gateway.exit().await;
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cutting off") && stderr.contains("every key released"), "{stderr}");
    for request in in_flight {
        assert!(request.await.unwrap().is_err(), "the connection was closed");
    }
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'cancelled'"), 4);
}

const STREAM: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";

/// A client that goes away mid-stream frees the key at once (long before the upstream's next event or
/// any timeout), and the attempt is recorded as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_the_key_at_once() {
    let upstream = mock(MockConfig { stream_delay: Duration::from_secs(60), ..MockConfig::default() }).await;
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let mut response = client()
        .post(gateway.url(&format!("/{C}{STREAM}")))
        .header("x-goog-api-key", "placeholder")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&response, "cache-control"), Some("no-cache"));
    let first = response.chunk().await.unwrap().expect("the first event");
    assert!(first.starts_with(b"data: {\"candidates\""), "{first:?}");
    assert_eq!(sandbox.states(), [("key0".to_owned(), "locked".to_owned())], "held while streaming");
    drop(response);
    // 60 s before the next event, 10 s before the connector's read timeout: only the disconnect frees it.
    eventually(Duration::from_secs(8), "the key freed", || sandbox.states()[0].1 == "vacant").await;
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'cancelled'"), 1);
    assert!(upstream.wait_key_idle(&secret(0), Duration::from_secs(8)).await, "the upstream request was dropped");
}

/// Through the gateway too: a stream that fails before its first event is retried on another key; one
/// that breaks after it ends with one error event in its dialect (OpenAI's here: no `[DONE]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_retried_only_before_their_first_event() {
    use api_jongler::mock::StreamFault;
    let config = MockConfig {
        stream_faults_by_key: [(secret(0), vec![StreamFault::ErrorAsFirstEvent(429)])].into(),
        ..MockConfig::default()
    };
    let upstream = mock(config).await;
    let sandbox = sandbox(2, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let response = client()
        .post(gateway.url(&format!("/{C}{STREAM}")))
        .header("x-goog-api-key", "placeholder")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        (header(&response, "x-apijongler-key"), header(&response, "x-apijongler-attempts")),
        (Some("key1"), Some("2"))
    );
    let text = response.text().await.unwrap();
    assert_eq!(text.matches("data: ").count(), 3, "one whole stream: {text}");
    assert!(!text.contains("error"), "{text}");

    upstream.push_stream_fault(StreamFault::BreakMidStream { after_events: 1 });
    let body = r#"{"model":"gemini-2.5-flash","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = client()
        .post(gateway.url(&format!("/{C}{CHAT}")))
        .header("authorization", "Bearer placeholder")
        .header("accept", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!((response.status().as_u16(), header(&response, "x-apijongler-attempts")), (200, Some("1")));
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|event| !event.is_empty()).collect();
    assert_eq!(events.len(), 2, "one good event, then ours: {text}");
    let error: Value = serde_json::from_str(events[1].strip_prefix("data: ").expect("a data event")).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().starts_with("apijongler: upstream stream broke"), "{error}");
    assert!(error["error"]["type"].is_string() && !text.contains("[DONE]"), "{text}");
}

/// Issue 14: `/metrics` counts keys from the view `status --json` prints, so the two agree on every
/// key's state: a key locked down for every model by a row of its scope (its own row still says
/// vacant) is in lockdown for both, a held key locked, a bad key in error, a retired key in none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_key_states_status_json_shows() {
    let upstream = mock(MockConfig::default()).await;
    let sandbox = sandbox(5, upstream.port());
    let coordinator = sandbox.coordinator(sandbox.options());
    let held = coordinator.claim(C, &[], Duration::ZERO).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // The gateway syncs the keyring as it starts: the rows are changed after that.
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let free: Vec<String> = (0..5).map(|i| format!("key{i}")).filter(|name| name != held.key_name()).collect();
    sandbox
        .sql()
        .batch(&format!(
            "UPDATE keys SET state = 'error', reason = 'test' WHERE key_name = '{}';
             UPDATE keys SET retired_at = {now} WHERE key_name = '{}';
             INSERT INTO lockdowns (connector, scope, model, until, reason, set_by_key, set_at)
             VALUES ('{C}', 'key:{}', '*', {}, 'test lockdown of every model', '{}', {now});",
            free[0],
            free[1],
            free[2],
            now + 3_600_000,
            free[2]
        ))
        .unwrap();
    let text = client().get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let status = sandbox.apijongler().args(["status", C, "--json"]).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let rows: Value = serde_json::from_slice(&status.stdout).unwrap();
    let state_of =
        |name: &str| rows.as_array().unwrap().iter().find(|row| row["key"] == name).unwrap()["state"].clone();
    assert_eq!(state_of(&free[2]), "lockdown", "{rows:#}");
    assert_eq!(state_of(&free[1]), "retired");
    for state in ["vacant", "locked", "lockdown", "error"] {
        let shown = rows.as_array().unwrap().iter().filter(|row| row["state"] == state).count();
        let line = format!(r#"apijongler_keys{{connector="{C}",state="{state}"}} {shown}"#);
        assert!(text.lines().any(|got| got == line), "status --json shows {shown} {state}; missing {line} in\n{text}");
    }
    held.release().unwrap();
}
