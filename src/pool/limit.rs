//! Declared limits: how many requests (or tokens) one quota group may send one model per window.
//!
//! A limit is written `N/WINDOW` or `N tokens/WINDOW`, WINDOW one of `s`, `min`, `h`, `day` with an
//! optional count before it (`20/10s`, `300/5min`). A `day` is the provider's day (Gemini's starts at
//! midnight America/Los_Angeles), not 24 hours from now; the other windows slide.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Measure {
    /// Requests sent.
    Requests,
    /// Input tokens (estimated before the send, settled from the answer's usage).
    Tokens,
}

/// The window a limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// The last `Duration` before the claim (a sliding window).
    Sliding(Duration),
    /// The provider's day so far, from its midnight.
    Day,
}

/// One declared limit: at most `count` of `measure` per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// How many, at most.
    pub count: u64,
    /// Of what.
    pub measure: Measure,
    /// Per which window.
    pub window: Window,
}

/// The limits declared for one connector (`[CONNECTOR limits]` and `[CONNECTOR limits GROUP]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Model (or `*`: any model not listed) -> its limits, for every quota group without a section of
    /// its own (a key in no declared group, or in a project only learned, is a group of its own).
    pub every_group: BTreeMap<String, Vec<Limit>>,
    /// Quota group -> model (or `*`) -> its limits: a group's own section replaces `every_group` for it.
    pub groups: BTreeMap<String, BTreeMap<String, Vec<Limit>>>,
}

impl Limits {
    /// The word for any model not listed.
    pub const ANY_MODEL: &'static str = "*";

    /// Whether nothing is declared (the claim then does nothing more than without the feature).
    pub fn is_empty(&self) -> bool {
        self.every_group.is_empty() && self.groups.is_empty()
    }

    /// Every limit declared, for any group and model.
    pub fn all(&self) -> impl Iterator<Item = Limit> + '_ {
        let sections = std::iter::once(&self.every_group).chain(self.groups.values());
        sections.flat_map(BTreeMap::values).flatten().copied()
    }

    /// How far back from `now` the longest of all these limits' windows counts, in ms.
    pub fn longest_reach(&self, now: i64) -> i64 {
        self.all().map(|limit| now - limit.window.counted_from(now)).max().unwrap_or(0)
    }

    /// The limits a request for `model` meets on a key of declared quota group `group` (`None`: a key
    /// in no declared group): its group's section if it has one, else the section for every group; in
    /// it, the model's own line, else the `*` line, else none.
    pub fn binding(&self, group: Option<&str>, model: &str) -> &[Limit] {
        let section = group.and_then(|group| self.groups.get(group)).unwrap_or(&self.every_group);
        section.get(model).or_else(|| section.get(Self::ANY_MODEL)).map_or(&[], Vec::as_slice)
    }
}

/// The next midnight in America/Los_Angeles after `now_ms`, as unix ms (daylight saving included:
/// midnight always exists there, the clocks change at 2 am): when Gemini's day ends.
pub fn next_pacific_midnight(now_ms: i64) -> i64 {
    pacific_midnight(now_ms, 1).unwrap_or(now_ms + 86_400_000)
}

/// The last midnight in America/Los_Angeles at or before `now_ms`: when Gemini's day began.
pub fn pacific_day_start(now_ms: i64) -> i64 {
    pacific_midnight(now_ms, 0).unwrap_or(now_ms - 86_400_000)
}

/// Midnight in America/Los_Angeles `days` days after the date `now_ms` falls on there.
fn pacific_midnight(now_ms: i64, days: u64) -> Option<i64> {
    use chrono::{DateTime, Days, TimeZone};
    use chrono_tz::America::Los_Angeles;
    let date = DateTime::from_timestamp_millis(now_ms)?.with_timezone(&Los_Angeles).date_naive();
    let midnight = date.checked_add_days(Days::new(days))?.and_hms_opt(0, 0, 0)?;
    Los_Angeles.from_local_datetime(&midnight).earliest().map(|time| time.timestamp_millis())
}

/// What is wrong with the text of a limit. It never carries the text itself: a keyring line may hold a
/// secret typed in the wrong place, and an error must not show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitProblem {
    /// Not `N/WINDOW` nor `N tokens/WINDOW`.
    #[error("a limit is N/WINDOW or N tokens/WINDOW (such as 10/min, 20/10s, 250000 tokens/min, 250/day)")]
    Form,
    /// The count is 0, negative or too large.
    #[error("a limit's count must be a whole number from 1")]
    Count,
    /// The window is not one of the known units.
    #[error("a limit's window is s, min, h or day, with an optional whole number from 1 before it (10s, 5min)")]
    Window,
}

