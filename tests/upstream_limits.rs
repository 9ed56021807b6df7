//! What an upstream may cost: time, memory and attempts, each bounded against the loopback mock.
//!
//! - A generation that times out after it was sent is not sent again (it may have been generated and
//!   billed) unless the caller allows it, and the client's own deadline bounds each attempt.
//! - An answer or an event that never ends fails the attempt at a size limit, without blaming the key
//!   and without another key; the bytes read stay bounded (counted on the mock's side).
//! - A 429 that says "retry at once" (`Retry-After: 0`, `retryDelay: "0s"`) still locks the key down for
//!   a floor, so one request cannot hammer two keys in a loop.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use api_jongler::mock::{BARE_429, FixedAnswer, MockConfig, MockUpstream, StreamDialect, StreamFault, good_stream};
use api_jongler::{Dialect, Error, Exchange, ExchangeBody, JonglerBuilder, Outgoing};
use common::Sandbox;
use common::gateway::Gateway;

const GEMINI: &str = "generativelanguage.googleapis.com";
const MODEL: &str = "gemini-2.5-flash";
const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const STREAM: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
const MIB: usize = 1024 * 1024;

/// What may sit between the mock and the client's cap once the client stops reading: loopback socket
/// buffers (a few MiB each way with autotuning) and the HTTP stacks' own buffers. Far below what an
/// uncapped client reads at the mock's ~30 MB/s in the seconds a test lasts.
const IN_TRANSIT: u64 = 32 * MIB as u64;

fn secret(index: usize) -> String {
    format!("fake-secret-{GEMINI}-{index}-do-not-use")
}

async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(config).await.expect("mock")
}

/// A builder for `keys` keys of the mock, with quick backoffs and three retries.
fn builder(sandbox: &Sandbox, mock: &MockUpstream) -> JonglerBuilder {
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 3}));
    sandbox.jongler(GEMINI)
}

fn generate() -> Outgoing {
    Outgoing::new(reqwest::Method::POST, GENERATE, "{}")
}

fn gemini_stream() -> Outgoing {
    Outgoing { stream: Some(Dialect::Google), ..Outgoing::new(reqwest::Method::POST, STREAM, "{}") }
}

/// Every byte of the exchange's body.
async fn read(exchange: Exchange) -> Vec<u8> {
    match exchange.body {
        ExchangeBody::Full(bytes) => bytes.to_vec(),
        ExchangeBody::Stream(mut stream) => {
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.chunk().await {
                bytes.extend_from_slice(&chunk);
            }
            bytes
        }
    }
}

/// The states of all keys once every lease has been settled.
fn settled_states(sandbox: &Sandbox) -> Vec<(String, String)> {
    common::wait_until(Duration::from_secs(10), "every lease settled", || {
        sandbox.states().iter().all(|(_, state)| state != "locked")
    });
    sandbox.states()
}

fn all_vacant(sandbox: &Sandbox) -> bool {
    settled_states(sandbox).iter().all(|(_, state)| state == "vacant")
}

/// The endless answer was cut off at a 1 MiB cap: no more than [`IN_TRANSIT`] beyond it left the mock.
fn assert_capped(mock: &MockUpstream) {
    let sent = mock.endless_bytes();
    eprintln!("{sent} bytes of the endless answer left the mock");
    assert!(sent <= MIB as u64 + IN_TRANSIT, "{sent} bytes left the mock for a 1 MiB cap");
}

/// A size limit failed the attempt: no key is blamed, the upstream connection was dropped, and the
/// bytes read stayed near the cap.
async fn assert_cut_off_blameless(sandbox: &Sandbox, mock: &MockUpstream) {
    assert!(all_vacant(sandbox), "not the key's fault");
    assert!(mock.wait_idle(Duration::from_secs(10)).await, "the upstream connection was dropped");
    assert_capped(mock);
}

