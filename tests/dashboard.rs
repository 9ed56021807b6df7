//! The dashboard in a real headless browser (Debian's `chromium`, installed by .ci/browser): the page
//! of `apijongler serve` shows the keys of a pool driven by real requests against the loopback mock,
//! a lockdown another process sets appears without a reload, nothing the page shows or sends holds a
//! secret; and the door: foreign origins get 403, a token guards the data but not the page.
//!
//! Run alone: `cargo test --test dashboard`. Without chromium it says SKIPPED (and fails under CI=true).
//! `APIJONGLER_SCREENSHOT=docs/dashboard.png` also writes the page as shown (the README's picture).

mod common;

use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream};
use common::browser::{Browser, Recorder, chromium};
use common::gateway::{GEMINI, Gateway, client, sandbox};

const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const FOREIGN: &str = "https://evil.example";

/// The issue's bound: a change by another process shows within 2 s, without a reload.
const LIVE_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_pool_live_and_no_secret() {
    let Some(chromium) = chromium() else { return };
    // key2 is refused by the mock: it ends in error, and the strip counts its error.
    let bad = format!("fake-secret-{GEMINI}-2-do-not-use");
    let upstream = MockUpstream::start(MockConfig { bad_keys: [bad].into(), ..MockConfig::default() }).await.unwrap();
    let sandbox = sandbox(3, upstream.port());
    // A declared limit, whose window's usage the page shows.
    let mut keyring = std::fs::read_to_string(&sandbox.keyring).unwrap();
    keyring.push_str(&format!("[{GEMINI} limits]\ngemini-2.5-flash = 1000/min\n"));
    std::fs::write(&sandbox.keyring, keyring).unwrap();
    let gateway = Gateway::start(&sandbox, &[], &[]);
    for _ in 0..6 {
        let response = client()
            .post(gateway.url(&format!("/{GEMINI}{GENERATE}")))
            .header("x-goog-api-key", "placeholder")
            .body(r#"{"contents":[]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
    }
    let (total, _) = upstream.stats();
    assert!(total >= 6, "the mock saw the requests: {total}");

    let recorder = Recorder::start(gateway.addr).await;
    let url = format!("http://{}/__apijongler/ui/", recorder.addr);
    let chromium_path = chromium.clone();
    let mut browser = tokio::task::spawn_blocking(move || Browser::open(&chromium_path, &url)).await.unwrap();
    let (mut browser, text) = tokio::task::spawn_blocking(move || {
        // Every key with its fingerprint and state, and bars in the activity strip.
        browser.wait_for(
            "['key0', 'key1', 'key2'].every(k => !!document.querySelector(`tr[data-key='generativelanguage.googleapis.com/${k}']`)) \
             && document.querySelectorAll('#activity rect.ok').length > 0 \
             && document.querySelectorAll('#activity rect.er').length > 0 \
             && document.querySelector('#usage').innerText.includes('/1000 (1000/min, declared)')",
            Duration::from_secs(30),
        );
        browser.eval("window.__sameDocument = 'yes'");
        let text = browser.text();
        (browser, text)
    })
    .await
    .unwrap();
    assert!(text.contains("error") && text.contains("vacant"), "{text}");
    for fingerprint in sandbox.sql().column::<String>("SELECT fingerprint FROM keys", &[]).unwrap() {
        assert!(text.contains(&fingerprint), "each key's fingerprint is shown: {text}");
    }

    // Another process (a user's sqlite3) sets a lockdown; the page shows it without a reload.
    let until = now_ms() + 3_600_000;
    let insert = format!(
        "INSERT INTO lockdowns (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at) \
         VALUES ('{GEMINI}', 'key:key0', 'gemini-2.5-pro', {until}, NULL, '429 set by another process', 429, 'key0', {});",
        now_ms()
    );
    let status = std::process::Command::new("sqlite3").arg(&sandbox.db).arg(&insert).status().expect("sqlite3");
    assert!(status.success());
    let (mut browser, shown_after) = tokio::task::spawn_blocking(move || {
        let took =
            browser.wait_for("document.body.innerText.includes('429 set by another process')", Duration::from_secs(30));
        (browser, took)
    })
    .await
    .unwrap();
    eprintln!("dashboard: the lockdown showed {shown_after:?} after its commit");
    assert!(shown_after <= LIVE_WITHIN, "the lockdown took {shown_after:?} to show");
    let (mut browser, same, html) = tokio::task::spawn_blocking(move || {
        let same = browser.eval("window.__sameDocument");
        let html = browser.eval("document.documentElement.outerHTML").as_str().unwrap_or_default().to_owned();
        (browser, same, html)
    })
    .await
    .unwrap();
    assert_eq!(same, "yes", "the page was not reloaded");
    assert!(html.contains("gemini-2.5-pro until"), "the lockdown's model and deadline: {html}");

    // A key's row opens its history.
    let history = tokio::task::spawn_blocking(move || {
        browser.eval(&format!("document.querySelector(\"tr[data-key='{GEMINI}/key2']\").click()"));
        browser.wait_for("document.querySelector('#history').innerText.includes('errored')", Duration::from_secs(30));
        if let Some(path) = std::env::var_os("APIJONGLER_SCREENSHOT") {
            browser.eval("window.scrollTo(0, 0)");
            std::fs::write(path, browser.screenshot()).expect("write the screenshot");
        }
        browser.text()
    })
    .await
    .unwrap();
    assert!(history.contains("Recent history of key2"), "{history}");

    // No secret in what the page shows nor in any byte it sent or got.
    for text in [&html, &history, &recorder.traffic()] {
        assert!(!text.contains("fake-secret"), "a secret reached the page");
    }
    assert!(recorder.traffic().contains("text/event-stream"), "the recorder saw the page's live stream");

    // The door: a page of another origin is refused, for the page and its data alike.
    for path in ["/__apijongler/ui/", "/__apijongler/ui/state", "/__apijongler/ui/events"] {
        let refused = client().get(gateway.url(path)).header("origin", FOREIGN).send().await.unwrap();
        assert_eq!(refused.status(), 403, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_alone_has_the_gateways_door() {
    use std::io::{BufRead, BufReader};
    let sandbox = sandbox(2, 9);
    let token = sandbox.dir.path().join("token");
    std::fs::write(&token, "dashboard-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Keys in the database without any request: `cleanup` syncs the keyring.
    assert!(sandbox.apijongler().args(["cleanup", "--all"]).output().unwrap().status.success());
    let mut child = common::KillOnDrop(
        sandbox
            .apijongler()
            .args(["dashboard", "--listen", "127.0.0.1:0", "--token-file"])
            .arg(&token)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("apijongler dashboard: listening on ").expect(&line).to_owned();
    let get = |path: &str| client().get(format!("{base}{path}"));
    // The page itself needs no token; its data does.
    assert_eq!(get("").send().await.unwrap().status(), 200);
    assert_eq!(get("state").send().await.unwrap().status(), 401);
    let state = get("state").bearer_auth("dashboard-token").send().await.unwrap();
    assert_eq!(state.status(), 200);
    let state = common::gateway::body_json(state).await;
    assert_eq!(state["view"]["keys"].as_array().map(Vec::len), Some(2), "{state}");
    assert!(!state.to_string().contains("fake-secret"));
    assert_eq!(
        get("state").bearer_auth("dashboard-token").header("origin", FOREIGN).send().await.unwrap().status(),
        403
    );
    assert_eq!(
        get("state").bearer_auth("dashboard-token").header("host", "evil.example").send().await.unwrap().status(),
        421
    );
    // A key's history, as the page asks for it (the door strips `key=` from queries: the page says `name=`).
    let history =
        get(&format!("history?connector={GEMINI}&name=key0")).bearer_auth("dashboard-token").send().await.unwrap();
    assert_eq!(history.status(), 200);
    let rows = common::gateway::body_json(history).await;
    assert!(rows.as_array().is_some_and(|rows| !rows.is_empty()), "{rows}");
    let posted = client().post(format!("{base}state")).bearer_auth("dashboard-token").send().await.unwrap();
    assert_eq!(posted.status(), 405, "read-only");
    assert_eq!(client().get(base.replace("/__apijongler/ui/", "/v1beta/models")).send().await.unwrap().status(), 404);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A page left open does not hold a stopping gateway: its event stream ends with the stop, and every
/// request in flight having finished, `serve` exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_page_does_not_hold_a_stopping_gateway() {
    let sandbox = sandbox(1, 9);
    let gateway = Gateway::start(&sandbox, &["--grace", "60s"], &[]);
    let mut events = client().get(gateway.url("/__apijongler/ui/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    let first = events.chunk().await.unwrap().expect("the first snapshot");
    assert!(first.starts_with(b"data: {"), "{}", String::from_utf8_lossy(&first));
    gateway.signal(rustix::process::Signal::TERM);
    let (status, stderr) = gateway.exit().await;
    assert!(status.success(), "{status}: {stderr}");
    while let Ok(Some(_)) = events.chunk().await {}
}
