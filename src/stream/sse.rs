//! Server-sent events found in the upstream's bytes as they arrive, without ever rewriting them.
//!
//! The send path (and so the gateway) forwards the upstream's bytes verbatim (re-serialising events
//! split frames and broke SDKs at other gateways), so this module only says where events end and what
//! they mean.
//!
//! Invariants:
//! - [`Framer`] never changes, drops or adds a byte: it reports ranges of the stream. The ranges of the
//!   events it reports, followed by its pending bytes, cover every byte pushed, in order, without
//!   overlap.
//! - An event ends at the first blank line after some content: two line endings in a row, each CRLF,
//!   LF or CR, mixed too (Gemini ends events with CRLF CRLF, most others with LF LF).
//! - A CR that completes an event completes it at once, even as the last byte of a chunk: the event is
//!   reported without waiting for the next chunk. When the LF of that CRLF arrives in the next chunk,
//!   it is the first byte of the next event's range, a blank line before any content, which ends
//!   nothing. So any split of the same bytes yields the same events with the same data; only that one
//!   LF may move from the end of one range to the start of the next.
//! - Blank lines with nothing before them end nothing: they join the next event's range, so an event
//!   always has at least one non-empty line (a field or a comment).
//! - Memory is bounded: an event longer than the framer's limit is still delimited exactly, but its
//!   bytes are not kept (its [`Event::data`] is `None`), so it can be neither an error nor a terminal event
//!   to this module. [`FirstEventHold`] refuses a first event longer than its limit. The limit is the
//!   jongler's event limit (`APIJONGLER_MAX_EVENT`), which the relay after the commit keeps too.

use std::ops::Range;

use bytes::Bytes;
use serde_json::Value;

use super::dialect::Dialect;

/// Finds event boundaries in a byte stream pushed in chunks of any size.
#[derive(Debug, Clone)]
pub struct Framer {
    max_event_len: usize,
    /// Stream offset of the next byte to be pushed.
    offset: u64,
    /// Stream offset of the pending event's first byte.
    start: u64,
    /// The pending event's bytes, while they fit `max_event_len`.
    pending: Vec<u8>,
    /// The pending event outgrew `max_event_len`; `pending` is empty and stays so until it ends.
    oversized: bool,
    /// No byte since the last line ending (or since the start).
    line_empty: bool,
    /// The last byte was a CR, so an LF now completes that CRLF rather than ending a line.
    after_cr: bool,
    /// The pending event has a non-empty line.
    has_content: bool,
}

/// One complete event: its place in the stream and, unless it was too long to keep, its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    range: Range<u64>,
    raw: Option<Bytes>,
}

impl Framer {
    /// A framer that keeps the bytes of events up to `max_event_len` bytes long (terminator included).
    pub fn new(max_event_len: usize) -> Self {
        Framer {
            max_event_len,
            offset: 0,
            start: 0,
            pending: Vec::new(),
            oversized: false,
            line_empty: true,
            after_cr: false,
            has_content: false,
        }
    }

    /// Changes the length above which an event's bytes are not kept, for the events still to come
    /// (for example a larger limit once the first event has been forwarded).
    pub fn set_max_event_len(&mut self, max_event_len: usize) {
        self.max_event_len = max_event_len;
    }

