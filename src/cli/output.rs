//! How times and tables look on the terminal.

use chrono::{DateTime, Local};
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
