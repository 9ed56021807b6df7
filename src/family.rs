//! The API families a connector may speak, and what follows from one for a request: the dialect of
//! its streams and errors (so the terminal event and the error event), where it names its model, and
//! whether quotas meter it.
//!
//! A connector file declares its family in `api` (`gemini`, `openai`, `huggingface`, `plain`). One that
//! declares none (a file written in the Python package's format) gets a family per request from the
//! path alone ([`ApiFamily::infer`]), else from its host (a `googleapis.com` host is Gemini's), else
//! `plain`. Pure: no I/O, no logging.
//!
//! Invariants:
//! - Only a family whose streams have a known last event gives a dialect that judges a stream's end;
//!   `plain` never does, so nothing is ever appended to its streams.
//! - A method is metered only if it is a `POST` (a generation, an embedding): reads (`GET`: listing,
//!   getting a model), deletions and Gemini's token counts never are, whatever the family. A model's
//!   lockdown therefore never stops them; only a lockdown of every model does.

use std::fmt;

use reqwest::Method;

use crate::model::ModelRule;
use crate::stream::Dialect;

/// The API a connector speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiFamily {
    /// Gemini's native API (`/v1beta/models/{model}:generateContent`), and its OpenAI layer under
    /// `/{version}/openai/`.
    Gemini,
    /// An OpenAI-compatible API (`/v1/chat/completions`, `/v1/embeddings`…, the model in the body).
    OpenAi,
    /// Hugging Face: the native inference API (`/models/{org}/{name}`) and the router's
    /// OpenAI-compatible `/v1/…` routes.
    HuggingFace,
    /// Anything else: no model is read, streams are relayed as they come and never judged.
    Plain,
}

/// Gemini's methods (the `:method` after a model), metered or not. A path ending in one of them is
/// Gemini's wherever it is sent.
pub const GEMINI_METHODS: [&str; 16] = [
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
    "asyncBatchEmbedContent",
    "batchGenerateContent",
    "predict",
    "predictLongRunning",
    "generateAnswer",
    "generateText",
    "generateMessage",
    "embedText",
    "batchEmbedText",
    "countTextTokens",
    "countMessageTokens",
];

/// Gemini's methods that count tokens: free of the generation quotas.
const TOKEN_COUNTS: [&str; 3] = ["countTokens", "countTextTokens", "countMessageTokens"];

/// The path endings of OpenAI-compatible endpoints, on any host.
pub const OPENAI_ENDINGS: [&str; 4] = ["/chat/completions", "/completions", "/embeddings", "/responses"];

impl ApiFamily {
    /// Every family, in the order their words are listed.
    pub const ALL: [ApiFamily; 4] = [ApiFamily::Gemini, ApiFamily::OpenAi, ApiFamily::HuggingFace, ApiFamily::Plain];

    /// The word a connector file writes in `api`.
    pub fn word(self) -> &'static str {
        match self {
            ApiFamily::Gemini => "gemini",
            ApiFamily::OpenAi => "openai",
            ApiFamily::HuggingFace => "huggingface",
            ApiFamily::Plain => "plain",
        }
    }

    /// The family a connector file's `api` word names, exactly (lower case, no spaces).
    pub fn from_word(word: &str) -> Option<ApiFamily> {
        Self::ALL.into_iter().find(|family| family.word() == word)
    }

    /// The allowed words, quoted and comma-separated, for error messages.
    pub fn words() -> String {
        Self::ALL.iter().map(|family| format!("{:?}", family.word())).collect::<Vec<_>>().join(", ")
    }

    /// The family a request path shows by itself, if any: a Gemini method after the last `:` of the
    /// last segment (`:generateContent`, `:streamGenerateContent`, `:countTokens`…) is Gemini's; an
    /// OpenAI-compatible path ([`OPENAI_ENDINGS`], or Gemini's layer `/{version}/openai/…`) is OpenAI's.
    pub fn infer(path: &str) -> Option<ApiFamily> {
        if gemini_method(path).is_some() {
            Some(ApiFamily::Gemini)
        } else if is_openai_path(path) {
            Some(ApiFamily::OpenAi)
        } else {
            None
        }
    }

    /// The family a host name implies: Google's API hosts are Gemini's.
    pub fn of_host(host: &str) -> Option<ApiFamily> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        (host == "googleapis.com" || host.ends_with(".googleapis.com")).then_some(ApiFamily::Gemini)
    }

    /// The dialect of a request to `path` (the upstream path; a query is ignored) in this family.
    ///
    /// Gemini: OpenAI for its OpenAI layer, Google otherwise. OpenAI: always OpenAI. Hugging Face:
    /// OpenAI for OpenAI-compatible paths and the router's `/v1/…`, its native dialect otherwise.
    /// Plain: [`Dialect::Plain`], whose stream ends are never judged.
    pub fn dialect(self, path: &str) -> Dialect {
        match self {
            ApiFamily::Gemini if is_openai_path(path) => Dialect::OpenAi,
            ApiFamily::Gemini => Dialect::Google,
            ApiFamily::OpenAi => Dialect::OpenAi,
            ApiFamily::HuggingFace if is_openai_path(path) || first_segment(path) == "v1" => Dialect::OpenAi,
            ApiFamily::HuggingFace => Dialect::HuggingFace,
            ApiFamily::Plain => Dialect::Plain,
        }
    }

    /// Where the family's requests name their model, when the connector file has no `model`.
    pub fn model_rule(self) -> ModelRule {
        match self {
            ApiFamily::Gemini => ModelRule::gemini(),
            ApiFamily::OpenAi => ModelRule::body_only(),
            ApiFamily::HuggingFace => ModelRule::hugging_face(),
            ApiFamily::Plain => ModelRule::default(),
        }
    }

    /// Whether quotas meter a `method` request to `path`: a `POST` that is not one of Gemini's token
    /// counts. Reads (listing, getting a model), deletions and token counts are not metered. The same
    /// in every family today; a family with other free methods would list them here.
    pub fn meters(self, method: &Method, path: &str) -> bool {
        *method == Method::POST && !gemini_method(path).is_some_and(|method| TOKEN_COUNTS.contains(&method))
    }
}

