//! Helpers shared by the network test files: real nodes on 127.0.0.1, port 0, mDNS off.

// Each test file uses a different subset.
#![allow(dead_code)]

use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;
use weft_crdt::sync::Replica;
use weft_crdt::{Event, Op, PolicyKind, SigningKey, SpaceName};
use weft_net::{Multiaddr, NetClient, NetConfig, NetEvent};

/// How long any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn config(seed: u8, bootstrap: Vec<Multiaddr>) -> NetConfig {
    let mut c = NetConfig::new(SigningKey::from_bytes(&[seed; 32]));
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.bootstrap = bootstrap;
    c.mdns = false;
    c
}

pub struct Node {
    pub client: NetClient,
    pub events: Receiver<NetEvent>,
    pub addr: Multiaddr,
}

pub async fn node(seed: u8, bootstrap: Vec<Multiaddr>, tweak: impl FnOnce(&mut NetConfig)) -> Node {
    let mut c = config(seed, bootstrap);
    tweak(&mut c);
    let (client, events) = weft_net::start(c).unwrap();
    let addrs = client.wait_listening(WAIT).await.unwrap();
    let addr = addrs[0].clone();
    Node {
        client,
        events,
        addr,
    }
}

/// The next event matching `want`, skipping others; fails after `WAIT`.
pub async fn next(events: &mut Receiver<NetEvent>, want: impl Fn(&NetEvent) -> bool) -> NetEvent {
    timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(e) if want(&e) => return e,
                Some(_) => continue,
                None => panic!("event channel closed"),
            }
        }
    })
    .await
    .expect("timed out waiting for a network event")
}

/// `n` signed events from the writer with key `[seed; 32]`, a valid chain, made the way
/// a node makes them (the crdt sync core's in-memory replica).
pub fn signed_events(seed: u8, n: u64) -> Vec<Event> {
    let mut writer = Replica::new(
        SpaceName::default_space(),
        PolicyKind::Lww.policy(),
        SigningKey::from_bytes(&[seed; 32]),
    );
    (1..=n)
        .map(|seq| {
            writer
                .write(
                    &format!("todos/{seq}"),
                    Op::Put,
                    vec![0x63, b'a', b'b', b'c'],
                    1_700_000_000_000 + seq,
                )
                .expect("a valid local write")
        })
        .collect()
}
