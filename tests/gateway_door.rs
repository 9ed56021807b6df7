//! The gateway's door against a hostile client: web pages of other sites (`Origin`, CORS preflights),
//! paths that change on their way upstream (backslashes, encoded dot segments), a health endpoint that
//! must say when the database is gone, and clients that half-close their connection. The real
//! `apijongler serve` in front of loopback upstreams; raw HTTP where a client library would tidy the
//! request up before sending it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream};
use common::Sandbox;
use common::gateway::{GEMINI, Gateway, body_json, client, sandbox};
use serde_json::Value;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The connector every test serves (Gemini's name, pointed at a loopback upstream).
const C: &str = GEMINI;
const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const CHAT: &str = "/v1beta/openai/chat/completions";

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|value| value.to_str().unwrap())
}

/// The `access-control-*` headers of a response, as `name: value` lines.
fn cors_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("access-control-"))
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
        .collect()
}

/// A recording upstream that answers every request 200 with the CORS headers of a permissive API.
async fn permissive_upstream() -> MockServer {
    let server = MockServer::start().await;
    let answer = ResponseTemplate::new(200)
        .insert_header("access-control-allow-origin", "*")
        .insert_header("access-control-allow-credentials", "true")
        .insert_header("access-control-expose-headers", "*")
        .set_body_string(r#"{"candidates":[]}"#);
    Mock::given(any()).respond_with(answer).mount(&server).await;
    server
}

/// Sends `request` (raw HTTP/1.1, exactly these bytes) to `addr` and returns the whole answer as text.
async fn raw_http(addr: SocketAddr, request: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = stream.write_all(&request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap()
}

/// The JSON body of a raw answer (after the blank line).
fn raw_body(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or_else(|_| panic!("no JSON body in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_site_cannot_spend_the_pool() {
    let server = permissive_upstream().await;
    let sandbox = sandbox(1, server.address().port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let google = gateway.url(&format!("/{C}{GENERATE}"));
    let openai = gateway.url(&format!("/{C}{CHAT}"));
    let chat = r#"{"model":"gemini-2.5-flash","messages":[]}"#;

    // What a browser sends for fetch() from another site, a form post, a sandboxed frame, a sibling port.
    let refused = [
        http.post(&google).header("origin", "https://evil.example"),
        http.post(&google).header("origin", "https://evil.example").header("sec-fetch-site", "cross-site"),
        http.post(&google).header("sec-fetch-site", "cross-site"),
        http.post(&google).header("origin", "null"),
        http.post(&google).header("origin", "http://127.0.0.1:3000").header("sec-fetch-site", "same-site"),
        http.get(gateway.url("/metrics")).header("origin", "https://evil.example"),
    ];
    for send in refused {
        let response = send.body("{}").send().await.unwrap();
        assert_eq!(response.status(), 403);
        assert!(cors_headers(&response).is_empty(), "{:?}", cors_headers(&response));
        let body = body_json(response).await;
        assert_eq!(body["error"]["status"], "PERMISSION_DENIED", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("--allow-origin"), "{body}");
    }
    let response = http.post(&openai).header("origin", "https://evil.example").body(chat).send().await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(body_json(response).await["error"]["type"], "permission_error");
    // A preflight is answered at the door, never forwarded with a pool key.
    let response = http
        .request(reqwest::Method::OPTIONS, &google)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, x-goog-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(cors_headers(&response).is_empty(), "{:?}", cors_headers(&response));
    assert!(server.received_requests().await.unwrap().is_empty(), "nothing reached the upstream");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 0, "no key was claimed");

    // Clients that are not pages of another site pass: no Origin (SDKs, curl), the gateway's own
    // origin, a URL typed in the address bar.
    let own = format!("http://{}", gateway.addr);
    for send in [
        http.post(&google),
        http.post(&google).header("origin", own.as_str()).header("sec-fetch-site", "same-origin"),
        http.get(&google).header("sec-fetch-site", "none"),
    ] {
        let response = send.body("{}").send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            cors_headers(&response).is_empty(),
            "the upstream's CORS headers stay out: {:?}",
            cors_headers(&response)
        );
    }
    let text = http.get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"apijongler_gateway_refused_total{reason="origin"} 8"#), "{text}");
    drop(gateway);

    // An allowed origin gets its preflight answered by the gateway and its answers readable.
    let app = "https://app.example";
    let gateway = Gateway::start(&sandbox, &["--allow-origin", app, "--allow-origin", "http://localhost:5173"], &[]);
    let google = gateway.url(&format!("/{C}{GENERATE}"));
    let response = http
        .request(reqwest::Method::OPTIONS, &google)
        .header("origin", app)
        .header("sec-fetch-site", "cross-site")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, x-goog-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "access-control-allow-origin"), Some(app));
    assert!(header(&response, "access-control-allow-methods").unwrap().contains("POST"));
    assert_eq!(header(&response, "access-control-allow-headers"), Some("content-type, x-goog-api-key"));
    assert_eq!(header(&response, "vary"), Some("Origin"));
    assert!(header(&response, "access-control-allow-credentials").is_none());
    let before = server.received_requests().await.unwrap().len();
    let response = http.post(&google).header("origin", app).header("sec-fetch-site", "cross-site").body("{}");
    let response = response.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "access-control-allow-origin"), Some(app), "ours, not the upstream's *");
    assert!(response.headers().get_all("vary").iter().any(|value| value == "Origin"));
    assert!(header(&response, "access-control-allow-credentials").is_none(), "{:?}", cors_headers(&response));
    let response = http.post(&google).header("origin", "https://evil.example").body("{}").send().await.unwrap();
    assert_eq!(response.status(), 403);
    let reached = server.received_requests().await.unwrap();
    assert_eq!(reached.len(), before + 1, "the preflight stayed at the door");
    assert!(reached.iter().all(|request| request.method.as_str() != "OPTIONS"));
    drop(gateway);

    // `null` (sandboxed frames, file:// pages) can stand for any page: never allowed.
    for value in ["null", "*", "https://app.example/path", "app.example"] {
        let output = sandbox.apijongler().args(["serve", "--listen", "127.0.0.1:0", "--allow-origin", value]).output();
        let output = output.unwrap();
        assert_eq!(output.status.code(), Some(2), "{value}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--allow-origin"), "{value}");
    }
}

