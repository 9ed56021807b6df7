//! Quotas as Gemini meters them, through real HTTP: the loopback mock counts requests per (project,
//! model), answers Gemini's real 429s, and says when a request reached a bucket that had already
//! answered a per-day 429 (a request apijongler should never have sent).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream, ModelQuota};
use api_jongler::{Clock, CoordinatorOptions, Error, Jongler, ManualClock};
use common::Sandbox;

const GEMINI: &str = "generativelanguage.googleapis.com";
const PRO: &str = "/v1beta/models/gemini-2.5-pro:generateContent";
const FLASH: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

fn secret(index: usize) -> String {
    format!("fake-secret-{GEMINI}-{index}-do-not-use")
}

/// A mock where gemini-2.5-pro allows `pro_per_day` requests a day per project, and flash is unlimited.
async fn mock(pro_per_day: u32, projects: HashMap<String, String>) -> MockUpstream {
    let pro = ModelQuota { model: "gemini-2.5-pro".to_owned(), per_day: Some(pro_per_day), ..ModelQuota::default() };
    let config = MockConfig { model_quotas: vec![pro], projects, latency: Duration::ZERO, ..MockConfig::default() };
    MockUpstream::start(config).await.expect("mock")
}

/// `keys` Gemini keys pointed at `mock`, with `groups` as the keyring's `[... groups]` section.
fn sandbox(keys: usize, groups: &str, mock: &MockUpstream) -> Sandbox {
    let mut ini = format!("[{GEMINI}]\n");
    for index in 0..keys {
        ini.push_str(&format!("key{index} = {}\n", secret(index)));
    }
    if !groups.is_empty() {
        ini.push_str(&format!("[{GEMINI} groups]\n{groups}"));
    }
    let sandbox = Sandbox::with_keyring(&ini);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 4}));
    sandbox
}

async fn connect(sandbox: &Sandbox, options: Option<CoordinatorOptions>) -> Jongler {
    let mut builder = Jongler::builder(GEMINI)
        .keyring(&sandbox.keyring)
        .database(&sandbox.db)
        .connectors_dir(sandbox.connectors_dir());
    if let Some(options) = options {
        builder = builder.coordinator(options);
    }
    builder.connect().await.expect("connect")
}

/// The mock's counts for one model, summed over its projects: (requests, 200s, 429s, after a 429).
fn seen(mock: &MockUpstream, model: &str) -> (u64, u64, u64, u64) {
    mock.model_stats().iter().filter(|((_, m), _)| m == model).fold((0, 0, 0, 0), |sum, (_, s)| {
        (sum.0 + s.requests, sum.1 + s.ok, sum.2 + s.rate_limited, sum.3 + s.after_429)
    })
}

/// The issue's scenario: 4 keys, each in its own project; pro allows 2 requests a day, flash is
/// unlimited. Once pro's day is spent, every flash request still succeeds, and no pro request reaches
/// the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_quota_of_one_model_leaves_every_key_to_the_others() {
    let mock = mock(2, HashMap::new()).await;
    let sandbox = sandbox(4, "", &mock);
    let jongler = connect(&sandbox, None).await;
    for _ in 0..8 {
        assert_eq!(jongler.request("POST", PRO, "{}").await.expect("pro").status, 200);
    }
    // The ninth meets each project's 429 once, and finds no key left for pro.
    let error = jongler.request("POST", PRO, "{}").await.expect_err("pro's day is spent");
    let message = error.to_string();
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{message}");
    assert!(message.contains("0 of 4 keys") && message.contains("free for gemini-2.5-pro"), "{message}");
    assert!(message.contains("4 locked down for it") && message.contains("daily quota"), "{message}");
    for _ in 0..3 {
        jongler.request("POST", PRO, "{}").await.expect_err("still spent");
    }
    assert_eq!(seen(&mock, "gemini-2.5-pro"), (12, 8, 4, 0), "no pro request after each project's 429");
    for _ in 0..20 {
        let response = jongler.request("POST", FLASH, "{}").await.expect("flash");
        assert_eq!((response.status, response.attempts), (200, 1), "flash is never blocked by pro");
    }
    assert_eq!(seen(&mock, "gemini-2.5-flash"), (20, 20, 0, 0));
    // Keys are whole for the seed's view and for flash, locked down for pro.
    assert!(jongler.lockdown_keys().await.expect("states").is_empty());
    assert_eq!(jongler.key_states_for(Some("gemini-2.5-pro")).await.expect("states").lockdown.len(), 4);
    assert_eq!(jongler.key_states_for(Some("gemini-2.5-flash")).await.expect("states").vacant.len(), 4);
    // The requests table says which model each attempt was for.
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE model = 'gemini-2.5-pro'"), 12);
}

