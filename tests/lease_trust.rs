//! A lost lease stops the use of its key where it matters: at the last moment before a request's
//! bytes leave (after the connection is set up, not before), and while a stream is being relayed.
//!
//! The leases are lost the way a user loses them: `cleanup --force` (the library's
//! `Coordinator::cleanup(_, true)`) while the holder is in the middle of its request; the upstream is
//! the loopback mock, which counts each key's requests in flight. Connection setup is made slow by a
//! loopback SOCKS5 proxy (the connector's Tor option) that holds the handshake until the test lets
//! it go, as a holder paused during a TLS handshake would be.

mod common;

use std::time::{Duration, Instant};

use api_jongler::mock::{KEY_HEADER, MockConfig, MockUpstream};
use api_jongler::{Bookkeeping, CoordinatorOptions, Dialect, ExchangeBody, Outgoing};
use common::Sandbox;
use common::socks::Socks5;

const GEMINI: &str = "generativelanguage.googleapis.com";
const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const STREAM: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";

fn secret(index: usize) -> String {
    format!("fake-secret-{GEMINI}-{index}-do-not-use")
}

/// `cleanup --force` until it took `key` from its holder: a heartbeat that lands between the
/// cleanup's read and its write wins, and the holder heartbeats every 100 ms here.
fn force_cleanup(coordinator: &api_jongler::Coordinator, key: &str) {
    common::wait_until(Duration::from_secs(10), "cleanup --force to take the key", || {
        let transitions = coordinator.cleanup(Some(GEMINI), true).expect("cleanup --force");
        transitions.iter().any(|transition| transition.key_name == key && transition.event.is_eviction())
    });
}

/// A holder stuck in connection setup (a paused VM in its TLS handshake) whose lease is lost meanwhile
/// never sends with it once the connection is up, while the key's new holder is in flight: the
/// upstream never sees the key twice at once, the stale request is not completed, and the request goes
/// to another key instead (nothing was processed upstream, so no key is blamed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_during_connection_setup_is_never_sent_with() {
    let mock =
        MockUpstream::start(MockConfig { latency: Duration::ZERO, ..MockConfig::default() }).await.expect("mock");
    let sandbox = Sandbox::new(GEMINI, 2);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 3}));
    let mut proxy = Socks5::holding().await;
    // A trust window of 900 ms (stale_after less one heartbeat): waiting that long after the cleanup
    // makes the lease untrusted whether or not the holder's heartbeat has run since.
    let options = CoordinatorOptions {
        heartbeat_interval: Duration::from_millis(100),
        stale_after: Duration::from_secs(1),
        ..sandbox.options()
    };
    let trust_window = Duration::from_millis(900);
    let holder = sandbox
        .jongler(GEMINI)
        .coordinator(options.clone())
        .tor_proxy(proxy.url())
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect");
    let stale = tokio::spawn({
        let holder = holder.clone();
        async move { holder.send(Outgoing::new(reqwest::Method::POST, GENERATE, "{}")).await }
    });
    tokio::time::timeout(Duration::from_secs(20), proxy.held.recv()).await.expect("the holder reaches the proxy");
    assert_eq!(
        sandbox.states(),
        [("key0".to_owned(), "locked".to_owned()), ("key1".to_owned(), "vacant".to_owned())],
        "key0 held while its connection is being set up"
    );

    // cleanup --force, then the key's new holder sends with it and stays in flight (the mock's /slow
    // paths answer after 60 s).
    let (coordinator, new_lease, cleaned) = tokio::task::spawn_blocking({
        let (sandbox_options, keyring) = (sandbox.options(), sandbox.load_keyring());
        move || {
            let coordinator = api_jongler::Coordinator::open(sandbox_options).expect("open");
            coordinator.sync(&keyring).expect("sync");
            force_cleanup(&coordinator, "key0");
            let cleaned = Instant::now();
            let lease = coordinator.claim(GEMINI, &["key1".to_owned()], Duration::ZERO).expect("claim key0 again");
            (coordinator, lease, cleaned)
        }
    })
    .await
    .expect("cleanup");
    assert_eq!(new_lease.key_name(), "key0");
    let in_flight = tokio::spawn(
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .post(format!("{}/slow{GENERATE}", mock.url()))
            .header(KEY_HEADER, secret(0))
            .body("{}")
            .send(),
    );
    assert!(
        mock.wait_for(Duration::from_secs(20), |keys| keys.get(&secret(0)).is_some_and(|stats| stats.in_flight() == 1))
            .await,
        "the new holder's request is in flight"
    );
    // Past the stale holder's trust window (monotonic time never runs ahead of the boot clock).
    let margin = Duration::from_millis(300);
    tokio::time::sleep((trust_window + margin).saturating_sub(cleaned.elapsed())).await;

    proxy.open();
    let exchange = tokio::time::timeout(Duration::from_secs(30), stale).await.expect("in time").expect("task");
    let exchange = exchange.expect("sent on another key");
    let (_, per_key) = mock.stats();
    assert_eq!(per_key[&secret(0)].max_in_flight, 1, "key0 was never in flight twice at once");
    let key0_requests = mock.seen_requests().iter().filter(|seen| seen.key.as_deref() == Some(&secret(0))).count();
    assert_eq!(key0_requests, 1, "only the new holder's request with key0 reached the upstream");
    assert_eq!((exchange.status, exchange.key_name.as_deref(), exchange.attempts), (200, Some("key1"), 2));
    assert_eq!(exchange.bookkeeping, Bookkeeping::Recorded, "nothing was sent with the lost lease");
    let not_sent = "SELECT count(*) FROM requests WHERE key_name = 'key0' AND outcome = 'lease lost, not sent'";
    assert_eq!(sandbox.count(not_sent), 1, "the refused attempt is recorded");
    common::wait_until(Duration::from_secs(10), "the refused connection closed", || proxy.forwarded(0).is_some());
    assert_eq!(proxy.forwarded(0), Some(0), "not one byte of the refused request left the process");

    in_flight.abort();
    assert_eq!(new_lease.key_name(), "key0", "the new holder still holds key0");
    tokio::task::spawn_blocking(move || {
        new_lease.release().expect("the new holder's lease was never touched by the stale one");
        drop(coordinator);
    })
    .await
    .expect("release");
}

