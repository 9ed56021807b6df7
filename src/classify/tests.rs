//! Every answer of the reference page, and what it must do to the key and the caller.

use super::*;
use chrono::NaiveDate;
use reqwest::header::{HeaderName, HeaderValue};

/// 2026-11-22 12:00:00 UTC (04:00 in Los Angeles, PST).
const NOW: i64 = 1_795_348_800_000;

// The real bodies of `shared/reference/upstream-errors.md`, shared with the HTTP-level tests.
include!("../../tests/fixtures/upstream_bodies.rs");

type Headers<'a> = &'a [(&'static str, &'a str)];

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| (HeaderName::from_static(name), HeaderValue::from_str(value).expect("header value")))
        .collect()
}

/// A context at [`NOW`] under `policy`: no earlier lockdowns or retries, no Tor, no model, a connector
/// that can tell models.
fn context(policy: &Policy) -> Context<'_> {
    Context { now_ms: NOW, policy, lockdown_count: 0, retries: 0, via_tor: false, model: None, names_models: true }
}

fn judge(status: u16, pairs: &[(&'static str, &str)], body: &str) -> Verdict {
    let policy = Policy::default();
    let context = context(&policy);
    classify(status, &headers(pairs), body, &context)
}

fn lockdown_secs(verdict: &Verdict) -> f64 {
    match &verdict.key {
        Fate::Lockdown(Lockdown { until, .. }) => (until - NOW) as f64 / 1000.0,
        other => panic!("expected a lockdown, got {other:?}"),
    }
}

#[test]
fn success_releases_and_returns() {
    assert_eq!(judge(200, &[], "{}"), Verdict { key: Fate::Release { success: true }, next: Next::Return });
}

#[test]
fn rate_limits_lock_down_exactly_as_long_as_asked() {
    let cases: [(u16, Headers<'_>, &str, f64); 7] = [
        (429, &[], GEMINI_429_MINUTE, 26.0),
        (429, &[], GEMINI_429_FRACTION, 38.922),
        (429, &[("retry-after", "120")], GEMINI_429_BARE, 120.0),
        (429, &[("retry-after", "Sun, 22 Nov 2026 12:05:00 GMT")], HF_429, 300.0),
        (429, &[("ratelimit", "\"api\";r=0;t=55")], HF_429, 55.0),
        (429, &[], GEMINI_429_BARE, 60.0),
        (509, &[], "", 60.0),
    ];
    for (status, pairs, body, expected) in cases {
        let verdict = judge(status, pairs, body);
        assert_eq!(verdict.next, Next::OtherKey, "{body}");
        let secs = lockdown_secs(&verdict);
        assert!((secs - expected).abs() < 0.01, "{status} {pairs:?} {body}: {secs} s, expected {expected} s");
    }
}

#[test]
fn a_daily_quota_locks_down_until_midnight_pacific_whatever_retry_delay_says() {
    let verdict = judge(429, &[], GEMINI_429_DAY);
    let Fate::Lockdown(Lockdown { until, reason, .. }) = &verdict.key else { panic!("{verdict:?}") };
    // 2026-11-23 00:00 PST = 08:00 UTC.
    let midnight = NaiveDate::from_ymd_opt(2026, 11, 23).and_then(|d| d.and_hms_opt(8, 0, 0)).expect("date");
    assert_eq!(*until, midnight.and_utc().timestamp_millis());
    assert!(reason.contains("GenerateRequestsPerDayPerProjectPerModel-FreeTier"), "{reason}");
    assert_eq!(verdict.next, Next::OtherKey);
}

#[test]
fn pacific_midnight_is_right_across_daylight_saving() {
    let utc = |y, m, d, h, min| {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_opt(h, min, 0))
            .expect("date")
            .and_utc()
            .timestamp_millis()
    };
    // DST starts 2026-03-08 at 2 am: 01:30 PST on the 8th -> midnight of the 9th is PDT (07:00 UTC).
    assert_eq!(next_pacific_midnight(utc(2026, 3, 8, 9, 30)), utc(2026, 3, 9, 7, 0));
    // The day before: 23:00 PST on the 7th -> midnight of the 8th, still PST (08:00 UTC).
    assert_eq!(next_pacific_midnight(utc(2026, 3, 8, 7, 0)), utc(2026, 3, 8, 8, 0));
    // DST ends 2026-11-01 at 2 am: 23:00 PDT on Oct 31 -> midnight of Nov 1 is PDT (07:00 UTC).
    assert_eq!(next_pacific_midnight(utc(2026, 11, 1, 6, 0)), utc(2026, 11, 1, 7, 0));
    // Noon PST on Nov 1 -> midnight of Nov 2 is PST (08:00 UTC).
    assert_eq!(next_pacific_midnight(utc(2026, 11, 1, 20, 0)), utc(2026, 11, 2, 8, 0));
}

#[test]
fn zero_quota_locks_down_for_a_day() {
    assert!((lockdown_secs(&judge(429, &[], GEMINI_429_ZERO)) - 86_400.0).abs() < 0.01);
}

#[test]
fn no_hint_escalates_from_the_base_to_the_cap_and_absurd_hints_are_clamped() {
    let policy = Policy::default();
    let at = |count| {
        let context = Context { lockdown_count: count, ..context(&policy) };
        lockdown_secs(&classify(429, &HeaderMap::new(), GEMINI_429_BARE, &context))
    };
    assert_eq!([at(0), at(1), at(2), at(6), at(30)], [60.0, 120.0, 240.0, 3600.0, 3600.0]);
    let absurd = judge(429, &[("retry-after", "99999999999")], "");
    assert!((lockdown_secs(&absurd) - 48.0 * 3600.0).abs() < 0.01);
}

/// A hint of "now" (or of the past, or of less than the floor) still locks the key down for the floor:
/// a key that comes back at once would be hammered by every request's retries (hardening item 10).
#[test]
fn hints_below_the_floor_lock_down_for_the_floor() {
    let retry_delay = |delay: &str| {
        format!(
            r#"{{"error":{{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
        )
    };
    let per_minute_zero = GEMINI_429_MINUTE.replace(r#""retryDelay":"26s""#, r#""retryDelay":"0s""#);
    let retry_in_zero =
        r#"{"error":{"code":429,"message":"Quota exceeded. Please retry in 0s.","status":"RESOURCE_EXHAUSTED"}}"#;
    let floor = MIN_LOCKDOWN.as_secs_f64();
    let cases: [(&str, Headers<'_>, String, f64); 12] = [
        ("Retry-After: 0", &[("retry-after", "0")], GEMINI_429_BARE.to_owned(), floor),
        ("Retry-After: 0.2", &[("retry-after", "0.2")], GEMINI_429_BARE.to_owned(), floor),
        ("Retry-After in the past", &[("retry-after", "Sun, 22 Nov 2026 11:00:00 GMT")], HF_429.to_owned(), floor),
        ("ratelimit t=0", &[("ratelimit", "\"api\";r=0;t=0")], HF_429.to_owned(), floor),
        ("retryDelay 0s", &[], retry_delay("0s"), floor),
        ("retryDelay 0.001s", &[], retry_delay("0.001s"), floor),
        ("per-minute quota with retryDelay 0s", &[], per_minute_zero, floor),
        ("Please retry in 0s", &[], retry_in_zero.to_owned(), floor),
        // Not a delay at all: no hint, so the default lockdown.
        ("Retry-After: -5", &[("retry-after", "-5")], GEMINI_429_BARE.to_owned(), 60.0),
        ("Retry-After: NaN", &[("retry-after", "NaN")], GEMINI_429_BARE.to_owned(), 60.0),
        ("retryDelay -3s", &[], retry_delay("-3s"), 60.0),
        ("Retry-After: 1.5", &[("retry-after", "1.5")], GEMINI_429_BARE.to_owned(), 1.5),
    ];
    for (name, pairs, body, expected) in cases {
        let verdict = judge(429, pairs, &body);
        assert_eq!(verdict.next, Next::OtherKey, "{name}");
        let secs = lockdown_secs(&verdict);
        assert!((secs - expected).abs() < 0.01, "{name}: {secs} s, expected {expected} s");
    }
}

#[test]
fn bad_keys_go_to_error_and_the_caller_tries_another() {
    for (status, body) in [
        (400, GEMINI_400_INVALID),
        (400, GEMINI_400_EXPIRED),
        (403, GEMINI_403_LEAKED),
        (403, GEMINI_403_DISABLED),
        (401, HF_401),
    ] {
        let verdict = judge(status, &[], body);
        assert!(matches!(verdict.key, Fate::Error { .. }), "{status} {body}: {verdict:?}");
        assert_eq!(verdict.next, Next::OtherKey);
    }
    let Fate::Error { reason, .. } = judge(403, &[], GEMINI_403_DISABLED).key else { panic!() };
    assert!(reason.contains("SERVICE_DISABLED"), "{reason}");
}

#[test]
fn used_up_credits_lock_down_for_a_day() {
    let verdict = judge(402, &[], HF_402);
    assert!((lockdown_secs(&verdict) - 86_400.0).abs() < 0.01);
    assert_eq!(verdict.next, Next::OtherKey);
}

#[test]
fn location_refusals_are_not_the_keys_fault() {
    let released = Fate::Release { success: false };
    assert_eq!(judge(400, &[], GEMINI_400_LOCATION), Verdict { key: released.clone(), next: Next::Return });
    let policy = Policy::default();
    let context = Context { via_tor: true, ..context(&policy) };
    let verdict = classify(400, &HeaderMap::new(), GEMINI_400_LOCATION, &context);
    assert_eq!(verdict, Verdict { key: released, next: Next::NewCircuit });
}

#[test]
fn provider_trouble_releases_the_key_and_backs_off() {
    for (status, body, after_ms) in [
        (503, GEMINI_503, 500),
        (500, GEMINI_500, 500),
        (502, "<html>bad gateway</html>", 500),
        (504, GEMINI_504, 500),
        (503, HF_503_LOADING, 20_000),
    ] {
        let verdict = judge(status, &[], body);
        assert_eq!(
            verdict,
            Verdict {
                key: Fate::Release { success: false },
                next: Next::Backoff { after: Duration::from_millis(after_ms) },
            },
            "{status} {body}"
        );
    }
    let policy = Policy::default();
    let context = Context { retries: 2, ..context(&policy) };
    assert_eq!(transport_failure(&context).next, Next::Backoff { after: Duration::from_millis(2_000) });
}

#[test]
fn other_client_errors_release_and_return_at_once() {
    for (status, body) in [(400, GEMINI_400_BAD_REQUEST), (404, GEMINI_404), (410, HF_410), (422, "not json")] {
        assert_eq!(
            judge(status, &[], body),
            Verdict { key: Fate::Release { success: false }, next: Next::Return },
            "{status}"
        );
    }
}

#[test]
fn a_connector_may_declare_other_rate_limit_statuses() {
    let policy = Policy { rate_limit_statuses: vec![429, 420], ..Policy::default() };
    let context = context(&policy);
    let verdict = classify(420, &HeaderMap::new(), "", &context);
    assert!(matches!(verdict.key, Fate::Lockdown(_)));
}

/// A per-day 429 that names its model, as the free tier sends it.
const DAY_FOR_PRO: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-pro"},"quotaValue":"50"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"47s"}]}}"#;
/// The older per-project, per-region rate limit: no model, and the project in `consumer`.
const PROJECT_RATE_LIMIT: &str = r#"{"error":{"code":429,"message":"Quota exceeded for quota metric 'Generate Content API requests per minute' and limit 'GenerateContent request limit per minute for a region' of service 'generativelanguage.googleapis.com' for consumer 'project_number:696498078762'.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","domain":"googleapis.com","metadata":{"consumer":"projects/696498078762","quota_limit":"GenerateContentRequestsPerMinutePerProjectPerRegion","service":"generativelanguage.googleapis.com"}},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"20s"}]}}"#;
/// A per-project quota without a model dimension.
const PROJECT_QUOTA: &str = r#"{"error":{"code":429,"message":"x","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProject-FreeTier","quotaValue":"100"}]}]}}"#;
const DISABLED_WITH_CONSUMER: &str = r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 411082643095 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","metadata":{"consumer":"projects/411082643095","service":"generativelanguage.googleapis.com"}}]}}"#;

fn judge_for(status: u16, body: &str, model: Option<&str>) -> Verdict {
    let policy = Policy::default();
    let context = Context { model, ..context(&policy) };
    classify(status, &HeaderMap::new(), body, &context)
}

/// Each 429 locks exactly the quota that ran out: its scope (the key, or its whole group), its models
/// (none listed: every model) and its end.
#[test]
fn a_lockdown_is_as_wide_as_the_quota_that_ran_out() {
    let midnight = next_pacific_midnight(NOW);
    let day = 86_400_000;
    let models = |names: &[&str]| names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>();
    type Case<'a> = (u16, &'a str, Option<&'a str>, Reach, Vec<String>, i64);
    let cases: [Case<'_>; 13] = [
        // The quota names its model: that model of the group, whatever was asked.
        (429, DAY_FOR_PRO, Some("gemini-2.5-pro"), Reach::Group, models(&["gemini-2.5-pro"]), midnight),
        (429, GEMINI_429_MINUTE, Some("gemini-2.5-flash"), Reach::Group, models(&["gemini-2.5-flash"]), NOW + 26_000),
        // An alias asked for: both names.
        (
            429,
            DAY_FOR_PRO,
            Some("gemini-pro-latest"),
            Reach::Group,
            models(&["gemini-2.5-pro", "gemini-pro-latest"]),
            midnight,
        ),
        // No model dimension: the requested model (the daily quota still wins over the short retryDelay).
        (429, GEMINI_429_DAY, Some("gemini-2.5-flash"), Reach::Group, models(&["gemini-2.5-flash"]), midnight),
        (429, GEMINI_429_ZERO, Some("gemini-2.5-pro"), Reach::Group, models(&["gemini-2.5-pro"]), NOW + day),
        // A request that names no model: the model the quota names.
        (429, DAY_FOR_PRO, None, Reach::Group, models(&["gemini-2.5-pro"]), midnight),
        // Quotas of the whole project: every model of the group.
        (429, PROJECT_QUOTA, Some("gemini-2.5-pro"), Reach::Group, models(&[]), NOW + 60_000),
        (429, PROJECT_RATE_LIMIT, Some("gemini-2.5-pro"), Reach::Group, models(&[]), NOW + 20_000),
        (
            429,
            &PROJECT_RATE_LIMIT.replace("PerRegion", "PerModel"),
            Some("gemini-2.5-pro"),
            Reach::Group,
            models(&["gemini-2.5-pro"]),
            NOW + 20_000,
        ),
        // No details: shared capacity, or this key alone; the requested model only.
        (429, GEMINI_429_BARE, Some("gemini-2.5-pro"), Reach::Key, models(&["gemini-2.5-pro"]), NOW + 60_000),
        (429, GEMINI_429_BARE, None, Reach::Key, models(&[]), NOW + 60_000),
        (
            429,
            HF_429,
            Some("meta-llama/Llama-3.1-8B-Instruct"),
            Reach::Key,
            models(&["meta-llama/Llama-3.1-8B-Instruct"]),
            NOW + 60_000,
        ),
        // Credits of the account: everything of the group.
        (402, HF_402, Some("meta-llama/Llama-3.1-8B-Instruct"), Reach::Group, models(&[]), NOW + day),
    ];
    for (status, body, model, reach, expected_models, until) in cases {
        let verdict = judge_for(status, body, model);
        let Fate::Lockdown(Lockdown { until: got_until, reach: got_reach, models: got_models, .. }) = &verdict.key
        else {
            panic!("{status} {body} for {model:?}: {verdict:?}")
        };
        assert_eq!(
            (got_reach, got_models, *got_until),
            (&reach, &expected_models, until),
            "{status} {body} for {model:?}"
        );
    }
}

/// The project an answer reveals travels in the key's fate, the one the store applies, with the
/// answer's status: nothing between this verdict and the key's row can drop it.
#[test]
fn the_project_an_answer_reveals_is_in_the_keys_fate() {
    let cases: [(u16, &str, Option<&str>); 5] = [
        (429, PROJECT_RATE_LIMIT, Some("696498078762")),
        (403, DISABLED_WITH_CONSUMER, Some("411082643095")),
        // From the message alone.
        (403, GEMINI_403_DISABLED, Some("1")),
        (429, DAY_FOR_PRO, None),
        (403, GEMINI_403_LEAKED, None),
    ];
    for (status, body, project) in cases {
        let fate = judge_for(status, body, None).key;
        let http_status = match &fate {
            Fate::Lockdown(lockdown) => lockdown.http_status,
            Fate::Error { http_status, .. } => *http_status,
            Fate::Release { .. } => panic!("{status} {body}: the key is blamed, got {fate:?}"),
        };
        assert_eq!((fate.project(), http_status), (project, Some(status)), "{status} {body}");
    }
}

#[test]
fn quota_ids_and_model_names_from_answers_are_kept_only_when_sane() {
    let hostile = DAY_FOR_PRO
        .replace("gemini-2.5-pro", "gemini\\u001b[31m pro")
        .replace("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "GenerateRequestsPerDay <script>");
    let verdict = judge_for(429, &hostile, Some("gemini-2.5-pro"));
    let Fate::Lockdown(Lockdown { models, quota_id, reason, .. }) = &verdict.key else { panic!("{verdict:?}") };
    assert_eq!(models, &vec!["gemini-2.5-pro".to_owned()], "the requested model stands in for an insane one");
    assert_eq!(quota_id.as_deref(), Some("unnamed quota"));
    assert!(!reason.contains('<') && !reason.contains('\u{1b}'), "{reason}");
}

/// A connector that cannot tell any request's model: a lockdown of one model would never stop a claim,
/// so it covers every model of the scope.
#[test]
fn without_a_model_rule_a_lockdown_of_one_model_covers_them_all() {
    let policy = Policy::default();
    let context = Context { names_models: false, ..context(&policy) };
    let verdict = classify(429, &HeaderMap::new(), DAY_FOR_PRO, &context);
    let Fate::Lockdown(Lockdown { models, reach, .. }) = &verdict.key else { panic!("{verdict:?}") };
    assert_eq!((models.len(), reach), (0, &Reach::Group));
}

#[test]
fn status_and_reason_from_a_body_are_kept_only_when_sane() {
    let hostile = GEMINI_429_BARE.replace("RESOURCE_EXHAUSTED", "RESOURCE\\u001b[2J");
    let Fate::Lockdown(Lockdown { reason, .. }) = judge_for(429, &hostile, Some("m")).key else { panic!() };
    assert!(!reason.contains('\u{1b}') && !reason.contains("RESOURCE"), "{reason}");
}

// Answers about resources and from the OpenAI-compatible layer, shared with tests/judgement.rs.
include!("../../tests/fixtures/judgement_bodies.rs");

/// A 403 or 404 about a file, cached content, batch or tuned model is the request's fault: the key goes
/// back vacant (never to error) and the caller gets the answer; the verdict's helper says which resource.
#[test]
fn an_answer_about_a_resource_releases_the_key_and_returns_it() {
    use ResourceKind::{Batch, CachedContent, File, TunedModel};
    let cases: [(u16, &str, ResourceKind, Option<&str>); 7] = [
        (403, GEMINI_403_FILE, File, Some("files/abc")),
        (403, GEMINI_403_CACHED, CachedContent, None),
        (403, GEMINI_403_TUNED, TunedModel, Some("tunedModels/my-model-7x2")),
        (404, GEMINI_404_BATCH, Batch, Some("batches/b-123")),
        (404, GEMINI_404_FILE, File, Some("files/xyz-9")),
        (403, OPENAI_LAYER_403_FILE, File, Some("files/abc")),
        // A connector that still lists 403 among its rate limits (the seed's habit) locks nothing down either.
        (403, &GEMINI_403_FILE.replace("File abc", "File files/abc"), File, Some("files/abc")),
    ];
    for (status, body, kind, name) in cases {
        assert_eq!(
            judge(status, &[], body),
            Verdict { key: Fate::Release { success: false }, next: Next::Return },
            "{status} {body}"
        );
        let expected = Resource { kind, name: name.map(str::to_owned) };
        assert_eq!(resource(status, body), Some(expected), "{status} {body}");
    }
    let policy = Policy { rate_limit_statuses: vec![429, 403], ..Policy::default() };
    let verdict = classify(403, &HeaderMap::new(), GEMINI_403_FILE, &context(&policy));
    assert_eq!(verdict, Verdict { key: Fate::Release { success: false }, next: Next::Return });
}

/// Answers about the key, the project or the model name no resource: they keep their rows of the table.
#[test]
fn answers_about_the_key_name_no_resource() {
    for (status, body) in [
        (403, GEMINI_403_LEAKED),
        (403, GEMINI_403_DISABLED),
        (400, GEMINI_400_INVALID),
        (404, GEMINI_404),
        (401, HF_401),
        (429, GEMINI_429_MINUTE),
        (
            403,
            r#"{"error":{"code":403,"message":"Permission denied on resource project 12345 (or it may not exist).","status":"PERMISSION_DENIED"}}"#,
        ),
        // A resource named in a success or a rate limit is not an answer about it.
        (200, GEMINI_403_FILE),
        (429, GEMINI_403_FILE),
    ] {
        assert_eq!(resource(status, body), None, "{status} {body}");
    }
    for body in [GEMINI_403_LEAKED, ARRAY_403_CONSUMER_INVALID, ARRAY_403_CALLER] {
        assert_eq!(resource(403, body), None, "{body}");
        let verdict = judge(403, &[], body);
        assert!(matches!(verdict.key, Fate::Error { .. }), "{body}: {verdict:?}");
    }
}

/// The OpenAI-compatible layer's `[{"error": {...}}]` is read like the bare envelope: its quota details
/// scope the lockdown, and a bad key in it goes to error.
#[test]
fn the_openai_layers_array_is_read_like_a_bare_error() {
    let verdict = judge_for(429, OPENAI_LAYER_429_DAY, Some("gemini-2.5-pro"));
    let Fate::Lockdown(Lockdown { until, reach, models, quota_id, .. }) = &verdict.key else { panic!("{verdict:?}") };
    assert_eq!(
        (*until, reach, models.as_slice(), quota_id.as_deref()),
        (
            next_pacific_midnight(NOW),
            &Reach::Group,
            &["gemini-2.5-pro".to_owned()][..],
            Some("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
        )
    );
    assert_eq!(verdict.next, Next::OtherKey);
    let bare = judge_for(429, OPENAI_LAYER_429_BARE, Some("gemini-2.5-pro"));
    let Fate::Lockdown(Lockdown { reason, reach, .. }) = &bare.key else { panic!("{bare:?}") };
    assert!(reason.contains("RESOURCE_EXHAUSTED"), "the element's status is read: {reason}");
    assert_eq!(reach, &Reach::Key);
    let bad = judge(400, &[], OPENAI_LAYER_400_INVALID);
    let Fate::Error { reason, .. } = &bad.key else { panic!("{bad:?}") };
    assert!(reason.contains("API_KEY_INVALID"), "{reason}");
    assert_eq!(bad.next, Next::OtherKey);
    // Not an error envelope: an empty array, or an array of something else, is no error at all.
    for body in ["[]", "[1]", r#"[{"candidates":[]}]"#] {
        assert_eq!(judge(400, &[], body), Verdict { key: Fate::Release { success: false }, next: Next::Return });
    }
}

/// An in-band error event's status is read from the bare envelope and from the OpenAI layer's array.
#[test]
fn the_status_of_an_error_envelope_is_read_bare_or_in_an_array() {
    let cases: [(&str, Option<u16>); 6] = [
        (GEMINI_429_MINUTE, Some(429)),
        (OPENAI_LAYER_429_DAY, Some(429)),
        (OPENAI_LAYER_400_INVALID, Some(400)),
        (HF_429, None),
        (r#"{"error":{"code":200}}"#, None),
        ("[]", None),
    ];
    for (body, status) in cases {
        assert_eq!(envelope_status(body), status, "{body}");
    }
}