impl fmt::Display for ApiFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// `path` without its query or fragment, and without a trailing `/`.
fn bare(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/')
}

fn first_segment(path: &str) -> &str {
    bare(path).split('/').nth(1).unwrap_or_default()
}

/// The Gemini method a path calls (`countTokens` in `/v1beta/models/m:countTokens`, `%3A` too).
fn gemini_method(path: &str) -> Option<&'static str> {
    let last = bare(path).rsplit('/').next().unwrap_or_default();
    let method = match last.rsplit_once(':') {
        Some((_, method)) => method,
        None => last.rsplit_once("%3A").or_else(|| last.rsplit_once("%3a"))?.1,
    };
    GEMINI_METHODS.iter().find(|known| **known == method).copied()
}

/// An OpenAI-compatible endpoint: a path ending in [`OPENAI_ENDINGS`], or under `/{version}/openai`
/// (Gemini's layer). `openai` elsewhere in a path (a model named `openai/gpt-oss-20b`) means nothing.
fn is_openai_path(path: &str) -> bool {
    let path = bare(path);
    let mut segments = path.split('/').skip(1);
    let version = segments.next().unwrap_or_default();
    let is_version = version.len() > 1 && version.starts_with('v') && version.as_bytes()[1].is_ascii_digit();
    OPENAI_ENDINGS.iter().any(|ending| path.ends_with(ending)) || (is_version && segments.next() == Some("openai"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ApiFamily::{Gemini, HuggingFace, OpenAi, Plain};

    #[test]
    fn words_round_trip_and_nothing_else_is_a_family() {
        for family in ApiFamily::ALL {
            assert_eq!(ApiFamily::from_word(family.word()), Some(family));
        }
        for bad in ["Gemini", "gemini ", "", "open-ai", "hf", "google"] {
            assert_eq!(ApiFamily::from_word(bad), None, "{bad:?}");
        }
        assert_eq!(ApiFamily::words(), r#""gemini", "openai", "huggingface", "plain""#);
    }

    #[test]
    fn a_path_shows_its_family_by_itself_or_not_at_all() {
        let cases: &[(&str, Option<ApiFamily>)] = &[
            ("/v1beta/models/gemini-2.5-flash:generateContent", Some(Gemini)),
            ("/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse", Some(Gemini)),
            ("/v1beta/models/gemini-2.5-pro:countTokens", Some(Gemini)),
            ("/v1/models/gemini-embedding-001:batchEmbedContents", Some(Gemini)),
            ("/v1beta/tunedModels/t-1:generateContent", Some(Gemini)),
            ("/v1beta/models/gemini-2.5-flash%3AgenerateContent", Some(Gemini)),
            ("/proxy/v1beta/models/imagen-4:predict", Some(Gemini)),
            ("/v1beta/openai/chat/completions", Some(OpenAi)),
            ("/v1beta/openai/models", Some(OpenAi)),
            ("/v1/chat/completions", Some(OpenAi)),
            ("/v1/completions", Some(OpenAi)),
            ("/v1/embeddings?x=1", Some(OpenAi)),
            ("/models/google/gemma-2-9b-it/v1/chat/completions", Some(OpenAi)),
            ("/v1beta/models", None),
            ("/v1beta/models/gemini-2.5-flash", None),
            ("/v1beta/models/x:unknownMethod", None),
            ("/models/google/gemma-2-9b-it", None),
            ("/hf-inference/models/openai/gpt-oss-20b", None),
            ("/v1/models", None),
            ("/embeddingsx", None),
            ("", None),
        ];
        for (path, expected) in cases {
            assert_eq!(ApiFamily::infer(path), *expected, "{path}");
        }
        assert_eq!(ApiFamily::of_host("generativelanguage.googleapis.com"), Some(Gemini));
        assert_eq!(ApiFamily::of_host("GENERATIVELANGUAGE.GOOGLEAPIS.COM."), Some(Gemini));
        assert_eq!(ApiFamily::of_host("googleapis.com.evil.example"), None);
        assert_eq!(ApiFamily::of_host("127.0.0.1"), None);
    }

    #[test]
    fn each_family_gives_each_route_its_dialect() {
        let cases: &[(ApiFamily, &str, Dialect)] = &[
            (Gemini, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", Dialect::Google),
            (Gemini, "/v1/models", Dialect::Google),
            (Gemini, "/upload/v1beta/files", Dialect::Google),
            (Gemini, "/v1/interactions", Dialect::Google),
            (Gemini, "/v1beta/openai/chat/completions", Dialect::OpenAi),
            (Gemini, "/v1beta/openai/models", Dialect::OpenAi),
            (Gemini, "/v1beta/openai", Dialect::OpenAi),
            (Gemini, "/v1beta/openai/", Dialect::OpenAi),
            (Gemini, "/v1beta/openaiish/models", Dialect::Google),
            (OpenAi, "/v1/chat/completions", Dialect::OpenAi),
            (OpenAi, "/v1/models", Dialect::OpenAi),
            (OpenAi, "/anything", Dialect::OpenAi),
            (HuggingFace, "/v1/chat/completions", Dialect::OpenAi),
            (HuggingFace, "/v1/models", Dialect::OpenAi),
            (HuggingFace, "/v1", Dialect::OpenAi),
            (HuggingFace, "/hf-inference/models/google/gemma-2-9b-it", Dialect::HuggingFace),
            (HuggingFace, "/hf-inference/models/openai/gpt-oss-20b", Dialect::HuggingFace),
            (HuggingFace, "/models/google/gemma-2-9b-it/v1/chat/completions", Dialect::OpenAi),
            (HuggingFace, "/v10/things", Dialect::HuggingFace),
            (Plain, "/v1/chat/completions", Dialect::Plain),
            (Plain, "/v1beta/models/m:streamGenerateContent", Dialect::Plain),
        ];
        for (family, path, expected) in cases {
            assert_eq!(family.dialect(path), *expected, "{family} {path}");
        }
    }

    #[test]
    fn only_generation_posts_are_metered() {
        let cases: &[(ApiFamily, Method, &str, bool)] = &[
            (Gemini, Method::POST, "/v1beta/models/m:generateContent", true),
            (Gemini, Method::POST, "/v1beta/models/m:streamGenerateContent?alt=sse", true),
            (Gemini, Method::POST, "/v1/models/m:batchEmbedContents", true),
            (Gemini, Method::POST, "/v1/models/m:embedContent", true),
            (Gemini, Method::POST, "/v1beta/models/imagen:predict", true),
            (Gemini, Method::POST, "/v1beta/openai/chat/completions", true),
            (Gemini, Method::POST, "/v1/interactions", true),
            (Gemini, Method::POST, "/v1beta/models/m:countTokens", false),
            (Gemini, Method::POST, "/v1beta/models/m%3AcountTokens", false),
            (Gemini, Method::GET, "/v1beta/models/m", false),
            (Gemini, Method::GET, "/v1beta/models", false),
            (Gemini, Method::DELETE, "/v1beta/tunedModels/t-1", false),
            (OpenAi, Method::POST, "/v1/chat/completions", true),
            (OpenAi, Method::GET, "/v1/models/gpt-4o", false),
            (HuggingFace, Method::POST, "/models/google/gemma-2-9b-it", true),
            (HuggingFace, Method::GET, "/v1/models", false),
            (Plain, Method::POST, "/anything", true),
            (Plain, Method::GET, "/anything", false),
        ];
        for (family, method, path, expected) in cases {
            assert_eq!(family.meters(method, path), *expected, "{family} {method} {path}");
        }
    }
}
