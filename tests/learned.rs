//! Limits the pool learns without being told, and token limits: a 429 whose `QuotaFailure` states its
//! limit (`quotaValue`) paces its quota scope for that model until the provider's next midnight, and a
//! token limit reserves each request's estimate and settles it from the answer's usage.

mod common;

use std::sync::Arc;
use std::time::Duration;

use api_jongler::classify::{self, Context};
use api_jongler::connector::Policy;
use api_jongler::{Error, ManualClock};
use common::Sandbox;

const GEMINI: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// Gemini's 429 for `model`'s quota of `limit` requests per minute per project, retry in 2 s.
fn per_minute_429(model: &str, limit: u32) -> String {
    serde_json::json!({"error": {
        "code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": limit.to_string(),
            }]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"},
        ],
    }})
    .to_string()
}

/// Ends `lease` (a claim for model m) as the replayed 429 of a quota of 3 requests per minute for m,
/// judged at `now` by the connector policy's rules, as an exchange would.
fn answer_3_per_minute(lease: api_jongler::Lease, now: i64) {
    let policy = Policy::default();
    let context = Context {
        now_ms: now,
        policy: &policy,
        lockdown_count: 0,
        retries: 0,
        via_tor: false,
        model: Some("m"),
        names_models: true,
    };
    let verdict = classify::classify(429, &Default::default(), &per_minute_429("m", 3), &context);
    lease.finish(&verdict.key, None).expect("finish");
}

/// Unix ms of `y-m-d h:m` UTC.
fn utc(date: (i32, u32, u32), (hour, minute): (u32, u32)) -> i64 {
    let day = chrono::NaiveDate::from_ymd_opt(date.0, date.1, date.2).expect("date");
    day.and_hms_opt(hour, minute, 0).expect("time").and_utc().timestamp_millis()
}

/// On each daylight-saving day of Los Angeles (2027-03-14 has 23 hours there, 2027-11-07 has 25): a
/// replayed `QuotaFailure` stating 3 requests per minute teaches group g that limit for model m. The
/// minute it came in is full; then 3 claims go through in a minute and the 4th is paced; the lesson is
/// forgotten at the next midnight in Los Angeles exactly (not 24 h later), and claims are free again.
#[test]
fn a_replayed_quota_failure_paces_its_scope_until_the_providers_midnight_on_both_daylight_saving_days() {
    // (when the 429 comes, the next midnight in Los Angeles)
    let days = [
        // 01:30 PST on the day clocks spring forward; midnight is 00:00 PDT, 07:00 UTC, 21.5 h later.
        (utc((2027, 3, 14), (9, 30)), utc((2027, 3, 15), (7, 0))),
        // 00:30 PDT on the day clocks fall back; midnight is 00:00 PST, 08:00 UTC, 24.5 h later.
        (utc((2027, 11, 7), (7, 30)), utc((2027, 11, 8), (8, 0))),
    ];
    for (taught_at, midnight) in days {
        let sandbox = Sandbox::with_keyring("[c]\nkey0 = fake-secret-c-0-do-not-use\n[c groups]\nkey0 = g\n");
        let clock = Arc::new(ManualClock::new(taught_at));
        let coordinator = sandbox.coordinator_on(&clock);
        let claim = || coordinator.claim_for("c", Some("m"), &[], Duration::ZERO);
        let lease = claim().expect("nothing paces the pool yet");
        answer_3_per_minute(lease, taught_at);
        let learned = coordinator.store().learned_limits("c", taught_at).expect("learned");
        let said: Vec<_> =
            learned.iter().map(|l| (l.scope.as_str(), l.model.as_str(), l.limit.to_string(), l.until)).collect();
        assert_eq!(said, [("group:g", "m", "3/min".to_owned(), midnight)], "taught at {taught_at}");

        // The 429 said the provider's minute is full: the lesson starts with its window full (3
        // reservations at the lesson), so the scope is paced for that minute and its margin, even once
        // the 429's own 2 s lockdown is over, instead of sending a burst.
        clock.set(taught_at + 2_000);
        assert!(matches!(claim(), Err(Error::NoKeyAvailable(_))), "the taught window starts full");
        clock.set(taught_at + 60_500);
        for _ in 0..3 {
            claim().expect("room in the learned window").release().expect("release");
            clock.advance(1_000);
        }
        let error = claim().expect_err("the learned window is full");
        assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
        let reason: String = sandbox
            .sql()
            .value("SELECT reason FROM lockdowns WHERE quota_id = 'apijongler:paced'", &[])
            .expect("a paced lockdown");
        assert_eq!(reason, "paced: 3/min learned from GenerateRequestsPerMinutePerProjectPerModel-FreeTier for m");
        coordinator
            .claim_for("c", Some("other"), &[], Duration::ZERO)
            .expect("other models are free")
            .release()
            .unwrap();

        // Just before midnight the lesson still holds: fill the minute again, and the next is paced.
        clock.set(midnight - 30_000);
        for _ in 0..3 {
            claim().expect("room").release().expect("release");
        }
        assert!(claim().is_err(), "still paced at {}", midnight - 30_000);
        // At midnight it is forgotten (and the paced lockdown of the full minute no longer matters
        // once it ends: nothing re-paces the scope).
        clock.set(midnight + 60_500);
        assert!(coordinator.store().learned_limits("c", midnight).expect("learned").is_empty(), "forgotten");
        for _ in 0..5 {
            claim().expect("no limit after the provider's midnight").release().expect("release");
        }
    }
}