    /// Scans the next chunk; returns the events it completes, in stream order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        let base = self.offset;
        let mut events = Vec::new();
        let mut from = 0;
        let mut i = 0;
        while i < chunk.len() {
            let byte = chunk[i];
            i += 1;
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\r' | b'\n' if self.line_empty && self.has_content => {
                    if byte == b'\r' && chunk.get(i) == Some(&b'\n') {
                        i += 1;
                    }
                    self.keep(&chunk[from..i]);
                    events.push(self.take(base + i as u64));
                    from = i;
                }
                b'\r' | b'\n' => {
                    self.line_empty = true;
                    self.after_cr = byte == b'\r';
                }
                _ => {
                    self.line_empty = false;
                    self.has_content = true;
                }
            }
        }
        self.keep(&chunk[from..]);
        self.offset = base + chunk.len() as u64;
        events
    }

    /// The bytes pushed since the last complete event (the send path never needs it: the tests check the
    /// ranges-cover-every-byte invariant with it).
    #[cfg(test)]
    pub fn pending_len(&self) -> u64 {
        self.offset - self.start
    }

    /// Ends the stream: the unterminated last event, if it has any content. The SSE specification
    /// discards such an event; it is returned so that the caller can classify it (an upstream error
    /// written without its blank line), never to count it as a complete event.
    pub fn finish(mut self) -> Option<Event> {
        let end = self.offset;
        self.has_content.then(|| self.take(end))
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.oversized {
            return;
        }
        if self.pending.len() + bytes.len() > self.max_event_len {
            self.oversized = true;
            self.pending = Vec::new();
        } else {
            self.pending.extend_from_slice(bytes);
        }
    }

    fn take(&mut self, end: u64) -> Event {
        let raw = (!std::mem::take(&mut self.oversized)).then(|| Bytes::from(std::mem::take(&mut self.pending)));
        let event = Event { range: self.start..end, raw };
        self.start = end;
        self.line_empty = true;
        self.has_content = false;
        event
    }
}

impl Event {
    /// Where the event lies in the stream: byte offsets from the start of the body, terminator included.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// The event's bytes exactly as received, or `None` when it was longer than the framer's limit.
    /// This and the two views below serve the tests: the send path reads [`event_data`] of the bytes
    /// it relays.
    #[cfg(test)]
    pub fn raw(&self) -> Option<&Bytes> {
        self.raw.as_ref()
    }

    /// The event's `data` (see [`event_data`]); `None` when it has no data line or was not kept.
    pub fn data(&self) -> Option<String> {
        self.raw.as_deref().and_then(event_data)
    }

    /// Whether the event carries an error (see [`is_error_event`]).
    #[cfg(test)]
    pub fn is_error(&self) -> bool {
        self.data().is_some_and(|data| is_error_event(&data))
    }

    /// Whether the event ends the answer in `dialect` (see [`is_terminal`]).
    #[cfg(test)]
    pub fn is_terminal(&self, dialect: Dialect) -> bool {
        self.data().is_some_and(|data| is_terminal(dialect, &data))
    }
}

