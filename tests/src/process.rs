//! One `weft run` process driven from a test, and the client calls made against it.
//!
//! The node's stdout goes to `<data>.stdout.log` (rewritten on every start) and is
//! polled for the startup lines `peer`, `listening`, `api`; stderr is appended to
//! `<data>.stderr.log` across restarts. Both files sit next to the data directory, by
//! default inside a temporary directory that the harness owns. When a test panics, every
//! node still alive in it prints the tail of its log while unwinding and keeps its
//! directory on disk for inspection.
//!
//! Nodes are started with `PR_SET_PDEATHSIG = SIGKILL`, so a test process that is itself
//! killed takes its nodes with it. The signal follows the *thread* that spawned the
//! node: start nodes from the test's own thread or a runtime worker, not from
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::binary::weft_binary;
use crate::cli::{run_cli, CliOutput};

/// The space every node hosts unless told otherwise.
pub const DEFAULT_SPACE: &str = "default";

/// How long `weft run` may take to print its `api` line: a fresh node needs well under
/// a second; a loaded 2-core CI machine running tests in parallel needs more.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a node may take to exit after SIGTERM before the test fails.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Timeout of one HTTP request made by the harness.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of the node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// How often the harness looks at a node's stdout file and exit status.
const POLL: Duration = Duration::from_millis(25);

/// Options for starting a `weft run` process; see [`WeftProcess::builder`].
#[derive(Debug, Clone)]
pub struct WeftBuilder {
    data_dir: Option<PathBuf>,
    listen: Vec<String>,
    mdns: bool,
    extra: Vec<String>,
    netns: Option<String>,
}

impl WeftBuilder {
    /// Use `dir` as the data directory instead of a fresh temporary one. The logs go
    /// next to it, so its parent must be writable.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Host `name` (`--space`); the node hosts only `default` when none is given.
    pub fn space(self, name: &str) -> Self {
        self.arg("--space").arg(name)
    }

    /// Dial `addr` on start (`--bootstrap`).
    pub fn bootstrap(self, addr: &str) -> Self {
        self.arg("--bootstrap").arg(addr)
    }

    /// Conflict resolver: `lww` or `multi` (`--resolver`).
    pub fn resolver(self, resolver: &str) -> Self {
        self.arg("--resolver").arg(resolver)
    }

    /// Listen on `addr` instead of the default (`/ip4/127.0.0.1/tcp/0`); may be given
    /// several times.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen.push(addr.to_owned());
        self
    }

    /// Keep mDNS on. Off by default, so that nodes of parallel tests on the host's
    /// loopback never meet.
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    /// Any further argument of `weft run`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Run the node inside network namespace `ns` (used by [`crate::netns::Lan`]).
    pub(crate) fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// Starts `weft run` and waits until it prints its `api` line. Panics, with the
    /// node's log, when it exits or stays silent for [`STARTUP_TIMEOUT`].
    pub async fn start(self) -> WeftProcess {
        let (temp, data_dir) = match self.data_dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("weft-test-")
                    .tempdir()
                    .expect("create a temporary directory");
                let data = temp.path().join("data");
                (Some(temp), data)
            }
        };
        let name = data_dir
            .file_name()
            .unwrap_or_else(|| panic!("data dir {} has no file name", data_dir.display()))
            .to_string_lossy()
            .into_owned();
        let parent = data_dir.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent)
            .unwrap_or_else(|err| panic!("create {}: {err}", parent.display()));

        let mut run_args = vec!["--data".to_owned(), data_dir.display().to_string()];
        run_args.extend(["--api".to_owned(), "127.0.0.1:0".to_owned()]);
        let listen = if self.listen.is_empty() {
            vec!["/ip4/127.0.0.1/tcp/0".to_owned()]
        } else {
            self.listen
        };
        for addr in listen {
            run_args.extend(["--listen".to_owned(), addr]);
        }
        if !self.mdns {
            run_args.push("--no-mdns".to_owned());
        }
        run_args.extend(self.extra);

        let mut process = WeftProcess {
            stdout_log: parent.join(format!("{name}.stdout.log")),
            stderr_log: parent.join(format!("{name}.stderr.log")),
            data_dir,
            temp,
            run_args,
            netns: self.netns,
            child: None,
            runs: 0,
            peer_id: String::new(),
            listen_addrs: Vec::new(),
            api_url: String::new(),
            http: reqwest::Client::builder()
                .timeout(HTTP_TIMEOUT)
                .build()
                .expect("build an HTTP client"),
            tail_shown: AtomicBool::new(false),
        };
        process.launch().await;
        process
    }
}

