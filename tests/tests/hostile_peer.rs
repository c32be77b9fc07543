//! A peer that sends undecodable or badly signed messages — by gossip and in answer to
//! pulls — gets them rejected, and nothing of them is stored.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_crdt::{Event, Hlc, NodeId, Op, SigningKey, SpaceName, UnsignedEvent, VectorClock};
use weft_net::{NetConfig, NetEvent, PullResponse};
use weft_node::NodeBuilder;

fn event(key: &SigningKey, space: &SpaceName, value: &str) -> Event {
    let origin = NodeId::of(key);
    let mut payload = Vec::new();
    ciborium::into_writer(&value, &mut payload).expect("encoding a str");
    UnsignedEvent {
        origin,
        seq: 1,
        clock: [(origin, 1)].into_iter().collect::<VectorClock>(),
        hlc: Hlc::new(1_700_000_000_000, 0),
        key: "victim".into(),
        op: Op::Put,
        kind: String::new(),
        payload,
        meta: Default::default(),
        prev: None,
    }
    .sign(space, key)
}

fn tampered(key: &SigningKey, space: &SpaceName) -> Event {
    let mut e = event(key, space, "forged");
    // Change the value after signing: the signature no longer matches.
    e.payload = {
        let mut p = Vec::new();
        ciborium::into_writer(&"tampered", &mut p).expect("encoding a str");
        p
    };
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_badly_signed_messages_are_rejected_and_not_stored() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir()?;
    let space = SpaceName::default_space();
    let node = NodeBuilder::new(dir.path())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .start()
        .await?;
    let node_addr = node
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .context("node has no listen address")?;

    let attacker_key = SigningKey::from_bytes(&[42; 32]);
    let mut cfg = NetConfig::new(attacker_key.clone());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    cfg.mdns = false;
    cfg.bootstrap = vec![node_addr];
    let (attacker, mut events) = weft_net::start(cfg)?;

    // Answer the node's pulls with a forged page; wait until the node has subscribed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut subscribed = false;
    let mut pulls_answered = 0;
    while !(subscribed && pulls_answered > 0) {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("timed out waiting for the node to pull and subscribe")?
            .context("attacker's network stopped")?;
        match ev {
            NetEvent::PeerSubscribed { .. } => subscribed = true,
            NetEvent::PullRequested { reply, .. } => {
                let _ = reply.send(PullResponse::Events {
                    events: vec![tampered(&attacker_key, &space)],
                    done: true,
                    have: Default::default(),
                });
                pulls_answered += 1;
            }
            _ => {}
        }
    }

    // Undecodable gossip, then a badly signed event by gossip.
    attacker
        .publish_raw(space.clone(), b"\xff\xfe definitely not CBOR".to_vec())
        .await?;
    attacker
        .publish(space.clone(), vec![tampered(&attacker_key, &space)])
        .await?;

    // Then a valid event, proving the path works; only it may be stored.
    let genuine = event(&attacker_key, &space, "genuine");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        attacker
            .publish(space.clone(), vec![genuine.clone()])
            .await?;
        if node.version_vector(&space).await?.total() > 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the node never applied the genuine event");
        }
        // The forged phase is over: pulls now get the genuine event too, since gossip
        // that races ahead of the first pull exchange is left to that pull.
        while let Ok(ev) = events.try_recv() {
            if let NetEvent::PullRequested { reply, .. } = ev {
                let _ = reply.send(PullResponse::Events {
                    events: vec![genuine.clone()],
                    done: true,
                    have: Default::default(),
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stored = node.events_since(&space, 0, 100).await?;
    assert_eq!(stored.len(), 1, "only the genuine event is stored");
    assert_eq!(stored[0].event, genuine);
    let record = node.get(&space, "victim").await?.context("victim key")?;
    assert_eq!(record.value.decode::<String>()?, "genuine");
    node.shutdown().await;
    Ok(())
}