/// One Gemini key pointed at `mock`, with `limits` as `[GEMINI limits]` when given.
fn gemini_sandbox(mock: &api_jongler::mock::MockUpstream, limits: Option<&str>) -> Sandbox {
    let mut ini = format!("[{GEMINI}]\nkey0 = fake-secret-{GEMINI}-0-do-not-use\n");
    if let Some(limits) = limits {
        ini.push_str(&format!("[{GEMINI} limits]\n{limits}\n"));
    }
    let sandbox = Sandbox::with_keyring(&ini);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 0}));
    sandbox
}

/// End to end: the mock's per-key quota of 2 a minute answers the third request with a 429 stating
/// it; the pool records the lesson for the key's scope beside the keyring's `7/h`, and `why --model`,
/// `status --json` and the gateway's metrics show both with their windows' usage (the three requests
/// reserved against the declared limit, and count against the learned one too: one scope, one model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_429_teaches_the_pool_and_why_status_and_metrics_show_it() {
    let config = api_jongler::mock::MockConfig { quota: Some(2), ..Default::default() };
    let mock = api_jongler::mock::MockUpstream::start(config).await.expect("mock");
    let sandbox = gemini_sandbox(&mock, Some("gemini-2.5-flash = 7/h"));
    let jongler = sandbox.jongler(GEMINI).wait(Duration::ZERO).connect().await.expect("connect");
    for _ in 0..2 {
        assert_eq!(jongler.request("POST", ENDPOINT, "{}").await.expect("ok").status, 200);
    }
    let third = jongler.request("POST", ENDPOINT, "{}").await;
    assert!(!matches!(&third, Ok(response) if response.status == 200), "the mock's quota is spent");
    let row = sandbox.sql().row("SELECT quota_scope, model, limit_text FROM learned_limits", &[]).expect("one lesson");
    let row: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(row, ("key:key0".to_owned(), "gemini-2.5-flash".to_owned(), "2/min".to_owned()));

    let why = sandbox.apijongler().args(["why", GEMINI, "key0", "--model", "gemini-2.5-flash"]).output().expect("why");
    let text = String::from_utf8_lossy(&why.stdout);
    let said = "Limits of gemini-2.5-flash for key:key0: 3/7 this hour (7/h, declared), 3/2 this minute (2/min, \
                learned from GenerateRequestsPerMinutePerProjectPerModel-FreeTier).";
    assert!(text.contains(said), "{text}");
    let status = sandbox.apijongler().args(["status", GEMINI, "--json"]).output().expect("status");
    let keys: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let limits: Vec<_> = keys[0]["limits"]
        .as_array()
        .expect("a key's limits")
        .iter()
        .map(|limit| (limit["limit"].clone(), limit["source"].clone(), limit["used"].clone()))
        .collect();
    assert_eq!(limits, [("7/h".into(), "declared".into(), 3.into()), ("2/min".into(), "learned".into(), 3.into())]);

    let gateway = common::gateway::Gateway::start(&sandbox, &[], &[]);
    let text = reqwest::get(gateway.url("/metrics")).await.expect("scrape").text().await.expect("text");
    let labels = |limit: &str, source: &str| {
        format!(
            r#"{{connector="{GEMINI}",scope="key:key0",model="gemini-2.5-flash",limit="{limit}",source="{source}"}}"#
        )
    };
    for line in [
        format!("apijongler_limit{} 7", labels("7/h", "declared")),
        format!("apijongler_limit_used{} 3", labels("7/h", "declared")),
        format!("apijongler_limit{} 2", labels("2/min", "learned")),
        format!("apijongler_limit_used{} 3", labels("2/min", "learned")),
    ] {
        assert!(text.lines().any(|got| got == line), "missing {line} in\n{text}");
    }
}

