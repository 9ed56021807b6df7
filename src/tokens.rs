//! Input tokens, for token limits: estimated from a request before it is sent, read from the answer's
//! usage after.
//!
//! The estimate follows Gemini's own rule of thumb: a token is about four characters of text, and an
//! inline image or file part costs 258 tokens (an image up to 384 px a side; larger ones cost more,
//! which the answer's count corrects when the lease ends). Only text the model reads is counted (the
//! strings of the JSON body, not its keys, punctuation or base64 data), so a request with a large file
//! inline is not taken for millions of tokens.

use serde_json::Value;

/// Tokens counted for an inline image or file part before its real cost is known.
pub const PER_FILE_PART: u64 = 258;

/// The keys of a part holding a file or image rather than text (Gemini's and OpenAI's spellings).
const FILE_PARTS: [&str; 6] = ["inlineData", "inline_data", "fileData", "file_data", "image_url", "input_audio"];

/// The input tokens `body` (a request's JSON) will likely cost: `ceil(chars / 4)` of its strings plus
/// [`PER_FILE_PART`] per file part; for a body that is not JSON, a quarter of its length.
pub fn estimate(body: &[u8]) -> u64 {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return (body.len() as u64).div_ceil(4);
    };
    let (chars, files) = count(&json);
    chars.div_ceil(4) + files * PER_FILE_PART
}

/// Characters of the strings of `value` outside file parts, and how many file parts it has.
fn count(value: &Value) -> (u64, u64) {
    match value {
        Value::String(text) => (text.chars().count() as u64, 0),
        Value::Array(items) => items.iter().map(count).fold((0, 0), |(a, b), (c, d)| (a + c, b + d)),
        Value::Object(fields) => fields.iter().fold((0, 0), |(chars, files), (name, field)| {
            if FILE_PARTS.contains(&name.as_str()) {
                (chars, files + 1)
            } else {
                let (more_chars, more_files) = count(field);
                (chars + more_chars, files + more_files)
            }
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => (0, 0),
    }
}

/// The input tokens an answer (a whole JSON body, or one stream event's data) says the request used:
/// Gemini's `usageMetadata.promptTokenCount`, OpenAI's `usage.prompt_tokens`. Bodies without either
/// word are not parsed.
pub fn prompt_tokens(body: &[u8]) -> Option<u64> {
    let has = |word: &[u8]| body.windows(word.len()).any(|window| window == word);
    if !has(b"promptTokenCount") && !has(b"prompt_tokens") {
        return None;
    }
    let json: Value = serde_json::from_slice(body).ok()?;
    // Gemini's OpenAI-compatible layer and some errors wrap the envelope in a one-element array.
    let json = json.as_array().and_then(|items| items.first()).unwrap_or(&json);
    json["usageMetadata"]["promptTokenCount"].as_u64().or_else(|| json["usage"]["prompt_tokens"].as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_the_text_a_model_reads_and_each_file_part() {
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"abcdefgh"},{"inlineData":{"mimeType":"image/png","data":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}]}]}"#;
        // "user" (4) + "abcdefgh" (8) = 12 chars -> 3 tokens, and one image.
        assert_eq!(estimate(gemini), 3 + PER_FILE_PART);
        let openai = br#"{"model":"m","messages":[{"role":"user","content":"hello world!"}]}"#;
        // "m" + "user" + "hello world!" = 17 chars -> 5 tokens.
        assert_eq!(estimate(openai), 5);
        assert_eq!(estimate(b"not json at all"), 4);
        assert_eq!(estimate(b""), 0);
    }

    #[test]
    fn the_answer_says_how_many_tokens_the_prompt_took() {
        let gemini = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":42,"totalTokenCount":50}}"#;
        assert_eq!(prompt_tokens(gemini), Some(42));
        let openai = br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
        assert_eq!(prompt_tokens(openai), Some(7));
        let wrapped = br#"[{"usageMetadata":{"promptTokenCount":9}}]"#;
        assert_eq!(prompt_tokens(wrapped), Some(9));
        assert_eq!(prompt_tokens(br#"{"usageMetadata":{}}"#), None);
        assert_eq!(prompt_tokens(br#"{"candidates":[]}"#), None);
        assert_eq!(prompt_tokens(b"promptTokenCount but not json"), None);
    }
}
