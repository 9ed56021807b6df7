//! Several hosts on one machine, for the tests of a pool shared through PostgreSQL: each simulated host
//! is a process tree in its own pid, UTS and mount namespaces (`unshare`, as root) with its own
//! hostname, `/proc` and boot id, running worker loops of the real binary; a fresh database on the test
//! server (`APIJONGLER_TEST_PG`); and a proxy on a Unix socket that cuts one host from the server.
//!
//! Network rule: a host keeps this machine's network namespace and gets no address of its own. It
//! reaches PostgreSQL through a Unix socket (the server's, or the proxy's) and the mock upstream on
//! 127.0.0.1; nothing else is ever addressed.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// The variable naming the PostgreSQL server the tests may create databases on (a maintenance
/// database's URL reaching the server through its Unix socket, e.g.
/// `postgres://postgres@/postgres?host=/run/pg`).
pub const TEST_PG_ENV: &str = "APIJONGLER_TEST_PG";

/// Why this test cannot run here, or `None` when it can: `APIJONGLER_TEST_PG` unset, not root, or
/// no namespaces. Under `CI=true` with the server given, a missing means of running it is a failure,
/// not a reason to skip (CI runs as root and installs libfaketime).
pub fn cannot_run() -> Option<String> {
    if std::env::var(TEST_PG_ENV).map_or(true, |url| url.is_empty()) {
        return Some(format!("{TEST_PG_ENV} is unset (see .ci/postgres)"));
    }
    let why = if !rustix::process::geteuid().is_root() {
        Some("simulated hosts need root (unshare of pid, UTS and mount namespaces)".to_owned())
    } else if let Err(why) = namespaces_work() {
        Some(why)
    } else if libfaketime().is_none() {
        Some("libfaketime is missing (Debian package faketime)".to_owned())
    } else {
        None
    };
    let why = why?;
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{TEST_PG_ENV} is set under CI=true, but {why}");
    Some(why)
}

