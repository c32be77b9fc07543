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
use weft_node::{Durability, Multiaddr, NodeBuilder, PolicyKind, SpaceName};

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
        /// A space to host (repeatable).
        #[arg(long = "space", value_parser = parse_space)]
        spaces: Vec<SpaceName>,
        /// A multiaddr to listen on (repeatable).
        #[arg(long = "listen", default_value = "/ip4/0.0.0.0/tcp/0")]
        listen: Vec<Multiaddr>,
        /// A peer's multiaddr to dial at start (repeatable).
        #[arg(long = "bootstrap")]
        bootstrap: Vec<Multiaddr>,
        /// Turns off LAN discovery by mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Address of the HTTP API.
        #[arg(long, default_value = "127.0.0.1:7700")]
        api: SocketAddr,
        /// Conflict policy of the spaces: lww (last writer wins), multi (keep concurrent
        /// values), counter, set (add-wins) or json (merged field by field).
        #[arg(long, default_value = "lww")]
        resolver: PolicyKind,
        /// full: every acknowledged write is fsynced first. relaxed: flushed every
        /// 100 ms; a process kill loses nothing, a power cut may lose the last 100 ms.
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
            api,
            resolver,
            durability,
        } => {
            let opts = RunOptions {
                data,
                spaces,
                listen,
                bootstrap,
                mdns: !no_mdns,
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
    }
}

struct RunOptions {
    data: PathBuf,
    spaces: Vec<SpaceName>,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    mdns: bool,
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
        .resolver(resolver)
        .durability(durability)
        .api(api);
    for s in spaces {
        b = b.space(s);
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
    let resp = req.send().await.map_err(|e| {
        if e.is_connect() {
            anyhow!("cannot reach a weft node at {base} (is `weft run` running? set --api)")
        } else if e.is_timeout() {
            anyhow!("the weft node at {base} did not answer in time")
        } else {
            anyhow!("request to {base} failed: {e}")
        }
    })?;
    let status = resp.status().as_u16();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| anyhow!("the node at {base} sent an unreadable answer: {e}"))?;
    Ok((status, body))
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
                "space {space} (resolver {}): {} events, {} pending, {} conflicts",
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