/// Two projects of two keys each, declared in the keyring: a per-day 429 locks the whole project for
/// pro, so its second key never asks the bucket that already said no.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_one_declared_group_share_its_lockdown() {
    let projects: HashMap<String, String> =
        (0..4).map(|index| (secret(index), if index < 2 { "alpha" } else { "beta" }.to_owned())).collect();
    let mock = mock(2, projects).await;
    let groups = "key0 = alpha\nkey1 = alpha\nkey2 = beta\nkey3 = beta\n";
    let sandbox = sandbox(4, groups, &mock);
    let jongler = connect(&sandbox, None).await;
    for _ in 0..4 {
        assert_eq!(jongler.request("POST", PRO, "{}").await.expect("pro").status, 200);
    }
    let message = jongler.request("POST", PRO, "{}").await.expect_err("pro's day is spent").to_string();
    assert!(message.contains("free for gemini-2.5-pro"), "{message}");
    assert_eq!(seen(&mock, "gemini-2.5-pro"), (6, 4, 2, 0), "one 429 per project, none after it");
    assert_eq!(
        sandbox.count("SELECT count(*) FROM lockdowns WHERE model = 'gemini-2.5-pro' AND scope LIKE 'group:%'"),
        2
    );
    for _ in 0..8 {
        assert_eq!(jongler.request("POST", FLASH, "{}").await.expect("flash").status, 200);
    }
}

/// Without the groups section, the same two projects cost one wasted 429 each: what the section saves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_keys_of_one_project_each_learn_the_429_themselves() {
    let projects: HashMap<String, String> =
        (0..4).map(|index| (secret(index), if index < 2 { "alpha" } else { "beta" }.to_owned())).collect();
    let mock = mock(2, projects).await;
    let sandbox = sandbox(4, "", &mock);
    let jongler = connect(&sandbox, None).await;
    for _ in 0..4 {
        jongler.request("POST", PRO, "{}").await.expect("pro");
    }
    jongler.request("POST", PRO, "{}").await.expect_err("pro's day is spent");
    assert_eq!(seen(&mock, "gemini-2.5-pro"), (8, 4, 4, 2));
}

/// A per-minute lockdown of flash on every key, while pro keeps flowing through the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_minute_lockdown_of_one_model_leaves_the_other_flowing() {
    let flash = ModelQuota { model: "gemini-2.5-flash".to_owned(), per_minute: Some(1), ..ModelQuota::default() };
    let config = MockConfig {
        model_quotas: vec![flash],
        // A "minute" no test run outlives, so the lockdowns are still in force at the end.
        minute: Duration::from_secs(3_600),
        latency: Duration::ZERO,
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = sandbox(2, "", &mock);
    let jongler = connect(&sandbox, None).await;
    for _ in 0..2 {
        assert_eq!(jongler.request("POST", FLASH, "{}").await.expect("flash").status, 200);
    }
    let message = jongler.request("POST", FLASH, "{}").await.expect_err("flash's minute is spent").to_string();
    // The mock names its hour-long "minute" in its quota id (so that no client learns it as a limit per minute).
    let quota = "GenerateRequestsPer3600000MillisecondsPerProjectPerModel-Mock";
    assert!(message.contains("free for gemini-2.5-flash") && message.contains(quota), "{message}");
    for _ in 0..10 {
        let response = jongler.request("POST", PRO, "{}").await.expect("pro");
        assert_eq!((response.status, response.attempts), (200, 1));
    }
    // Keys locked down for flash still take turns serving pro.
    let keys = "SELECT count(DISTINCT key_name) FROM requests WHERE model = 'gemini-2.5-pro' AND status = 200";
    assert_eq!(sandbox.count(keys), 2, "pro used both keys");
    jongler.request("POST", FLASH, "{}").await.expect_err("still locked down");
    let stats = mock.model_stats();
    let flash_stats: Vec<_> = stats.iter().filter(|((_, model), _)| model == "gemini-2.5-flash").collect();
    assert!(flash_stats.iter().all(|(_, s)| s.before_deadline == 0 && s.rate_limited == 1), "{flash_stats:?}");
}

