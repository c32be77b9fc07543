//! The `weft` command: `weft run` starts a node; the other commands are clients of a
//! running node's HTTP API. Every failure is one line on stderr and a non-zero exit.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use weft_node::{Durability, Multiaddr, NodeBuilder, PolicyKind, SpaceMode, SpaceName};

#[derive(Parser)]
#[command(name = "weft", version, about = "A peer-to-peer replication node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Client {
    /// The space to use.
    #[arg(long, default_value = "default", value_parser = parse_space)]
    space: SpaceName,
    /// The running node's HTTP API (`host:port` or `http://host:port`).
    #[arg(long, env = "WEFT_API", default_value = "127.0.0.1:7700")]
    api: String,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a node in the foreground until Ctrl-C or SIGTERM.
    Run {
        /// Data directory (log, identity key).
        #[arg(long, default_value = "./weft-data")]
        data: PathBuf,
        /// A space to host (repeatable), as NAME or NAME:MODE. MODE is full (default),
        /// pull-only (a read replica: refuses local writes) or push-only (sends its
        /// writes, takes nothing in).
        #[arg(long = "space", value_name = "NAME[:MODE]", value_parser = parse_space_spec)]
        spaces: Vec<SpaceSpec>,
        /// A multiaddr to listen on (repeatable).
        #[arg(long = "listen", default_value = "/ip4/0.0.0.0/tcp/0")]
        listen: Vec<Multiaddr>,
        /// A peer's multiaddr to dial at start (repeatable).
        #[arg(long = "bootstrap")]
        bootstrap: Vec<Multiaddr>,
        /// Turns off LAN discovery by mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Pull only when asked (`weft sync`), never on connection, gap or timer.
        #[arg(long)]
        no_auto_pull: bool,
        /// Address of the HTTP API.
        #[arg(long, default_value = "127.0.0.1:7700")]
        api: SocketAddr,
        /// Conflict policy of the spaces: lww (last writer wins), multi (keep concurrent
        /// values), counter, set (add-wins) or json (merged field by field).
        #[arg(long, default_value = "lww")]
        resolver: PolicyKind,
        /// full: every acknowledged write is fsynced first. relaxed: flushed every
        /// 100 ms; a process kill loses nothing, a power cut may lose the last 100 ms
        /// (and can leave the store inconsistent; see ARCHITECTURE.md).
        #[arg(long, default_value = "full", value_parser = parse_durability)]
        durability: Durability,
    },
    /// Appends a put; prints the event id. VALUE is JSON if it parses as JSON, else a string.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        client: Client,
    },
    /// Appends a delete; prints the event id.
    Del {
        key: String,
        #[command(flatten)]
        client: Client,
    },
    /// Appends several writes atomically: `weft tx put K1 V1 put K2 V2 del K3`.
    Tx {
        /// `put KEY VALUE` and `del KEY` items, in order.
        #[arg(required = true, num_args = 1.., allow_negative_numbers = true)]
        items: Vec<String>,
        #[command(flatten)]
        client: Client,
    },
    /// Prints the value (every sibling on its own line for a conflict); exit 1 if none.
    Get {
        key: String,
        /// The value as it stood right after this local position (time travel).
        #[arg(long)]
        at: Option<u64>,
        #[command(flatten)]
        client: Client,
    },
    /// Prints events in local order, one per line.
    Log {
        /// Print events after this local position.
        #[arg(long, conflicts_with_all = ["start", "cursor"])]
        since: Option<u64>,
        /// Where to start: oldest, latest, or an lsn (inclusive).
        #[arg(long, conflicts_with = "cursor")]
        start: Option<String>,
        /// Resume from the cursor a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only puts or only deletes.
        #[arg(long, value_parser = ["put", "delete"])]
        op: Option<String>,
        /// Only events of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// The history of one key instead of the whole log.
        #[arg(long, conflicts_with_all = ["prefix", "op", "kind", "start", "cursor", "desc"])]
        key: Option<String>,
        /// Newest first.
        #[arg(long, conflicts_with = "follow")]
        desc: bool,
        /// At most this many events (default: all; pages of 1,000 are fetched).
        #[arg(long)]
        limit: Option<u64>,
        /// Keep printing new events as they are applied.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Verifies every invariant of a data directory offline and reports each violation.
    Check {
        /// The data directory (of a node that is not running).
        #[arg(long, default_value = "./weft-data")]
        data: PathBuf,
    },
    /// Pulls every space from every connected peer now and reports what moved; draws a
    /// progress bar on stderr when it is a terminal. Exit 1 when an exchange failed or
    /// no peer is connected.
    Sync {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The running node's HTTP API (`host:port` or `http://host:port`).
        #[arg(long, env = "WEFT_API", default_value = "127.0.0.1:7700")]
        api: String,
    },
    /// Node id, peers, version vector and counts.
    Status {
        /// Print the /status JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "full" => Ok(Durability::Full),
        "relaxed" => Ok(Durability::relaxed()),
        other => Err(format!("unknown durability {other:?}: use full or relaxed")),
    }
}

