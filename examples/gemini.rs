//! A first Gemini request from Rust through the shared key pool.
//!
//! ```sh
//! export APIJONGLER_CONFIG=~/.config/apijongler/keys.ini   # [generativelanguage.googleapis.com] key1 = ...
//! cargo run --example gemini -- "Explain WAL mode in one sentence."
//! ```

use std::time::Duration;

use api_jongler::{Error, Jongler};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "Say hello.".to_owned());
    let gemini = Jongler::builder("generativelanguage.googleapis.com")
        // Queue for a key for up to two minutes when every key is busy or rate-limited.
        .wait(Duration::from_secs(120))
        .connect()
        .await?;
    let body = json!({ "contents": [{ "parts": [{ "text": prompt }] }] });
    let answer = gemini.request_json("/v1beta/models/gemini-2.5-flash:generateContent", &body).await?;
    println!("{}", answer["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap_or_default());
    println!("keys now: {:?}", gemini.key_states().await?);
    Ok(())
}
