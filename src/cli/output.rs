//! How times and tables look on the terminal.

use api_jongler::pool::{LockdownRecord, ModelScope, Scope};
use chrono::{DateTime, Local, Timelike};
use chrono_tz::America::Los_Angeles;
use comfy_table::{ContentArrangement, Table, presets};

/// A unix-ms time in local time, to the second, with its offset.
pub fn local_time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|time| time.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S %:z").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// Just the clock time, for times within the day.
pub fn clock_time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|time| time.with_timezone(&Local).format("%H:%M:%S").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A deadline as people read it: `00:00 PT (in 9 h)` for a Pacific midnight (when Gemini's daily quotas
/// reset), the clock time within a day (`13:03:05 (in 42 s)`), else the full local time.
pub fn deadline(until: i64, now: i64) -> String {
    let Some(time) = DateTime::from_timestamp_millis(until) else { return until.to_string() };
    let pacific = time.with_timezone(&Los_Angeles);
    let midnight = pacific.num_seconds_from_midnight() == 0 && pacific.nanosecond() == 0;
    let when = match (midnight, (until - now).abs() < 86_400_000) {
        (true, true) => "00:00 PT".to_owned(),
        (true, false) => pacific.format("%Y-%m-%d 00:00 PT").to_string(),
        (false, true) => clock_time(until),
        (false, false) => local_time(until),
    };
    format!("{when} ({})", relative(until, now))
}

/// A past moment: its clock time within the last 20 hours, else the full local time.
pub fn moment(at: i64, now: i64) -> String {
    if (0..72_000_000).contains(&(now - at)) { clock_time(at) } else { local_time(at) }
}

/// A quota scope as a phrase: `group my-project`, `project #411082643095 (learned)`, `key key1 alone`.
pub fn scope(scope: &Scope) -> String {
    match scope {
        Scope::Group(name) => format!("group {name}"),
        Scope::Project(number) => format!("project #{number} (learned)"),
        Scope::Key(name) => format!("key {name} alone"),
    }
}

/// A lockdown's model as a phrase: the model's name, or `every model`.
pub fn model(lockdown: &LockdownRecord) -> &str {
    match &lockdown.model {
        ModelScope::Every => "every model",
        ModelScope::One(model) => model,
    }
}

/// Why a lockdown was set: its reason, with the provider's quota when the reason does not name it.
pub fn because(lockdown: &LockdownRecord) -> String {
    match &lockdown.quota_id {
        Some(quota) if !lockdown.reason.contains(quota.as_str()) => format!("{} [{quota}]", lockdown.reason),
        _ => lockdown.reason.clone(),
    }
}

/// Who set a lockdown and when: `key1's 429 at 13:02:05`, or `pacing (its declared limit was full) at
/// 13:02:05`.
pub fn set_by(lockdown: &LockdownRecord, now: i64) -> String {
    if lockdown.is_paced() {
        return format!("pacing (its declared limit was full) at {}", moment(lockdown.set_at, now));
    }
    let answer = lockdown.http_status.map_or_else(|| "answer".to_owned(), |status| status.to_string());
    format!("{}'s {answer} at {}", lockdown.set_by_key, moment(lockdown.set_at, now))
}

/// `in 42 s`, `3 min ago`, ... for `ms` relative to `now`.
pub fn relative(ms: i64, now: i64) -> String {
    let delta = ms - now;
    let span = humanize(delta.unsigned_abs());
    if delta >= 0 { format!("in {span}") } else { format!("{span} ago") }
}

/// A duration in ms as `42 s`, `3 min`, `5 h`, `2 d`.
pub fn humanize(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0..120 => format!("{seconds} s"),
        120..7_200 => format!("{} min", seconds / 60),
        7_200..172_800 => format!("{} h", seconds / 3600),
        _ => format!("{} d", seconds / 86_400),
    }
}

/// A table in the house style.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic);
    table.set_header(header.to_vec());
    table
}

/// The limits of one (quota scope, model), each with its window's usage, and until when pacing holds
/// it back: `9/10 this minute (10/min, declared), 18/250 today (250/day, declared), paced until 13:05:12
/// (in 4 s)`.
pub fn limits_used(usages: &[api_jongler::pool::LimitUsage], now: i64) -> String {
    let mut said: Vec<String> = usages.iter().map(api_jongler::pool::LimitUsage::said).collect();
    if let Some(until) = usages.iter().find_map(|usage| usage.paced_until) {
        said.push(format!("paced until {}", deadline(until, now)));
    }
    said.join(", ")
}

/// `usages` in runs of one (connector, quota scope, model), in order.
pub fn by_scope_and_model(
    usages: &[api_jongler::pool::LimitUsage],
) -> impl Iterator<Item = &[api_jongler::pool::LimitUsage]> {
    usages.chunk_by(|a, b| (&a.connector, &a.scope, &a.model) == (&b.connector, &b.scope, &b.model))
}