impl FromStr for Limit {
    type Err = LimitProblem;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (amount, window) = text.trim().split_once('/').ok_or(LimitProblem::Form)?;
        let mut words = amount.split_whitespace();
        let count = words.next().ok_or(LimitProblem::Form)?;
        let measure = match (words.next(), words.next()) {
            (None, _) => Measure::Requests,
            (Some("tokens"), None) => Measure::Tokens,
            _ => return Err(LimitProblem::Form),
        };
        let count = match count.parse::<u64>() {
            Ok(count) if count >= 1 => count,
            _ if count.bytes().all(|byte| byte.is_ascii_digit() || byte == b'-') => return Err(LimitProblem::Count),
            _ => return Err(LimitProblem::Form),
        };
        Ok(Self { count, measure, window: window.trim().parse()? })
    }
}

impl FromStr for Window {
    type Err = LimitProblem;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or(LimitProblem::Window)?;
        let (times, unit) = text.split_at(unit_at);
        let times: u64 = match times {
            "" => 1,
            times => times.parse().ok().filter(|times| *times >= 1).ok_or(LimitProblem::Window)?,
        };
        let seconds = match unit {
            "s" => 1,
            "min" => 60,
            "h" => 3_600,
            "day" if times == 1 => return Ok(Self::Day),
            _ => return Err(LimitProblem::Window),
        };
        times
            .checked_mul(seconds)
            .map(|seconds| Self::Sliding(Duration::from_secs(seconds)))
            .ok_or(LimitProblem::Window)
    }
}

/// The quota id of a lockdown that pacing set: a declared limit's window was full.
pub const PACED_QUOTA_ID: &str = "apijongler:paced";

/// Added to every sliding window: an upstream's clock and ours, and the request's time on the wire,
/// put a reservation's instant a little before the upstream counts it. Half a second kept a simulated
/// hour at full quota free of 429s against rolling, fixed-minute and bucket-shaped upstreams.
pub const MARGIN_MS: i64 = 500;

impl Window {
    /// The first instant (unix ms) whose reservations this window counts at `now`: the last span and
    /// its margin, or the provider's day so far.
    pub fn counted_from(self, now: i64) -> i64 {
        match self {
            Self::Day => pacific_day_start(now),
            Self::Sliding(_) => now.saturating_sub(self.span_ms()).saturating_add(1),
        }
    }

    /// When a full window has room again, `oldest` being the reservation whose leaving gives it room.
    pub fn room_at(self, oldest: i64, now: i64) -> i64 {
        let at = match self {
            Self::Day => next_pacific_midnight(now),
            Self::Sliding(_) => oldest.saturating_add(self.span_ms()),
        };
        at.max(now + 1)
    }

    /// A sliding window's span with its margin, in ms.
    fn span_ms(self) -> i64 {
        match self {
            Self::Day => 0,
            Self::Sliding(span) => i64::try_from(span.as_millis()).unwrap_or(i64::MAX / 2).saturating_add(MARGIN_MS),
        }
    }

