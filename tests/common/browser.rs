//! A real headless browser for the dashboard's test: Debian's `chromium`, driven over the Chrome
//! DevTools Protocol through `--remote-debugging-pipe` (two named pipes, so no WebSocket client and no
//! `unsafe` fd juggling), and a recording TCP proxy that keeps every byte the page sends and gets.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The browser's path, or `None` when it is not installed: then the caller skips, except under
/// `CI=true`, where the project's CI script (.ci/browser) must have installed it.
pub fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join("chromium")).find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is missing under CI=true: .ci/browser (called by .ci/run) installs it"
        );
        eprintln!("SKIPPED: chromium is not installed (`bash .ci/browser` installs it); the browser test did not run");
    }
    found
}

/// One headless chromium with one page, attached over the DevTools protocol.
pub struct Browser {
    child: Child,
    to: std::fs::File,
    from: Receiver<Value>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromium` on `url` in a window of 1280×900.
    pub fn open(chromium: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let (commands, answers) = (profile.path().join("in"), profile.path().join("out"));
        for fifo in [&commands, &answers] {
            let made = Command::new("mkfifo").arg(fifo).status().expect("mkfifo");
            assert!(made.success(), "mkfifo {}", fifo.display());
        }
        // chromium reads commands on fd 3 and writes answers on fd 4.
        let child = Command::new("sh")
            .arg("-c")
            .arg(
                r#"exec "$0" --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
                    --window-size=1280,900 --user-data-dir="$1/profile" --remote-debugging-pipe about:blank \
                    3<"$1/in" 4>"$1/out""#,
            )
            .arg(chromium)
            .arg(profile.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let to = std::fs::OpenOptions::new().write(true).open(&commands).expect("open the command pipe");
        let from = std::fs::File::open(&answers).expect("open the answer pipe");
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|read| read > 0) {
                message.pop();
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && sender.send(value).is_err()
                {
                    break;
                }
                message.clear();
            }
        });
        let mut browser = Browser { child, to, from: receiver, next: 0, session: String::new(), _profile: profile };
        let target = browser.call("Target.createTarget", json!({ "url": url }), false);
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = browser.call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }), false);
        browser.session = attached["sessionId"].as_str().expect("sessionId").to_owned();
        browser
    }

    /// Sends one command (to the page's session when `page`) and waits for its result.
    pub fn call(&mut self, method: &str, params: Value, page: bool) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if page {
            message["sessionId"] = Value::from(self.session.clone());
        }
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.from.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(answer) if answer["id"] == id => {
                    assert!(answer.get("error").is_none(), "{method}: {answer}");
                    return answer["result"].clone();
                }
                Ok(_) => {} // an event, or another command's answer
                Err(RecvTimeoutError::Timeout) => panic!("chromium did not answer {method} within a minute"),
                Err(RecvTimeoutError::Disconnected) => panic!("chromium went away during {method}"),
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }), true);
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is `true`, at most `limit`; how long that took.
    pub fn wait_for(&mut self, expression: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.eval(expression) != Value::Bool(true) {
            assert!(started.elapsed() < limit, "the page never showed {expression} within {limit:?}: {}", self.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        started.elapsed()
    }

    /// The page's visible text.
    pub fn text(&mut self) -> String {
        self.eval("document.body.innerText").as_str().unwrap_or_default().to_owned()
    }

    /// A PNG of the page as shown.
    pub fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }), true);
        base64_decode(shot["data"].as_str().expect("base64 data"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the protocol's binary encoding) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | (u32::from(*d) << (18 - 6 * i)));
        out.extend_from_slice(&bits.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A TCP proxy on 127.0.0.1 in front of `target` that records every byte in both directions.
pub struct Recorder {
    pub addr: std::net::SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    pub async fn start(target: std::net::SocketAddr) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&bytes);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, Arc::clone(&recorded)));
                tokio::spawn(pipe(server_read, client_write, Arc::clone(&recorded)));
            }
        });
        Recorder { addr, bytes }
    }

    /// Everything that went through, both ways, as text.
    pub fn traffic(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    recorded: Arc<Mutex<Vec<u8>>>,
) {
    let mut buffer = vec![0; 16 * 1024];
    while let Ok(read) = from.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        recorded.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&buffer[..read]);
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
