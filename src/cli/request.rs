//! The seed's form: `apijongler CONNECTOR METHOD ENDPOINT [BODY]`. The body of the answer goes to
//! stdout (indented with `--pretty`), the status and progress to stderr; a non-2xx answer exits 3.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api_jongler::{Bookkeeping, Jongler, Response};
use serde_json::Value;

use super::exit::{self, Usage};
use super::signals::{Signal, Signals};
use super::{Global, output, parse_duration};

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The connector (see `apijongler connectors`), e.g. generativelanguage.googleapis.com.
    connector: Option<String>,
    /// The HTTP method, e.g. POST.
    method: Option<String>,
    /// The endpoint path, e.g. /v1beta/models/gemini-2.5-flash:generateContent.
    endpoint: Option<String>,
    /// The request body (JSON for JSON connectors); `-` reads it from standard input and `@FILE` from
    /// a file, as curl does (an argument holds 128 KiB at most).
    body: Option<String>,
    /// Print a JSON answer indented.
    #[arg(long)]
    pretty: bool,
    /// Route through Tor (socks5h://127.0.0.1:9050, or APIJONGLER_TOR_PROXY).
    #[arg(long)]
    tor: bool,
    /// How long to wait for a key when all are held or in lockdown (30s, 2m, 0 = fail at once; 1y at most).
    #[arg(long, env = "APIJONGLER_WAIT", default_value = "5m", value_name = "DURATION")]
    wait: String,
    /// The whole request's deadline, the wait for a key included (30s, 2m): each attempt gets what is
    /// left of it when that is less than its own timeout (APIJONGLER_TIMEOUT). Default: none.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Send a POST that timed out (or whose connection broke) after it was sent again, on another key.
    /// The upstream may have generated and billed the first one: this may pay twice for one answer.
    #[arg(long)]
    retry_timeouts: bool,
}

pub fn run(global: &Global, args: &RequestArgs) -> anyhow::Result<ExitCode> {
    let (Some(connector), Some(method), Some(endpoint)) = (&args.connector, &args.method, &args.endpoint) else {
        return Err(Usage(
            "connector, method and endpoint are required for API calls, e.g. `apijongler \
             generativelanguage.googleapis.com POST /v1beta/models/gemini-2.5-flash:generateContent '{...}'` \
             (see `apijongler --help` for the other commands)"
                .to_owned(),
        )
        .into());
    };
    let wait = parse_wait(&args.wait)?;
    let timeout = args.timeout.as_deref().map(parse_timeout).transpose()?;
    let body = read_body(args.body.as_deref())?;
    let body = body.as_str();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let code = runtime.block_on(async {
        let mut builder =
            Jongler::builder(connector.as_str()).wait(wait).tor(args.tor).retry_timeouts(args.retry_timeouts);
        if let Some(path) = &global.config {
            builder = builder.keyring(path);
        }
        if let Some(path) = &global.db {
            builder = builder.database(path);
        }
        if let Some(dir) = &global.connectors {
            builder = builder.connectors_dir(dir);
        }
        let jongler = builder.connect().await?;
        if jongler.connector().content_type() == "application/json" && !body.trim().is_empty() {
            serde_json::from_str::<Value>(body)
                .map_err(|error| Usage(format!("BODY is not valid JSON ({error}); {connector} takes JSON")))?;
        }
        if !global.quiet {
            eprintln!("Making {} request to {connector}{endpoint}", method.to_ascii_uppercase());
        }
        // Installed before the request starts, so no signal in between kills the process outright.
        let mut signals = Signals::install()?;
        let model = jongler.connector().model_of(endpoint, body.as_bytes());
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let wait = timeout.map_or(wait, |timeout| wait.min(timeout));
        let request = jongler.request_with_deadline(method, endpoint, body, deadline);
        let request = with_waiting_line(&jongler, model.as_deref(), wait, request);
        let response = tokio::select! {
            response = request => response,
            signal = signals.next() => return cancelled(&jongler, signal, &mut signals).await,
        };
        // Ends that could not be written in place (a lock held too long) get a last chance before exit.
        let coordinator = jongler.coordinator().clone();
        tokio::task::spawn_blocking(move || coordinator.settle(Instant::now() + SETTLE_ON_EXIT)).await?;
        let response = response?;
        print(global, args, &response)?;
        match &response.bookkeeping {
            Bookkeeping::Recorded => {}
            Bookkeeping::LeaseLost { key } => {
                eprintln!(
                    "apijongler: the answer is on stdout, but the lease on key '{key}' was taken away during the \
                     request (`cleanup --force`, or this process was stopped): another process may have used the key \
                     at the same time; see `apijongler history --key {key}`"
                );
                return Ok(ExitCode::from(exit::LEASE_LOST));
            }
            Bookkeeping::NotRecorded { problem } => {
                eprintln!(
                    "apijongler: the answer is on stdout, but the database could not record it: {problem}; the key \
                     is freed once this process has exited"
                );
                return Ok(ExitCode::from(exit::NOT_RECORDED));
            }
        }
        if response.is_success() {
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("apijongler: {connector} answered {} (the body is on stdout)", response.status);
        Ok(ExitCode::from(exit::UPSTREAM))
    });
    // A claim still waiting on the blocking pool (the request was interrupted) must not hold up the exit.
    runtime.shutdown_background();
    code
}

/// The request was dropped by a signal: its key is being given back with the attempt recorded as
/// cancelled (see `Jongler::request`); wait a little for that write, then exit as the signal asks.
/// A second signal while it waits ends the process at once (the key is then freed by the next claimer).
async fn cancelled(jongler: &Jongler, signal: Signal, signals: &mut Signals) -> anyhow::Result<ExitCode> {
    let coordinator = jongler.coordinator().clone();
    let settling = tokio::task::spawn_blocking(move || coordinator.settle(Instant::now() + SETTLE_ON_EXIT));
    let left = tokio::select! {
        left = settling => left?,
        _ = signals.next() => 1,
    };
    let (name, code) = (signal.name(), signal.exit_code());
    if left == 0 {
        eprintln!("apijongler: {name}: request cancelled, key released");
    } else {
        eprintln!(
            "apijongler: {name}: request cancelled; the key is freed by the next claimer once this process has exited"
        );
    }
    Ok(ExitCode::from(code))
}

/// How long an interrupted request waits for its key's release to be written.
const SETTLE_ON_EXIT: Duration = Duration::from_secs(5);

/// The longest `--wait` (humantime's `1y`): as good as forever for a request, and far from the
/// overflow of the clock arithmetic that a wait like `500000000000y` would reach.
const MAX_WAIT: Duration = Duration::from_secs(31_557_600);

fn parse_wait(text: &str) -> Result<Duration, Usage> {
    let wait = parse_duration(text).map_err(|why| Usage(format!("--wait (or APIJONGLER_WAIT) {why}")))?;
    if wait > MAX_WAIT {
        return Err(Usage(format!(
            "--wait (or APIJONGLER_WAIT) '{text}' is longer than the longest wait, 1y; write 1y to wait as long as it takes"
        )));
    }
    Ok(wait)
}

/// `--timeout`: a positive duration, at most [`MAX_WAIT`].
fn parse_timeout(text: &str) -> Result<Duration, Usage> {
    let timeout = parse_duration(text).map_err(|why| Usage(format!("--timeout {why}")))?;
    if timeout.is_zero() || timeout > MAX_WAIT {
        return Err(Usage(format!("--timeout '{text}' must be longer than 0 and at most 1y")));
    }
    Ok(timeout)
}

/// BODY as curl reads `--data`: `-` is standard input, `@FILE` the contents of FILE, anything else the
/// body itself. Bodies are text (JSON, form data); bytes that are not UTF-8 are refused.
fn read_body(arg: Option<&str>) -> Result<String, Usage> {
    let usage =
        |problem: String| Usage(format!("BODY {problem}; BODY is the text itself, - for standard input or @FILE"));
    let (source, bytes) = match arg {
        None => return Ok(String::new()),
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut bytes)
                .map_err(|error| usage(format!("-: cannot read standard input ({error})")))?;
            ("standard input".to_owned(), bytes)
        }
        Some(arg) => match arg.strip_prefix('@') {
            None => return Ok(arg.to_owned()),
            Some("") => return Err(usage("'@' names no file".to_owned())),
            Some(path) => {
                let bytes =
                    std::fs::read(path).map_err(|error| usage(format!("{arg}: cannot read {path} ({error})")))?;
                (path.to_owned(), bytes)
            }
        },
    };
    String::from_utf8(bytes).map_err(|error| usage(format!("from {source} is not UTF-8 text ({error})")))
}

