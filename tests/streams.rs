//! Streams through the pool (`Jongler::send`), against the loopback mock streaming in Gemini's and
//! OpenAI's dialects and failing before the first event, in it, and after it. The rule: until the first
//! event has reached the caller, a failure is judged like a whole answer and may be retried on another
//! key; after it, never: the stream ends with one error event of ours (or the upstream's own), and
//! nothing is added after a complete answer.

mod common;

use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream, StreamDialect, StreamFault, good_stream};
use api_jongler::{Dialect, Exchange, ExchangeBody, Jongler, Outgoing};
use bytes::Bytes;
use common::Sandbox;

const GEMINI: &str = "generativelanguage.googleapis.com";
const MODEL: &str = "gemini-2.5-flash";
const STREAM: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
const CHAT: &str = "/v1beta/openai/chat/completions";
const EVENTS: usize = 3;

fn secret(index: usize) -> String {
    format!("fake-secret-{GEMINI}-{index}-do-not-use")
}

async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(MockConfig { latency: Duration::ZERO, stream_events: EVENTS, ..config }).await.expect("mock")
}

async fn connect(sandbox: &Sandbox, mock: &MockUpstream, timeout: Duration) -> Jongler {
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 3}));
    Jongler::builder(GEMINI)
        .keyring(&sandbox.keyring)
        .database(&sandbox.db)
        .connectors_dir(sandbox.connectors_dir())
        .timeout(timeout)
        .connect()
        .await
        .expect("connect")
}

fn gemini_stream() -> Outgoing {
    Outgoing { stream: Some(Dialect::Google), ..Outgoing::new(reqwest::Method::POST, STREAM, "{}") }
}

fn chat_stream() -> Outgoing {
    let body = format!(r#"{{"model":"{MODEL}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#);
    Outgoing { stream: Some(Dialect::OpenAi), ..Outgoing::new(reqwest::Method::POST, CHAT, body) }
}

/// Every byte of the exchange's body, and whether it was a relayed stream.
async fn read(exchange: Exchange) -> (Vec<u8>, bool) {
    match exchange.body {
        ExchangeBody::Full(bytes) => (bytes.to_vec(), false),
        ExchangeBody::Stream(mut stream) => {
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.chunk().await {
                bytes.extend_from_slice(&chunk);
            }
            (bytes, true)
        }
    }
}

fn concat(chunks: &[Bytes]) -> Vec<u8> {
    chunks.iter().flat_map(|chunk| chunk.iter().copied()).collect()
}

/// The states of all keys once every lease has been settled (a relay settles after its last byte).
async fn settled_states(sandbox: &Sandbox) -> Vec<(String, String)> {
    common::wait_until(Duration::from_secs(10), "every lease settled", || {
        sandbox.states().iter().all(|(_, state)| state != "locked")
    });
    sandbox.states()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_stream_arrives_byte_for_byte_in_both_dialects() {
    for (outgoing, dialect) in [(gemini_stream(), StreamDialect::Gemini), (chat_stream(), StreamDialect::OpenAi)] {
        let mock = mock(MockConfig::default()).await;
        let sandbox = Sandbox::new(GEMINI, 1);
        let jongler = connect(&sandbox, &mock, Duration::from_secs(10)).await;
        let exchange = jongler.send(outgoing).await.expect("stream");
        assert_eq!((exchange.status, exchange.attempts), (200, 1));
        let (bytes, streamed) = read(exchange).await;
        assert!(streamed);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&concat(&good_stream(dialect, MODEL, EVENTS))),
            "{dialect:?}: verbatim, usage chunk and [DONE] included"
        );
        assert_eq!(settled_states(&sandbox).await, [("key0".to_owned(), "vacant".to_owned())]);
        assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'"), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_split_anywhere_still_arrive_as_whole_events_byte_for_byte() {
    let mock = mock(MockConfig { stream_faults: vec![StreamFault::SplitFrames], ..MockConfig::default() }).await;
    let sandbox = Sandbox::new(GEMINI, 1);
    let jongler = connect(&sandbox, &mock, Duration::from_secs(10)).await;
    let (bytes, _) = read(jongler.send(gemini_stream()).await.expect("stream")).await;
    assert_eq!(bytes, concat(&good_stream(StreamDialect::Gemini, MODEL, EVENTS)));
}

/// Failures before the first event: judged like whole answers, retried on another key, and the caller
/// gets one good stream (never two joined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_event_are_retried_on_another_key() {
    let cases = [
        ("429 before the stream", StreamFault::quota_429(MODEL), true),
        ("429 as the first event", StreamFault::ErrorAsFirstEvent(429), true),
        ("503 as the first event", StreamFault::ErrorAsFirstEvent(503), false),
        ("503 before the stream", StreamFault::overloaded_503(), false),
        ("no event at all", StreamFault::EndBeforeFirstEvent, false),
        ("an unterminated first event", StreamFault::PartialFirstEvent, false),
    ];
    for (name, fault, locks_key0) in cases {
        let config = MockConfig { stream_faults_by_key: [(secret(0), vec![fault])].into(), ..MockConfig::default() };
        let mock = mock(config).await;
        let sandbox = Sandbox::new(GEMINI, 2);
        // A short attempt timeout: it is also the first-event deadline.
        let jongler = connect(&sandbox, &mock, Duration::from_millis(1500)).await;
        let exchange = jongler.send(gemini_stream()).await.unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!((exchange.status, exchange.attempts), (200, 2), "{name}");
        assert_eq!(exchange.key_name.as_deref(), Some("key1"), "{name}");
        let (bytes, streamed) = read(exchange).await;
        assert!(streamed, "{name}");
        assert_eq!(bytes, concat(&good_stream(StreamDialect::Gemini, MODEL, EVENTS)), "{name}: one whole stream");
        settled_states(&sandbox).await;
        let for_model = jongler.key_states_for(Some(MODEL)).await.expect("states");
        assert_eq!(for_model.lockdown.contains("key0"), locks_key0, "{name}: {for_model:?}");
    }
}

