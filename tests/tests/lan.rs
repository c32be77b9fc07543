//! Hosts on a LAN of network namespaces: first the LAN itself (unicast, multicast, a
//! cut link), then `weft` nodes that find each other by mDNS alone and keep replicating
//! across a short cut. Needs root; see `weft_tests::netns`.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weft_tests::netns::{require_root, Lan};
use weft_tests::{wait_until, DEFAULT_SPACE};

const DISCOVERY: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(500);

#[test]
fn hosts_on_a_lan_reach_each_other_until_a_link_is_cut() {
    if !require_root() {
        return;
    }
    let lan = Lan::new(2);
    let listener = lan.tcp_listener(0);
    let server_addr = listener.local_addr().unwrap();
    assert_eq!(server_addr.ip(), lan.host_addr(0));
    let echo = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).expect("read");
        stream.write_all(&buf).expect("write");
        peer
    });

    let mut stream = lan
        .tcp_connect(1, server_addr, Duration::from_secs(5))
        .expect("host 1 connects to host 0");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"hello").unwrap();
    let mut answer = [0u8; 5];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"hello");
    let peer = echo.join().unwrap();
    assert_eq!(
        peer.ip(),
        lan.host_addr(1),
        "traffic comes from host 1's address"
    );

    // The test process's own namespace cannot reach the LAN.
    assert!(
        std::net::TcpStream::connect_timeout(&server_addr, Duration::from_millis(500)).is_err(),
        "the LAN must be invisible from the host's namespace"
    );

    lan.link_down(1);
    let refused = lan.tcp_connect(1, server_addr, Duration::from_secs(1));
    assert!(
        refused.is_err(),
        "host 1 still reaches host 0 after link_down"
    );

    lan.link_up(1);
    // A new listener: the first one was consumed by the echo thread.
    let listener = lan.tcp_listener(0);
    let addr = listener.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lan.tcp_connect(1, addr, Duration::from_secs(1)) {
            Ok(_) => break,
            Err(err) if Instant::now() >= deadline => {
                panic!("host 1 cannot reach host 0 10 s after link_up: {err}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn multicast_crosses_the_bridge() {
    if !require_root() {
        return;
    }
    const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
    let lan = Lan::new(2);
    let receiver = lan.udp_socket(1, 0);
    let port = receiver.local_addr().unwrap().port();
    receiver
        .join_multicast_v4(&GROUP, &lan.host_addr(1))
        .expect("join the group on eth0");
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sender = lan.udp_socket(0, 0);

    let mut buf = [0u8; 64];
    let mut received = None;
    for _ in 0..25 {
        sender
            .send_to(b"weft-mdns-probe", SocketAddr::from((GROUP, port)))
            .expect("send to the group (is 224.0.0.0/4 routed to eth0?)");
        if let Ok((len, from)) = receiver.recv_from(&mut buf) {
            received = Some((buf[..len].to_vec(), from));
            break;
        }
    }
    let (payload, from) = received.expect("no multicast datagram crossed the bridge in 5 s");
    assert_eq!(payload, b"weft-mdns-probe");
    assert_eq!(from.ip(), lan.host_addr(0));
}

/// Starts a node on each host and waits until they are connected through mDNS.
async fn discovered_pair() -> Lan {
    let mut lan = Lan::new(2);
    for i in 0..2 {
        let own = format!("/ip4/{}/tcp/", lan.host_addr(i));
        let listen = lan.start_weft(i, |node| node).await.listen_addrs().to_vec();
        assert!(
            listen.iter().any(|addr| addr.starts_with(&own)),
            "listening on 0.0.0.0 prints the concrete addresses; host {i} printed {listen:?}"
        );
        assert!(
            !listen.iter().any(|addr| addr.contains("/0.0.0.0/")),
            "unspecified address printed: {listen:?}"
        );
    }
    let (id0, id1) = (
        lan.weft(0).peer_id().to_owned(),
        lan.weft(1).peer_id().to_owned(),
    );
    wait_until(
        "the two nodes discover each other by mDNS",
        DISCOVERY,
        POLL,
        async || {
            lan.weft(0).peers().await.contains(&id1) && lan.weft(1).peers().await.contains(&id0)
        },
    )
    .await;
    lan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_a_lan_find_each_other_by_mdns_and_replicate_both_ways() {
    if !require_root() {
        return;
    }
    let lan = discovered_pair().await;
    let (a, b) = (lan.weft(0), lan.weft(1));

    a.put(DEFAULT_SPACE, "from/a", "hello from a").await;
    wait_until("host 1 reads host 0's put", DISCOVERY, POLL, async || {
        b.get(DEFAULT_SPACE, "from/a").await.as_deref() == Some("hello from a")
    })
    .await;

    b.put(DEFAULT_SPACE, "from/b", "hello from b").await;
    wait_until("host 0 reads host 1's put", DISCOVERY, POLL, async || {
        a.get(DEFAULT_SPACE, "from/b").await.as_deref() == Some("hello from b")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_short_cut_arrive_once_the_link_is_back() {
    if !require_root() {
        return;
    }
    let lan = discovered_pair().await;
    let (a, b) = (lan.weft(0), lan.weft(1));

    lan.link_down(1);
    a.put(DEFAULT_SPACE, "during/a", "1").await;
    b.put(DEFAULT_SPACE, "during/b", "2").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        b.get(DEFAULT_SPACE, "during/a").await,
        None,
        "host 1 got host 0's write while cut off: link_down did not cut it"
    );

    lan.link_up(1);
    wait_until(
        "both writes reach the other side after the cut",
        DISCOVERY,
        POLL,
        async || {
            b.get(DEFAULT_SPACE, "during/a").await.as_deref() == Some("1")
                && a.get(DEFAULT_SPACE, "during/b").await.as_deref() == Some("2")
        },
    )
    .await;
    assert_eq!(
        a.version_vector(DEFAULT_SPACE).await,
        b.version_vector(DEFAULT_SPACE).await
    );
}