/// Whether `unshare` can give a process tree its own pid, UTS and mount namespaces here.
fn namespaces_work() -> Result<(), String> {
    let status = Command::new("unshare")
        .args(["--pid", "--uts", "--mount", "--fork", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match status {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!("unshare failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
        Err(error) => Err(format!("cannot run unshare (util-linux): {error}")),
    }
}

/// libfaketime's library, where Debian puts it (`/usr/lib/<triplet>/faketime/`).
pub fn libfaketime() -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    let mut candidates: Vec<PathBuf> = dirs.flatten().map(|dir| dir.path().join("faketime/libfaketime.so.1")).collect();
    candidates.push(PathBuf::from("/usr/lib/faketime/libfaketime.so.1"));
    candidates.into_iter().find(|path| path.is_file())
}

/// The test server of `APIJONGLER_TEST_PG`: who logs in, and the directory of its Unix socket.
#[derive(Debug, Clone)]
pub struct TestServer {
    user: String,
    password: Option<String>,
    socket_dir: PathBuf,
    port: u16,
}

impl TestServer {
    /// The server `APIJONGLER_TEST_PG` names; it must be reached through a Unix socket (the network rule).
    pub fn from_env() -> Self {
        let url = std::env::var(TEST_PG_ENV).unwrap_or_else(|_| panic!("{TEST_PG_ENV} is set"));
        let config: postgres::Config = url.parse().unwrap_or_else(|e| panic!("{TEST_PG_ENV}: {e}"));
        let socket_dir = match config.get_hosts() {
            [postgres::config::Host::Unix(dir)] => dir.clone(),
            hosts => panic!("{TEST_PG_ENV} must name one socket directory (host=/dir), not {hosts:?}"),
        };
        Self {
            user: config.get_user().unwrap_or("postgres").to_owned(),
            password: config.get_password().map(|password| String::from_utf8_lossy(password).into_owned()),
            socket_dir,
            port: config.get_ports().first().copied().unwrap_or(5432),
        }
    }

    /// The server's socket file.
    pub fn socket(&self) -> PathBuf {
        self.socket_dir.join(self.socket_name())
    }

    /// The file name of a socket of this server's port in any directory (libpq's `.s.PGSQL.PORT`).
    pub fn socket_name(&self) -> String {
        format!(".s.PGSQL.{}", self.port)
    }

    /// The URL of database `name` through the socket in `socket_dir`.
    pub fn url(&self, name: &str, socket_dir: &Path) -> String {
        let login = match &self.password {
            Some(password) => format!("{}:{password}", self.user),
            None => self.user.clone(),
        };
        format!("postgres://{login}@/{name}?host={}&port={}", socket_dir.display(), self.port)
    }

    /// A connection to database `name` through the server's own socket.
    pub fn connect(&self, name: &str) -> postgres::Client {
        let mut config: postgres::Config = self.url(name, &self.socket_dir).parse().expect("a URL");
        config.connect_timeout(Duration::from_secs(30));
        config.connect(postgres::NoTls).unwrap_or_else(|e| panic!("connect to the test server ({TEST_PG_ENV}): {e}"))
    }
}

/// A fresh database on the test server, dropped (with whoever is still connected) with this.
pub struct Database {
    pub server: TestServer,
    pub name: String,
}

impl Database {
    pub fn create(server: TestServer) -> Self {
        let name = format!("apijongler_hosts_{}_{:08x}", std::process::id(), fastrand::u32(..));
        server.connect("postgres").batch_execute(&format!("CREATE DATABASE {name}")).expect("CREATE DATABASE");
        Self { server, name }
    }

    /// Its URL through the server's own socket.
    pub fn url(&self) -> String {
        self.server.url(&self.name, &self.server.socket_dir)
    }

    /// A connection for the test's own reads, in apijongler's schema.
    pub fn sql(&self) -> postgres::Client {
        let mut client = self.server.connect(&self.name);
        client.batch_execute("SET search_path = apijongler").expect("search_path");
        client
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(error) = self.server.connect("postgres").batch_execute(&statement) {
            eprintln!("could not drop the test database {}: {error}", self.name);
        }
    }
}

/// A proxy between a Unix socket of its own and the server's socket: what a host behind it sees as the
/// server. [`DbProxy::cut`] is a partition: every connection through it dies, and new ones are
/// closed at once, until [`DbProxy::restore`].
pub struct DbProxy {
    /// The directory of the proxy's socket (`host=` of the URL a host behind it uses).
    pub dir: PathBuf,
    state: Arc<ProxyState>,
    accepting: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

#[derive(Default)]
struct ProxyState {
    cut: AtomicBool,
    closing: AtomicBool,
    /// Connections closed at once because the proxy was cut.
    refused: AtomicUsize,
    /// Both ends of every connection passed through, to shut down on a cut.
    open: Mutex<Vec<UnixStream>>,
}

impl ProxyState {
    fn shut_all(&self) {
        for stream in self.open.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl DbProxy {
    /// A proxy to `server` listening in directory `dir` (created).
    pub fn start(server: &TestServer, dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("mkdir proxy dir");
        let socket = dir.join(server.socket_name());
        let listener = UnixListener::bind(&socket).expect("bind the proxy's socket");
        let (state, upstream) = (Arc::new(ProxyState::default()), server.socket());
        let shared = Arc::clone(&state);
        let accepting = std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if shared.cut.load(Ordering::SeqCst) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: the connection dies at once
                }
                let Ok(server) = UnixStream::connect(&upstream) else { continue };
                let mut open = shared.open.lock().unwrap_or_else(PoisonError::into_inner);
                for stream in [&client, &server] {
                    open.push(stream.try_clone().expect("clone a stream"));
                }
                drop(open);
                pipe(client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                pipe(server, client);
            }
        });
        Self { dir, state, accepting: Some(accepting), socket }
    }

    /// The partition: every connection through the proxy dies now, and new ones die at once.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.shut_all();
    }

    /// The partition heals: new connections go through again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// How many connections the proxy closed at once since it was first cut.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.state.closing.store(true, Ordering::SeqCst);
        self.state.shut_all();
        let _ = UnixStream::connect(&self.socket); // wakes the accepting thread
        if let Some(thread) = self.accepting.take() {
            let _ = thread.join();
        }
    }
}

