//! Lines that fit a terminal: the width to fit (`COLUMNS`, else the terminal's, else 100), rows of
//! cells shrunk column by column to that width, and prose wrapped at spaces.
//!
//! Invariant: every line [`fit`] and [`wrap`] return is at most the width asked for, in characters
//! (a cell cut short ends with `…`; a word longer than a line is cut the same way).

use std::io::IsTerminal;

/// The width when neither `COLUMNS` nor the terminal tells one (a pipe, a file).
pub const DEFAULT_WIDTH: usize = 100;

/// The narrowest width honoured: below it lines would say nothing.
const NARROWEST: usize = 40;

/// The width to fit: `COLUMNS` if it is a number, else stdout's terminal's, else [`DEFAULT_WIDTH`].
pub fn width() -> usize {
    let asked = std::env::var("COLUMNS").ok().and_then(|text| text.trim().parse::<usize>().ok());
    let terminal = || {
        let stdout = std::io::stdout();
        if !stdout.is_terminal() {
            return None;
        }
        rustix::termios::tcgetwinsize(&stdout).ok().map(|size| usize::from(size.ws_col)).filter(|cols| *cols > 0)
    };
    asked.or_else(terminal).unwrap_or(DEFAULT_WIDTH).max(NARROWEST)
}

/// How [`fit`] may narrow a table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Narrowing<'a> {
    /// Each column's wanted width (3 when not given): while a line is too wide, the column furthest
    /// above its wanted width loses a character first.
    pub wanted: &'a [usize],
    /// Columns left out, in this order, while the wanted widths alone are too wide.
    pub dropped_first: &'a [usize],
    /// Columns aligned right (numbers).
    pub right: &'a [usize],
    /// Columns cut in the middle rather than at the end (names that may differ only at the end).
    pub middle: &'a [usize],
}

/// `rows` (the first being the header) as lines of at most `width` characters: columns two spaces
/// apart, each as wide as its widest cell, narrowed as `narrowing` says. Columns whose every cell
/// below the header is empty are left out.
pub fn fit(rows: &[Vec<String>], width: usize, narrowing: Narrowing<'_>) -> Vec<String> {
    let Narrowing { wanted, dropped_first, right, middle } = narrowing;
    let all = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut shown: Vec<usize> =
        (0..all).filter(|&c| rows.iter().skip(1).any(|row| row.get(c).is_some_and(|cell| !cell.is_empty()))).collect();
    let natural = |c: usize| rows.iter().filter_map(|row| row.get(c)).map(|cell| len(cell)).max().unwrap_or(0);
    let want = |c: usize| natural(c).min(wanted.get(c).copied().unwrap_or(3)).max(3);
    let too_wide =
        |shown: &[usize]| shown.iter().map(|&c| want(c)).sum::<usize>() + 2 * shown.len().saturating_sub(1) > width;
    for column in dropped_first {
        if !too_wide(&shown) {
            break;
        }
        shown.retain(|c| c != column);
    }
    let mut widths: Vec<usize> = shown.iter().map(|&c| natural(c)).collect();
    let least: Vec<usize> = shown.iter().map(|&c| want(c)).collect();
    let gaps = 2 * shown.len().saturating_sub(1);
    while widths.iter().sum::<usize>() + gaps > width {
        let excess = |i: usize| widths[i].saturating_sub(least[i]);
        let Some(i) = (0..widths.len()).filter(|&i| widths[i] > 3).max_by_key(|&i| (excess(i), widths[i])) else {
            break;
        };
        widths[i] -= 1;
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = widths
                .iter()
                .zip(&shown)
                .map(|(&w, &c)| {
                    let text = row.get(c).map_or("", String::as_str);
                    let cell = if middle.contains(&c) { cut_middle(text, w) } else { cut(text, w) };
                    let pad = " ".repeat(w - len(&cell));
                    if right.contains(&c) { format!("{pad}{cell}") } else { format!("{cell}{pad}") }
                })
                .collect();
            cut(cells.join("  ").trim_end(), width)
        })
        .collect()
}

