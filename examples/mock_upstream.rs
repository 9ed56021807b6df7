//! A loopback imitation of Gemini (and of an OpenAI-compatible router), to try `apijongler serve` and
//! the official SDKs without keys or network: `cargo run --example mock_upstream` prints its URL; point a
//! connector file at it (`"host": "127.0.0.1", "port": PORT, "protocol": "http"`). Ctrl-C stops it.

use api_jongler::mock::{MockConfig, MockUpstream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mock = MockUpstream::start(MockConfig::default()).await?;
    println!("mock upstream listening on {}", mock.url());
    tokio::signal::ctrl_c().await
}
