//! No secret anywhere: a full scenario (successes, rate limits, a bad key, provider overloads, a
//! transport failure, cleanup) logged at trace level, then the captured logs, every error text and the
//! database bytes (WAL included) are searched for the secrets.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_jongler::Jongler;
use api_jongler::mock::{MockConfig, MockUpstream};
use common::Sandbox;

const GEMINI: &str = "generativelanguage.googleapis.com";

/// Everything every thread logs, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_errors_or_the_database() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");

    let bad = format!("fake-secret-{GEMINI}-2-do-not-use");
    let config = MockConfig {
        quota: Some(2),
        window: Duration::from_millis(300),
        bad_keys: [bad].into(),
        overload_every: Some(4),
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = Sandbox::new(GEMINI, 3);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5}));
    let dir = sandbox.connectors_dir();
    let jongler = Jongler::builder(GEMINI)
        .keyring(&sandbox.keyring)
        .database(&sandbox.db)
        .connectors_dir(&dir)
        .wait(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");

    let mut texts = vec![format!("{jongler:?}")];
    for _ in 0..12 {
        match jongler.request("POST", "/v1beta/models/m:generateContent?alt=sse", "{}").await {
            Ok(response) => texts.push(format!("{response:?}")),
            Err(error) => texts.push(format!("{error} / {error:?}")),
        }
    }
    let keyless = Jongler::builder(GEMINI).keyring(&sandbox.keyring).database(&sandbox.db).connectors_dir(&dir);
    let refused = {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        sandbox.point_connector(GEMINI, "127.0.0.1", port, serde_json::json!({"backoff_ms": 1, "retries": 1}));
        keyless.connect().await.expect("connect").request("POST", "/x", "{}").await.expect_err("refused")
    };
    texts.push(format!("{refused} / {refused:?} / {:?}", std::error::Error::source(&refused)));
    texts.extend(jongler.cleanup(true).await.expect("cleanup").iter().map(|t| format!("{t:?}")));

    let logs = String::from_utf8_lossy(&captured.0.lock().expect("logs")).into_owned();
    let database = sandbox.stored_text();
    let keyring = sandbox.load_keyring();
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "the scenario was logged in detail");
    for (_, key) in keyring.all_keys() {
        use secrecy::ExposeSecret;
        let secret = key.secret().expose_secret();
        assert!(!logs.contains(secret), "secret of {} in the logs", key.name());
        assert!(!database.contains(secret), "secret of {} in the database", key.name());
        for text in &texts {
            assert!(!text.contains(secret), "secret of {} in {text}", key.name());
        }
        assert!(logs.contains(key.fingerprint().as_str()), "key {} is identified by its fingerprint", key.name());
    }
}
