//! Two or three real nodes on 127.0.0.1 (TCP, port 0, mDNS off): connection, pull,
//! gossip, rejection of garbage gossip, and a pull the remote node never answers.

mod common;

use std::time::Duration;

use common::{config, next, node, signed_events, Node, WAIT};
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;
use weft_crdt::{Event, SpaceName, VersionVector};
use weft_net::{
    Multiaddr, NetClient, NetConfig, NetError, NetEvent, PeerId, PullRequest, PullResponse, Verdict,
};

/// Two nodes, the second bootstrapped to the first, both seeing the connection.
async fn pair(tweak_a: impl FnOnce(&mut NetConfig)) -> (Node, Node) {
    let mut a = node(1, vec![], tweak_a).await;
    let mut b = node(2, vec![a.addr.clone()], |_| {}).await;
    let (pa, pb) = (a.client.local_peer_id(), b.client.local_peer_id());
    next(
        &mut a.events,
        |e| matches!(e, NetEvent::PeerConnected { peer } if *peer == pb),
    )
    .await;
    next(
        &mut b.events,
        |e| matches!(e, NetEvent::PeerConnected { peer } if *peer == pa),
    )
    .await;
    (a, b)
}

fn pull_request() -> PullRequest {
    PullRequest {
        space: SpaceName::default_space(),
        have: VersionVector::new(),
        max_events: 100,
        max_bytes: 1 << 20,
        policy: weft_crdt::PolicyIdentity {
            name: "lww".into(),
            version: 1,
        },
    }
}

/// Publishes `events` from `from` until `to` reports them as gossip (subscriptions take a
/// moment to propagate), then returns the gossip event.
async fn gossip_until_received(
    from: &NetClient,
    to: &mut Receiver<NetEvent>,
    events: &[Event],
) -> NetEvent {
    timeout(WAIT, async {
        loop {
            from.publish(SpaceName::default_space(), events.to_vec())
                .await
                .unwrap();
            if let Ok(Some(e)) = timeout(Duration::from_millis(300), async {
                loop {
                    match to.recv().await {
                        Some(e @ NetEvent::Gossip { .. }) => return Some(e),
                        Some(_) => continue,
                        None => return None,
                    }
                }
            })
            .await
            {
                return e;
            }
        }
    })
    .await
    .expect("gossip never arrived")
}

#[tokio::test]
async fn bootstrap_connects_and_pull_returns_the_answered_events() {
    let (mut a, b) = pair(|_| {}).await;
    let pb = b.client.local_peer_id();
    let events = signed_events(7, 2);
    let want = events.clone();
    let mut have = VersionVector::new();
    have.set(events[1].origin, 2);
    let answer_have = have.clone();

    let responder = tokio::spawn(async move {
        match next(&mut a.events, |e| {
            matches!(e, NetEvent::PullRequested { .. })
        })
        .await
        {
            NetEvent::PullRequested {
                peer,
                request,
                reply,
            } => {
                assert_eq!(peer, pb);
                assert_eq!(request, pull_request());
                reply
                    .send(PullResponse::Events {
                        events,
                        done: true,
                        have: answer_have,
                    })
                    .unwrap();
            }
            _ => unreachable!(),
        }
        a
    });

    let pa: PeerId = a_peer(&b).await;
    let response = timeout(WAIT, b.client.pull(pa, pull_request()))
        .await
        .expect("pull hung")
        .unwrap();
    assert_eq!(
        response,
        PullResponse::Events {
            events: want,
            done: true,
            have
        }
    );
    let a = responder.await.unwrap();
    assert_eq!(a.client.connected_peers().await.unwrap(), vec![pb]);
}

/// The one peer `b` is connected to.
async fn a_peer(b: &Node) -> PeerId {
    let peers = b.client.connected_peers().await.unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    peers[0]
}