/// The day of a per-day lockdown ends at midnight in Los Angeles, on the days the clocks change too:
/// pro is refused a millisecond before and served at midnight; flash is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_lockdown_of_one_model_ends_at_pacific_midnight_across_daylight_saving() {
    // (when the quota runs out, UTC; the next Pacific midnight, UTC)
    let days = [
        ("2026-03-07T22:00:00Z", "2026-03-08T08:00:00Z"), // Saturday before spring forward: PST midnight
        ("2026-03-08T20:00:00Z", "2026-03-09T07:00:00Z"), // the 23-hour day: PDT midnight
        ("2026-10-31T20:00:00Z", "2026-11-01T07:00:00Z"), // Saturday before fall back: PDT midnight
        ("2026-11-01T20:00:00Z", "2026-11-02T08:00:00Z"), // the 25-hour day: PST midnight
    ];
    let ms = |text: &str| chrono::DateTime::parse_from_rfc3339(text).expect("time").timestamp_millis();
    for (spent, midnight) in days {
        let mock = mock(1, HashMap::new()).await;
        let sandbox = sandbox(1, "", &mock);
        let clock = Arc::new(ManualClock::new(ms(spent)));
        let options = CoordinatorOptions { clock: clock.clone(), ..sandbox.options() };
        let jongler = connect(&sandbox, Some(options)).await;
        assert_eq!(jongler.request("POST", PRO, "{}").await.expect("pro").status, 200);
        jongler.request("POST", PRO, "{}").await.expect_err("pro's day is spent");
        clock.set(ms(midnight) - 1);
        jongler.request("POST", PRO, "{}").await.expect_err("still the same Pacific day");
        assert_eq!(jongler.request("POST", FLASH, "{}").await.expect("flash").status, 200, "{spent}");
        mock.reset_day();
        clock.set(ms(midnight));
        assert_eq!(jongler.request("POST", PRO, "{}").await.expect("a new day").status, 200, "{spent}");
        assert_eq!(seen(&mock, "gemini-2.5-pro"), (3, 2, 1, 0), "{spent}");
    }
}

/// Hint-less 429s escalate per (key, model): three for flash lock it 60, 120, then 240 s; pro's first
/// is 60 s whatever flash went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hintless_lockdowns_escalate_per_model() {
    let config = MockConfig {
        bare_429_models: ["gemini-2.5-flash", "gemini-2.5-pro"].map(str::to_owned).into_iter().collect(),
        latency: Duration::ZERO,
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = sandbox(1, "", &mock);
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let options = CoordinatorOptions { clock: clock.clone(), ..sandbox.options() };
    let jongler = connect(&sandbox, Some(options)).await;
    let lockdown_of = |model: &str| {
        let store = jongler.coordinator().store();
        let lockdowns = store.lockdowns(Some(GEMINI)).expect("lockdowns");
        let found = lockdowns
            .into_iter()
            .find(|l| l.model.to_string() == model && l.scope.to_string() == "key:key0")
            .expect("lockdown");
        ((found.until - clock.now_ms()) / 1000, found.strikes)
    };
    for (round, expected) in [(1, 60), (2, 120), (3, 240)] {
        jongler.request("POST", FLASH, "{}").await.expect_err("bare 429");
        assert_eq!(lockdown_of("gemini-2.5-flash"), (expected, round));
        clock.advance(expected * 1000);
    }
    jongler.request("POST", PRO, "{}").await.expect_err("bare 429");
    assert_eq!(lockdown_of("gemini-2.5-pro"), (60, 1), "pro's strikes are its own");
    let (_, per_key) = mock.stats();
    assert_eq!(per_key.values().map(|s| s.before_deadline).sum::<u64>(), 0);
}