/// The `data` of one event: the values of its `data` lines joined with `\n`, each without the one
/// optional space after the colon (a bare `data` line counts as an empty value). `None` when the event
/// has no data line (a comment, or `event:`/`id:` lines only). Invalid UTF-8 is replaced, not refused.
pub fn event_data(raw: &[u8]) -> Option<String> {
    let mut data: Option<Vec<u8>> = None;
    for line in raw.split(|&byte| byte == b'\n' || byte == b'\r') {
        let value = match line.strip_prefix(b"data") {
            Some([]) => &[][..],
            Some([b':', rest @ ..]) => rest.strip_prefix(b" ").unwrap_or(rest),
            _ => continue,
        };
        match &mut data {
            Some(joined) => {
                joined.push(b'\n');
                joined.extend_from_slice(value);
            }
            None => data = Some(value.to_vec()),
        }
    }
    data.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// Whether an event's data is an error: a JSON object with an `error` key, the in-band error of Gemini,
/// OpenAI-compatible servers and Hugging Face alike, or such an object as the first element of an array
/// (Gemini's OpenAI-compatible layer wraps its errors so).
pub fn is_error_event(data: &str) -> bool {
    let is_error = |value: &Value| matches!(value, Value::Object(object) if object.contains_key("error"));
    data.contains("\"error\"")
        && match serde_json::from_str::<Value>(data) {
            Ok(Value::Array(elements)) => elements.first().is_some_and(is_error),
            Ok(value) => is_error(&value),
            Err(_) => false,
        }
}

/// Whether an event's data ends the answer, so that nothing may be appended after it (an error event
/// after a complete answer makes the SDKs throw that answer away).
///
/// - Google: a candidate with a `finishReason` (other than `FINISH_REASON_UNSPECIFIED`), a
///   `promptFeedback.blockReason`, or an Interactions `interaction.complete` event. With several
///   candidates the first to finish counts: missing the end of a normal stream would append an error
///   to every complete answer, a worse failure than missing a break in candidate 2.
/// - OpenAI: `[DONE]`, and also a choice with a non-empty `finish_reason`. The answer is complete
///   there; only a usage chunk and `[DONE]` follow. The openai SDK accepts a stream that ends without
///   `[DONE]`, and some compatible servers never send it, so a break after `finish_reason` is left
///   silent rather than turned into an error that discards the answer. The Responses API's streams
///   end with an event of `type` `response.completed`, `response.incomplete` or `response.failed`.
/// - Hugging Face (text-generation streams): a non-null top-level `generated_text`, which only the last
///   event carries, or `[DONE]`.
/// - Plain: never: no one knows what ends such a stream, so it is never judged cut short.
pub fn is_terminal(dialect: Dialect, data: &str) -> bool {
    let data = data.trim();
    if dialect == Dialect::Plain {
        return false;
    }
    if data.starts_with("[DONE]") {
        return dialect != Dialect::Google;
    }
    let marker = match dialect {
        Dialect::Google => ["finishReason", "blockReason", "interaction.complete"].iter().any(|m| data.contains(m)),
        Dialect::OpenAi => data.contains("finish_reason") || data.contains("\"response."),
        Dialect::HuggingFace => data.contains("generated_text"),
        Dialect::Plain => false,
    };
    if !marker {
        return false;
    }
    let Ok(json) = serde_json::from_str::<Value>(data) else { return false };
    let set =
        |value: Option<&Value>, unset: &str| value.and_then(Value::as_str).is_some_and(|s| !s.is_empty() && s != unset);
    match dialect {
        Dialect::Google => {
            json["candidates"].as_array().is_some_and(|candidates| {
                candidates.iter().any(|c| set(c.get("finishReason"), "FINISH_REASON_UNSPECIFIED"))
            }) || set(json["promptFeedback"].get("blockReason"), "BLOCK_REASON_UNSPECIFIED")
                || json["event_type"] == "interaction.complete"
        }
        Dialect::OpenAi => {
            json["choices"].as_array().is_some_and(|choices| choices.iter().any(|c| set(c.get("finish_reason"), "")))
                || ["response.completed", "response.incomplete", "response.failed"]
                    .iter()
                    .any(|end| json["type"] == *end)
        }
        Dialect::HuggingFace => json.get("generated_text").is_some_and(|text| !text.is_null()),
        Dialect::Plain => false,
    }
}

/// The bytes held before the first event may be longer than the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "apijongler: the upstream's first event is longer than {limit} bytes; raise the first-event limit if this answer is legitimate"
)]
pub struct FirstEventTooLarge {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// Holds an upstream stream's chunks until its first event with data is complete: the point where the
/// send path decides between forwarding (commit) and retrying on another key.
///
/// Invariants: the held chunks are the upstream's bytes, unchanged and in order; events without data
/// (comments) do not end the hold; the first data event must end within `limit` bytes of the stream's
/// start, else [`FirstEventHold::push`] fails, so the hold never grows past `limit` plus one chunk.
#[derive(Debug)]
pub struct FirstEventHold {
    framer: Framer,
    limit: usize,
    held: Vec<Bytes>,
    events: Vec<Event>,
    first: Option<usize>,
}

/// What a committed hold hands over: the held chunks to send first, the complete events among them, and
/// the framer to keep watching the rest of the stream with.
#[derive(Debug)]
pub struct Committed {
    /// The chunks to forward first, verbatim.
    pub held: Vec<Bytes>,
    /// Every complete event in `held`, the first data event among them; later ones may already be an
    /// error or terminal.
    pub events: Vec<Event>,
    /// The framer, positioned after `held`.
    pub framer: Framer,
}

impl FirstEventHold {
    /// A hold for a first event of at most `limit` bytes, counted from the start of the stream.
    pub fn new(limit: usize) -> Self {
        FirstEventHold { framer: Framer::new(limit), limit, held: Vec::new(), events: Vec::new(), first: None }
    }