fn print(global: &Global, args: &RequestArgs, response: &Response) -> anyhow::Result<()> {
    let parsed = serde_json::from_str::<Value>(&response.body).ok();
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let body = parsed.unwrap_or_else(|| Value::String(response.body.clone()));
        let record = serde_json::json!({
            "status": response.status, "key": response.key_name, "attempts": response.attempts, "body": body
        });
        writeln!(stdout, "{record}")?;
        return Ok(());
    }
    if !global.quiet {
        let key = response.key_name.as_deref().map(|key| format!(" (key {key})")).unwrap_or_default();
        eprintln!("Status Code: {}{key}", response.status);
    }
    match parsed {
        Some(json) if args.pretty => writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?,
        _ => writeln!(stdout, "{}", response.body)?,
    }
    Ok(())
}

/// Runs `request`; while it takes more than a second and stderr is a terminal, keeps one status line
/// there saying what the request is waiting for and until when.
async fn with_waiting_line<T>(
    jongler: &Jongler,
    model: Option<&str>,
    wait: Duration,
    request: impl Future<Output = api_jongler::Result<T>>,
) -> anyhow::Result<T> {
    if !std::io::stderr().is_terminal() {
        return Ok(request.await?);
    }
    let started = Instant::now();
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    tokio::pin!(request);
    let mut shown = false;
    let result = loop {
        tokio::select! {
            result = &mut request => break result,
            _ = ticker.tick() => {
                shown = true;
                eprint!("\r\x1b[2K{}", waiting_line(jongler, model, started, wait));
            }
        }
    };
    if shown {
        eprint!("\r\x1b[2K");
    }
    Ok(result?)
}

fn waiting_line(jongler: &Jongler, model: Option<&str>, started: Instant, wait: Duration) -> String {
    let coordinator = jongler.coordinator();
    let now = coordinator.now_ms();
    let waited = output::humanize(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    let limit = output::humanize(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
    match coordinator.store().availability(&jongler.connector().name, model, &[], now) {
        Ok(a) if a.claimable == 0 && a.total() > 0 => {
            let until = a
                .earliest_lockdown_end
                .map(|end| {
                    format!(", the first lockdown ends {} ({})", output::clock_time(end), output::relative(end, now))
                })
                .unwrap_or_default();
            let for_model = match &a.model {
                Some(model) => format!(", {} locked down for {model}", a.model_lockdown),
                None => String::new(),
            };
            format!(
                "waiting for a key of {}: {} held, {} in lockdown{for_model}{until} (waited {waited} of at most {limit})",
                a.connector, a.locked, a.lockdown
            )
        }
        _ => format!("waiting for the answer of {} ({waited})", jongler.connector().name),
    }
}