/// A new secret is a new key: the lockdowns of the old key alone are lifted, its group's stay.
#[test]
fn a_new_secret_lifts_the_lockdowns_of_the_old_key_alone() {
    use api_jongler::pool::{Fate, Lockdown, Reach};
    let sandbox = Sandbox::with_keyring(&format!(
        "[{GEMINI}]\nkey0 = {}\nkey1 = {}\n[{GEMINI} groups]\nkey1 = team\n",
        secret(0),
        secret(1)
    ));
    let coordinator = sandbox.coordinator(sandbox.options());
    let until = coordinator.now_ms() + 3_600_000;
    for key in ["key0", "key1"] {
        let lease = coordinator.claim_for(GEMINI, Some("gemini-2.5-pro"), &[], Duration::ZERO).expect("claim");
        assert_eq!(lease.key_name(), key);
        let reach = if key == "key0" { Reach::Key } else { Reach::Group };
        let lockdown = Lockdown {
            models: vec!["gemini-2.5-pro".to_owned()],
            reach,
            ..Lockdown::whole_key(until, "429", Some(429))
        };
        lease.finish(&Fate::Lockdown(lockdown), None).expect("lockdown");
    }
    coordinator.claim_for(GEMINI, Some("gemini-2.5-pro"), &[], Duration::ZERO).expect_err("both locked for pro");
    let renewed =
        format!("[{GEMINI}]\nkey0 = fake-new-secret-0\nkey1 = fake-new-secret-1\n[{GEMINI} groups]\nkey1 = team\n");
    std::fs::write(&sandbox.keyring, renewed).expect("write keyring");
    coordinator.sync_as_truth(&api_jongler::Keyring::load(&sandbox.keyring).expect("keyring")).expect("sync");
    let scopes: Vec<String> = coordinator
        .store()
        .lockdowns(Some(GEMINI))
        .expect("lockdowns")
        .into_iter()
        .map(|l| l.scope.to_string())
        .collect();
    assert_eq!(scopes, ["group:team"], "the group's lockdown stays");
    let lease = coordinator.claim_for(GEMINI, Some("gemini-2.5-pro"), &[], Duration::ZERO).expect("key0 is new");
    assert_eq!(lease.key_name(), "key0");
}

fn lockdown_of_group(model: &str, until: i64, project: Option<&str>) -> api_jongler::pool::Lockdown {
    api_jongler::pool::Lockdown {
        reach: api_jongler::pool::Reach::Group,
        models: vec![model.to_owned()],
        project: project.map(str::to_owned),
        ..api_jongler::pool::Lockdown::whole_key(until, "429 daily quota", Some(429))
    }
}

/// A new secret is a new key, maybe of another project: the project the old one revealed is forgotten,
/// and with it that project's lockdowns.
#[test]
fn a_new_secret_forgets_the_project_the_old_one_revealed() {
    use api_jongler::pool::Fate;
    let sandbox = Sandbox::with_keyring(&format!("[{GEMINI}]\nkey0 = {}\n", secret(0)));
    let coordinator = sandbox.coordinator(sandbox.options());
    let lease = coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("claim");
    let until = coordinator.now_ms() + 3_600_000;
    lease.finish(&Fate::Lockdown(lockdown_of_group("m", until, Some("123456"))), None).expect("lockdown");
    assert_eq!(sandbox.count("SELECT count(*) FROM keys WHERE quota_scope = 'project:123456'"), 1);
    std::fs::write(&sandbox.keyring, format!("[{GEMINI}]\nkey0 = fake-new-secret-0\n")).expect("write keyring");
    coordinator.sync_as_truth(&api_jongler::Keyring::load(&sandbox.keyring).expect("keyring")).expect("sync");
    assert_eq!(sandbox.count("SELECT count(*) FROM keys WHERE project_learned IS NULL"), 1);
    coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("the new key is free for m");
}