/// A POST whose generation takes longer than the attempt's timeout reached the upstream: it is not
/// sent again on the other key, the caller hears so at the timeout, and no key is blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_generation_is_sent_once_and_fails_at_the_timeout() {
    let mock = mock(MockConfig { latency: Duration::from_secs(4), ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler = builder(&sandbox, &mock).timeout(Duration::from_secs(1)).connect().await.expect("connect");
    let started = Instant::now();
    let error = jongler.send(generate()).await.expect_err("times out");
    let elapsed = started.elapsed();
    assert_eq!(mock.stats().0, 1, "one copy upstream: {error}");
    let text = error.to_string();
    eprintln!("{text} ({elapsed:?})");
    assert!(matches!(error, Error::Stream { attempts: 1, .. }), "{error:?}");
    assert!(text.contains("not sent again") && text.contains("retry_timeouts"), "{text}");
    // The attempt ends at its 1 s timeout; the generation would take 4 s.
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(all_vacant(&sandbox), "a long generation is not the key's fault");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'timeout'"), 1);
}

/// With `retry_timeouts`, the caller accepts paying twice: the timed-out POST goes to the other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_timeouts_sends_a_timed_out_generation_again() {
    let mock = mock(MockConfig { latency: Duration::from_secs(4), ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler = builder(&sandbox, &mock)
        .timeout(Duration::from_millis(300))
        .retry_timeouts(true)
        .connect()
        .await
        .expect("connect");
    let error = jongler.send(generate()).await.expect_err("times out");
    assert!(matches!(error, Error::Transport { attempts: 4, .. }), "{error:?}");
    assert_eq!(mock.stats().0, 4, "the first try and three retries");
}

/// The caller's deadline bounds the attempt, whatever the jongler's own (longer) timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_s_deadline_bounds_the_attempt() {
    let mock = mock(MockConfig { latency: Duration::from_secs(4), ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler = builder(&sandbox, &mock).timeout(Duration::from_secs(30)).connect().await.expect("connect");
    let started = Instant::now();
    let outgoing = Outgoing { deadline: Some(started + Duration::from_secs(1)), ..generate() };
    let error = jongler.send(outgoing).await.expect_err("past the deadline");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}: {error}", started.elapsed());
    assert_eq!(mock.stats().0, 1, "{error}");
    assert!(all_vacant(&sandbox));
}

/// The gateway takes the client's deadline from `X-Server-Timeout` (google-genai): a generation longer
/// than it fails at it, sent once, instead of holding the client for the connector's 30 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_ends_an_attempt_at_the_client_s_deadline() {
    let mock = mock(MockConfig { latency: Duration::from_secs(4), ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "timeout_secs": 30}));
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(gateway.addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        let request = format!(
            "POST /{GEMINI}{GENERATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Server-Timeout: 1\r\nContent-Type: \
             application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        drop(gateway);
        answer
    })
    .await
    .expect("join");
    let elapsed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("not sent again"), "{answer}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}: {answer}");
    assert_eq!(mock.stats().0, 1);
}

