//! The real `apijongler serve`, started on a free port for a test, and an HTTP client for it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Sandbox;

/// Gemini's connector name, the one the gateway tests serve (pointed at a loopback upstream).
pub const GEMINI: &str = "generativelanguage.googleapis.com";

/// A sandbox with `keys` keys for connector [`GEMINI`], which points at `127.0.0.1:port`.
pub fn sandbox(keys: usize, port: u16) -> Sandbox {
    let sandbox = Sandbox::new(GEMINI, keys);
    sandbox.point_connector(GEMINI, "127.0.0.1", port, serde_json::json!({ "backoff_ms": 5, "timeout_secs": 10.0 }));
    sandbox
}

/// A running `apijongler serve`; killed if a test ends without stopping it.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts `apijongler serve --listen 127.0.0.1:0 ARGS` with `envs`, and waits for its address.
    pub fn start(sandbox: &Sandbox, args: &[&str], envs: &[(&str, &str)]) -> Gateway {
        let mut command = sandbox.apijongler();
        command
            .env("APIJONGLER_CONNECTORS", sandbox.connectors_dir())
            .env("APIJONGLER_LOG", "info")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start apijongler serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (found, address) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("stderr");
        let shared = Arc::clone(&stderr);
        // Reads stderr to its end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("apijongler serve: listening on http://") {
                    let _ = found.send(addr.parse::<SocketAddr>().expect("an address"));
                }
                let mut text = shared.lock().unwrap_or_else(PoisonError::into_inner);
                text.push_str(&line);
                text.push('\n');
            }
        });
        let addr = address.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let status = child.try_wait();
            panic!("no address from apijongler serve ({status:?}): {}", stderr.lock().unwrap())
        });
        Gateway { child, addr, stderr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signal");
    }

    /// Waits for the process to exit (at most a minute); returns its status and stderr.
    pub async fn exit(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "apijongler serve did not exit: {}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The reader thread ends with the pipe; give it the last lines.
        eventually(Duration::from_secs(10), "stderr closed", || Arc::strong_count(&self.stderr) == 1).await;
        (status, self.stderr())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds or `limit` passes, without blocking the runtime.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub async fn body_json(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
}