/// Keys that join a group locked down for a model move behind the keys free for it in the claim order,
/// so a claim for that model still stops at the first key it looks at.
#[test]
fn keys_joining_a_locked_group_move_behind_the_free_ones() {
    use api_jongler::pool::Fate;
    let mut ini = format!("[{GEMINI}]\n");
    for index in 0..6 {
        ini.push_str(&format!("key{index} = {}\n", secret(index)));
    }
    let sandbox = Sandbox::with_keyring(&format!("{ini}[{GEMINI} groups]\nkey5 = team\n"));
    let coordinator = sandbox.coordinator(sandbox.options());
    let until = coordinator.now_ms() + 3_600_000;
    let lease = coordinator
        .claim_for(GEMINI, Some("m"), &["key0", "key1", "key2", "key3", "key4"].map(String::from), Duration::ZERO)
        .expect("key5");
    lease.finish(&Fate::Lockdown(lockdown_of_group("m", until, None)), None).expect("lockdown");
    let regrouped = format!("{ini}[{GEMINI} groups]\nkey0 = team\nkey1 = team\nkey2 = team\nkey5 = team\n");
    std::fs::write(&sandbox.keyring, regrouped).expect("write keyring");
    coordinator.sync(&api_jongler::Keyring::load(&sandbox.keyring).expect("keyring")).expect("sync");
    // SQLite keeps the claim order in a column; PostgreSQL's claim has none to keep (see its migration).
    if !common::store::on_postgres() {
        let behind = format!("SELECT count(*) FROM keys WHERE quota_group = 'team' AND queue_at >= {until}");
        assert_eq!(sandbox.count(&behind), 4, "every key of the locked group is behind the free ones");
    }
    let lease = coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("a key free for m");
    assert!(["key3", "key4"].contains(&lease.key_name()), "{}", lease.key_name());
}

/// Keys locked down for one model still take turns serving the others, least recently used first.
#[test]
fn keys_locked_down_for_one_model_still_rotate_for_the_others() {
    use api_jongler::pool::Fate;
    let sandbox = Sandbox::new(GEMINI, 4);
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let coordinator = sandbox.coordinator(CoordinatorOptions { clock: clock.clone(), ..sandbox.options() });
    for _ in 0..3 {
        let lease = coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("claim");
        lease.finish(&Fate::Lockdown(lockdown_of_group("m", clock.now_ms() + 3_600_000, None)), None).expect("x");
    }
    let mut used = std::collections::BTreeSet::new();
    for _ in 0..4 {
        clock.advance(1_000);
        let lease = coordinator.claim_for(GEMINI, Some("n"), &[], Duration::ZERO).expect("claim");
        used.insert(lease.key_name().to_owned());
        lease.release().expect("release");
    }
    assert_eq!(used.len(), 4, "four claims for n used four keys: {used:?}");
}

/// A group locked down for a model while one of its keys is held: once freed, that key stays kept from
/// the model with the others, and serves the rest. (On PostgreSQL, the lockdown's trigger marks the held
/// key too, so its release and the claims after it read the lockdown.)
#[test]
fn a_key_held_while_its_group_is_locked_down_is_kept_from_the_model_once_freed() {
    use api_jongler::pool::Fate;
    let sandbox = Sandbox::with_keyring(&format!(
        "[{GEMINI}]\nkey0 = {}\nkey1 = {}\n[{GEMINI} groups]\nkey0 = team\nkey1 = team\n",
        secret(0),
        secret(1)
    ));
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let coordinator = sandbox.coordinator(CoordinatorOptions { clock: clock.clone(), ..sandbox.options() });
    let held = coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("claim");
    clock.advance(1_000);
    let other = coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("claim");
    let until = clock.now_ms() + 3_600_000;
    other.finish(&Fate::Lockdown(lockdown_of_group("m", until, None)), None).expect("lockdown");
    let held_name = held.key_name().to_owned();
    held.release().expect("release");
    assert_kept_from_m_serving_n(&coordinator, &held_name);
}