#[tokio::test]
async fn published_events_arrive_as_gossip() {
    let (a, mut b) = pair(|_| {}).await;
    let events = signed_events(1, 3);
    match gossip_until_received(&a.client, &mut b.events, &events).await {
        NetEvent::Gossip {
            source,
            message_id,
            space,
            events: got,
        } => {
            assert_eq!(source, a.client.local_peer_id());
            assert_eq!(space, SpaceName::default_space());
            assert_eq!(got, events);
            b.client
                .report_validation(message_id, source, Verdict::Accept)
                .await
                .unwrap();
        }
        other => panic!("unexpected {other:?}"),
    }
    // Re-publishing identical events is not an error (duplicates are free).
    a.client
        .publish(SpaceName::default_space(), events)
        .await
        .unwrap();
}

#[tokio::test]
async fn garbage_gossip_is_rejected_and_never_reaches_the_node() {
    let (a, mut b) = pair(|_| {}).await;
    // Make sure the mesh is up: a first valid batch gets through.
    let first = signed_events(1, 1);
    gossip_until_received(&a.client, &mut b.events, &first).await;

    a.client
        .publish_raw(SpaceName::default_space(), b"\xffnot a batch".to_vec())
        .await
        .unwrap();
    a.client
        .publish_raw(
            SpaceName::default_space(),
            weft_crdt::compact::encode_batch(&[]),
        )
        .await
        .unwrap();
    let second = signed_events(1, 2);
    a.client
        .publish(SpaceName::default_space(), second.clone())
        .await
        .unwrap();

    // Messages from one peer arrive in order, so the next gossip event would be the
    // garbage if it were forwarded to the node.
    match next(&mut b.events, |e| matches!(e, NetEvent::Gossip { .. })).await {
        NetEvent::Gossip { events, .. } => assert_eq!(events, second),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_pull_the_remote_node_drops_fails_instead_of_hanging() {
    let (mut a, b) = pair(|_| {}).await;
    let dropper = tokio::spawn(async move {
        if let NetEvent::PullRequested { reply, .. } = next(&mut a.events, |e| {
            matches!(e, NetEvent::PullRequested { .. })
        })
        .await
        {
            drop(reply);
        }
        a
    });
    let pa = a_peer(&b).await;
    let err = timeout(WAIT, b.client.pull(pa, pull_request()))
        .await
        .expect("pull hung")
        .unwrap_err();
    assert!(matches!(err, NetError::PullFailed { .. }), "{err}");
    assert!(err.to_string().contains("without answering"), "{err}");
    let _a = dropper.await.unwrap();
}

#[tokio::test]
async fn a_pull_the_remote_node_never_answers_times_out() {
    let (mut a, b) = pair(|c| c.request_timeout = Duration::from_millis(500)).await;
    let holder = tokio::spawn(async move {
        let held = next(&mut a.events, |e| {
            matches!(e, NetEvent::PullRequested { .. })
        })
        .await;
        (a, held)
    });
    let pa = a_peer(&b).await;
    let err = timeout(WAIT, b.client.pull(pa, pull_request()))
        .await
        .expect("pull hung")
        .unwrap_err();
    // b's own timeout is 30 s; a's 500 ms inbound timeout closes the stream first.
    assert!(
        matches!(
            err,
            NetError::PullFailed { .. } | NetError::PullTimeout { .. }
        ),
        "{err}"
    );
    let _ = holder.await.unwrap();
}

#[tokio::test]
async fn publishing_to_an_unconfigured_space_is_an_error_and_dial_failures_are_reported() {
    let a = node(1, vec![], |_| {}).await;
    let err = a
        .client
        .publish(SpaceName::new("other").unwrap(), signed_events(1, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::UnknownSpace(_)), "{err}");

    // A port nobody listens on: connection refused, reported as a dial error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{closed}").parse().unwrap();
    let err = timeout(WAIT, a.client.dial(addr))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, NetError::Dial { .. }), "{err}");
}