/// A connector file for `name` on `127.0.0.1:port` under `base_path`.
fn point_connector_under(sandbox: &Sandbox, name: &str, port: u16, base_path: &str) {
    let dir = sandbox.connectors_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let connector = serde_json::json!({
        "name": name, "host": "127.0.0.1", "port": port, "protocol": "http", "base_path": base_path,
        "api_key_header": "x-goog-api-key", "api_key_prefix": "", "policy": {"backoff_ms": 5},
        "model": {"path_markers": ["models"], "path_segments": 1, "body_field": "model"}
    });
    std::fs::write(dir.join(format!("{name}.json")), connector.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_changes_on_its_way_upstream_is_refused() {
    let server = MockServer::start().await;
    Mock::given(any()).respond_with(ResponseTemplate::new(200).set_body_string("{}")).mount(&server).await;
    let port = server.address().port();
    let sandbox = Sandbox::with_keyring(&format!(
        "[{C}]\nkey0 = fake-secret-door-0-do-not-use\n[door.test]\nkey0 = fake-secret-door-1-do-not-use\n"
    ));
    sandbox.point_connector(C, "127.0.0.1", port, serde_json::json!({ "backoff_ms": 5 }));
    point_connector_under(&sandbox, "door.test", port, "/base");
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let pro = "gemini-2.5-pro:generateContent";
    let hostile = [
        format!("/{C}/v1beta/models/x\\..\\{pro}"),
        format!("/{C}/v1beta/models/x\\{pro}"),
        format!("/{C}/v1beta/models/x/%2e%2e/{pro}"),
        format!("/{C}/v1beta/models/x/.%2E/{pro}"),
        format!("/{C}/v1beta/models/x/../{pro}"),
        format!("/{C}/v1beta/models/./{pro}"),
        format!("/{C}/v1beta/models/x%5c..%5c{pro}"),
        format!("/{C}/v1beta/models/x%2f..%2f{pro}"),
        format!("/{C}/v1beta/models/x%2F%2E%2E%2F{pro}"),
        format!("/{C}/v1beta/models/{pro}?alt=json'x"),
        "/door.test/..\\secret".to_owned(),
        "/door.test/models/a\\..\\..\\..\\secret".to_owned(),
    ];
    for path in &hostile {
        let request =
            format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
        let answer = raw_http(gateway.addr, request.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        let body = raw_body(&answer);
        // Gemini's error shape on its connector, the plain `{"error":"…"}` on the other.
        let message = body["error"]["message"].as_str().or(body["error"].as_str()).unwrap_or_else(|| panic!("{body}"));
        assert!(message.starts_with("apijongler: "), "{message}");
        assert!(message.contains("changes") && message.contains("refused"), "{path}: {message}");
        assert!(!message.contains("fake-secret"), "{message}");
    }
    assert!(server.received_requests().await.unwrap().is_empty(), "nothing reached the upstream");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 0, "no key was claimed");
    assert_eq!(sandbox.count("SELECT count(*) FROM lockdowns"), 0);

    // Clean paths pass, and reach the upstream byte for byte.
    for (path, sent) in [
        (format!("/{C}/v1beta/models/{pro}?alt=sse&x=%2e%2e"), format!("/v1beta/models/{pro}?alt=sse&x=%2e%2e")),
        ("/door.test/models/m:predict".to_owned(), "/base/models/m:predict".to_owned()),
        (format!("/{C}/v1beta/files/a...b"), "/v1beta/files/a...b".to_owned()),
    ] {
        let request =
            format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
        let answer = raw_http(gateway.addr, request.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        let reached = server.received_requests().await.unwrap();
        let last = reached.last().unwrap();
        let got = match last.url.query() {
            Some(query) => format!("{}?{query}", last.url.path()),
            None => last.url.path().to_owned(),
        };
        assert_eq!(got, sent);
    }
    assert!(!gateway.stderr().contains("fake-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_when_the_database_is_gone() {
    if common::sqlite_only("the database file is deleted") {
        return;
    }
    let upstream = MockUpstream::start(MockConfig::default()).await.unwrap();
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let health = gateway.url("/__apijongler/health");
    let response = http.get(&health).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_json(response).await["ok"], true);
    assert_eq!(http.post(gateway.url(&format!("/{C}{GENERATE}"))).body("{}").send().await.unwrap().status(), 200);

    std::fs::remove_file(&sandbox.db).unwrap();
    let response = http.post(gateway.url(&format!("/{C}{GENERATE}"))).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 503, "requests fail once the file is gone");
    let response = http.get(&health).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body = body_json(response).await;
    assert_eq!(body["ok"], false, "{body}");
    let problem = body["problem"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(problem.contains(&sandbox.db.display().to_string()), "names the file: {problem}");
    assert!(problem.contains("restart"), "says what to do: {problem}");
    let response = http.head(&health).send().await.unwrap();
    assert_eq!(response.status(), 503);
}

/// With a gateway token, health is the one endpoint anyone may read: it says the database cannot be
/// read without naming the file (which may name the user); the log names it.
#[tokio::test]
async fn health_behind_a_token_does_not_name_the_database() {
    if common::sqlite_only("the database file is deleted") {
        return;
    }
    let upstream = MockUpstream::start(MockConfig::default()).await.unwrap();
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[("APIJONGLER_GATEWAY_TOKEN", "fake-gateway-token-1")]);
    let health = gateway.url("/__apijongler/health");
    assert_eq!(client().get(&health).send().await.unwrap().status(), 200);
    std::fs::remove_file(&sandbox.db).unwrap();
    let response = client().get(&health).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body = body_json(response).await;
    let problem = body["problem"].as_str().unwrap_or_else(|| panic!("{body}"));
    let db = sandbox.db.display().to_string();
    assert!(!problem.contains(&db) && problem.contains("log"), "{problem}");
    common::gateway::eventually(Duration::from_secs(10), "the log names the file", || gateway.stderr().contains(&db))
        .await;
}

/// Writes `request`, shuts the write side down (as `curl --no-buffer` or a script piping into `nc -N`
/// do), and reads the whole answer.
async fn half_closed(addr: SocketAddr, request: String) -> String {
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        // Ok only when the gateway closed the connection: no request can follow a half-close.
        let read = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(read.is_ok(), "the connection stayed open ({read:?}) after {answer:?}");
        answer
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let upstream =
        MockUpstream::start(MockConfig { latency: Duration::from_millis(200), ..MockConfig::default() }).await.unwrap();
    let sandbox = sandbox(1, upstream.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let started = Instant::now();
    let request = format!("POST /{C}{GENERATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{{}}");
    let answer = half_closed(gateway.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "after {:?}: {answer:?}", started.elapsed());
    assert!(answer.contains("candidates"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    let stream = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    let request = format!("POST /{C}{stream} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{{}}");
    let answer = half_closed(gateway.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(answer.matches("data: ").count(), 3, "the whole stream: {answer}");
    // A health probe written with `printf … | nc -N`.
    let answer = half_closed(gateway.addr, "GET /__apijongler/health HTTP/1.1\r\nHost: localhost\r\n\r\n".into()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'"), 2);
}

/// The library's `Jongler::send` (and so `apijongler CONNECTOR METHOD ENDPOINT`) refuses such paths too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_refuses_a_path_that_changes_on_its_way_upstream() {
    let server = MockServer::start().await;
    Mock::given(any()).respond_with(ResponseTemplate::new(200).set_body_string("{}")).mount(&server).await;
    let sandbox = sandbox(1, server.address().port());
    let jongler = sandbox.jongler(C).connect().await.expect("connect");
    for endpoint in ["/v1beta/models/x\\..\\gemini-2.5-pro:generateContent", "/v1beta/models/x/%2E%2E/y"] {
        let outgoing = api_jongler::Outgoing::new(reqwest::Method::POST, endpoint, "{}");
        match jongler.send(outgoing).await {
            Err(api_jongler::Error::InvalidRequest { problem }) => assert!(problem.contains("refused"), "{problem}"),
            other => panic!("{endpoint}: {other:?}"),
        }
    }
    assert!(server.received_requests().await.unwrap().is_empty(), "nothing reached the upstream");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 0, "no key was claimed");
    let outgoing = api_jongler::Outgoing::new(reqwest::Method::POST, GENERATE, "{}");
    assert_eq!(jongler.send(outgoing).await.expect("a clean path").status, 200);
}

/// A client that goes away (closes its socket) while its request waits for a key must not have that
/// request sent upstream later with a pool key: nobody would read the answer, the generation would be
/// paid for, and live clients would wait behind it. One key, busy upstream for 2 s; a client sends its
/// request and leaves; a live client asks after it. Waiters are served first come, first served, so
/// had the leaver's request stayed queued it would reach the upstream before the live one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_left_while_waiting_for_a_key_is_not_sent_upstream() {
    let mock = MockUpstream::start(MockConfig { latency: Duration::from_secs(2), ..MockConfig::default() })
        .await
        .expect("mock");
    let sandbox = sandbox(1, mock.port());
    let gateway = Gateway::start(&sandbox, &["--wait", "60s"], &[]);
    let url = gateway.url(&format!("/{C}{GENERATE}"));
    let holder = tokio::spawn(client().post(url.clone()).body("{}").send());
    let busy = mock.wait_for(Duration::from_secs(30), |keys| keys.values().any(|stats| stats.in_flight() > 0)).await;
    assert!(busy, "the holder's request is upstream");
    // A client sends its request and leaves while it is queued for the key.
    let addr = gateway.addr;
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let request = format!(
            "POST /{C}{GENERATE} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).expect("write");
        // Long enough for the gateway to read it and queue it for the key (a few ms): were it not
        // queued yet, the test could only pass, never fail wrongly.
        std::thread::sleep(Duration::from_millis(500));
    })
    .await
    .expect("leaver");
    let live = client().post(url).body("{}").send().await.expect("live request");
    assert_eq!(live.status(), 200);
    assert_eq!(holder.await.expect("holder").expect("holder's answer").status(), 200);
    let seen = mock.seen_requests().len();
    assert_eq!(seen, 2, "the upstream got {seen} requests: the one of a client that had left was sent too");
}