/// A key added to a group already locked down for a model is kept from that model from its first claim.
#[test]
fn a_key_added_to_a_locked_down_group_is_kept_from_the_model() {
    use api_jongler::pool::Fate;
    let sandbox = Sandbox::with_keyring(&format!("[{GEMINI}]\nkey0 = {}\n[{GEMINI} groups]\nkey0 = team\n", secret(0)));
    let coordinator = sandbox.coordinator(sandbox.options());
    let lease = coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).expect("claim");
    let until = coordinator.now_ms() + 3_600_000;
    lease.finish(&Fate::Lockdown(lockdown_of_group("m", until, None)), None).expect("lockdown");
    let grown = format!(
        "[{GEMINI}]\nkey0 = {}\nkey1 = {}\n[{GEMINI} groups]\nkey0 = team\nkey1 = team\n",
        secret(0),
        secret(1)
    );
    std::fs::write(&sandbox.keyring, grown).expect("write keyring");
    coordinator.sync(&api_jongler::Keyring::load(&sandbox.keyring).expect("keyring")).expect("sync");
    assert_kept_from_m_serving_n(&coordinator, "key1");
}

/// No key of the group locked down for `m` is claimed for it, and `lru`, the least recently used key,
/// serves `n`.
fn assert_kept_from_m_serving_n(coordinator: &api_jongler::Coordinator, lru: &str) {
    let refused =
        coordinator.claim_for(GEMINI, Some("m"), &[], Duration::ZERO).map(|lease| lease.key_name().to_owned());
    assert!(refused.is_err(), "the group is locked down for m, yet {refused:?} was claimed for it");
    let lease = coordinator.claim_for(GEMINI, Some("n"), &[], Duration::ZERO).expect("free for n");
    assert_eq!(lease.key_name(), lru, "the least recently used key serves n");
}

/// On PostgreSQL a row of `learned_limits`, written by apijongler or by hand, marks every key of its scope
/// (their scope watermark), as a row of `lockdowns` does: their claims then read the connector's latest
/// lesson. SQLite keeps no watermark.
#[test]
fn a_learned_limit_marks_the_keys_of_its_scope_alone() {
    if !common::store::on_postgres() {
        eprintln!("not run on SQLite: it keeps no scope watermark");
        return;
    }
    let sandbox = Sandbox::with_keyring(&format!(
        "[{GEMINI}]\nkey0 = {}\nkey1 = {}\nkey2 = {}\n[{GEMINI} groups]\nkey0 = team\nkey1 = team\n",
        secret(0),
        secret(1),
        secret(2)
    ));
    let _coordinator = sandbox.coordinator(sandbox.options());
    let marked = "SELECT key_name FROM keys WHERE scope_watermark IS NOT NULL ORDER BY key_name";
    assert_eq!(sandbox.sql().column::<String>(marked, &[]).expect("marked"), Vec::<String>::new());
    sandbox
        .sql()
        .execute(
            &format!(
                "INSERT INTO learned_limits (connector, quota_scope, model, quota_id, limit_text, until, learned_at, key_name)
                 VALUES ('{GEMINI}', 'group:team', 'm', 'q', '10/min', 4102444800000, 1, 'key0')"
            ),
            &[],
        )
        .expect("a learned limit");
    assert_eq!(sandbox.sql().column::<String>(marked, &[]).expect("marked"), ["key0", "key1"]);
}