/// Failures after the first event: no retry, no other key; one error event in the stream's dialect,
/// after whole events only, and the body ends cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_after_the_first_event_end_the_stream_with_one_error_event() {
    let good = good_stream(StreamDialect::Gemini, MODEL, EVENTS);
    let cases = [
        ("break", StreamFault::BreakMidStream { after_events: 1 }, "broke after"),
        ("truncation", StreamFault::TruncateMidStream { after_events: 2 }, "ended after"),
        ("idle", StreamFault::IdleMidStream { after_events: 1, pause: Duration::from_secs(30) }, "idle for"),
    ];
    for (name, fault, says) in cases {
        let mock = mock(MockConfig { stream_faults: vec![fault.clone()], ..MockConfig::default() }).await;
        let sandbox = Sandbox::new(GEMINI, 2);
        let jongler = connect(&sandbox, &mock, Duration::from_millis(1500)).await;
        let exchange = jongler.send(gemini_stream()).await.expect("committed");
        assert_eq!(exchange.attempts, 1, "{name}");
        let (bytes, _) = read(exchange).await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let sent = match fault {
            StreamFault::TruncateMidStream { after_events } => after_events,
            _ => 1,
        };
        let prefix = String::from_utf8_lossy(&concat(&good[..sent])).into_owned();
        assert!(text.starts_with(&prefix), "{name}: the good events first, whole: {text}");
        let rest = &text[prefix.len()..];
        assert!(rest.starts_with("data: {\"error\":") && rest.ends_with("}}\r\n\r\n"), "{name}: {rest:?}");
        assert!(rest.contains(says) && rest.contains("\"code\":503"), "{name}: {rest}");
        assert_eq!(rest.matches("data: ").count(), 1, "{name}: exactly one event of ours");
        let (_, per_key) = mock.stats();
        assert_eq!(per_key.values().map(|stats| stats.streams_started).sum::<u64>(), 1, "{name}: no retry");
        assert!(
            settled_states(&sandbox).await.iter().all(|(_, state)| state == "vacant"),
            "{name}: not the key's fault"
        );
        assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'stream broken'"), 1, "{name}");
    }
}