/// A running (or stopped) `weft run` process. Dropping it kills the process.
pub struct WeftProcess {
    temp: Option<TempDir>,
    data_dir: PathBuf,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    run_args: Vec<String>,
    netns: Option<String>,
    child: Option<Child>,
    runs: u32,
    peer_id: String,
    listen_addrs: Vec<String>,
    api_url: String,
    http: reqwest::Client,
    /// Set once a failure message carried the log tail, so unwinding does not repeat it.
    tail_shown: AtomicBool,
}

/// The answer to an appended event: `{"id", "lsn"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub id: String,
    pub lsn: u64,
}

/// A raw HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON; panics (showing the body) when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| {
            panic!(
                "HTTP {} body is not JSON ({err}): {:?}",
                self.status, self.body
            )
        })
    }
}

impl WeftProcess {
    /// A node on `127.0.0.1`, mDNS off, API on a free port, fresh data directory.
    pub fn builder() -> WeftBuilder {
        WeftBuilder {
            data_dir: None,
            listen: Vec::new(),
            mdns: false,
            extra: Vec::new(),
            netns: None,
        }
    }

    /// Starts a node with the builder's defaults.
    pub async fn start() -> WeftProcess {
        Self::builder().start().await
    }

    /// The node's PeerId, as printed on its `peer` line.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The addresses of its `listening` lines, in order.
    pub fn listen_addrs(&self) -> &[String] {
        &self.listen_addrs
    }

    /// The first listen address, to bootstrap other nodes with.
    pub fn listen_addr(&self) -> &str {
        self.listen_addrs
            .first()
            .unwrap_or_else(|| panic!("node {} printed no listening line", self.peer_id))
    }

    /// `http://127.0.0.1:<port>` from its `api` line (changes on every start).
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file collecting the node's stderr across restarts.
    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// The network namespace the node runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The OS process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// The last `lines` lines of the node's stderr log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Panics with `message` and the tail of the node's log.
    pub fn fail(&self, message: impl std::fmt::Display) -> ! {
        self.tail_shown.store(true, Ordering::Relaxed);
        panic!("{message}\n{}", self.log_report())
    }

    /// A heading naming the node and its log file, then the log's tail.
    fn log_report(&self) -> String {
        let name = if self.peer_id.is_empty() {
            "(not started)"
        } else {
            &self.peer_id
        };
        format!(
            "--- node {name} log ({}), last {LOG_TAIL_LINES} lines ---\n{}",
            self.stderr_log.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    // ---- lifecycle ----

    async fn launch(&mut self) {
        assert!(self.child.is_none(), "node is already running");
        self.runs += 1;
        let stdout = File::create(&self.stdout_log)
            .unwrap_or_else(|err| panic!("create {}: {err}", self.stdout_log.display()));
        let mut stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .unwrap_or_else(|err| panic!("open {}: {err}", self.stderr_log.display()));
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(weft_binary());
                command
            }
            None => Command::new(weft_binary()),
        };
        command.arg("run").args(&self.run_args);
        writeln!(stderr, "=== weft-tests: start #{}: {command:?}", self.runs)
            .expect("write the node log");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The log is a file: no colour escapes in it.
        command.env("NO_COLOR", "1");
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        self.child = Some(child);
        self.await_startup_lines().await;
    }

