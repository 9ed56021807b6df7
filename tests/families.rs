//! Connectors that say (or do not say) which API they speak, through real HTTP against the loopback
//! mock: a connector written in the Python package's documented format (name, host, port, protocol,
//! format, requires_api_key, api_key_header; no `api`, no `model`) keeps per-model and group lockdowns
//! and clean stream ends, as the shipped connector does; methods that quotas do not meter (counting
//! tokens, getting or listing models) are not stopped by a model's lockdown.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream, ModelQuota, StreamDialect, good_stream};
use api_jongler::pool::{Fate, Lockdown};
use api_jongler::{Error, Jongler};
use bytes::Bytes;
use common::Sandbox;
use common::gateway::{Gateway, client};

/// A connector the user wrote for a Gemini-compatible proxy: a name no shipped connector has.
const PROXY: &str = "gemini-proxy";
const PRO: &str = "gemini-2.5-pro";
const FLASH: &str = "gemini-2.5-flash";
const EVENTS: usize = 3;

fn secret(connector: &str, index: usize) -> String {
    format!("fake-secret-{connector}-{index}-do-not-use")
}

fn generate(model: &str) -> String {
    format!("/v1beta/models/{model}:generateContent")
}

/// `keys` keys of `connector`, with `groups` as its `[... groups]` section, and a connector file in
/// the seed's documented format pointing `connector` at `port`.
fn seed_sandbox(connector: &str, keys: usize, groups: &str, port: u16) -> Sandbox {
    let mut ini = format!("[{connector}]\n");
    for index in 0..keys {
        ini.push_str(&format!("key{index} = {}\n", secret(connector, index)));
    }
    if !groups.is_empty() {
        ini.push_str(&format!("[{connector} groups]\n{groups}"));
    }
    let sandbox = Sandbox::with_keyring(&ini);
    write_seed_connector(&sandbox, connector, port);
    sandbox
}

/// The seed README's connector example, with the header Gemini takes its key in: nothing else.
fn write_seed_connector(sandbox: &Sandbox, connector: &str, port: u16) {
    let dir = sandbox.connectors_dir();
    std::fs::create_dir_all(&dir).expect("mkdir connectors");
    let file = serde_json::json!({
        "name": connector, "host": "127.0.0.1", "port": port, "protocol": "http", "format": "json",
        "requires_api_key": true, "api_key_header": "x-goog-api-key"
    });
    std::fs::write(dir.join(format!("{connector}.json")), file.to_string()).expect("write connector");
}

async fn connect(sandbox: &Sandbox, connector: &str) -> Jongler {
    Jongler::builder(connector)
        .keyring(&sandbox.keyring)
        .database(&sandbox.db)
        .connectors_dir(sandbox.connectors_dir())
        .connect()
        .await
        .expect("connect")
}

/// A mock where pro allows `pro_per_day` requests a day per project; flash is unlimited.
async fn quota_mock(pro_per_day: u32, projects: HashMap<String, String>) -> MockUpstream {
    let pro = ModelQuota { model: PRO.to_owned(), per_day: Some(pro_per_day), ..ModelQuota::default() };
    let config = MockConfig { model_quotas: vec![pro], projects, latency: Duration::ZERO, ..MockConfig::default() };
    MockUpstream::start(config).await.expect("mock")
}

/// The mock's counts for one model, summed over its projects: (requests, 200s, 429s, after a 429).
fn seen(mock: &MockUpstream, model: &str) -> (u64, u64, u64, u64) {
    mock.model_stats().iter().filter(|((_, m), _)| m == model).fold((0, 0, 0, 0), |sum, (_, s)| {
        (sum.0 + s.requests, sum.1 + s.ok, sum.2 + s.rate_limited, sum.3 + s.after_429)
    })
}