    /// How a window is said in a sentence: `this minute`, `these 10 s`, `today`.
    pub fn said(self) -> String {
        match self {
            Self::Day => "today".to_owned(),
            Self::Sliding(span) if span.as_secs() == 60 => "this minute".to_owned(),
            Self::Sliding(span) if span.as_secs() == 3_600 => "this hour".to_owned(),
            Self::Sliding(span) if span.as_secs() == 1 => "this second".to_owned(),
            Self::Sliding(_) => format!("these {self}"),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Day => f.write_str("day"),
            Self::Sliding(span) => {
                let seconds = span.as_secs();
                let (times, unit) = match seconds {
                    s if s % 3_600 == 0 => (s / 3_600, "h"),
                    s if s % 60 == 0 => (s / 60, "min"),
                    s => (s, "s"),
                };
                if times == 1 { f.write_str(unit) } else { write!(f, "{times}{unit}") }
            }
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.measure {
            Measure::Requests => write!(f, "{}/{}", self.count, self.window),
            Measure::Tokens => write!(f, "{} tokens/{}", self.count, self.window),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(text: &str) -> Limit {
        text.parse().unwrap_or_else(|problem| panic!("{text}: {problem}"))
    }

    #[test]
    fn the_issues_forms_read_and_print_back() {
        let minute = Window::Sliding(Duration::from_secs(60));
        assert_eq!(limit("10/min"), Limit { count: 10, measure: Measure::Requests, window: minute });
        assert_eq!(limit(" 250000 tokens/min "), Limit { count: 250_000, measure: Measure::Tokens, window: minute });
        assert_eq!(limit("250/day"), Limit { count: 250, measure: Measure::Requests, window: Window::Day });
        let ten_seconds = Window::Sliding(Duration::from_secs(10));
        assert_eq!(limit("20/10s"), Limit { count: 20, measure: Measure::Requests, window: ten_seconds });
        assert_eq!(limit("300/5min").window, Window::Sliding(Duration::from_secs(300)));
        assert_eq!(limit("3/2h").window, Window::Sliding(Duration::from_secs(7_200)));
        for text in ["10/min", "250000 tokens/min", "250/day", "20/10s", "300/5min", "3/2h", "1/s", "7/90s"] {
            assert_eq!(limit(text).to_string(), text, "prints as written");
        }
        assert_eq!(limit("5/60s").to_string(), "5/min", "the same window in its shortest words");
    }

    #[test]
    fn a_groups_own_section_replaces_the_one_for_every_group_and_a_models_line_the_star() {
        let minute =
            |count| Limit { count, measure: Measure::Requests, window: Window::Sliding(Duration::from_secs(60)) };
        let limits = Limits {
            every_group: [("flash".to_owned(), vec![minute(10)]), ("*".to_owned(), vec![minute(5)])].into(),
            groups: [("paid".to_owned(), [("pro".to_owned(), vec![minute(150)])].into())].into(),
        };
        assert_eq!(limits.binding(None, "flash"), [minute(10)]);
        assert_eq!(limits.binding(None, "other"), [minute(5)]);
        assert_eq!(limits.binding(Some("free"), "flash"), [minute(10)], "a group without a section");
        assert_eq!(limits.binding(Some("paid"), "pro"), [minute(150)]);
        assert_eq!(limits.binding(Some("paid"), "flash"), [], "the paid group's section lists no flash and no *");
        assert!(Limits::default().is_empty() && !limits.is_empty());
    }

    #[test]
    fn gemini_days_start_at_pacific_midnight_across_daylight_saving() {
        let utc = |y, m, d, h, min| {
            chrono::NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(h, min, 0)
                .unwrap()
                .and_utc()
                .timestamp_millis()
        };
        // Summer (UTC-7) and winter (UTC-8).
        assert_eq!(pacific_day_start(utc(2026, 7, 1, 12, 0)), utc(2026, 7, 1, 7, 0));
        assert_eq!(pacific_day_start(utc(2026, 1, 15, 7, 59)), utc(2026, 1, 14, 8, 0));
        assert_eq!(pacific_day_start(utc(2026, 1, 15, 8, 0)), utc(2026, 1, 15, 8, 0), "midnight is the day's start");
        // The days the clocks change are 23 and 25 hours long.
        assert_eq!(
            next_pacific_midnight(utc(2026, 3, 8, 9, 30)) - pacific_day_start(utc(2026, 3, 8, 9, 30)),
            23 * 3_600_000
        );
        assert_eq!(
            next_pacific_midnight(utc(2026, 11, 1, 20, 0)) - pacific_day_start(utc(2026, 11, 1, 20, 0)),
            25 * 3_600_000
        );
    }

    #[test]
    fn each_mistake_says_which_part_is_wrong() {
        for (text, problem) in [
            ("10", LimitProblem::Form),
            ("10 per min", LimitProblem::Form),
            ("10 requests/min", LimitProblem::Form),
            ("ten/min", LimitProblem::Form),
            ("/min", LimitProblem::Form),
            ("0/min", LimitProblem::Count),
            ("-3/min", LimitProblem::Count),
            ("99999999999999999999999/min", LimitProblem::Count),
            ("10/", LimitProblem::Window),
            ("10/10", LimitProblem::Window),
            ("10/week", LimitProblem::Window),
            ("10/0s", LimitProblem::Window),
            ("10/2day", LimitProblem::Window),
            ("10/m", LimitProblem::Window),
        ] {
            assert_eq!(text.parse::<Limit>(), Err(problem), "{text}");
        }
    }
}