#[tokio::test]
async fn explicit_dial_connects_and_the_loop_stops_when_clients_drop() {
    let a = node(1, vec![], |_| {}).await;
    let mut b = node(2, vec![], |_| {}).await;
    timeout(WAIT, b.client.dial(a.addr.clone()))
        .await
        .unwrap()
        .unwrap();
    let pa = a.client.local_peer_id();
    next(
        &mut b.events,
        |e| matches!(e, NetEvent::PeerConnected { peer } if *peer == pa),
    )
    .await;

    // Dropping every client of `a` stops its loop and closes its connections.
    drop(a);
    next(
        &mut b.events,
        |e| matches!(e, NetEvent::PeerDisconnected { peer } if *peer == pa),
    )
    .await;
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let mut c = config(1, vec![]);
    c.event_buffer = 0;
    assert!(matches!(weft_net::start(c), Err(NetError::Config(_))));
    let mut c = config(1, vec![]);
    c.max_gossip_bytes = 1000;
    assert!(matches!(weft_net::start(c), Err(NetError::Config(_))));
    let mut c = config(1, vec![]);
    c.max_established = 0;
    assert!(matches!(weft_net::start(c), Err(NetError::Config(_))));
    // A discovery target the connection limit could never allow.
    let mut c = config(1, vec![]);
    c.max_established = 4;
    c.target_peers = 5;
    assert!(matches!(weft_net::start(c), Err(NetError::Config(_))));
}

#[tokio::test]
async fn traffic_counts_bytes_on_the_wire_and_per_protocol() {
    let (mut a, mut b) = pair(|_| {}).await;
    let events = signed_events(3, 3);
    gossip_until_received(&a.client, &mut b.events, &events).await;

    let pa = a_peer(&b).await;
    let page = signed_events(4, 2);
    let responder = tokio::spawn(async move {
        if let NetEvent::PullRequested { reply, .. } = next(&mut a.events, |e| {
            matches!(e, NetEvent::PullRequested { .. })
        })
        .await
        {
            let _ = reply.send(PullResponse::Events {
                events: page,
                done: true,
                have: VersionVector::new(),
            });
        }
        a
    });
    timeout(WAIT, b.client.pull(pa, pull_request()))
        .await
        .expect("pull hung")
        .unwrap();
    let a = responder.await.unwrap();

    let (ta, tb) = (a.client.traffic(), b.client.traffic());
    assert!(
        ta.gossip_messages_sent >= 1 && ta.gossip_events_sent >= 3,
        "{ta:?}"
    );
    assert!(tb.gossip_messages_received >= 1, "{tb:?}");
    assert_eq!(
        tb.gossip_events_received,
        3 * tb.gossip_messages_received,
        "{tb:?}"
    );
    assert_eq!(
        (tb.pulls_sent, tb.pages_received, tb.events_pulled),
        (1, 1, 2)
    );
    assert_eq!((ta.pulls_served, ta.events_served), (1, 2));
    assert!(ta.connections >= 1 && tb.connections >= 1);
    for t in [ta, tb] {
        assert!(t.gossip.streams >= 1 && t.sync.streams >= 1, "{t:?}");
        assert!(
            t.bytes_out >= t.gossip.bytes_out + t.sync.bytes_out + t.other.bytes_out,
            "the wire carries every substream's bytes and their framing: {t:?}"
        );
    }
    assert!(ta.gossip.bytes_out > 0 && tb.gossip.bytes_in > 0);
    assert!(tb.sync.bytes_out > 0 && ta.sync.bytes_in > 0 && ta.sync.bytes_out > 0);

    // Every byte one side writes the other reads, once the connection is quiet.
    timeout(WAIT, async {
        loop {
            let (ta, tb) = (a.client.traffic(), b.client.traffic());
            if ta.bytes_out == tb.bytes_in && tb.bytes_out == ta.bytes_in {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the two ends never agreed on the bytes between them");
}