/// A whole answer that never ends fails at the response limit: the caller hears of the limit, the key
/// stays vacant and is not retried on the other key, and the bytes read stay near the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_fails_at_the_response_limit_without_blaming_the_key() {
    let mock = mock(MockConfig { endless_bodies: true, ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler =
        builder(&sandbox, &mock).timeout(Duration::from_secs(5)).max_response(MIB).connect().await.expect("connect");
    let error = jongler.send(generate()).await.expect_err("too large");
    let text = error.to_string();
    eprintln!("{text}");
    assert!(text.contains(&format!("larger than {MIB} bytes")) && text.contains("APIJONGLER_MAX_RESPONSE"), "{text}");
    assert_eq!(mock.stats().0, 1, "not sent to the other key: {text}");
    assert_cut_off_blameless(&sandbox, &mock).await;
}

/// A first event that never ends fails at the event limit, before anything was committed: an error to
/// the caller, no other key, no blame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_first_event_fails_at_the_event_limit_without_blaming_the_key() {
    let faults = [(secret(0), vec![StreamFault::EndlessEvent { after_events: 0 }])].into();
    let mock = mock(MockConfig { stream_faults_by_key: faults, ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler =
        builder(&sandbox, &mock).timeout(Duration::from_secs(5)).max_event(MIB).connect().await.expect("connect");
    let sent = tokio::time::timeout(Duration::from_secs(20), jongler.send(gemini_stream())).await;
    let error = match sent {
        Ok(Err(error)) => error,
        Ok(Ok(exchange)) => {
            let read = tokio::time::timeout(Duration::from_secs(5), read(exchange)).await;
            panic!("committed an endless first event ({} bytes read)", read.map_or(0, |bytes| bytes.len()))
        }
        Err(_) => panic!("no answer in 20 s"),
    };
    let text = error.to_string();
    assert!(text.contains(&format!("larger than {MIB} bytes")) && text.contains("APIJONGLER_MAX_EVENT"), "{text}");
    let (_, per_key) = mock.stats();
    assert_eq!(per_key.values().map(|stats| stats.streams_started).sum::<u64>(), 1, "no other key: {text}");
    assert_cut_off_blameless(&sandbox, &mock).await;
}

/// An event that never ends after the first one ends the committed stream with one error event in the
/// stream's dialect, after the whole events; the key stays vacant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_later_event_ends_the_stream_with_an_error_event() {
    let faults = vec![StreamFault::EndlessEvent { after_events: 1 }];
    let mock = mock(MockConfig { stream_faults: faults, ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler =
        builder(&sandbox, &mock).timeout(Duration::from_secs(5)).max_event(MIB).connect().await.expect("connect");
    let exchange = jongler.send(gemini_stream()).await.expect("committed");
    assert_eq!((exchange.status, exchange.attempts), (200, 1));
    let ExchangeBody::Stream(mut stream) = exchange.body else { panic!("a stream") };
    let (bytes, ended) = common::drain(&mut stream, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(ended, "the stream did not end in 20 s ({} bytes)", bytes.len());
    let first = String::from_utf8_lossy(&good_stream(StreamDialect::Gemini, MODEL, 3)[0]).into_owned();
    let rest = text.strip_prefix(&first).unwrap_or_else(|| panic!("the first event, whole: {text:.300}"));
    assert!(rest.starts_with("data: {\"error\":") && rest.ends_with("}}\r\n\r\n"), "{rest:.300}");
    assert!(rest.contains(&format!("larger than {MIB} bytes")), "{rest:.300}");
    assert!(all_vacant(&sandbox), "not the key's fault");
    assert_eq!(mock.stats().0, 1);
    assert_capped(&mock);
}

/// A 429 that says "at once" still locks its key down for the floor: one request on two keys makes a
/// few attempts a second at most, not a burst of the whole retry budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_zero_does_not_amplify() {
    let gemini_zero = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"0s"}]}}"#;
    let cases = [
        ("Retry-After: 0", vec![("retry-after".to_owned(), "0".to_owned())], BARE_429),
        ("Retry-After: -3", vec![("retry-after".to_owned(), "-3".to_owned())], BARE_429),
        ("retryDelay 0s", Vec::new(), gemini_zero),
    ];
    for (name, headers, body) in cases {
        let fixed = FixedAnswer { status: 429, headers, body: body.to_owned() };
        let mock = mock(MockConfig { fixed_answer: Some(fixed), ..MockConfig::default() }).await;
        let sandbox = Sandbox::new(GEMINI, 2);
        let wait = Duration::from_millis(1500);
        let jongler = builder(&sandbox, &mock).wait(wait).connect().await.expect("connect");
        let answer = jongler.send(generate()).await;
        let attempts = mock.stats().0;
        eprintln!("{name}: {attempts} attempts upstream in a {wait:?} wait");
        // Each key comes back no sooner than a second after its 429: within the 1.5 s wait, at most
        // its first attempt and one more per second, whatever the machine's speed (a slow one makes
        // fewer). Without a floor, the whole budget (18 attempts) went out in half a second.
        assert!((2..=6).contains(&attempts), "{name}: {attempts} attempts upstream ({answer:?})");
        assert!(settled_states(&sandbox).iter().all(|(_, state)| state != "error"), "{name}");
    }
}

