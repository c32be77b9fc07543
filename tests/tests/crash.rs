//! Crash safety: a `weft run` process under 8 concurrent writers is SIGKILLed at a random
//! moment, `weft check` verifies the directory exactly as the crash left it, and after a
//! restart every acknowledged write is present. Repeated `WEFT_CRASH_ROUNDS` times
//! (default 20); the seed is printed and `WEFT_CRASH_SEED` replays the same kill times.
//! Every [`MACHINE_CRASH_EVERY`]th round the kill is also made to look like a machine
//! crash: the store's state file names a boot that is over and its LMDB file is
//! garbage, as a power cut may leave a file written without fsync. The restart must
//! rebuild everything acknowledged from the journal.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use weft_tests::{run_cli, WeftProcess, DEFAULT_SPACE};

const WRITERS: usize = 8;
const MACHINE_CRASH_EVERY: u64 = 4;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_under_concurrent_writers() {
    let rounds = env_u64("WEFT_CRASH_ROUNDS").unwrap_or(20);
    let seed = env_u64("WEFT_CRASH_SEED").unwrap_or_else(rand::random);
    println!("crash test seed {seed} (rerun: WEFT_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = WeftProcess::start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let acked: Arc<Mutex<Vec<(String, String, u64)>>> = Arc::default();

    for round in 0..rounds {
        let url = format!("{}/spaces/{DEFAULT_SPACE}/events", node.api_url());
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (client, url, acked) = (client.clone(), url.clone(), acked.clone());
                tokio::spawn(async move {
                    // Bounded: the node dies long before this many writes.
                    for i in 0..100_000u64 {
                        let key = format!("r{round}/w{w}/{i}");
                        let body = json!({"key": key, "value": i});
                        let Ok(resp) = client.post(&url).json(&body).send().await else {
                            return;
                        };
                        if resp.status() != 201 {
                            return;
                        }
                        let Ok(reply) = resp.json::<Value>().await else {
                            return;
                        };
                        let id = reply["id"].as_str().unwrap_or_default().to_owned();
                        acked.lock().expect("lock").push((key, id, i));
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..400))).await;
        node.kill();
        for w in writers {
            w.await.expect("writer task");
        }

        // The directory exactly as the crash left it.
        let check = run_cli(
            None,
            ["check", "--data", &node.data_dir().display().to_string()],
        )
        .await;
        assert!(
            check.success() && check.stdout.contains("clean"),
            "round {round} (seed {seed}): weft check after SIGKILL:\n{}\n{}",
            check.stdout,
            check.stderr
        );

        if round % MACHINE_CRASH_EVERY == MACHINE_CRASH_EVERY - 1 {
            let log = node.data_dir().join("log");
            std::fs::write(
                log.join("journal.state"),
                "open 00000000-0000-0000-0000-00000000dead\n",
            )
            .expect("state file");
            std::fs::write(log.join("data.mdb"), vec![0xA5u8; 1 << 20]).expect("data.mdb");
            println!("round {round}: machine crash simulated");
        }
        node.restart().await;
        let events = node.http_all_events(DEFAULT_SPACE).await;
        let ids: HashSet<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
        assert_eq!(ids.len(), events.len(), "round {round}: duplicate events");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["lsn"].as_u64(),
                Some(i as u64 + 1),
                "round {round}: lsn gap"
            );
        }
        let acked = acked.lock().expect("lock").clone();
        for (key, id, _) in &acked {
            assert!(
                ids.contains(id.as_str()),
                "round {round} (seed {seed}): acknowledged write {key} ({id}) is lost"
            );
        }
        println!(
            "round {round}: {} events, {} acknowledged so far, all present",
            events.len(),
            acked.len()
        );
    }
    // Spot-check values, not just ids, for the last round's acknowledged writes.
    let acked = acked.lock().expect("lock").clone();
    assert!(!acked.is_empty(), "no write was ever acknowledged");
    for (key, _, value) in acked.iter().rev().take(20) {
        assert_eq!(node.get(DEFAULT_SPACE, key).await, Some(value.to_string()));
    }
}