/// Copies `from` to `to` on a thread until either side ends, then ends both.
fn pipe(mut from: UnixStream, mut to: UnixStream) {
    std::thread::spawn(move || {
        let mut buffer = [0; 16 * 1024];
        while let Ok(read) = from.read(&mut buffer) {
            if read == 0 || to.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

/// What a simulated host runs and how it is set up.
pub struct HostSpec<'a> {
    /// Its hostname (UTS namespace).
    pub name: &'a str,
    /// Worker loops it runs, each one `apijongler worker` after another.
    pub loops: usize,
    /// The environment of its workers (`APIJONGLER_DB` and friends), on top of `PATH`.
    pub env: Vec<(String, String)>,
    /// The worker's arguments after the binary.
    pub worker_args: Vec<String>,
    /// Run the workers under libfaketime, with the offset read from a file ([`Host::step_clock`]).
    pub faketime: bool,
}

/// A simulated host: `unshare --pid --uts --mount --fork --mount-proc` running an init (`sh`) that sets
/// its hostname, bind-mounts its own boot id over `/proc/sys/kernel/random/boot_id` and runs worker
/// loops. Each loop appends its workers' stdout to `out.N` and stderr to `err.N` in the host's
/// directory, and stops once the file `stop` exists.
pub struct Host {
    pub name: String,
    pub dir: PathBuf,
    loops: usize,
    unshare: Child,
    init: u32,
    namespace: u64,
}

/// The init of a host; its arguments are the hostname, the host's directory, the loop count and the
/// worker's command line.
const INIT: &str = r#"set -eu
hostname "$1"
mount --bind "$2/boot_id" /proc/sys/kernel/random/boot_id
dir=$2; loops=$3; shift 3
set +e
i=0
while [ "$i" -lt "$loops" ]; do
    i=$((i + 1))
    ( while [ ! -e "$dir/stop" ]; do
          "$@" >>"$dir/out.$i" 2>>"$dir/err.$i" || sleep 1
      done ) &
done
wait
"#;

impl Host {
    /// Starts the host in `dir` (created) and waits until its init runs in its own pid namespace.
    pub fn start(spec: &HostSpec<'_>, dir: PathBuf, binary: &Path) -> Self {
        std::fs::create_dir_all(&dir).expect("mkdir host dir");
        let boot_id = format!("{:08x}-0000-4000-8000-{:012x}", fastrand::u32(..), fastrand::u64(..1 << 48));
        std::fs::write(dir.join("boot_id"), format!("{boot_id}\n")).expect("write boot id");
        let mut worker: Vec<String> = Vec::new();
        if spec.faketime {
            std::fs::write(dir.join("faketime"), "+0\n").expect("write faketime file");
            let library = libfaketime().expect("libfaketime");
            worker.push("env".into());
            worker.push(format!("LD_PRELOAD={}", library.display()));
            worker.push(format!("FAKETIME_TIMESTAMP_FILE={}", dir.join("faketime").display()));
            // Only the wall clock steps, as an NTP step does: libfaketime would otherwise move the
            // monotonic and boot clocks too.
            worker.push("FAKETIME_DONT_FAKE_MONOTONIC=1".into());
            worker.push("FAKETIME_CACHE_DURATION=1".into());
        }
        worker.push(binary.display().to_string());
        worker.extend(spec.worker_args.iter().cloned());
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--uts", "--mount", "--fork", "--mount-proc", "sh", "-c", INIT, "sh", spec.name])
            .arg(&dir)
            .arg(spec.loops.to_string())
            .args(&worker)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(spec.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("init.err")).expect("create init.err"));
        let unshare = command.spawn().expect("spawn unshare (util-linux)");
        let own_namespace = namespace_of(std::process::id()).expect("own pid namespace");
        let mut init = None;
        super::wait_until(Duration::from_secs(60), "the host's init in its own pid namespace", || {
            init = children(unshare.id())
                .into_iter()
                .find(|&pid| namespace_of(pid).is_some_and(|namespace| namespace != own_namespace));
            init.is_some()
        });
        let init = init.expect("init");
        let namespace = namespace_of(init).expect("the init's namespace");
        Self { name: spec.name.to_owned(), dir, loops: spec.loops, unshare, init, namespace }
    }

    /// Every process of the host, as pids of this (the test's) namespace.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        let pids = entries.flatten().filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok());
        pids.filter(|&pid| namespace_of(pid) == Some(self.namespace)).collect()
    }

    /// SIGSTOP to every process of the host, again until every one of them is stopped (a loop may be
    /// starting a worker meanwhile).
    pub fn freeze(&self) {
        super::wait_until(Duration::from_secs(60), "every process of the host stopped", || {
            let pids = self.pids();
            let running: Vec<u32> =
                pids.iter().copied().filter(|&pid| !matches!(state(pid), 'T' | 't' | 'Z' | 'X' | '?')).collect();
            for &pid in &running {
                signal(pid, Signal::STOP);
            }
            running.is_empty() && !pids.is_empty()
        });
    }

    /// SIGCONT to every process of the host.
    pub fn thaw(&self) {
        for pid in self.pids() {
            signal(pid, Signal::CONT);
        }
    }

    /// SIGKILL to the host's init: the kernel kills every process of its pid namespace.
    pub fn kill(&mut self) {
        signal(self.init, Signal::KILL);
        self.unshare.wait().expect("reap unshare");
        super::wait_until(Duration::from_secs(60), "every process of the killed host gone", || self.pids().is_empty());
    }

    /// Asks every loop to stop after its current worker, and waits (up to `limit`) until they did.
    pub fn stop(&mut self, limit: Duration) {
        std::fs::write(self.dir.join("stop"), "").expect("write stop file");
        let deadline = Instant::now() + limit;
        while self.unshare.try_wait().expect("poll unshare").is_none() {
            assert!(Instant::now() < deadline, "host {} still running {limit:?} after it was asked to stop", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Steps the host's wall clock to `offset` from the real one (libfaketime's syntax: `+5m`, `-300s`).
    pub fn step_clock(&self, offset: &str) {
        let path = self.dir.join("faketime");
        let temporary = self.dir.join("faketime.new");
        std::fs::write(&temporary, format!("{offset}\n")).expect("write faketime file");
        std::fs::rename(temporary, path).expect("replace faketime file");
    }

    /// The lines of every worker's stdout so far, loops in order.
    pub fn output(&self) -> Vec<String> {
        self.files("out").lines().map(str::to_owned).collect()
    }

    /// Every worker's stderr so far, and then the init's (`unshare`, `hostname`, `mount`).
    pub fn errors(&self) -> String {
        self.files("err") + &std::fs::read_to_string(self.dir.join("init.err")).unwrap_or_default()
    }

    fn files(&self, prefix: &str) -> String {
        let read = |index| std::fs::read_to_string(self.dir.join(format!("{prefix}.{index}"))).unwrap_or_default();
        (1..=self.loops).map(read).collect()
    }

    /// Requests its workers saw answered (`answered STATUS KEY` lines).
    pub fn answered(&self) -> usize {
        self.output().iter().filter(|line| line.starts_with("answered ")).count()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.unshare.try_wait().ok().flatten().is_none() {
            signal(self.init, Signal::KILL);
            let _ = self.unshare.wait();
        }
    }
}

/// The inode of `pid`'s pid namespace.
fn namespace_of(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok().map(|meta| meta.ino())
}

/// The children of `pid` (every thread's).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let lists = tasks.flatten().filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok());
    lists.flat_map(|list| list.split_whitespace().filter_map(|pid| pid.parse().ok()).collect::<Vec<_>>()).collect()
}

/// The state letter of `pid` in `/proc/PID/stat` (`?` once it is gone).
fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next())
        .and_then(|state| state.chars().next())
        .unwrap_or('?')
}

fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, signal);
    }
}