    /// Holds the next chunk. Returns the first event with data once it is complete (and from then on);
    /// `Ok(None)` means more bytes are needed.
    pub fn push(&mut self, chunk: Bytes) -> Result<Option<&Event>, FirstEventTooLarge> {
        if self.first.is_none() {
            let events = self.framer.push(&chunk);
            self.held.push(chunk);
            for event in events {
                if self.first.is_none() && event.data().is_some() {
                    if event.range.end > self.limit as u64 {
                        return Err(FirstEventTooLarge { limit: self.limit });
                    }
                    self.first = Some(self.events.len());
                }
                self.events.push(event);
            }
            if self.first.is_none() && self.framer.offset > self.limit as u64 {
                return Err(FirstEventTooLarge { limit: self.limit });
            }
        }
        Ok(self.first.map(|index| &self.events[index]))
    }

    /// Hands the held bytes over for forwarding; call it once [`FirstEventHold::push`] returned an event.
    pub fn commit(self) -> Committed {
        Committed { held: self.held, events: self.events, framer: self.framer }
    }

    /// The stream ended before a first data event: the held chunks (the whole body, to classify like a
    /// non-streaming answer) and the unterminated last event, if any.
    pub fn finish(self) -> (Vec<Bytes>, Option<Event>) {
        (self.held, self.framer.finish())
    }
}

#[cfg(test)]
// Arrays of one range here are lists of event ranges, not ranges meant as arrays.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    /// The ranges and data of the events a framer reported.
    type Seen = Vec<(Range<u64>, Option<String>)>;

