//! `weft` processes on loopback, driven through the `weft` client and the HTTP API the
//! way users drive them: replication between two processes, catch-up after being
//! offline, restart on the same data directory (after SIGTERM and after SIGKILL),
//! concurrent writes under both resolvers, the client's own behaviour (`log --follow`,
//! `WEFT_API`, one-line errors), and rejection of bad input.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt as _;
use weft_tests::{
    parse_event_id, run_cli, wait_until, weft_binary, WeftProcess, CLI_TIMEOUT, DEFAULT_SPACE,
};

const REPLICATION: Duration = Duration::from_secs(30);
const CATCH_UP: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);

/// Starts A, and B bootstrapped to A, and waits until each lists the other as a peer.
async fn connected_pair() -> (WeftProcess, WeftProcess) {
    let a = WeftProcess::start().await;
    let b = WeftProcess::builder()
        .bootstrap(a.listen_addr())
        .start()
        .await;
    let (a_id, b_id) = (a.peer_id().to_owned(), b.peer_id().to_owned());
    wait_until(
        "A and B list each other as peers",
        REPLICATION,
        POLL,
        async || a.peers().await.contains(&b_id) && b.peers().await.contains(&a_id),
    )
    .await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_one_node_is_readable_on_its_bootstrap_peer() {
    let a = WeftProcess::start().await;
    let b = WeftProcess::builder()
        .bootstrap(a.listen_addr())
        .start()
        .await;
    assert_ne!(a.peer_id(), b.peer_id());

    let id = a.put(DEFAULT_SPACE, "greeting", "hello").await;
    assert_eq!(
        parse_event_id(&id),
        Some((a.peer_id(), 1)),
        "weft put prints <peerid>:<seq>"
    );
    wait_until("B reads A's greeting", REPLICATION, POLL, async || {
        b.get(DEFAULT_SPACE, "greeting").await.as_deref() == Some("hello")
    })
    .await;

    // The other direction, a JSON value, and a key with slashes.
    b.put(
        DEFAULT_SPACE,
        "todos/42",
        r#"{"done": false, "tags": ["x"]}"#,
    )
    .await;
    wait_until("A reads B's todos/42", REPLICATION, POLL, async || {
        a.get(DEFAULT_SPACE, "todos/42").await.as_deref() == Some(r#"{"done":false,"tags":["x"]}"#)
    })
    .await;

    // --api also accepts a bare ip:port.
    let bare = b.api_url().trim_start_matches("http://").to_owned();
    let output = run_cli(None, ["get", "greeting", "--api", bare.as_str()]).await;
    assert!(output.success(), "{output}");
    assert_eq!(output.stdout_trimmed(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_offline_during_1000_writes_catches_up_after_restart() {
    const WRITES: u64 = 1_000;
    const WRITERS: u64 = 4;
    let (a, mut b) = connected_pair().await;
    b.stop().await;

    let writers = (0..WRITERS).map(|w| {
        let a = &a;
        async move {
            for i in (w..WRITES).step_by(WRITERS as usize) {
                a.http_put(DEFAULT_SPACE, &format!("items/{i}"), json!({"n": i}))
                    .await;
            }
        }
    });
    futures::future::join_all(writers).await;
    assert_eq!(a.event_count(DEFAULT_SPACE).await, WRITES);

    b.restart().await;
    wait_until(
        "B has all 1,000 events and the same version vector as A",
        CATCH_UP,
        Duration::from_millis(500),
        async || {
            let b_count = b.event_count(DEFAULT_SPACE).await;
            b_count == WRITES
                && a.version_vector(DEFAULT_SPACE).await == b.version_vector(DEFAULT_SPACE).await
        },
    )
    .await;
    let vector = b.version_vector(DEFAULT_SPACE).await;
    assert_eq!(vector, BTreeMap::from([(a.peer_id().to_owned(), WRITES)]));
    assert_eq!(
        b.get(DEFAULT_SPACE, "items/999").await.as_deref(),
        Some(r#"{"n":999}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_identity_log_and_state() {
    let mut node = WeftProcess::start().await;
    for i in 0..5 {
        node.put(DEFAULT_SPACE, &format!("k{i}"), &format!("v{i}"))
            .await;
    }
    node.put(DEFAULT_SPACE, "k0", "v0-again").await;
    node.del(DEFAULT_SPACE, "k1").await;

    let peer = node.peer_id().to_owned();
    let old_api = node.api_url().to_owned();
    let count = node.event_count(DEFAULT_SPACE).await;
    assert_eq!(count, 7);
    let log = node.log_lines(DEFAULT_SPACE).await;
    assert_eq!(log.len(), 7, "one log line per event: {log:#?}");
    let events = node.http_all_events(DEFAULT_SPACE).await;
    let max_lsn = events.iter().filter_map(|e| e["lsn"].as_u64()).max();
    let max_seq = node.version_vector(DEFAULT_SPACE).await[&peer];
    assert_eq!((max_lsn, max_seq), (Some(7), 7));

    node.restart().await;

    assert_eq!(node.peer_id(), peer, "the identity survives a restart");
    assert_ne!(node.api_url(), old_api, "a restart binds a new API port");
    assert_eq!(node.event_count(DEFAULT_SPACE).await, count);
    assert_eq!(node.log_lines(DEFAULT_SPACE).await, log);
    assert_eq!(node.http_all_events(DEFAULT_SPACE).await, events);
    assert_eq!(
        node.get(DEFAULT_SPACE, "k0").await.as_deref(),
        Some("v0-again")
    );
    assert_eq!(
        node.get(DEFAULT_SPACE, "k1").await,
        None,
        "a delete survives"
    );
    assert_eq!(node.get(DEFAULT_SPACE, "k4").await.as_deref(), Some("v4"));

    let appended = node
        .http_put(DEFAULT_SPACE, "after", json!("restart"))
        .await;
    assert_eq!(
        parse_event_id(&appended.id),
        Some((peer.as_str(), max_seq + 1)),
        "seq continues after a restart"
    );
    assert_eq!(
        Some(appended.lsn),
        max_lsn.map(|lsn| lsn + 1),
        "lsn continues"
    );
    let after = node.http_events(DEFAULT_SPACE, max_lsn.unwrap(), 100).await;
    let new_events = after["events"].as_array().expect("events array");
    assert_eq!(new_events.len(), 1, "{after}");
    assert_eq!(new_events[0]["lsn"], json!(appended.lsn));
    assert_eq!(new_events[0]["id"], json!(appended.id));
    assert_eq!(new_events[0]["seq"], json!(max_seq + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_mid_write() {
    const KILL_AFTER: usize = 300;
    const MAX_WRITES: usize = 20_000;
    let mut node = WeftProcess::start().await;
    let peer = node.peer_id().to_owned();
    let pid = libc::pid_t::try_from(node.pid().expect("running")).expect("pid fits");
    let url = format!("{}/spaces/{DEFAULT_SPACE}/events", node.api_url());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // One writer appends until the node dies; the killer SIGKILLs it mid-stream.
    let acknowledged = RefCell::new(Vec::new());
    let killed = Cell::new(false);
    let writer = async {
        for i in 0..MAX_WRITES {
            let body = json!({"key": format!("w/{i}"), "op": "put", "value": i});
            let Ok(response) = client.post(&url).json(&body).send().await else {
                break;
            };
            if response.status() != 201 {
                break;
            }
            let Ok(reply) = response.json::<Value>().await else {
                break;
            };
            acknowledged
                .borrow_mut()
                .push((i, reply["id"].as_str().unwrap_or_default().to_owned()));
        }
    };
    let killer = async {
        wait_until(
            "300 writes are acknowledged",
            Duration::from_secs(60),
            Duration::from_millis(5),
            async || acknowledged.borrow().len() >= KILL_AFTER,
        )
        .await;
        // SAFETY: plain syscall on the node's pid, which is not reaped before `node.kill()`.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        killed.set(true);
    };
    futures::join!(writer, killer);
    assert!(killed.get());
    node.kill();
    let acknowledged = acknowledged.into_inner();
    assert!(acknowledged.len() < MAX_WRITES, "the node never died");

    node.restart().await;
    let count = node.event_count(DEFAULT_SPACE).await;
    assert!(
        count >= acknowledged.len() as u64,
        "{} writes were acknowledged but only {count} events survived",
        acknowledged.len()
    );
    // Whatever survived is a gap-free prefix of this origin's events.
    assert_eq!(node.version_vector(DEFAULT_SPACE).await[&peer], count);
    for (i, id) in acknowledged.iter().step_by(37).chain(acknowledged.last()) {
        assert_eq!(parse_event_id(id), Some((peer.as_str(), *i as u64 + 1)));
        assert_eq!(
            node.get(DEFAULT_SPACE, &format!("w/{i}")).await,
            Some(i.to_string()),
            "acknowledged write w/{i} ({id}) is lost"
        );
    }
    let next = node.http_put(DEFAULT_SPACE, "after", json!(true)).await;
    assert_eq!(parse_event_id(&next.id), Some((peer.as_str(), count + 1)));
    assert_eq!(next.lsn, count + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_and_stores_nothing() {
    let node = WeftProcess::start().await;
    let oversized = "x".repeat(70 * 1024);
    let event = |value: Value| json!({"key": "k", "op": "put", "value": value}).to_string();
    let cases: Vec<(&str, String, String)> = vec![
        (
            "space name with a space",
            "/spaces/bad%20name/events".into(),
            event(json!(1)),
        ),
        (
            "space name of 65 chars",
            format!("/spaces/{}/events", "s".repeat(65)),
            event(json!(1)),
        ),
        (
            "space name starting with a dot",
            "/spaces/.hidden/events".into(),
            event(json!(1)),
        ),
        (
            "value over 64 KiB",
            "/spaces/default/events".into(),
            event(json!(oversized)),
        ),
        (
            "malformed JSON",
            "/spaces/default/events".into(),
            r#"{"key": "k", "op": "#.into(),
        ),
        (
            "missing key",
            "/spaces/default/events".into(),
            json!({"op": "put", "value": 1}).to_string(),
        ),
        (
            "unknown op",
            "/spaces/default/events".into(),
            json!({"key": "k", "op": "frobnicate", "value": 1}).to_string(),
        ),
    ];
    for (what, path, body) in &cases {
        let reply = node
            .http(
                reqwest::Method::POST,
                path,
                Some(("application/json", body.clone().into_bytes())),
            )
            .await;
        assert!(
            (400..500).contains(&reply.status),
            "{what}: expected a 4xx, got {} {}",
            reply.status,
            reply.body
        );
        let error = serde_json::from_str::<Value>(&reply.body)
            .ok()
            .and_then(|body| body["error"].as_str().map(str::to_owned));
        assert!(
            error.is_some_and(|e| !e.trim().is_empty()),
            "{what}: expected a JSON body with a non-empty \"error\", got {:?}",
            reply.body
        );
    }

    let missing = node
        .http(
            reqwest::Method::GET,
            "/spaces/default/keys/nothing/here",
            None,
        )
        .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.json()["error"].is_string(), "{}", missing.body);

    assert_eq!(
        node.event_count(DEFAULT_SPACE).await,
        0,
        "a rejected event was stored"
    );
    assert!(node.version_vector(DEFAULT_SPACE).await.is_empty());
    let status = node.status().await;
    let spaces = status["spaces"].as_object().expect("spaces object");
    assert_eq!(spaces.keys().collect::<Vec<_>>(), ["default"], "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_failures_are_one_line_on_stderr_and_a_nonzero_exit() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("127.0.0.1:{port}");
    let output = run_cli(None, ["get", "x", "--api", dead.as_str()]).await;
    assert!(!output.success(), "{output}");
    assert_eq!(
        output.stderr_lines().len(),
        1,
        "one line on stderr: {output}"
    );
    assert!(!output.stderr.trim().is_empty(), "{output}");

    let node = WeftProcess::start().await;
    let missing = node.cli(&["get", "missing-key"]).await;
    assert_eq!(missing.code(), Some(1), "{missing}");
    assert_eq!(missing.stdout, "", "{missing}");

    let too_big = "x".repeat(70 * 1024);
    let rejected = node.cli(&["put", "k", &too_big]).await;
    assert!(!rejected.success(), "{rejected}");
    assert_eq!(
        rejected.stderr_lines().len(),
        1,
        "one line on stderr: {rejected}"
    );

    let bad_args = node.cli(&["put", "only-a-key"]).await;
    assert!(!bad_args.success(), "{bad_args}");
    assert_eq!(
        bad_args.stderr_lines().len(),
        1,
        "one line on stderr: {bad_args}"
    );

    assert_eq!(node.event_count(DEFAULT_SPACE).await, 0);
}

/// A and B write `k` while apart, then B restarts bootstrapped to A; returns A and the
/// restarted B once both hold both writes. `_apart` is B before the restart (it owns
/// B's data directory).
async fn concurrent_writes_to_one_key(resolver: &str) -> [WeftProcess; 3] {
    let a = WeftProcess::builder().resolver(resolver).start().await;
    let mut apart = WeftProcess::builder().resolver(resolver).start().await;
    a.put(DEFAULT_SPACE, "k", "from-a").await;
    apart.put(DEFAULT_SPACE, "k", "from-b").await;
    apart.stop().await;
    let b = WeftProcess::builder()
        .data_dir(apart.data_dir())
        .resolver(resolver)
        .bootstrap(a.listen_addr())
        .start()
        .await;
    assert_eq!(b.peer_id(), apart.peer_id());
    wait_until("A and B hold both writes", REPLICATION, POLL, async || {
        let vector = a.version_vector(DEFAULT_SPACE).await;
        vector.len() == 2 && vector == b.version_vector(DEFAULT_SPACE).await
    })
    .await;
    [a, b, apart]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_converge_to_one_value_under_lww() {
    let [a, b, _apart] = concurrent_writes_to_one_key("lww").await;
    let on_a = a.get(DEFAULT_SPACE, "k").await;
    assert_eq!(on_a, b.get(DEFAULT_SPACE, "k").await, "replicas disagree");
    let value = on_a.expect("k has a value");
    assert!(
        value == "from-a" || value == "from-b",
        "lww returns one of the writes, got {value:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_kept_as_siblings_under_multi() {
    let [a, b, _apart] = concurrent_writes_to_one_key("multi").await;
    let on_a = a.get(DEFAULT_SPACE, "k").await.expect("k has a value");
    let on_b = b.get(DEFAULT_SPACE, "k").await.expect("k has a value");
    assert_eq!(on_a, on_b, "replicas print the siblings differently");
    let mut siblings: Vec<&str> = on_a.lines().collect();
    siblings.sort_unstable();
    assert_eq!(siblings, ["from-a", "from-b"], "one line per sibling");

    // A write that has seen both siblings resolves the conflict.
    a.put(DEFAULT_SPACE, "k", "merged").await;
    wait_until("B reads the merged value", REPLICATION, POLL, async || {
        b.get(DEFAULT_SPACE, "k").await.as_deref() == Some("merged")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_follow_prints_events_as_they_are_written() {
    const LINE: Duration = Duration::from_secs(10);
    let node = WeftProcess::start().await;
    node.put(DEFAULT_SPACE, "first", "1").await;

    let mut follow = tokio::process::Command::new(weft_binary())
        .args(["log", "--follow", "--api", node.api_url()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn weft log --follow");
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut next_line = async || match tokio::time::timeout(LINE, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => panic!("weft log --follow printed no line within {LINE:?}: {other:?}"),
    };
    let first = next_line().await;
    assert!(first.contains("first"), "{first}");
    node.put(DEFAULT_SPACE, "second", "2").await;
    let second = next_line().await;
    assert!(second.contains("second"), "{second}");
    assert!(
        matches!(follow.try_wait(), Ok(None)),
        "--follow keeps running"
    );
    follow.kill().await.expect("kill weft log --follow");

    let since = node.cli_ok(&["log", "--since", "1"]).await;
    assert_eq!(
        since.stdout_lines(),
        [second.as_str()],
        "--since is exclusive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_finds_the_node_through_weft_api() {
    let node = WeftProcess::start().await;
    node.put(DEFAULT_SPACE, "k", "v").await;
    let mut get = tokio::process::Command::new(weft_binary());
    get.args(["get", "k"]).env("WEFT_API", node.api_url());
    let output = tokio::time::timeout(CLI_TIMEOUT, get.output())
        .await
        .expect("weft get finishes")
        .expect("weft get runs");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "v\n");
}

/// A peer that stops answering (SIGSTOP: its sockets stay open, so TCP alone never
/// notices) is dropped from `status` once its pings time out, and is back, replicating,
/// once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_leaves_the_peer_list_and_returns_when_it_answers_again() {
    let (a, b) = connected_pair().await;
    let b_id = b.peer_id().to_owned();
    b.pause();
    // Ping every 5 s with a 10 s timeout: gone within ~15 s; 60 s leaves room for load.
    wait_until(
        "A drops the silent B from its peers",
        CATCH_UP,
        POLL,
        async || !a.peers().await.contains(&b_id),
    )
    .await;
    b.resume();
    wait_until("A and B reconnect", CATCH_UP, POLL, async || {
        a.peers().await.contains(&b_id)
    })
    .await;
    a.put(DEFAULT_SPACE, "after-silence", "back").await;
    wait_until(
        "B reads A's write after returning",
        REPLICATION,
        POLL,
        async || b.get(DEFAULT_SPACE, "after-silence").await.as_deref() == Some("back"),
    )
    .await;
}