/// `text` wrapped at spaces into lines of at most `width` characters; lines after the first start
/// with `indent`.
pub fn wrap(text: &str, width: usize, indent: &str) -> Vec<String> {
    let mut lines = Vec::new();
    // The first line keeps its own indent.
    let body = text.trim_start_matches(' ');
    let mut line = text[..text.len() - body.len()].to_owned();
    for word in body.split(' ').filter(|word| !word.is_empty()) {
        let room = if lines.is_empty() { width } else { width - len(indent) };
        if !line.trim_start().is_empty() && len(&line) + 1 + len(word) > room {
            lines.push(std::mem::take(&mut line));
        }
        if !line.trim_start().is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| if i == 0 { cut(&line, width) } else { cut(&format!("{indent}{line}"), width) })
        .collect()
}

fn len(text: &str) -> usize {
    text.chars().count()
}

/// `text` in at most `width` characters, ending with `…` when cut.
fn cut(text: &str, width: usize) -> String {
    if len(text) <= width {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(width.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// `text` cut to `width` characters in the middle: its start and its end stay (`team-a-p…-prod-2`).
fn cut_middle(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width {
        return text.to_owned();
    }
    let kept = width.saturating_sub(1);
    let (head, tail) = (kept.div_ceil(2), kept / 2);
    let mut short: String = chars[..head].iter().collect();
    short.push('…');
    short.extend(&chars[chars.len() - tail..]);
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_cut_in_the_middle_keeps_its_end() {
        assert_eq!(cut_middle("team-a-prod-1", 9), "team…od-1");
        assert_eq!(cut_middle("team-a-prod-1", 13), "team-a-prod-1");
        assert_eq!(cut_middle("abcdef", 4), "ab…f");
    }

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|cell| (*cell).to_owned()).collect()
    }

    #[test]
    fn rows_fit_the_width_narrowing_the_widest_column() {
        let rows = [row(&["key", "lockdowns", "uses"]), row(&["key0", &"m until 00:00 PT ".repeat(8), "12"])];
        for width in [40, 80, 100] {
            let lines = fit(&rows, width, Narrowing { right: &[2], ..Narrowing::default() });
            assert!(lines.iter().all(|line| line.chars().count() <= width), "{width}: {lines:#?}");
            assert!(lines[1].starts_with("key0  m until") && lines[1].ends_with("…    12"), "{lines:#?}");
        }
        let lines = fit(
            &[row(&["a", "b", "c"]), row(&["aaa", "", "1"])],
            100,
            Narrowing { right: &[2], ..Narrowing::default() },
        );
        assert_eq!(lines, ["a    c", "aaa  1"], "an empty column is left out");
        let rows = [row(&["key", "lockdowns"]), row(&[&"k".repeat(30), &"m".repeat(30)])];
        let lines = fit(&rows, 40, Narrowing { wanted: &[8, 25], ..Narrowing::default() });
        // Each loses what it has above its wanted width (8 and 25), the furthest above first: 11 and 27.
        assert_eq!(lines[1], format!("{}…  {}…", "k".repeat(10), "m".repeat(26)));
        let rows = [row(&["key", "last", "lockdowns"]), row(&["k", "3 min ago", &"m".repeat(30)])];
        let lines = fit(&rows, 30, Narrowing { wanted: &[3, 9, 25], dropped_first: &[1], right: &[], middle: &[] });
        assert_eq!(lines[1], format!("k    {}…", "m".repeat(24)), "a column given up for the wanted ones: {lines:?}");
    }

    #[test]
    fn prose_wraps_at_spaces() {
        let lines = wrap("one two three four five", 10, "  ");
        assert_eq!(lines, ["one two", "  three", "  four", "  five"]);
        assert_eq!(wrap(&"x".repeat(12), 10, ""), ["xxxxxxxxx…"]);
        assert_eq!(wrap("  a b c", 5, "   "), ["  a b", "   c"], "the first line keeps its indent");
    }
}