/// The issue's scenario on a seed-format connector: pro's daily quota is spent on every key, and every
/// one of 20 flash requests still succeeds at the first attempt (it was 0 of 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_format_connector_locks_down_one_model_not_the_keys() {
    let mock = quota_mock(2, HashMap::new()).await;
    let sandbox = seed_sandbox(PROXY, 4, "", mock.port());
    let jongler = connect(&sandbox, PROXY).await;
    for _ in 0..8 {
        assert_eq!(jongler.request("POST", &generate(PRO), "{}").await.expect("pro").status, 200);
    }
    let error = jongler.request("POST", &generate(PRO), "{}").await.expect_err("pro's day is spent");
    let message = error.to_string();
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{message}");
    assert!(message.contains("free for gemini-2.5-pro"), "{message}");
    for _ in 0..20 {
        let response = jongler.request("POST", &generate(FLASH), "{}").await.expect("flash");
        assert_eq!((response.status, response.attempts), (200, 1), "flash is never blocked by pro");
    }
    assert_eq!(seen(&mock, FLASH), (20, 20, 0, 0));
    assert_eq!(seen(&mock, PRO), (12, 8, 4, 0), "one 429 per project, none after it");
    assert!(jongler.lockdown_keys().await.expect("states").is_empty(), "no key is locked for every model");
    assert_eq!(jongler.key_states_for(Some(PRO)).await.expect("states").lockdown.len(), 4);
    // OpenAI-compatible requests on the same connector name their model in the body.
    let chat = format!(r#"{{"model":"{PRO}","messages":[]}}"#);
    let error = jongler.request("POST", "/v1beta/openai/chat/completions", &chat).await.expect_err("pro");
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
    let chat = format!(r#"{{"model":"{FLASH}","messages":[]}}"#);
    assert_eq!(jongler.request("POST", "/v1beta/openai/chat/completions", &chat).await.expect("flash").status, 200);
}

/// Keys declared in one group share its lockdown on a seed-format connector too: one 429 per group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_format_connector_shares_a_group_s_lockdown() {
    let projects: HashMap<String, String> =
        (0..4).map(|index| (secret(PROXY, index), if index < 2 { "alpha" } else { "beta" }.to_owned())).collect();
    let mock = quota_mock(2, projects).await;
    let groups = "key0 = alpha\nkey1 = alpha\nkey2 = beta\nkey3 = beta\n";
    let sandbox = seed_sandbox(PROXY, 4, groups, mock.port());
    let jongler = connect(&sandbox, PROXY).await;
    for _ in 0..4 {
        assert_eq!(jongler.request("POST", &generate(PRO), "{}").await.expect("pro").status, 200);
    }
    jongler.request("POST", &generate(PRO), "{}").await.expect_err("pro's day is spent");
    assert_eq!(seen(&mock, PRO), (6, 4, 2, 0), "one 429 per group, none after it");
    let groups_locked = "SELECT count(*) FROM lockdowns WHERE model = 'gemini-2.5-pro' AND scope LIKE 'group:%'";
    assert_eq!(sandbox.count(groups_locked), 2);
    for _ in 0..8 {
        assert_eq!(jongler.request("POST", &generate(FLASH), "{}").await.expect("flash").status, 200);
    }
}

fn concat(chunks: &[Bytes]) -> Vec<u8> {
    chunks.iter().flat_map(|chunk| chunk.iter().copied()).collect()
}

/// Streams through `serve` on a seed-format connector end exactly as the upstream ended them: a
/// complete Gemini stream and a complete OpenAI stream, with nothing of apijongler's after the terminal
/// event (it was `{"error":"..."}` after Gemini's `finishReason`, which google-genai cannot read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_through_serve_on_a_seed_format_connector_end_cleanly() {
    let config = MockConfig { latency: Duration::ZERO, stream_events: EVENTS, ..MockConfig::default() };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = seed_sandbox(PROXY, 2, "", mock.port());
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let response = http
        .post(gateway.url(&format!("/{PROXY}/v1beta/models/{FLASH}:streamGenerateContent?alt=sse")))
        .header("x-goog-api-key", "placeholder")
        .body(r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.expect("body");
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&concat(&good_stream(StreamDialect::Gemini, FLASH, EVENTS))),
        "Gemini: the upstream's bytes, nothing after finishReason"
    );
    for path in ["/v1beta/openai/chat/completions", "/v1/chat/completions"] {
        let body = format!(r#"{{"model":"{FLASH}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#);
        let response = http
            .post(gateway.url(&format!("/{PROXY}{path}")))
            .bearer_auth("placeholder")
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "{path}");
        let bytes = response.bytes().await.expect("body");
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&concat(&good_stream(StreamDialect::OpenAi, FLASH, EVENTS))),
            "{path}: the upstream's bytes, nothing after [DONE]"
        );
    }
    common::wait_until(Duration::from_secs(10), "every lease settled", || {
        sandbox.states().iter().all(|(_, state)| state == "vacant")
    });
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'"), 3);
}