    /// Polls the stdout file until the `api` line is complete.
    async fn await_startup_lines(&mut self) {
        let started = Instant::now();
        loop {
            let text = fs::read_to_string(&self.stdout_log).unwrap_or_default();
            if let Some(startup) = parse_startup(&text) {
                match startup {
                    Ok((peer, listen, api)) => {
                        self.peer_id = peer;
                        self.listen_addrs = listen;
                        self.api_url = api;
                        return;
                    }
                    Err(problem) => {
                        self.kill();
                        self.fail(format!(
                            "weft run printed bad startup lines: {problem}\n--- stdout ---\n{text}"
                        ));
                    }
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    self.fail(format!(
                        "weft run exited during startup with {status}\n--- stdout ---\n{text}"
                    ));
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                self.kill();
                self.fail(format!(
                    "weft run printed no complete `api` line within {STARTUP_TIMEOUT:?}\n--- stdout ---\n{text}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL, then reap. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`] for the process to exit, and asserts
    /// that it exited cleanly (status 0). A node that does not exit in time is killed and
    /// the test fails.
    pub async fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Ok(Some(status)) = child.try_wait() {
            self.child = None;
            self.fail(format!(
                "weft run had already exited ({status}) before stop"
            ));
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain syscall on the pid of a child we have not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            self.fail(format!(
                "SIGTERM to {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let started = Instant::now();
        let status: ExitStatus = loop {
            let waited = self.child.as_mut().map(Child::try_wait);
            match waited {
                Some(Ok(Some(status))) => break status,
                Some(Ok(None)) if started.elapsed() < STOP_TIMEOUT => {
                    tokio::time::sleep(POLL).await;
                }
                Some(Ok(None)) => {
                    self.kill();
                    self.fail(format!(
                        "weft run did not exit within {STOP_TIMEOUT:?} of SIGTERM"
                    ));
                }
                Some(Err(err)) => self.fail(format!("waiting for weft run: {err}")),
                None => unreachable!("the child is only taken by kill()"),
            }
        };
        self.child = None;
        if !status.success() {
            self.fail(format!(
                "weft run exited with {status} after SIGTERM, expected a clean exit 0"
            ));
        }
    }

    /// Sends `signal` to the running process; fails the test when it is not running.
    fn signal(&self, signal: libc::c_int, name: &str) {
        let Some(child) = self.child.as_ref() else {
            self.fail(format!("{name}: the node is not running"));
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain syscall on the pid of a child we have not reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            self.fail(format!(
                "{name} to {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }

    /// SIGSTOP: the process freezes (no I/O, no timers) until [`Self::resume`]. Its
    /// API does not answer meanwhile, so client calls against it time out.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP, "SIGSTOP");
    }

    /// SIGCONT: a paused process runs on.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT, "SIGCONT");
    }

    /// Starts a node that was stopped or killed again, with the same data directory and
    /// arguments (new ports). Panics when it is still running.
    pub async fn start_again(&mut self) {
        if self.is_running() {
            self.fail("start_again: the node is still running");
        }
        self.child = None;
        self.launch().await;
    }

    /// Stops the node if it runs (cleanly, see [`Self::stop`]) and starts it again with
    /// the same data directory and arguments. It listens and serves its API on new
    /// ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    // ---- the `weft` client ----

    /// Runs `weft <args> --api <this node>` (inside the node's namespace, if any).
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--api", &self.api_url]);
        run_cli(self.netns.as_deref(), all).await
    }

    /// Like [`Self::cli`], but fails the test unless the command exits 0.
    pub async fn cli_ok(&self, args: &[&str]) -> CliOutput {
        let output = self.cli(args).await;
        if !output.success() {
            self.fail(format!("client command failed: {output}"));
        }
        output
    }

    /// `weft put KEY VALUE --space SPACE`; returns the printed event id.
    pub async fn put(&self, space: &str, key: &str, value: &str) -> String {
        let output = self.cli_ok(&["put", key, value, "--space", space]).await;
        output.stdout_trimmed().to_owned()
    }

    /// `weft tx put K1 V1 put K2 V2 ..` (at most 256 writes); the printed event ids,
    /// one per write, or `None` when the command fails.
    pub async fn try_tx_put(
        &self,
        space: &str,
        writes: &[(String, String)],
    ) -> Option<Vec<String>> {
        // The writes are a trailing list that takes every later argument, so the client
        // options go first (`cli` would append `--api` after them).
        let mut args: Vec<&str> = vec!["tx", "--api", &self.api_url, "--space", space];
        for (key, value) in writes {
            args.extend(["put", key, value]);
        }
        let output = run_cli(self.netns.as_deref(), args).await;
        if !output.success() {
            eprintln!("weft-tests: {output}");
            return None;
        }
        let ids: Vec<String> = output
            .stdout_lines()
            .iter()
            .map(|l| (*l).to_owned())
            .collect();
        if ids.len() != writes.len() {
            self.fail(format!(
                "tx of {} writes printed {} ids: {output}",
                writes.len(),
                ids.len()
            ));
        }
        Some(ids)
    }

    /// Like [`Self::try_tx_put`], but fails the test unless the command succeeds.
    pub async fn tx_put(&self, space: &str, writes: &[(String, String)]) -> Vec<String> {
        match self.try_tx_put(space, writes).await {
            Some(ids) => ids,
            None => self.fail(format!("weft tx of {} writes failed", writes.len())),
        }
    }

    /// `weft del KEY --space SPACE`; returns the printed event id.
    pub async fn del(&self, space: &str, key: &str) -> String {
        let output = self.cli_ok(&["del", key, "--space", space]).await;
        output.stdout_trimmed().to_owned()
    }

    /// `weft get KEY --space SPACE`: `Some(stdout)` (without the final newline) on exit
    /// 0, `None` on exit 1 (no value); any other outcome fails the test.
    pub async fn get(&self, space: &str, key: &str) -> Option<String> {
        let output = self.cli(&["get", key, "--space", space]).await;
        match output.code() {
            Some(0) => Some(output.stdout_trimmed().to_owned()),
            Some(1) => None,
            _ => self.fail(format!("weft get failed: {output}")),
        }
    }

    /// The lines of `weft log --space SPACE`.
    pub async fn log_lines(&self, space: &str) -> Vec<String> {
        let output = self.cli_ok(&["log", "--space", space]).await;
        output.stdout.lines().map(str::to_owned).collect()
    }

    /// `weft status --json`, parsed.
    pub async fn status(&self) -> Value {
        let output = self.cli_ok(&["status", "--json"]).await;
        serde_json::from_str(&output.stdout)
            .unwrap_or_else(|err| self.fail(format!("status --json is not JSON ({err}): {output}")))
    }

    /// The status entry of `space`: `{"version_vector", "events", "pending"}`.
    pub async fn space_status(&self, space: &str) -> Value {
        let status = self.status().await;
        match status.pointer(&format!("/spaces/{space}")) {
            Some(entry) => entry.clone(),
            None => self.fail(format!("status has no space {space:?}: {status}")),
        }
    }

    /// The version vector of `space` (origin PeerId -> highest contiguous seq).
    pub async fn version_vector(&self, space: &str) -> BTreeMap<String, u64> {
        let entry = self.space_status(space).await;
        let Some(vector) = entry.get("version_vector").and_then(Value::as_object) else {
            self.fail(format!(
                "status of {space:?} has no version_vector object: {entry}"
            ));
        };
        vector
            .iter()
            .map(|(origin, seq)| match seq.as_u64() {
                Some(seq) => (origin.clone(), seq),
                None => self.fail(format!("version vector entry {origin}: {seq} is not a u64")),
            })
            .collect()
    }

    /// The number of events in `space`'s log, from `status`.
    pub async fn event_count(&self, space: &str) -> u64 {
        let entry = self.space_status(space).await;
        match entry.get("events").and_then(Value::as_u64) {
            Some(count) => count,
            None => self.fail(format!("status of {space:?} has no events count: {entry}")),
        }
    }

    /// The PeerIds of the connected peers, from `status`.
    pub async fn peers(&self) -> Vec<String> {
        let status = self.status().await;
        let Some(peers) = status.get("peers").and_then(Value::as_array) else {
            self.fail(format!("status has no peers array: {status}"));
        };
        peers
            .iter()
            .map(|peer| match peer.as_str() {
                Some(peer) => peer.to_owned(),
                None => self.fail(format!("peer {peer} is not a string")),
            })
            .collect()
    }

    // ---- HTTP ----

    /// Sends `method path` with an optional `(content type, body)` to the node's API.
    /// Only for nodes in the test's own network namespace.
    pub async fn http(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> HttpReply {
        if let Some(ns) = &self.netns {
            panic!("the test process cannot reach the API of a node inside network namespace {ns}; use cli()");
        }
        let url = format!("{}{path}", self.api_url);
        let mut request = self.http.request(method.clone(), &url);
        if let Some((content_type, bytes)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => self.fail(format!("{method} {url}: {err}")),
        };
        let status = response.status().as_u16();
        let body = match response.text().await {
            Ok(body) => body,
            Err(err) => self.fail(format!("{method} {url}: reading the body: {err}")),
        };
        HttpReply { status, body }
    }

    /// `POST /spaces/{space}/events` with `event` as the JSON body; the raw answer.
    pub async fn http_post_event(&self, space: &str, event: &Value) -> HttpReply {
        self.http(
            reqwest::Method::POST,
            &format!("/spaces/{space}/events"),
            Some(("application/json", event.to_string().into_bytes())),
        )
        .await
    }

    /// Appends a put of `value` to `key` over HTTP; fails the test unless it is
    /// answered 201 `{"id", "lsn"}`.
    pub async fn http_put(&self, space: &str, key: &str, value: Value) -> Appended {
        let event = serde_json::json!({"key": key, "op": "put", "value": value});
        let reply = self.http_post_event(space, &event).await;
        if reply.status != 201 {
            self.fail(format!(
                "POST /spaces/{space}/events {event}: expected 201, got {} {}",
                reply.status, reply.body
            ));
        }
        let body = reply.json();
        match (
            body.get("id").and_then(Value::as_str),
            body.get("lsn").and_then(Value::as_u64),
        ) {
            (Some(id), Some(lsn)) => Appended {
                id: id.to_owned(),
                lsn,
            },
            _ => self.fail(format!("201 body lacks id or lsn: {body}")),
        }
    }

    /// `GET /spaces/{space}/events?since=..&limit=..`; fails the test unless 200.
    pub async fn http_events(&self, space: &str, since: u64, limit: u64) -> Value {
        let path = format!("/spaces/{space}/events?since={since}&limit={limit}");
        let reply = self.http(reqwest::Method::GET, &path, None).await;
        if reply.status != 200 {
            self.fail(format!("GET {path}: {} {}", reply.status, reply.body));
        }
        reply.json()
    }

    /// Every event of `space` in local order, paging through the events API.
    pub async fn http_all_events(&self, space: &str) -> Vec<Value> {
        const PAGE: u64 = 500;
        const MAX_PAGES: usize = 10_000;
        let mut events = Vec::new();
        let mut since = 0;
        for _ in 0..MAX_PAGES {
            let page = self.http_events(space, since, PAGE).await;
            let batch = page
                .get("events")
                .and_then(Value::as_array)
                .unwrap_or_else(|| self.fail(format!("events page without events: {page}")));
            if batch.is_empty() {
                return events;
            }
            events.extend(batch.iter().cloned());
            let next = page
                .get("next")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| self.fail(format!("events page without next: {page}")));
            if next <= since {
                self.fail(format!(
                    "events page did not advance: since {since}, next {next}"
                ));
            }
            since = next;
        }
        self.fail(format!("more than {MAX_PAGES} pages of events"))
    }
}

impl Drop for WeftProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(temp) = self.temp.as_mut() {
                temp.disable_cleanup(true);
                eprintln!("weft-tests: kept {} for inspection", temp.path().display());
            }
            if !self.tail_shown.load(Ordering::Relaxed) {
                eprintln!("{}", self.log_report());
            }
        }
    }
}

/// Splits an event id `<peerid>:<seq>`.
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let (origin, seq) = id.rsplit_once(':')?;
    Some((origin, seq.parse().ok()?))
}

type Startup = (String, Vec<String>, String);

/// `None` until a complete `api` line is present; then the parsed lines or what is
/// wrong with them.
fn parse_startup(text: &str) -> Option<Result<Startup, String>> {
    let complete = &text[..text.rfind('\n')? + 1];
    let mut peer = None;
    let mut listen = Vec::new();
    for line in complete.lines() {
        if let Some(rest) = line.strip_prefix("peer ") {
            peer = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("listening ") {
            listen.push(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("api ") {
            let api = rest.trim().to_owned();
            return Some(match peer {
                None => Err("no `peer` line before the `api` line".to_owned()),
                Some(_) if listen.is_empty() => {
                    Err("no `listening` line before the `api` line".to_owned())
                }
                Some(_) if !api.starts_with("http://") => {
                    Err(format!("api line {api:?} is not an http:// URL"))
                }
                Some(peer) => Ok((peer, listen, api.trim_end_matches('/').to_owned())),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_lines_are_parsed_once_the_api_line_is_complete() {
        let text = "peer 12D3Koo\nlistening /ip4/127.0.0.1/tcp/4001\nlistening /ip4/10.0.0.1/tcp/4001\napi http://127.0.0.1:7700";
        assert!(parse_startup(text).is_none(), "api line without newline");
        let parsed = parse_startup(&format!("{text}\n")).unwrap().unwrap();
        assert_eq!(parsed.0, "12D3Koo");
        assert_eq!(
            parsed.1,
            ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.1/tcp/4001"]
        );
        assert_eq!(parsed.2, "http://127.0.0.1:7700");
    }

    #[test]
    fn startup_lines_out_of_contract_are_reported() {
        assert!(parse_startup("api http://127.0.0.1:1\n").unwrap().is_err());
        assert!(parse_startup("peer p\napi http://127.0.0.1:1\n")
            .unwrap()
            .is_err());
        assert!(
            parse_startup("peer p\nlistening /ip4/1.2.3.4/tcp/1\napi 127.0.0.1:1\n")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn event_ids_split_at_the_last_colon() {
        assert_eq!(parse_event_id("12D3Koo:42"), Some(("12D3Koo", 42)));
        assert_eq!(parse_event_id("12D3Koo"), None);
        assert_eq!(parse_event_id("12D3Koo:x"), None);
    }
}