/// A stream whose first event does not come before the deadline was sent: the upstream may be
/// generating it, so it is not sent to the other key either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_not_sent_again_after_its_first_event_deadline() {
    let faults = [(secret(0), vec![StreamFault::SilentBeforeFirstEvent(Duration::from_secs(30))])].into();
    let mock = mock(MockConfig { stream_faults_by_key: faults, ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler = builder(&sandbox, &mock).timeout(Duration::from_millis(1500)).connect().await.expect("connect");
    let error = jongler.send(gemini_stream()).await.expect_err("no first event in time");
    let text = error.to_string();
    assert!(text.contains("no first event within 1.5 s") && text.contains("not sent again"), "{text}");
    let (_, per_key) = mock.stats();
    assert_eq!(per_key.values().map(|stats| stats.streams_started).sum::<u64>(), 1, "{text}");
    assert!(all_vacant(&sandbox));
}

/// The command line's `--timeout` is the request's deadline: a generation longer than it fails there
/// with the network exit code, sent once; `--retry-timeouts` sends it again on the other key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_s_timeout_ends_the_request_and_sends_it_once() {
    let mock = mock(MockConfig { latency: Duration::from_secs(4), ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 1}));
    let started = Instant::now();
    let output = tokio::task::block_in_place(|| {
        let mut command = sandbox.apijongler();
        command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).args([GEMINI, "POST", GENERATE, "{}"]);
        command.args(["--timeout", "1s"]).output().expect("run apijongler")
    });
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("not sent again"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(mock.stats().0, 1, "{stderr}");
    // Allowed to pay twice (0.5 s attempts, one retry), the timed-out POST goes out a second time.
    let output = tokio::task::block_in_place(|| {
        let mut command = sandbox.apijongler();
        command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).args([GEMINI, "POST", GENERATE, "{}"]);
        command.args(["--timeout", "10s", "--retry-timeouts"]).env("APIJONGLER_TIMEOUT", "0.5");
        command.output().expect("run apijongler")
    });
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert_eq!(mock.stats().0, 3, "one more copy, then one retry: {stderr}");
}

/// A connection that broke after the answer began (headers, then an aborted body) may have cost a
/// generation: not sent again. A connection that could not be made sent nothing: it goes on to the
/// other key and its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_is_sent_again_only_if_nothing_was_sent() {
    let faults = [(secret(0), vec![StreamFault::BreakMidStream { after_events: 0 }])].into();
    let mock = mock(MockConfig { stream_faults_by_key: faults, ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    let jongler = builder(&sandbox, &mock).timeout(Duration::from_secs(10)).connect().await.expect("connect");
    let error = jongler.send(gemini_stream()).await.expect_err("broken before the first event");
    assert!(error.to_string().contains("not sent again"), "{error}");
    let (_, per_key) = mock.stats();
    assert_eq!(per_key.values().map(|stats| stats.streams_started).sum::<u64>(), 1, "{error}");
    assert!(all_vacant(&sandbox));

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let sandbox = Sandbox::new(GEMINI, 2);
    sandbox.point_connector(GEMINI, "127.0.0.1", port, serde_json::json!({"backoff_ms": 5, "retries": 3}));
    let jongler = sandbox.jongler(GEMINI).connect().await.expect("connect");
    let error = jongler.send(generate()).await.expect_err("refused");
    assert!(matches!(error, Error::Transport { attempts: 4, .. }), "the first try and three retries: {error:?}");
}

/// The limits come from the environment too (`APIJONGLER_MAX_RESPONSE`, `APIJONGLER_MAX_EVENT`), in
/// bytes or binary units; a value that is no size is refused, naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_come_from_the_environment() {
    let mock = mock(MockConfig { endless_bodies: true, ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 2);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5}));
    let run = |variable: &str, value: &str| {
        let mut command = sandbox.apijongler();
        command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).env(variable, value);
        command.args([GEMINI, "POST", GENERATE, "{}"]).env("APIJONGLER_TIMEOUT", "20");
        let output = tokio::task::block_in_place(|| command.output().expect("run apijongler"));
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (code, stderr) = run("APIJONGLER_MAX_RESPONSE", "1MiB");
    assert_eq!(code, Some(7), "{stderr}");
    assert!(stderr.contains(&format!("larger than {MIB} bytes")), "{stderr}");
    assert_eq!(mock.stats().0, 1, "{stderr}");
    assert!(all_vacant(&sandbox));
    for variable in ["APIJONGLER_MAX_RESPONSE", "APIJONGLER_MAX_EVENT"] {
        let (code, stderr) = run(variable, "lots");
        assert_ne!(code, Some(0), "{stderr}");
        assert!(stderr.contains(&format!("{variable}=\"lots\" is not valid")), "{stderr}");
    }
    assert_eq!(mock.stats().0, 1, "a refused setting sends nothing");
}