/// A Gemini request whose only text is `chars` characters (its estimate: `chars / 4` tokens and one
/// for `user`).
fn asking(chars: usize) -> String {
    serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "x".repeat(chars)}]}]}).to_string()
}

/// `100 tokens/min` declared: a request estimated at 80 tokens goes, and its reservation is settled at
/// the 5 tokens the mock's answer says it used, so a second one fits beside it (80 + 80 would not); a
/// request estimated at 101 tokens does not fit beside the 10 reserved, and is paced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limit_reserves_the_estimate_and_settles_it_from_the_answers_usage() {
    let mock = api_jongler::mock::MockUpstream::start(Default::default()).await.expect("mock");
    let sandbox = gemini_sandbox(&mock, Some("* = 100 tokens/min"));
    let jongler = sandbox.jongler(GEMINI).wait(Duration::ZERO).connect().await.expect("connect");
    for _ in 0..2 {
        assert_eq!(jongler.request("POST", ENDPOINT, &asking(316)).await.expect("room").status, 200);
    }
    let reserved =
        (sandbox.count("SELECT count(*) FROM reservations"), sandbox.count("SELECT sum(tokens) FROM reservations"));
    assert_eq!(reserved, (2, 10), "each reservation settled at the answer's 5 tokens");
    let error = jongler.request("POST", ENDPOINT, &asking(400)).await.expect_err("101 tokens do not fit beside 10");
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
    let reason: String = sandbox
        .sql()
        .value("SELECT reason FROM lockdowns WHERE quota_id = 'apijongler:paced'", &[])
        .expect("a paced lockdown");
    assert_eq!(reason, "paced: 100 tokens/min declared for gemini-2.5-flash");
    assert_eq!(sandbox.count("SELECT sum(prompt_tokens) FROM requests"), 10, "the requests record their tokens");
}

/// A lesson reaches another process's claims without a statement of its own: coordinator B (its own
/// store, as in another process) synced before A learned `3/min`; B's first claim after the taught
/// window sees the new lesson in the claim statement's answer and goes out unpaced, but counted; B then
/// reads the lesson, and its claims are paced: 3 in the minute, the 4th refused.
#[test]
fn a_lesson_learned_by_one_process_paces_another_from_its_next_claim() {
    let sandbox = Sandbox::with_keyring(
        "[c]\nkey0 = fake-secret-c-0-do-not-use\nkey1 = fake-secret-c-1-do-not-use\n[c groups]\nkey0 = g\nkey1 = g\n",
    );
    let t0 = utc((2027, 6, 1), (12, 0));
    let clock = Arc::new(ManualClock::new(t0));
    let (a, b) = (sandbox.coordinator_on(&clock), sandbox.coordinator_on(&clock));
    let claim = |coordinator: &api_jongler::Coordinator| coordinator.claim_for("c", Some("m"), &[], Duration::ZERO);
    claim(&b).expect("nothing learned yet").release().expect("release");
    let lease = claim(&a).expect("nothing learned yet");
    answer_3_per_minute(lease, t0);

    clock.set(t0 + 60_500);
    for turn in 0..3 {
        claim(&b).unwrap_or_else(|error| panic!("claim {turn}: {error}")).release().expect("release");
    }
    assert!(matches!(claim(&b), Err(Error::NoKeyAvailable(_))), "B is paced by A's lesson");
    let window = sandbox.count(&format!("SELECT count(*) FROM reservations WHERE model = 'm' AND at > {t0}"));
    assert_eq!(window, 3, "the claim that saw the lesson counts in the window too");
}