fn parse_space(s: &str) -> Result<SpaceName, String> {
    SpaceName::new(s).map_err(|e| e.to_string())
}

/// A `--space NAME[:MODE]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpaceSpec {
    name: SpaceName,
    mode: SpaceMode,
}

fn parse_space_spec(s: &str) -> Result<SpaceSpec, String> {
    // Space names have no `:`, so the first one separates the mode.
    let (name, mode) = match s.split_once(':') {
        Some((name, mode)) => (name, mode.parse().map_err(|e| format!("{e}"))?),
        None => (s, SpaceMode::Full),
    };
    Ok(SpaceSpec {
        name: parse_space(name)?,
        mode,
    })
}

/// The mode of each named space; naming a space twice with different modes is refused.
fn space_modes(specs: Vec<SpaceSpec>) -> Result<Vec<SpaceSpec>> {
    let mut out: Vec<SpaceSpec> = Vec::new();
    for spec in specs {
        match out.iter().find(|s| s.name == spec.name) {
            Some(s) if s.mode != spec.mode => bail!(
                "space {} is given twice, as {} and as {}",
                spec.name,
                s.mode,
                spec.mode
            ),
            Some(_) => {}
            None => out.push(spec),
        }
    }
    Ok(out)
}

/// Exit code for "the key has no value", distinct from errors (2).
const EXIT_NO_VALUE: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // A usage error is one line, like every other failure; `--help` has the rest.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("error: {message} (see weft --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// The whole error chain on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

async fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Run {
            data,
            spaces,
            listen,
            bootstrap,
            no_mdns,
            no_auto_pull,
            api,
            resolver,
            durability,
        } => {
            let opts = RunOptions {
                data,
                spaces: space_modes(spaces)?,
                listen,
                bootstrap,
                mdns: !no_mdns,
                auto_pull: !no_auto_pull,
                api,
                resolver,
                durability,
            };
            run(opts).await
        }
        Command::Tx { items, client } => {
            let writes = parse_tx(&items)?;
            let url = format!(
                "{}/spaces/{}/transactions",
                base_url(&client.api),
                client.space
            );
            let (status, body) = call(
                &client,
                http()?.post(url).json(&json!({ "writes": writes })),
            )
            .await?;
            if status != 201 {
                bail!("{}", error_of(&body));
            }
            for e in body
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!("{}", e.get("id").and_then(Value::as_str).unwrap_or("?"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { data } => check(&data),
        Command::Put { key, value, client } => {
            let value = serde_json::from_str(&value).unwrap_or(Value::String(value));
            let out = write(&client, json!({"key": key, "op": "put", "value": value})).await?;
            println!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Del { key, client } => {
            let out = write(&client, json!({"key": key, "op": "delete"})).await?;
            println!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { key, at, client } => get(&client, &key, at).await,
        Command::Log {
            since,
            start,
            cursor,
            prefix,
            op,
            kind,
            key,
            desc,
            limit,
            follow,
            client,
        } => {
            let mut params: Vec<(&str, String)> = Vec::new();
            if let Some(s) = since {
                params.push(("since", s.to_string()));
            }
            for (name, v) in [
                ("start", start),
                ("cursor", cursor),
                ("prefix", prefix),
                ("op", op),
                ("kind", kind),
            ] {
                if let Some(v) = v {
                    params.push((name, v));
                }
            }
            if desc {
                params.push(("order", "desc".into()));
            }
            log(&client, params, key, limit, follow).await
        }
        Command::Status { json, client } => status(&client, json).await,
        Command::Sync { json, api } => sync(&api, json).await,
    }
}

struct RunOptions {
    data: PathBuf,
    spaces: Vec<SpaceSpec>,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    mdns: bool,
    auto_pull: bool,
    api: SocketAddr,
    resolver: PolicyKind,
    durability: Durability,
}

/// `put KEY VALUE` / `del KEY` items into transaction writes.
fn parse_tx(items: &[String]) -> Result<Vec<Value>> {
    let mut writes = Vec::new();
    let mut it = items.iter();
    while let Some(op) = it.next() {
        match op.as_str() {
            "put" => {
                let (Some(key), Some(value)) = (it.next(), it.next()) else {
                    bail!("`put` needs a key and a value: weft tx put KEY VALUE ...");
                };
                let value = serde_json::from_str(value).unwrap_or(Value::String(value.clone()));
                writes.push(json!({"key": key, "op": "put", "value": value}));
            }
            "del" => {
                let Some(key) = it.next() else {
                    bail!("`del` needs a key: weft tx del KEY ...");
                };
                writes.push(json!({"key": key, "op": "delete"}));
            }
            other => bail!("expected `put` or `del`, found {other:?}"),
        }
    }
    Ok(writes)
}

fn check(data: &std::path::Path) -> Result<ExitCode> {
    let log = data.join("log");
    if !log.exists() {
        bail!("{} holds no weft log", data.display());
    }
    let report = weft_store::check(&log).with_context(|| format!("checking {}", data.display()))?;
    let mut violations = 0;
    for v in &report.violations {
        println!("violation: {v}");
        violations += 1;
    }
    for s in &report.spaces {
        println!(
            "space {}: {} events, {} violations",
            s.space,
            s.events,
            s.violations.len()
        );
        for v in &s.violations {
            println!("violation: {}: {v}", s.space);
            violations += 1;
        }
        for k in &s.skipped {
            println!("skipped: {}: {k}", s.space);
        }
    }
    if violations == 0 {
        println!("clean");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{violations} violations in {}", data.display());
        Ok(ExitCode::from(1))
    }
}

async fn run(opts: RunOptions) -> Result<ExitCode> {
    let RunOptions {
        data,
        spaces,
        listen,
        bootstrap,
        mdns,
        auto_pull,
        api,
        resolver,
        durability,
    } = opts;
    use std::io::IsTerminal as _;
    // libp2p's kad and gossipsub warn about routine states of a small mesh ("no known
    // peers" on a lone start, "already published" on a retry); weft logs what matters.
    const DEFAULT_LOG: &str =
        "warn,libp2p_kad=error,libp2p_gossipsub=error,weft_node=info,weft_net=info,weft_store=info";
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .init();
    let mut b = NodeBuilder::new(&data)
        .mdns(mdns)
        .auto_pull(auto_pull)
        .resolver(resolver)
        .durability(durability)
        .api(api);
    for s in spaces {
        b = b.space_mode(s.name, s.mode);
    }
    for l in listen {
        b = b.listen(l);
    }
    for a in bootstrap {
        b = b.bootstrap(a);
    }
    let node = b
        .start()
        .await
        .with_context(|| format!("starting the node in {}", data.display()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "peer {}", node.peer_id())?;
        for a in node.listen_addrs().await? {
            writeln!(out, "listening {a}")?;
        }
        if let Some(a) = node.api_addr() {
            writeln!(out, "api http://{a}")?;
        }
        out.flush()?;
    }
    wait_for_signal().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

fn base_url(api: &str) -> String {
    let api = api.trim_end_matches('/');
    if api.starts_with("http://") || api.starts_with("https://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    }
}

fn http() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// Percent-encodes a key for a URL path, keeping `/` so `todos/42` stays readable.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sends a request and returns the status and JSON body, turning transport failures
/// and error bodies into one clear line.
async fn call(client: &Client, req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
    let base = base_url(&client.api);
    let resp = req.send().await.map_err(|e| transport_error(&base, e))?;
    let status = resp.status().as_u16();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| anyhow!("the node at {base} sent an unreadable answer: {e}"))?;
    Ok((status, body))
}

/// One clear line for a request that got no answer.
fn transport_error(base: &str, e: reqwest::Error) -> anyhow::Error {
    if e.is_connect() {
        anyhow!("cannot reach a weft node at {base} (is `weft run` running? set --api)")
    } else if e.is_timeout() {
        anyhow!("the weft node at {base} did not answer in time")
    } else {
        anyhow!("request to {base} failed: {e}")
    }
}

fn error_of(body: &Value) -> String {
    body.get("error")
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_owned()
}

async fn write(client: &Client, body: Value) -> Result<String> {
    let url = format!("{}/spaces/{}/events", base_url(&client.api), client.space);
    let (status, body) = call(client, http()?.post(url).json(&body)).await?;
    if status != 201 {
        bail!("{}", error_of(&body));
    }
    body.get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the node's answer has no event id"))
}

fn print_value(v: &Value) {
    match v {
        Value::String(s) => println!("{s}"),
        other => println!("{other}"),
    }
}

async fn get(client: &Client, key: &str, at: Option<u64>) -> Result<ExitCode> {
    let mut url = format!(
        "{}/spaces/{}/keys/{}",
        base_url(&client.api),
        client.space,
        encode_key(key)
    );
    if let Some(lsn) = at {
        url.push_str(&format!("?at={lsn}"));
    }
    let (status, body) = call(client, http()?.get(url)).await?;
    match status {
        200 => {
            match body.get("siblings").and_then(Value::as_array) {
                Some(sibs) if sibs.len() > 1 => sibs.iter().for_each(print_value),
                _ => print_value(body.get("value").unwrap_or(&Value::Null)),
            }
            Ok(ExitCode::SUCCESS)
        }
        404 if body
            .get("error")
            .and_then(Value::as_str)
            .is_some_and(|e| e.contains("has no value")) =>
        {
            eprintln!("{key}: no value");
            Ok(ExitCode::from(EXIT_NO_VALUE))
        }
        _ => bail!("{}", error_of(&body)),
    }
}

fn log_line(e: &Value) -> String {
    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let lsn = e.get("lsn").and_then(Value::as_u64).unwrap_or(0);
    let mut line = format!("{lsn} {} {} {}", s("id"), s("op"), s("key"));
    if s("op") == "put" {
        line.push(' ');
        line.push_str(&e.get("value").unwrap_or(&Value::Null).to_string());
    }
    let kind = s("kind");
    if !kind.is_empty() {
        line.push_str(&format!(" kind={kind}"));
    }
    line
}

/// Prints pages until the log (or the key's history) is exhausted or `limit` events
/// are out; with `follow`, keeps polling for new events.
async fn log(
    client: &Client,
    mut params: Vec<(&'static str, String)>,
    key: Option<String>,
    limit: Option<u64>,
    follow: bool,
) -> Result<ExitCode> {
    let http = http()?;
    let base = match &key {
        Some(k) => format!(
            "{}/spaces/{}/history/{}",
            base_url(&client.api),
            client.space,
            encode_key(k)
        ),
        None => format!("{}/spaces/{}/events", base_url(&client.api), client.space),
    };
    let mut printed: u64 = 0;
    loop {
        let page = limit.map_or(1000, |l| (l - printed).min(1000));
        let mut query = params.clone();
        query.push(("limit", page.to_string()));
        let (status, body) = call(client, http.get(&base).query(&query)).await?;
        if status != 200 {
            bail!("{}", error_of(&body));
        }
        let events = body
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        {
            let mut out = std::io::stdout().lock();
            for e in &events {
                writeln!(out, "{}", log_line(e))?;
            }
            out.flush()?;
        }
        printed += events.len() as u64;
        if limit.is_some_and(|l| printed >= l) {
            return Ok(ExitCode::SUCCESS);
        }
        // Continue from the page's cursor when the server gives one (filtered reads),
        // else from the last lsn seen.
        params.retain(|(k, _)| !matches!(*k, "since" | "start" | "cursor" | "after"));
        match body.get("cursor").and_then(Value::as_str) {
            Some(c) => params.push(("cursor", c.to_owned())),
            None => {
                let next = body.get("next").and_then(Value::as_u64).unwrap_or(0);
                params.push((
                    if key.is_some() { "after" } else { "since" },
                    next.to_string(),
                ));
            }
        }
        let at_end = body
            .get("at_end")
            .and_then(Value::as_bool)
            .unwrap_or(events.is_empty());
        if events.is_empty() && at_end {
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn status(client: &Client, as_json: bool) -> Result<ExitCode> {
    let url = format!("{}/status", base_url(&client.api));
    let (status, body) = call(client, http()?.get(url)).await?;
    if status != 200 {
        bail!("{}", error_of(&body));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    let peers = body
        .get("peers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    println!(
        "peer {}",
        body.get("peer_id").and_then(Value::as_str).unwrap_or("?")
    );
    println!("connected peers: {}", peers.len());
    if let Some(t) = body.get("traffic") {
        let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
        println!(
            "traffic: {} in, {} out over {} connections; gossip {} events out, {} in; pulled {} events, served {}",
            human_bytes(n("bytes_in")),
            human_bytes(n("bytes_out")),
            n("connections"),
            n("gossip_events_sent"),
            n("gossip_events_received"),
            n("events_pulled"),
            n("events_served")
        );
    }
    let space = client.space.as_str();
    for p in &peers {
        let id = p.as_str().unwrap_or("?");
        match body
            .get("peer_sync")
            .and_then(|s| s.get(id))
            .and_then(|s| s.get(space))
        {
            Some(sync) => {
                let n = |k: &str| sync.get(k).and_then(Value::as_u64).unwrap_or(0);
                println!(
                    "  {id}  behind {} ahead {} (synced {:.1}s ago)",
                    n("behind"),
                    n("ahead"),
                    n("last_sync_ms_ago") as f64 / 1000.0
                );
            }
            None => println!("  {id}  (not synced yet)"),
        }
    }
    match body.get("spaces").and_then(|s| s.get(space)) {
        Some(s) => {
            let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
            let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
            println!(
                "space {space} (mode {}, resolver {}): {} events, {} pending, {} conflicts",
                text("mode"),
                text("resolver"),
                n("events"),
                n("pending"),
                n("conflicts")
            );
            println!("digest {}", text("digest"));
            if let Some(refused) = s.get("incompatible_peers").and_then(Value::as_object) {
                for (peer, policy) in refused {
                    println!(
                        "refusing peer {peer}: it uses resolver {} for this space",
                        policy.as_str().unwrap_or("?")
                    );
                }
            }
            println!("version vector:");
            if let Some(vv) = s.get("version_vector").and_then(Value::as_object) {
                for (origin, seq) in vv {
                    println!("  {origin} {seq}");
                }
            }
        }
        None => println!("space {space}: not hosted by this node"),
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `weft sync` waits for the next piece of the node's answer. The node sends
/// a progress line at least once a second, so this much silence means it is stuck.
const SYNC_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line `weft sync` accepts from the node (a report naming thousands of
/// peers and spaces stays far below it).
const MAX_SYNC_LINE: usize = 16 * 1024 * 1024;

/// Exit code of `weft sync` when an exchange failed or no peer was connected.
const EXIT_SYNC_INCOMPLETE: u8 = 1;

/// `weft sync`: streams `POST /sync?progress=1`, drawing the progress on stderr when it
/// is a terminal, then prints the report.
async fn sync(api: &str, as_json: bool) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let base = base_url(api);
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(SYNC_READ_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let mut resp = http
        .post(format!("{base}/sync?progress=1"))
        .send()
        .await
        .map_err(|e| transport_error(&base, e))?;
    let status = resp.status();
    if !status.is_success() {
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        match body.get("error") {
            Some(_) => bail!("{}", error_of(&body)),
            None => bail!("the node at {base} answered {status} to POST /sync"),
        }
    }
    let mut bar = ProgressBar::new(std::io::stderr().is_terminal());
    let mut pending: Vec<u8> = Vec::new();
    let mut report = None;
    while report.is_none() {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                bar.clear();
                return Err(transport_error(&base, e));
            }
        };
        pending.extend_from_slice(&chunk);
        if pending.len() > MAX_SYNC_LINE {
            bar.clear();
            bail!("the node at {base} sent a line longer than {MAX_SYNC_LINE} bytes");
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value: Value = serde_json::from_slice(&line)
                .map_err(|e| anyhow!("the node at {base} sent an unreadable sync line: {e}"))?;
            if let Some(p) = value.get("progress") {
                let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
                bar.draw(n("applied"), n("expected"));
            } else if let Some(r) = value.get("report") {
                report = Some(r.clone());
                break;
            } else {
                bar.clear();
                bail!("sync failed: {}", error_of(&value));
            }
        }
    }
    bar.clear();
    let Some(report) = report else {
        bail!("the node at {base} ended the sync without a report");
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_sync_report(&report)?;
    }
    let n = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0);
    if n("connected_peers") == 0 {
        eprintln!("error: no connected peer to sync with");
        return Ok(ExitCode::from(EXIT_SYNC_INCOMPLETE));
    }
    if n("errors") > 0 {
        for (peer, space, e) in sync_errors(&report) {
            eprintln!("error: peer {peer} space {space}: {e}");
        }
        return Ok(ExitCode::from(EXIT_SYNC_INCOMPLETE));
    }
    Ok(ExitCode::SUCCESS)
}

/// (peer, space, error) of every failed exchange in a report.
fn sync_errors(report: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (peer, spaces) in report
        .get("peers")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        for (space, e) in spaces.as_object().into_iter().flatten() {
            if let Some(err) = e.get("error").and_then(Value::as_str) {
                out.push((peer.clone(), space.clone(), err.to_owned()));
            }
        }
    }
    out
}

fn print_sync_report(report: &Value) -> Result<()> {
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let peers = report.get("peers").and_then(Value::as_object);
    writeln!(
        out,
        "synced with {} of {} connected peers in {}: {} events pulled, {} pushed",
        peers.map_or(0, |p| p.len()),
        n(report, "connected_peers"),
        seconds(n(report, "duration_ms")),
        thousands(n(report, "pulled")),
        thousands(n(report, "pushed")),
    )?;
    if let Some(peers) = peers.filter(|p| !p.is_empty()) {
        let peer_width = peers.keys().map(String::len).max().unwrap_or(4).max(4);
        let space_width = peers
            .values()
            .filter_map(Value::as_object)
            .flat_map(|s| s.keys().map(String::len))
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            out,
            "{:<peer_width$}  {:<space_width$}  {:>10}  {:>10}  {:>6}  {:>10}  {:>7}  STATUS",
            "PEER", "SPACE", "PULLED", "PUSHED", "PAGES", "BYTES", "TIME"
        )?;
        for (peer, spaces) in peers {
            for (space, e) in spaces.as_object().into_iter().flatten() {
                let state = if e.get("error").is_some_and(|v| !v.is_null()) {
                    "failed"
                } else {
                    "ok"
                };
                writeln!(
                    out,
                    "{peer:<peer_width$}  {space:<space_width$}  {:>10}  {:>10}  {:>6}  {:>10}  {:>7}  {state}",
                    thousands(n(e, "pulled")),
                    thousands(n(e, "pushed")),
                    thousands(n(e, "pages")),
                    human_bytes(n(e, "bytes")),
                    seconds(n(e, "duration_ms")),
                )?;
            }
        }
    }
    let push_only: Vec<&str> = report
        .get("push_only")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !push_only.is_empty() {
        writeln!(out, "not pulled (push-only here): {}", push_only.join(", "))?;
    }
    if report.get("timed_out").and_then(Value::as_bool) == Some(true) {
        writeln!(
            out,
            "the sync's time bound ran out; unfinished pulls go on in the background"
        )?;
    }
    out.flush()?;
    Ok(())
}

/// A one-line progress bar redrawn in place on stderr (only when it is a terminal).
struct ProgressBar {
    on: bool,
    shown: String,
}

impl ProgressBar {
    fn new(on: bool) -> Self {
        ProgressBar {
            on,
            shown: String::new(),
        }
    }

    fn draw(&mut self, applied: u64, expected: u64) {
        if !self.on {
            return;
        }
        let line = progress_line(applied, expected);
        if line != self.shown {
            // Pad over a longer previous line.
            let pad = self.shown.len().saturating_sub(line.len());
            eprint!("\r{line}{}", " ".repeat(pad));
            let _ = std::io::stderr().flush();
            self.shown = line;
        }
    }

    fn clear(&mut self) {
        if self.on && !self.shown.is_empty() {
            eprint!("\r{}\r", " ".repeat(self.shown.len()));
            let _ = std::io::stderr().flush();
            self.shown.clear();
        }
    }
}

/// `[#####.....]  45% 45,000/100,000 events`, or a count alone while the total is
/// unknown.
fn progress_line(applied: u64, expected: u64) -> String {
    const WIDTH: u64 = 30;
    if expected == 0 {
        return format!(
            "[{}] {} events",
            ".".repeat(WIDTH as usize),
            thousands(applied)
        );
    }
    let done = applied.min(expected);
    let filled = (done * WIDTH / expected) as usize;
    format!(
        "[{}{}] {:>3}% {}/{} events",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        done * 100 / expected,
        thousands(applied),
        thousands(expected)
    )
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn seconds(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_space_argument_takes_an_optional_mode() {
        let spec = parse_space_spec("todo").unwrap();
        assert_eq!(spec.name.as_str(), "todo");
        assert_eq!(spec.mode, SpaceMode::Full);
        assert_eq!(
            parse_space_spec("todo:pull-only").unwrap().mode,
            SpaceMode::PullOnly
        );
        assert_eq!(
            parse_space_spec("todo:push-only").unwrap().mode,
            SpaceMode::PushOnly
        );
        assert_eq!(
            parse_space_spec("todo:bogus").unwrap_err(),
            "unknown space mode \"bogus\": use full, pull-only or push-only"
        );
        assert!(parse_space_spec("bad name:full").is_err());
        assert!(parse_space_spec(":full").is_err());
    }

    #[test]
    fn a_space_named_twice_needs_one_mode() {
        let specs = |args: &[&str]| -> Vec<SpaceSpec> {
            args.iter().map(|a| parse_space_spec(a).unwrap()).collect()
        };
        assert_eq!(space_modes(specs(&["a", "a:full", "b"])).unwrap().len(), 2);
        let err = space_modes(specs(&["a", "a:pull-only"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "space a is given twice, as full and as pull-only"
        );
    }

    #[test]
    fn the_progress_line_shows_share_and_counts() {
        assert_eq!(
            progress_line(45_000, 100_000),
            format!(
                "[{}{}]  45% 45,000/100,000 events",
                "#".repeat(13),
                ".".repeat(17)
            )
        );
        assert_eq!(
            progress_line(7, 0),
            format!("[{}] 7 events", ".".repeat(30))
        );
        assert!(progress_line(10, 10).starts_with(&format!("[{}] 100%", "#".repeat(30))));
    }

    #[test]
    fn numbers_are_grouped_and_sizes_scaled() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn failed_exchanges_are_listed_from_a_report() {
        let report = json!({"peers": {"p1": {"a": {"error": null}, "b": {"error": "refused"}}}});
        assert_eq!(
            sync_errors(&report),
            vec![("p1".to_owned(), "b".to_owned(), "refused".to_owned())]
        );
    }
}