/// A key kept across requests (per connection) whose group was locked down for a model meanwhile is
/// given back before a request for that model, which goes out on a key free for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_key_locked_down_for_the_model_is_given_back() {
    use api_jongler::LeaseScope;
    use api_jongler::pool::Fate;
    let mock = mock(10, HashMap::new()).await;
    let sandbox = sandbox(3, "key0 = team\nkey1 = team\n", &mock);
    let jongler = Jongler::builder(GEMINI)
        .keyring(&sandbox.keyring)
        .database(&sandbox.db)
        .connectors_dir(sandbox.connectors_dir())
        .scope(LeaseScope::PerConnection)
        .connect()
        .await
        .expect("connect");
    assert_eq!(jongler.locked_keys().await.expect("states"), ["key0"], "claimed at connect");
    // Another process's 429 on key1 locks pro down for the whole group, key0 included.
    let other = sandbox.coordinator(sandbox.options());
    let lease = other.claim_for(GEMINI, Some("gemini-2.5-pro"), &[], Duration::ZERO).expect("key1");
    assert_eq!(lease.key_name(), "key1");
    let until = other.now_ms() + 3_600_000;
    lease.finish(&Fate::Lockdown(lockdown_of_group("gemini-2.5-pro", until, None)), None).expect("lockdown");
    let response = jongler.request("POST", PRO, "{}").await.expect("pro");
    assert_eq!((response.status, response.key_name.as_deref(), response.attempts), (200, Some("key2"), 1));
    let flash = jongler.request("POST", FLASH, "{}").await.expect("flash");
    assert_eq!(flash.key_name.as_deref(), Some("key2"), "the new key is kept");
    assert_eq!(seen(&mock, "gemini-2.5-pro").0, 1, "pro never went out on the team's keys");
}

/// The project an upstream answer reveals (`consumer: projects/NNN`) reaches the key's row, from a
/// rate limit (a lockdown) and from a disabled service (an error): `classify` reads it from the body,
/// and nothing between the verdict and the store may drop it (a conversion that did passed every
/// other test, since the classify table stops at the verdict and the store tests start at the fate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_project_an_answer_reveals_is_learned_by_the_key() {
    // A rate limit of the whole project: the key is locked down, and learns its project.
    let config = MockConfig {
        project_rate_limited: ["alpha".to_owned()].into(),
        projects: [(secret(0), "alpha".to_owned())].into(),
        latency: Duration::ZERO,
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    let rate_limited = sandbox(1, "", &mock);
    let jongler = connect(&rate_limited, None).await;
    let error = jongler.request("POST", PRO, "{}").await.expect_err("the only key is locked down");
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
    let number = api_jongler::mock::project_number("alpha").to_string();
    let learned: Option<String> = rate_limited.sql().value("SELECT project_learned FROM keys", &[]).expect("key row");
    assert_eq!(learned.as_deref(), Some(number.as_str()), "the lockdown's project reached the key");

    // A service disabled for the key's project: once another key answers the same request, the key
    // goes to error, and learns its project.
    let disabled = r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 411082643095 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","metadata":{"consumer":"projects/411082643095","service":"generativelanguage.googleapis.com"}}]}}"#;
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::header("x-goog-api-key", secret(0).as_str()))
        .respond_with(wiremock::ResponseTemplate::new(403).set_body_raw(disabled, "application/json"))
        .mount(&server)
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_raw(r#"{"candidates":[]}"#, "application/json"))
        .mount(&server)
        .await;
    let sandbox = Sandbox::with_keyring(&format!("[{GEMINI}]\nkey0 = {}\nkey1 = {}\n", secret(0), secret(1)));
    sandbox.point_connector(GEMINI, "127.0.0.1", server.address().port(), serde_json::json!({"backoff_ms": 5}));
    let jongler = connect(&sandbox, None).await;
    // Two requests: whichever key the first takes, key0 is tried by one of them.
    for _ in 0..2 {
        let response = jongler.request("POST", PRO, "{}").await.expect("an answer");
        assert_eq!(response.status, 200, "the other key answered: {response:?}");
    }
    let row =
        sandbox.sql().row("SELECT state, project_learned FROM keys WHERE key_name = 'key0'", &[]).expect("key row");
    let (state, learned): (String, Option<String>) = (row.get(0), row.get(1));
    assert_eq!(
        (state.as_str(), learned.as_deref()),
        ("error", Some("411082643095")),
        "the error's project reached the key"
    );
}