/// A relayed stream watches its lease: once `cleanup --force` took it, the stream ends with one error
/// event in its dialect within a few heartbeats, the upstream stream is closed, and the key's new
/// holder keeps the key (the relay writes no end for a lease that is not its own any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_ends_once_its_lease_is_lost() {
    // An endless stream: an event every 100 ms for over 15 minutes.
    let config = MockConfig {
        latency: Duration::ZERO,
        stream_events: 10_000,
        stream_delay: Duration::from_millis(100),
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = Sandbox::new(GEMINI, 1);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 3}));
    let heartbeat = Duration::from_millis(100);
    let options = CoordinatorOptions { heartbeat_interval: heartbeat, ..sandbox.options() };
    let jongler =
        sandbox.jongler(GEMINI).coordinator(options).timeout(Duration::from_secs(30)).connect().await.expect("connect");
    let outgoing = Outgoing { stream: Some(Dialect::Google), ..Outgoing::new(reqwest::Method::POST, STREAM, "{}") };
    let exchange = jongler.send(outgoing).await.expect("committed");
    let ExchangeBody::Stream(mut stream) = exchange.body else { panic!("a stream") };
    assert!(stream.chunk().await.is_some(), "the first event");

    let (coordinator, new_lease) = tokio::task::spawn_blocking({
        let (options, keyring) = (sandbox.options(), sandbox.load_keyring());
        move || {
            let coordinator = api_jongler::Coordinator::open(options).expect("open");
            coordinator.sync(&keyring).expect("sync");
            force_cleanup(&coordinator, "key0");
            let lease = coordinator.claim(GEMINI, &[], Duration::ZERO).expect("the key is free again");
            (coordinator, lease)
        }
    })
    .await
    .expect("cleanup");

    // A few heartbeats find the lease lost; 10 s (100 heartbeats) is the margin of a loaded machine.
    let (after, ended) = common::drain(&mut stream, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&after).into_owned();
    assert!(ended, "the stream ended after the lease was lost; got {} bytes since", after.len());
    let ours = text.matches("data: {\"error\":").count();
    assert_eq!(ours, 1, "exactly one error event: {text}");
    let error_event = &text[text.find("data: {\"error\":").expect("an error event")..];
    assert!(error_event.ends_with("}}\r\n\r\n") && error_event.contains("lease"), "{error_event}");
    assert!(
        mock.wait_key_idle(&secret(0), Duration::from_secs(10)).await,
        "the upstream stream of the lost lease was closed"
    );
    let (_, per_key) = mock.stats();
    assert_eq!(per_key[&secret(0)].streams_cancelled, 1);
    common::wait_until(Duration::from_secs(10), "the attempt recorded", || {
        sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'lease lost'") == 1
    });
    assert_eq!(sandbox.states(), [("key0".to_owned(), "locked".to_owned())], "still the new holder's");
    tokio::task::spawn_blocking(move || {
        new_lease.release().expect("the new holder's lease was never touched by the relay");
        drop(coordinator);
    })
    .await
    .expect("release");
}