    /// Events' data and whether they were kept, from pushing `chunks` in order, then finishing.
    fn frame(chunks: &[&[u8]], max: usize) -> (Seen, Option<Range<u64>>) {
        let mut framer = Framer::new(max);
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(framer.push(chunk));
        }
        let trailing = framer.finish().map(|event| event.range());
        (events.into_iter().map(|event| (event.range(), event.data())).collect(), trailing)
    }

    fn data(events: &Seen) -> Vec<Option<String>> {
        events.iter().map(|(_, data)| data.clone()).collect()
    }

    #[test]
    fn events_end_at_every_kind_of_blank_line() {
        let some = |s: &str| Some(s.to_owned());
        type Case = (&'static str, &'static [u8], Vec<Option<String>>, Option<Range<u64>>);
        let cases: &[Case] = &[
            ("LF LF", b"data: a\n\ndata: b\n\n", vec![some("a"), some("b")], None),
            ("CRLF CRLF", b"data: a\r\n\r\ndata: b\r\n\r\n", vec![some("a"), some("b")], None),
            ("CR CR", b"data: a\r\rdata: b\r\r", vec![some("a"), some("b")], None),
            ("CRLF then LF", b"data: a\r\n\ndata: b\n\r\n", vec![some("a"), some("b")], None),
            ("LF then CR", b"data: a\n\rdata: b\r\n\r", vec![some("a"), some("b")], None),
            ("CRLF is one ending, not two", b"data: a\r\ndata: b\r\n", vec![], Some(0..18)),
            ("unterminated tail", b"data: a\n\ndata: b\n", vec![some("a")], Some(9..17)),
            ("leading blank lines join the next event", b"\n\r\n\rdata: a\n\n", vec![some("a")], None),
            ("blank lines only", b"\n\n\r\n\r\n", vec![], None),
            ("comment-only event", b": keepalive\n\ndata: a\n\n", vec![None, some("a")], None),
            ("multi-line data", b"event: x\ndata: a\ndata:b\ndata\nid: 1\n\n", vec![some("a\nb\n")], None),
            ("one space stripped, not two", b"data:  a\n\n", vec![some(" a")], None),
            ("data-like field names are not data", b"datax: a\ndata2: b\n\n", vec![None], None),
        ];
        for (name, bytes, expected, trailing) in cases {
            let (events, tail) = frame(&[bytes], 1 << 20);
            assert_eq!(&data(&events), expected, "{name}");
            assert_eq!(&tail, trailing, "{name}");
            let covered = events.last().map_or(0, |(range, _)| range.end);
            assert!(events.windows(2).all(|w| w[0].0.end == w[1].0.start), "{name}: ranges must be contiguous");
            assert_eq!(events.first().map_or(0, |(range, _)| range.start), 0, "{name}");
            assert!(covered <= bytes.len() as u64, "{name}");
        }
    }

    #[test]
    fn ranges_include_the_whole_terminator() {
        let cases: &[(&[u8], &[Range<u64>])] = &[
            (b"data: a\r\n\r\ndata: b\r\n\r\n", &[0..11, 11..22]),
            (b"data: a\n\ndata: b\n\n", &[0..9, 9..18]),
            (b"data: a\r\rdata: b\r\r", &[0..9, 9..18]),
            (b"\ndata: a\n\n", &[0..10]),
        ];
        for (bytes, expected) in cases {
            let (events, _) = frame(&[bytes], 1 << 20);
            let ranges: Vec<_> = events.into_iter().map(|(range, _)| range).collect();
            assert_eq!(&ranges, expected, "{}", String::from_utf8_lossy(bytes).escape_debug());
        }
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let streams: &[&[u8]] = &[
            b"data: {\"a\":1}\r\n\r\ndata: {\"b\":2}\r\n\r\n",
            b"data: a\r\rdata: b\r\r",
            b"data: a\n\n: c\n\ndata: b\r\n\n",
            b"data: a\r\n\r\n\r\ndata: b\n\n",
        ];
        for stream in streams {
            let (whole, _) = frame(&[stream], 1 << 20);
            for split in 0..=stream.len() {
                let (head, tail) = stream.split_at(split);
                let (parts, _) = frame(&[head, tail], 1 << 20);
                assert_eq!(
                    data(&parts),
                    data(&whole),
                    "split at {split} of {}",
                    String::from_utf8_lossy(stream).escape_debug()
                );
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(data(&frame(&bytes, 1 << 20).0), data(&whole), "byte by byte");
        }
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_completes_the_event_at_once() {
        // CRLF CR | LF: reported with the first chunk; the LF starts the next range and is no blank line.
        let mut framer = Framer::new(1 << 20);
        let first = framer.push(b"data: a\r\n\r");
        assert_eq!(first.iter().map(Event::range).collect::<Vec<_>>(), [0..10]);
        assert!(framer.push(b"\n").is_empty());
        let second = framer.push(b"data: b\n\n");
        assert_eq!(second.iter().map(Event::range).collect::<Vec<_>>(), [10..20]);
        assert_eq!(second[0].data().as_deref(), Some("b"));
        // CR | CR: the second CR ends the event even though an LF could follow.
        let mut framer = Framer::new(1 << 20);
        assert!(framer.push(b"data: a\r").is_empty());
        assert_eq!(framer.push(b"\r").len(), 1);
        assert!(framer.push(b"\n\n").is_empty(), "blank lines before any content end nothing");
        assert_eq!(framer.pending_len(), 2);
    }

    #[test]
    fn events_over_the_limit_are_delimited_but_not_kept() {
        // "data: a\n\n" is 9 bytes.
        let cases: &[(usize, bool)] = &[(9, true), (8, false), (0, false)];
        for &(max, kept) in cases {
            let mut framer = Framer::new(max);
            let mut events = framer.push(b"data: a\n\n");
            events.extend(framer.push(b"x: 1\n\n"));
            assert_eq!(events.len(), 2, "max {max}");
            assert_eq!(events[0].raw().is_some(), kept, "max {max}");
            assert_eq!(events[0].range(), 0..9, "max {max}");
            assert_eq!(events[1].raw().is_some(), max >= 6, "max {max}: the limit is per event");
        }
        // Pushed in pieces, the limit still counts the whole event.
        let mut framer = Framer::new(9);
        assert!(framer.push(b"data: ab").is_empty());
        assert!(framer.push(b"\n\n")[0].raw().is_none());
    }

    #[test]
    fn error_events() {
        let cases: &[(&str, bool)] = &[
            (r#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#, true),
            (r#"{"error":"Model is loading","error_type":"overloaded"}"#, true),
            (r#"{"event_type":"error","error":{"message":"x"}}"#, true),
            (r#" {"error" : null} "#, true),
            (r#"{"candidates":[{"content":{"parts":[{"text":"\"error\""}]}}]}"#, false),
            (r#"{"choices":[{"delta":{"content":"{\"error\":1}"}}]}"#, false),
            (r#"{"candidates":[{"finishReason":"STOP"}],"status":"error"}"#, false),
            (r#"["error"]"#, false),
            (r#"[{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}]"#, true),
            (r#"[{"choices":[]},{"error":1}]"#, false),
            (r#""error""#, false),
            (r#"{"error":"#, false),
            ("[DONE]", false),
        ];
        for (data, expected) in cases {
            assert_eq!(is_error_event(data), *expected, "{data}");
        }
    }

    #[test]
    fn terminal_events() {
        use Dialect::{Google, HuggingFace, OpenAi, Plain};
        let cases: &[(Dialect, &str, bool)] = &[
            (Google, r#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}]}"#, false),
            (
                Google,
                r#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"STOP"}],"usageMetadata":{}}"#,
                true,
            ),
            (Google, r#"{"candidates":[{"index":0},{"index":1,"finishReason":"MAX_TOKENS"}]}"#, true),
            (Google, r#"{"candidates":[{"finishReason":"FINISH_REASON_UNSPECIFIED"}]}"#, false),
            (Google, r#"{"candidates":[{"finishReason":null}]}"#, false),
            (Google, r#"{"promptFeedback":{"blockReason":"SAFETY"}}"#, true),
            (Google, r#"{"candidates":[{"content":{"parts":[{"text":"finishReason"}]}}]}"#, false),
            (Google, r#"{"event_type":"interaction.complete","interaction":{}}"#, true),
            (Google, r#"{"event_type":"content.delta","delta":{"text":"interaction.complete"}}"#, false),
            (Google, "[DONE]", false),
            (OpenAi, "[DONE]", true),
            (OpenAi, r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#, false),
            (OpenAi, r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#, true),
            (OpenAi, r#"{"choices":[{"delta":{},"finish_reason":""}]}"#, false),
            (OpenAi, r#"{"choices":[],"usage":{"total_tokens":3}}"#, false),
            (OpenAi, r#"{"candidates":[{"finishReason":"STOP"}]}"#, false),
            (OpenAi, r#"{"type":"response.output_text.delta","delta":"response.completed"}"#, false),
            (OpenAi, r#"{"type":"response.completed","response":{}}"#, true),
            (OpenAi, r#"{"type":"response.incomplete","response":{}}"#, true),
            (HuggingFace, r#"{"token":{"text":"a"},"generated_text":null,"details":null}"#, false),
            (HuggingFace, r#"{"token":{"text":"a"},"generated_text":"a b","details":{}}"#, true),
            (HuggingFace, "[DONE]", true),
            // No one knows what ends a stream of an unknown API.
            (Plain, r#"{"token":{"text":"a"},"generated_text":"a b","details":{}}"#, false),
            (Plain, r#"{"candidates":[{"finishReason":"STOP"}]}"#, false),
            (Plain, "[DONE]", false),
        ];
        for (dialect, data, expected) in cases {
            assert_eq!(is_terminal(*dialect, data), *expected, "{dialect:?} {data}");
        }
    }

    #[test]
    fn event_methods_read_the_kept_bytes() {
        let mut framer = Framer::new(1 << 20);
        let events = framer.push(b"data: {\"error\":{\"code\":429}}\r\n\r\ndata: [DONE]\n\n");
        assert!(events[0].is_error() && !events[0].is_terminal(Dialect::OpenAi));
        assert!(!events[1].is_error() && events[1].is_terminal(Dialect::OpenAi));
        assert_eq!(events[0].raw().map(|raw| &raw[..]), Some(&b"data: {\"error\":{\"code\":429}}\r\n\r\n"[..]));
    }

    #[test]
    fn the_hold_releases_at_the_first_data_event() {
        let mut hold = FirstEventHold::new(1 << 20);
        assert_eq!(hold.push(Bytes::from_static(b": keepalive\n\n")), Ok(None), "a comment is no first event");
        assert_eq!(
            hold.push(Bytes::from_static(b"data: {\"a\":1}\r\n\r")).map(|e| e.map(Event::range)),
            Ok(Some(13..29))
        );
        let committed = hold.commit();
        let held: Vec<u8> = committed.held.concat();
        assert_eq!(held, b": keepalive\n\ndata: {\"a\":1}\r\n\r", "held bytes are verbatim");
        assert_eq!(committed.events.len(), 2);
        let mut framer = committed.framer;
        assert!(framer.push(b"\n").is_empty(), "the LF left of the CRLF ends nothing");
        assert_eq!(framer.push(b"data: b\r\n\r\n")[0].data().as_deref(), Some("b"));
    }

    #[test]
    fn the_hold_limit_is_exact() {
        #[derive(Debug, PartialEq)]
        enum Outcome {
            Ready,
            More,
            TooLarge,
        }
        use Outcome::{More, Ready, TooLarge};
        // "data: abc\n\n" is 11 bytes.
        let cases: &[(usize, &[&[u8]], Outcome)] = &[
            (11, &[b"data: abc\n\n"], Ready),
            (10, &[b"data: abc\n\n"], TooLarge),
            (11, &[b"data: abc\n", b"\n"], Ready),
            (10, &[b"data: abc\n", b"\n"], TooLarge),
            (11, &[b"data: abc\n\ndata: more than the limit\n\n"], Ready),
            (4, &[b"data"], More),
            (4, &[b"data", b":"], TooLarge),
            (13, &[b": c\n\n", b"data: a\n"], More),
            (12, &[b": c\n\n", b"data: a\n", b"\n"], TooLarge),
        ];
        for (limit, chunks, expected) in cases {
            let mut hold = FirstEventHold::new(*limit);
            let mut outcome = More;
            for chunk in *chunks {
                match hold.push(Bytes::copy_from_slice(chunk)) {
                    Ok(first) => outcome = if first.is_some() { Ready } else { More },
                    Err(error) => {
                        assert_eq!(error.limit, *limit);
                        outcome = TooLarge;
                        break;
                    }
                }
            }
            assert_eq!(&outcome, expected, "limit {limit}, chunks {chunks:?}");
        }
    }

    #[test]
    fn the_hold_hands_back_everything_at_eof() {
        let mut hold = FirstEventHold::new(1 << 20);
        assert_eq!(hold.push(Bytes::from_static(b"data: {\"error\":{\"code\":503}}\n")), Ok(None));
        let (held, trailing) = hold.finish();
        assert_eq!(held.concat(), b"data: {\"error\":{\"code\":503}}\n");
        assert!(trailing.is_some_and(|event| event.is_error()));
        let (held, trailing) = FirstEventHold::new(16).finish();
        assert!(held.is_empty() && trailing.is_none());
    }
}