/// Locks `model` down (every model when `None`) for each of the connector's `keys` keys, as their 429s would.
fn lock_down(sandbox: &Sandbox, connector: &str, keys: usize, model: Option<&str>) {
    let coordinator = sandbox.coordinator(sandbox.options());
    let until = coordinator.now_ms() + 3_600_000;
    for _ in 0..keys {
        let lease = coordinator.claim_for(connector, model, &[], Duration::ZERO).expect("a key free for the model");
        let lockdown = Lockdown {
            models: model.into_iter().map(str::to_owned).collect(),
            ..Lockdown::whole_key(until, "429", Some(429))
        };
        lease.finish(&Fate::Lockdown(lockdown), None).expect("lockdown");
    }
}

/// Once pro is locked down on every key, generating with pro is refused, but counting its tokens and
/// getting or listing models still go out (quotas of generation do not meter them), on the shipped
/// connector and on a seed-format one alike. A lockdown of every model still stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_quotas_do_not_meter_pass_a_model_s_lockdown() {
    let mock =
        MockUpstream::start(MockConfig { latency: Duration::ZERO, ..MockConfig::default() }).await.expect("mock");
    let gemini = common::gateway::GEMINI;
    for connector in [PROXY, gemini] {
        let sandbox = seed_sandbox(connector, 2, "", mock.port());
        lock_down(&sandbox, connector, 2, Some(PRO));
        let jongler = connect(&sandbox, connector).await;
        let error = jongler.request("POST", &generate(PRO), "{}").await.expect_err("pro is locked down");
        assert!(matches!(error, Error::NoKeyAvailable(_)), "{connector}: {error}");
        let unmetered = [
            ("POST", format!("/v1beta/models/{PRO}:countTokens")),
            ("GET", format!("/v1beta/models/{PRO}")),
            ("GET", "/v1beta/models".to_owned()),
            ("GET", "/v1beta/openai/models".to_owned()),
        ];
        for (method, path) in &unmetered {
            let response = jongler.request(method, path, if *method == "GET" { "" } else { "{}" }).await;
            let response = response.unwrap_or_else(|error| panic!("{connector}: {method} {path}: {error}"));
            assert_eq!(response.status, 200, "{connector}: {method} {path}");
        }
        // Through the gateway too.
        let gateway = Gateway::start(&sandbox, &[], &[]);
        let url = gateway.url(&format!("/{connector}/v1beta/models/{PRO}:countTokens"));
        let response = client().post(url).header("x-goog-api-key", "placeholder").body("{}").send().await.unwrap();
        assert_eq!(response.status(), 200, "{connector}: countTokens through serve");
        let url = gateway.url(&format!("/{connector}/v1beta/models/{PRO}:generateContent"));
        let response = client().post(url).header("x-goog-api-key", "placeholder").body("{}").send().await.unwrap();
        assert_eq!(response.status(), 429, "{connector}: generation through serve");
        let body = common::gateway::body_json(response).await;
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED", "{connector}: in Gemini's shape: {body}");
        drop(gateway);
        // A lockdown of every model of the keys' scopes still applies to every call (the keys, locked
        // down for pro only, are free for a claim of no model, which takes each once).
        lock_down(&sandbox, connector, 2, None);
        let error = jongler.request("POST", &format!("/v1beta/models/{PRO}:countTokens"), "{}").await;
        assert!(matches!(error, Err(Error::NoKeyAvailable(_))), "{connector}: {error:?}");
    }
}