/// An upstream error event after the first event is the upstream's own end: forwarded as it is, with
/// nothing of ours after it; one after a complete answer is not forwarded at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_events_after_the_first_end_the_stream_and_never_follow_a_complete_one() {
    let good = concat(&good_stream(StreamDialect::Gemini, MODEL, EVENTS));
    let mock = mock(MockConfig {
        stream_faults: vec![StreamFault::ErrorMidStream { after_events: 1 }, StreamFault::TrailingErrorAfterTerminal],
        ..MockConfig::default()
    })
    .await;
    let sandbox = Sandbox::new(GEMINI, 1);
    let jongler = connect(&sandbox, &mock, Duration::from_secs(10)).await;
    let (bytes, _) = read(jongler.send(gemini_stream()).await.expect("committed")).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert_eq!(text.matches("data: ").count(), 2, "one good event, then the upstream's error: {text}");
    assert!(text.contains("The model is overloaded") && !text.contains("apijongler"), "{text}");
    settled_states(&sandbox).await;
    let (bytes, _) = read(jongler.send(gemini_stream()).await.expect("committed")).await;
    assert_eq!(bytes, good, "a complete answer, and nothing after it");
    settled_states(&sandbox).await;
    let outcomes = "SELECT count(*) FROM requests WHERE outcome = 'success'";
    assert_eq!(sandbox.count(outcomes), 1, "the trailing error does not spoil the complete answer");
}

/// A reader that goes away mid-stream frees the key at once and the attempt is recorded as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_mid_stream_frees_the_key_at_once() {
    let config = MockConfig { stream_delay: Duration::from_secs(30), ..MockConfig::default() };
    let mock = mock(config).await;
    let sandbox = Sandbox::new(GEMINI, 1);
    let jongler = connect(&sandbox, &mock, Duration::from_secs(60)).await;
    let exchange = jongler.send(gemini_stream()).await.expect("committed");
    let ExchangeBody::Stream(mut stream) = exchange.body else { panic!("a stream") };
    assert!(stream.chunk().await.is_some(), "the first event");
    assert_eq!(sandbox.states(), [("key0".to_owned(), "locked".to_owned())], "held while streaming");
    drop(stream);
    // Far less than the 30 s the next event would take, or the 60 s of the idle timeout.
    assert!(mock.wait_key_idle(&secret(0), Duration::from_secs(10)).await, "the upstream request was dropped");
    assert_eq!(settled_states(&sandbox).await, [("key0".to_owned(), "vacant".to_owned())]);
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'cancelled'"), 1);
}

/// A stream whose dialect is unknown (`Dialect::Plain`: an API apijongler cannot read) has an end no
/// one can judge: a complete upstream stream goes out verbatim with nothing appended, and counts as a
/// success (it was a `{"error":"..."}` event after the upstream's last one, and a "stream broken").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_end_cannot_be_judged_gets_nothing_appended() {
    for (outgoing, dialect) in [(gemini_stream(), StreamDialect::Gemini), (chat_stream(), StreamDialect::OpenAi)] {
        let mock = mock(MockConfig::default()).await;
        let sandbox = Sandbox::new(GEMINI, 1);
        let jongler = connect(&sandbox, &mock, Duration::from_secs(10)).await;
        let outgoing = Outgoing { stream: Some(Dialect::Plain), ..outgoing };
        let (bytes, streamed) = read(jongler.send(outgoing).await.expect("stream")).await;
        assert!(streamed);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&concat(&good_stream(dialect, MODEL, EVENTS))),
            "{dialect:?}: verbatim, nothing after the upstream's end"
        );
        settled_states(&sandbox).await;
        assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'"), 1, "{dialect:?}");
    }
}
