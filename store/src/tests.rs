//! Behaviour the node relies on, each test on fresh temporary directories.

use std::collections::HashSet;

use tempfile::TempDir;
use weft_crdt::limits::MAX_PAYLOAD_BYTES;
use weft_crdt::{EventError, EventHash, Hlc, UnsignedEvent, VectorClock};

use super::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn space() -> SpaceName {
    SpaceName::new("todo").unwrap()
}

fn open(dir: &TempDir, seed: u8) -> Store {
    Store::open(dir.path(), key(seed), StoreConfig::default()).unwrap()
}

/// A store in a fresh directory; the directory lives as long as the returned guard.
fn fresh(seed: u8) -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, seed);
    (dir, store)
}

async fn put(store: &Store, k: &str, v: &[u8]) -> Applied {
    store
        .append(&space(), Write::put(k, v.to_vec()))
        .await
        .unwrap()
}

async fn all_events(store: &Store) -> Vec<Event> {
    store
        .events_since(&space(), 0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.event)
        .collect()
}

#[tokio::test]
async fn append_is_readable_through_every_view() {
    let (_dir, store) = fresh(1);
    let mut sub = store.subscribe();
    let me = store.node_id();

    let a1 = put(&store, "todos/1", b"milk").await;
    let a2 = put(&store, "todos/2", b"eggs").await;
    let a3 = put(&store, "todos/1", b"oat milk").await;
    assert_eq!((a1.lsn, a2.lsn, a3.lsn), (1, 2, 3));
    assert_eq!((a1.event.seq, a3.event.seq), (1, 3));
    assert_eq!(a1.event.prev, None);
    assert_eq!(
        a2.event.prev,
        Some(a1.event.hash()),
        "own events form a hash chain"
    );
    assert!(a2.event.hlc > a1.event.hlc);
    assert_eq!(a3.event.clock.get(&me), 3);
    a3.event.verify(&space()).unwrap();

    let got = store.get(&space(), "todos/1").await.unwrap();
    assert_eq!(
        got,
        vec![a3.event.clone()],
        "a later write supersedes the earlier one"
    );
    assert!(store.get(&space(), "todos/9").await.unwrap().is_empty());

    let since = store.events_since(&space(), 1, 10).await.unwrap();
    assert_eq!(since.iter().map(|a| a.lsn).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(store.events_since(&space(), 0, 1).await.unwrap().len(), 1);

    let vv = store.version_vector(&space()).await.unwrap();
    assert_eq!(vv.get(&me), 3);
    let stats = store.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.last_lsn, stats.pending), (3, 3, 0));

    for expected in [&a1, &a2, &a3] {
        let seen = sub.recv().await.unwrap();
        assert_eq!(seen.lsn, expected.lsn);
        assert_eq!(seen.event, expected.event);
    }
}

#[tokio::test]
async fn unknown_spaces_read_as_empty() {
    let (_dir, store) = fresh(1);
    let other = SpaceName::new("never").unwrap();
    assert!(store.get(&other, "k").await.unwrap().is_empty());
    assert!(store.events_since(&other, 0, 10).await.unwrap().is_empty());
    assert!(store.version_vector(&other).await.unwrap().is_empty());
    assert_eq!(store.stats(&other).await.unwrap().events, 0);
    let page = store
        .pull_page(&other, VersionVector::new(), 10, 1 << 20)
        .await
        .unwrap();
    assert!(page.events.is_empty() && page.done);
}

#[tokio::test]
async fn invalid_writes_store_nothing_and_use_no_seq() {
    let (_dir, store) = fresh(1);
    let empty_key = store.append(&space(), Write::put("", b"x".to_vec())).await;
    assert!(
        matches!(empty_key, Err(StoreError::Invalid(EventError::Limit(_)))),
        "{empty_key:?}"
    );
    let too_big = Write::put("k", vec![0; MAX_PAYLOAD_BYTES + 1]);
    assert!(matches!(
        store.append(&space(), too_big).await,
        Err(StoreError::Invalid(_))
    ));
    let mut delete_with_value = Write::delete("k");
    delete_with_value.payload = b"x".to_vec();
    assert!(matches!(
        store.append(&space(), delete_with_value).await,
        Err(StoreError::Invalid(_))
    ));

    assert_eq!(store.stats(&space()).await.unwrap().events, 0);
    let a = put(&store, "k", b"ok").await;
    assert_eq!(
        (a.event.seq, a.lsn),
        (1, 1),
        "failed writes consumed nothing"
    );
}

#[tokio::test]
async fn ingest_applies_another_nodes_events_and_counts_duplicates() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    for i in 0..3 {
        put(&a, &format!("k{i}"), b"v").await;
    }
    let events = all_events(&a).await;
    let out = b.ingest(&space(), events.clone()).await.unwrap();
    assert_eq!(out.applied.len(), 3);
    assert_eq!((out.duplicates, out.parked), (0, 0));
    assert_eq!(
        b.version_vector(&space()).await.unwrap(),
        a.version_vector(&space()).await.unwrap()
    );
    assert_eq!(
        b.get(&space(), "k1").await.unwrap(),
        vec![events[1].clone()]
    );

    let again = b.ingest(&space(), events).await.unwrap();
    assert_eq!((again.applied.len(), again.duplicates), (0, 3));
    assert_eq!(b.stats(&space()).await.unwrap().events, 3);

    // B's own write after ingesting depends on what it has seen.
    let mine = put(&b, "k0", b"b's").await;
    assert_eq!(mine.event.clock.get(&a.node_id()), 3);
    assert_eq!(b.get(&space(), "k0").await.unwrap(), vec![mine.event]);
}

#[tokio::test]
async fn early_events_wait_in_pending_until_the_gap_fills() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    for i in 0..3 {
        put(&a, "k", &[i]).await;
    }
    let e = all_events(&a).await;
    let mut sub = b.subscribe();

    let out = b.ingest(&space(), vec![e[2].clone()]).await.unwrap();
    assert_eq!((out.applied.len(), out.parked), (0, 1));
    let out = b
        .ingest(&space(), vec![e[1].clone(), e[2].clone()])
        .await
        .unwrap();
    assert_eq!((out.applied.len(), out.parked, out.duplicates), (0, 1, 1));
    let stats = b.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.pending), (0, 2));
    assert!(
        b.version_vector(&space()).await.unwrap().is_empty(),
        "parked events are not applied"
    );
    let page = b
        .pull_page(&space(), VersionVector::new(), 10, 1 << 20)
        .await
        .unwrap();
    assert!(page.events.is_empty(), "parked events are never served");

    let out = b.ingest(&space(), vec![e[0].clone()]).await.unwrap();
    let order: Vec<u64> = out.applied.iter().map(|x| x.event.seq).collect();
    assert_eq!(order, [1, 2, 3], "released in causal order");
    assert_eq!(out.parked, 0);
    let stats = b.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.pending), (3, 0));
    assert_eq!(b.get(&space(), "k").await.unwrap(), vec![e[2].clone()]);
    for seq in 1..=3 {
        assert_eq!(
            sub.recv().await.unwrap().event.seq,
            seq,
            "released events are broadcast"
        );
    }

    // A reversed batch into a fresh store applies whole, in causal order.
    let (_dc, c) = fresh(3);
    let out = c
        .ingest(&space(), e.iter().rev().cloned().collect())
        .await
        .unwrap();
    assert_eq!(
        out.applied.iter().map(|x| x.lsn).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        out.applied.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(out.parked, 0);
}

#[tokio::test]
async fn a_tampered_event_rejects_the_whole_batch() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    for i in 0..3 {
        put(&a, "k", &[i]).await;
    }
    let good = all_events(&a).await;
    for bad in 0..good.len() {
        let mut batch = good.clone();
        batch[bad].payload[0] ^= 0x01;
        match b.ingest(&space(), batch).await {
            Err(StoreError::Rejected { id, .. }) => assert_eq!(id, good[bad].id()),
            other => panic!("tampered event {bad} accepted: {other:?}"),
        }
        let stats = b.stats(&space()).await.unwrap();
        assert_eq!((stats.events, stats.pending), (0, 0), "nothing stored");
    }
    let other_space = SpaceName::new("other").unwrap();
    assert!(
        matches!(
            b.ingest(&other_space, good.clone()).await,
            Err(StoreError::Rejected { .. })
        ),
        "events are bound to their space"
    );
    assert_eq!(b.ingest(&space(), good).await.unwrap().applied.len(), 3);
}

/// A correctly signed event whose `prev` is not its predecessor's hash.
fn forged_chain(k: &SigningKey) -> (Event, Event) {
    let origin = NodeId::of(k);
    let ev = |seq: u64, prev: Option<EventHash>| {
        let mut clock = VectorClock::new();
        clock.set(origin, seq);
        UnsignedEvent {
            origin,
            seq,
            clock,
            hlc: Hlc::new(1_000 + seq, 0),
            key: "k".into(),
            op: Op::Put,
            kind: String::new(),
            payload: vec![seq as u8],
            meta: BTreeMap::new(),
            prev,
        }
        .sign(&space(), k)
    };
    (ev(1, None), ev(2, Some(EventHash([0xab; 32]))))
}

#[tokio::test]
async fn a_broken_hash_chain_is_rejected() {
    let (_db, b) = fresh(2);
    let (e1, e2) = forged_chain(&key(9));
    match b.ingest(&space(), vec![e1.clone(), e2.clone()]).await {
        Err(StoreError::Rejected { id, reason }) => {
            assert_eq!(id, e2.id());
            assert!(reason.to_string().contains("prev"), "{reason}");
        }
        other => panic!("broken chain accepted: {other:?}"),
    }
    assert_eq!(
        b.stats(&space()).await.unwrap().events,
        0,
        "e1 was not kept either"
    );

    // Parked by an earlier call, the bad event is dropped on release; the call that
    // fills the gap still succeeds.
    assert_eq!(b.ingest(&space(), vec![e2]).await.unwrap().parked, 1);
    let out = b.ingest(&space(), vec![e1.clone()]).await.unwrap();
    assert_eq!(out.applied.len(), 1);
    let stats = b.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.pending), (1, 0));
    assert_eq!(stats.version_vector.get(&e1.origin), 1);
}

#[tokio::test]
async fn a_bad_command_does_not_poison_its_batch() {
    let (_db, b) = fresh(2);
    // Drive one batch by hand so the bad command is certainly in it. The store's own
    // writer stays idle, and reads do not depend on its cache.
    let (tx, _rx) = broadcast::channel(16);
    let mut writer = Writer::new(
        b.inner.env.clone(),
        b.inner.tables,
        key(2),
        Hlc::default(),
        16,
        tx,
    )
    .unwrap();
    let (e1, e2) = forged_chain(&key(9));
    let mut answers = Vec::new();
    let mut ingest_answer = None;
    let mut batch = Vec::new();
    for i in 0..4u8 {
        let (reply, answer) = oneshot::channel();
        batch.push(Command::Append {
            space: space(),
            write: Write::put(format!("k{i}"), vec![i]),
            reply,
        });
        answers.push(answer);
        if i == 1 {
            let (reply, answer) = oneshot::channel();
            batch.push(Command::Ingest {
                space: space(),
                events: vec![e1.clone(), e2.clone()],
                reply,
            });
            ingest_answer = Some(answer);
        }
    }
    writer.run_batch(batch);

    let ingest = ingest_answer.unwrap().await.unwrap();
    assert!(matches!(ingest, Err(StoreError::Rejected { id, .. }) if id == e2.id()));
    let mut lsns = Vec::new();
    for answer in answers {
        lsns.push(answer.await.unwrap().unwrap().lsn);
    }
    assert_eq!(lsns, [1, 2, 3, 4], "the rejected command left no gap");
    let stats = b.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.pending), (4, 0));
    assert_eq!(
        stats.version_vector.len(),
        1,
        "nothing of the rejected batch remains"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_pages_until_done_converges() {
    let (_da, a) = fresh(1);
    let (_dc, c) = fresh(3);
    // A holds 2,500 events from two origins, interleaved in its log.
    for round in 0..5 {
        for i in 0..250 {
            put(&a, &format!("a/{round}/{i}"), b"from a").await;
            put(&c, &format!("c/{round}/{i}"), b"from c").await;
        }
        let fresh_from_c = c.events_since(&space(), round * 250, 250).await.unwrap();
        a.ingest(
            &space(),
            fresh_from_c.into_iter().map(|x| x.event).collect(),
        )
        .await
        .unwrap();
    }
    assert_eq!(a.stats(&space()).await.unwrap().events, 2_500);

    let (_db, b) = fresh(2);
    let mut pages = 0;
    loop {
        let have = b.version_vector(&space()).await.unwrap();
        let page = a.pull_page(&space(), have, 1_000, 16 << 20).await.unwrap();
        assert!(page.events.len() <= 1_000);
        pages += 1;
        let out = b.ingest(&space(), page.events).await.unwrap();
        assert_eq!(out.parked, 0, "pages arrive in causal order");
        if page.done {
            break;
        }
        assert!(pages < 10, "paging does not terminate");
    }
    assert_eq!(pages, 3);
    assert_eq!(
        b.version_vector(&space()).await.unwrap(),
        a.version_vector(&space()).await.unwrap()
    );
    assert_eq!(b.stats(&space()).await.unwrap().events, 2_500);

    // A puller that has all of C's events is sent only A's.
    let have_c: VersionVector = [(c.node_id(), 1_250)].into_iter().collect();
    let page = a
        .pull_page(&space(), have_c, 10_000, 16 << 20)
        .await
        .unwrap();
    assert!(page.done);
    assert_eq!(page.events.len(), 1_250);
    assert!(page.events.iter().all(|e| e.origin == a.node_id()));

    // The byte budget bounds a page but never starves it.
    let page = a
        .pull_page(&space(), VersionVector::new(), 1_000, 1)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);
    assert!(!page.done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_seqs() {
    let (_dir, store) = fresh(1);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                s.append(&space(), Write::put(format!("k{i}"), vec![i]))
                    .await
            })
        })
        .collect();
    let mut seqs = HashSet::new();
    let mut lsns = HashSet::new();
    for t in tasks {
        let applied = t.await.unwrap().unwrap();
        seqs.insert(applied.event.seq);
        lsns.insert(applied.lsn);
    }
    assert_eq!(seqs, (1..=64).collect::<HashSet<u64>>());
    assert_eq!(lsns, (1..=64).collect::<HashSet<u64>>());
    // The chain is intact however the appends were batched.
    let events = all_events(&store).await;
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev, Some(pair[0].hash()));
    }
}

#[tokio::test]
async fn reopening_continues_where_it_left_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_da, a) = fresh(1);
    for i in 0..3 {
        put(&a, "remote", &[i]).await;
    }
    let remote = all_events(&a).await;
    let last_hlc;
    {
        let store = open(&dir, 7);
        put(&store, "k", b"1").await;
        last_hlc = put(&store, "k", b"2").await.event.hlc;
        assert_eq!(
            store
                .ingest(&space(), vec![remote[2].clone()])
                .await
                .unwrap()
                .parked,
            1
        );
        assert!(matches!(
            Store::open(dir.path(), key(7), StoreConfig::default()),
            Err(StoreError::AlreadyOpen(_))
        ));
    }

    let store = open(&dir, 7);
    let stats = store.stats(&space()).await.unwrap();
    assert_eq!(
        (stats.events, stats.pending),
        (2, 1),
        "log and pending set survive"
    );
    let next = put(&store, "k", b"3").await;
    assert_eq!(
        (next.event.seq, next.lsn),
        (3, 3),
        "seq and lsn are never reused"
    );
    assert!(
        next.event.hlc > last_hlc,
        "the HLC never goes back across restarts"
    );
    let prev = store.events_since(&space(), 1, 1).await.unwrap();
    assert_eq!(
        next.event.prev,
        Some(prev[0].event.hash()),
        "the chain continues"
    );

    let out = store.ingest(&space(), remote[..2].to_vec()).await.unwrap();
    assert_eq!(
        out.applied.len(),
        3,
        "a parked event from before the restart is released"
    );
    drop(store);

    match Store::open(dir.path(), key(8), StoreConfig::default()) {
        Err(StoreError::IdentityMismatch { stored, given }) => {
            assert_eq!(stored, NodeId::of(&key(7)));
            assert_eq!(given, NodeId::of(&key(8)));
        }
        Err(other) => panic!("expected an identity mismatch, got {other}"),
        Ok(_) => panic!("opened another node's directory"),
    }
}

#[tokio::test]
async fn concurrent_writes_to_one_key_converge_to_the_same_frontier() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    let from_a = put(&a, "doc", b"a's").await.event;
    let from_b = put(&b, "doc", b"b's").await.event;
    a.ingest(&space(), vec![from_b.clone()]).await.unwrap();
    b.ingest(&space(), vec![from_a.clone()]).await.unwrap();

    let on_a = a.get(&space(), "doc").await.unwrap();
    let on_b = b.get(&space(), "doc").await.unwrap();
    assert_eq!(on_a.len(), 2);
    assert_eq!(on_a, on_b);
    assert!(
        on_a.windows(2).all(|w| w[0].id() < w[1].id()),
        "sorted by id"
    );

    // A write that has seen both resolves the conflict everywhere.
    let merged = put(&a, "doc", b"merged").await.event;
    b.ingest(&space(), vec![merged.clone()]).await.unwrap();
    assert_eq!(a.get(&space(), "doc").await.unwrap(), vec![merged.clone()]);
    assert_eq!(b.get(&space(), "doc").await.unwrap(), vec![merged]);
}

#[tokio::test]
async fn spaces_are_separate_logs() {
    let (_dir, store) = fresh(1);
    let other = SpaceName::new("notes").unwrap();
    put(&store, "k", b"todo").await;
    let n = store
        .append(&other, Write::put("k", b"note".to_vec()))
        .await
        .unwrap();
    put(&store, "k2", b"todo").await;
    assert_eq!((n.lsn, n.event.seq), (1, 1), "seq and lsn count per space");
    assert_eq!(store.stats(&space()).await.unwrap().events, 2);
    assert_eq!(store.get(&other, "k").await.unwrap(), vec![n.event]);
}

#[tokio::test]
async fn a_far_future_hlc_from_a_peer_is_not_followed() {
    let (_db, b) = fresh(2);
    let k = key(9);
    let origin = NodeId::of(&k);
    let mut clock = VectorClock::new();
    clock.set(origin, 1);
    let hostile = UnsignedEvent {
        origin,
        seq: 1,
        clock,
        hlc: Hlc(u64::MAX),
        key: "k".into(),
        op: Op::Put,
        kind: String::new(),
        payload: vec![1],
        meta: BTreeMap::new(),
        prev: None,
    }
    .sign(&space(), &k);
    assert_eq!(
        b.ingest(&space(), vec![hostile])
            .await
            .unwrap()
            .applied
            .len(),
        1
    );
    let mine = put(&b, "k", b"local").await.event;
    assert!(mine.hlc < Hlc(u64::MAX));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        mine.hlc.wall_ms().abs_diff(now_ms) < 60_000,
        "local HLC stays near real time"
    );
}

// ---- Policies, merge state, conflicts and digests ----

/// A test-only merge: a put's payload is a CBOR integer added to the key's total; a
/// delete resets it. Independent of the built-in merges in `weft_crdt::merge`.
#[derive(Debug)]
struct Sum;

fn cbor_int(n: i64) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(&n, &mut out).unwrap();
    out
}

fn int_of(bytes: &[u8]) -> Result<i64, weft_crdt::MergeError> {
    ciborium::from_reader(bytes).map_err(|e| weft_crdt::MergeError(format!("not an integer: {e}")))
}

impl weft_crdt::Merge for Sum {
    fn name(&self) -> &str {
        "sum"
    }
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), weft_crdt::MergeError> {
        match op {
            Op::Put => int_of(payload).map(|_| ()),
            Op::Delete => Ok(()),
        }
    }
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, weft_crdt::MergeError> {
        let old = state.map(int_of).transpose()?.unwrap_or(0);
        Ok(cbor_int(match event.op {
            Op::Put => old + int_of(&event.payload)?,
            Op::Delete => 0,
        }))
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, weft_crdt::MergeError> {
        Ok(Some(state.to_vec()))
    }
}

/// Another merge, to have a second identity of the same kind.
#[derive(Debug)]
struct Sum2;

impl weft_crdt::Merge for Sum2 {
    fn name(&self) -> &str {
        "sum"
    }
    fn version(&self) -> u32 {
        2
    }
    fn check(&self, op: Op, payload: &[u8]) -> Result<(), weft_crdt::MergeError> {
        Sum.check(op, payload)
    }
    fn apply(&self, state: Option<&[u8]>, event: &Event) -> Result<Vec<u8>, weft_crdt::MergeError> {
        Sum.apply(state, event)
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, weft_crdt::MergeError> {
        Sum.read(state)
    }
}

fn sum() -> Policy {
    Policy::Merge(Arc::new(Sum))
}

fn lww() -> Policy {
    weft_crdt::PolicyKind::Lww.policy()
}

fn multi() -> Policy {
    weft_crdt::PolicyKind::Multi.policy()
}

async fn add(store: &Store, k: &str, n: i64) -> Applied {
    store
        .append(&space(), Write::put(k, cbor_int(n)))
        .await
        .unwrap()
}

async fn total(store: &Store, k: &str) -> Option<i64> {
    store
        .merged_state(&space(), k)
        .await
        .unwrap()
        .map(|b| int_of(&b).unwrap())
}

/// A correctly signed, chain-linked event of a foreign origin with the given payload.
fn foreign_event(k: &SigningKey, seq: u64, prev: Option<EventHash>, payload: Vec<u8>) -> Event {
    let origin = NodeId::of(k);
    let mut clock = VectorClock::new();
    clock.set(origin, seq);
    UnsignedEvent {
        origin,
        seq,
        clock,
        hlc: Hlc::new(1_000 + seq, 0),
        key: "n".into(),
        op: Op::Put,
        kind: String::new(),
        payload,
        meta: BTreeMap::new(),
        prev,
    }
    .sign(&space(), k)
}

#[tokio::test]
async fn the_policy_identity_is_recorded_and_a_different_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir, 1);
        assert_eq!(store.policy_identity(&space()).await.unwrap(), None);
        assert!(store.policy(&space()).is_none());
        store.configure_space(&space(), lww()).await.unwrap();
        let lww_id = lww().identity();
        assert_eq!(
            store.policy_identity(&space()).await.unwrap(),
            Some(lww_id.clone())
        );
        put(&store, "k", b"v").await;

        let err = store
            .configure_space(&space(), multi())
            .await
            .expect_err("a second policy was accepted");
        match &err {
            StoreError::PolicyMismatch {
                space: s,
                stored,
                given,
            } => {
                assert_eq!(s, &space());
                assert_eq!(stored, &lww_id);
                assert_eq!(given, &multi().identity());
            }
            other => panic!("expected a policy mismatch, got {other}"),
        }
        assert!(
            err.to_string().starts_with(
                "space todo was created with resolver lww/1; this node is configured with multi/1"
            ),
            "{err}"
        );
        assert_eq!(
            store.policy_identity(&space()).await.unwrap(),
            Some(lww_id.clone()),
            "nothing changed"
        );
        assert_eq!(store.policy(&space()).unwrap().identity(), lww_id);
        assert_eq!(store.stats(&space()).await.unwrap().events, 1);
        // The same identity again is fine (every restart does this).
        store.configure_space(&space(), lww()).await.unwrap();
    }

    // The record survives a restart, and is checked against the next process's choice.
    let store = open(&dir, 1);
    assert_eq!(
        store.policy_identity(&space()).await.unwrap(),
        Some(lww().identity())
    );
    assert!(matches!(
        store.configure_space(&space(), multi()).await,
        Err(StoreError::PolicyMismatch { .. })
    ));
    // An unconfigured resolver space still takes writes, as before configuration existed.
    put(&store, "k", b"w").await;

    // A merge space refuses another merge, and keeps folding with its own.
    let sums = SpaceName::new("sums").unwrap();
    store.configure_space(&sums, sum()).await.unwrap();
    assert!(matches!(
        store
            .configure_space(&sums, Policy::Merge(Arc::new(Sum2)))
            .await,
        Err(StoreError::PolicyMismatch { .. })
    ));
    store
        .append(&sums, Write::put("n", cbor_int(5)))
        .await
        .unwrap();
    assert_eq!(
        store.merged_state(&sums, "n").await.unwrap(),
        Some(cbor_int(5))
    );
    drop(store);

    // After a restart, a merge space takes no events until its merge is configured:
    // applying them unfolded would leave its state behind for good.
    let store = open(&dir, 1);
    let refused = store.append(&sums, Write::put("n", cbor_int(1))).await;
    assert!(
        matches!(refused, Err(StoreError::PolicyNotConfigured { .. })),
        "{refused:?}"
    );
    store.configure_space(&sums, sum()).await.unwrap();
    store
        .append(&sums, Write::put("n", cbor_int(1)))
        .await
        .unwrap();
    assert_eq!(
        store.merged_state(&sums, "n").await.unwrap(),
        Some(cbor_int(6))
    );
}

#[tokio::test]
async fn merge_state_is_folded_on_append_and_on_ingest() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    for s in [&a, &b] {
        s.configure_space(&space(), sum()).await.unwrap();
    }
    add(&a, "n", 1).await;
    add(&a, "n", 2).await;
    add(&a, "m", 10).await;
    let last = add(&a, "n", 3).await;
    assert_eq!(total(&a, "n").await, Some(6));
    assert_eq!(total(&a, "m").await, Some(10));
    assert_eq!(total(&a, "never").await, None);
    assert!(!last.conflict);

    // Out of order: the first three are parked, then released by the fourth's cause.
    let e = all_events(&a).await;
    let out = b.ingest(&space(), e[1..].to_vec()).await.unwrap();
    assert_eq!((out.applied.len(), out.parked), (0, 3));
    assert_eq!(total(&b, "n").await, None, "parked events are not folded");
    let out = b.ingest(&space(), vec![e[0].clone()]).await.unwrap();
    assert_eq!(out.applied.len(), 4, "released events are applied too");
    assert_eq!(total(&b, "n").await, Some(6));
    assert_eq!(total(&b, "m").await, Some(10));

    // A remote event the merge refuses is applied to the log (the origin's chain goes
    // on) but leaves the state as it was.
    let k = key(9);
    let bad = foreign_event(&k, 1, None, b"not cbor".to_vec());
    let good = foreign_event(&k, 2, Some(bad.hash()), cbor_int(100));
    let out = b.ingest(&space(), vec![bad, good]).await.unwrap();
    assert_eq!(out.applied.len(), 2);
    assert_eq!(total(&b, "n").await, Some(106));
    assert_eq!(
        b.version_vector(&space())
            .await
            .unwrap()
            .get(&NodeId::of(&k)),
        2
    );

    // A space that had events before its first configuration has its log folded.
    let (_dc, c) = fresh(3);
    c.ingest(&space(), e.clone()).await.unwrap();
    assert_eq!(total(&c, "n").await, None, "no merge before configuration");
    c.configure_space(&space(), sum()).await.unwrap();
    assert_eq!(total(&c, "n").await, Some(6));
    assert_eq!(
        a.digest(&space()).await.unwrap(),
        c.digest(&space()).await.unwrap()
    );
}

#[tokio::test]
async fn an_invalid_merge_payload_on_append_stores_nothing() {
    let (_dir, store) = fresh(1);
    store.configure_space(&space(), sum()).await.unwrap();
    let refused = store
        .append(&space(), Write::put("n", b"not an integer".to_vec()))
        .await;
    match refused {
        Err(StoreError::Invalid(EventError::Malformed(msg))) => {
            assert!(msg.contains("sum/1"), "{msg}")
        }
        other => panic!("expected an invalid write, got {other:?}"),
    }
    let stats = store.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.pending), (0, 0));
    assert!(stats.version_vector.is_empty());
    assert_eq!(total(&store, "n").await, None);
    let a = add(&store, "n", 4).await;
    assert_eq!(
        (a.event.seq, a.lsn),
        (1, 1),
        "the refused write used no seq"
    );
    assert_eq!(total(&store, "n").await, Some(4));
    // Deletes carry no payload for the merge to check.
    store.append(&space(), Write::delete("n")).await.unwrap();
    assert_eq!(total(&store, "n").await, Some(0));
}

#[tokio::test]
async fn conflicts_are_counted_and_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, 1);
    let (_db, b) = fresh(2);
    for s in [&a, &b] {
        s.configure_space(&space(), multi()).await.unwrap();
    }
    let from_a = put(&a, "doc", b"a's").await;
    let from_b = put(&b, "doc", b"b's").await;
    put(&a, "other", b"x").await;
    assert!(!from_a.conflict && !from_b.conflict);
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 0);

    let mut sub = a.subscribe();
    let on_a = a
        .ingest(&space(), vec![from_b.event.clone()])
        .await
        .unwrap();
    let on_b = b
        .ingest(&space(), vec![from_a.event.clone()])
        .await
        .unwrap();
    assert!(on_a.applied[0].conflict && on_b.applied[0].conflict);
    assert!(
        sub.recv().await.unwrap().conflict,
        "broadcast carries the flag"
    );
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 1);
    assert_eq!(b.stats(&space()).await.unwrap().conflicts, 1);

    // A write that has seen both sides supersedes them, where it is written and where
    // it is ingested.
    let b2 = put(&b, "doc", b"b's again").await;
    assert!(!b2.conflict);
    assert_eq!(b.stats(&space()).await.unwrap().conflicts, 0);
    let out = a.ingest(&space(), vec![b2.event.clone()]).await.unwrap();
    assert!(!out.applied[0].conflict);
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 0);

    // Two keys in conflict count twice; resolving one leaves one.
    let a3 = put(&a, "doc", b"a's again").await;
    let b3 = put(&b, "doc", b"b's third").await;
    let a4 = put(&a, "other", b"a").await;
    let b4 = put(&b, "other", b"b").await;
    a.ingest(&space(), vec![b3.event.clone(), b4.event.clone()])
        .await
        .unwrap();
    // (b has not seen a's first write to "other" yet; a's log holds everything.)
    let out = b.ingest(&space(), all_events(&a).await).await.unwrap();
    assert!(out
        .applied
        .iter()
        .any(|x| x.event == a3.event && x.conflict));
    assert!(out
        .applied
        .iter()
        .any(|x| x.event == a4.event && x.conflict));
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 2);
    assert_eq!(b.stats(&space()).await.unwrap().conflicts, 2);
    let merged = put(&a, "doc", b"merged").await;
    assert!(!merged.conflict);
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 1);
    let out = b
        .ingest(&space(), vec![merged.event.clone()])
        .await
        .unwrap();
    assert!(!out.applied[0].conflict);
    assert_eq!(b.stats(&space()).await.unwrap().conflicts, 1);

    // The flag is kept with each event, for readers catching up from the log.
    let flags: Vec<bool> = a
        .events_since(&space(), 0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|x| x.conflict)
        .collect();
    // a: doc, other, b's doc (conflict), b2, a3, a4, b3 (conflict), b4 (conflict), merged.
    assert_eq!(
        flags,
        [false, false, true, false, false, false, true, true, false]
    );

    // The count is persisted.
    drop(a);
    let a = open(&dir, 1);
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 1);
}

#[tokio::test]
async fn a_layout_1_directory_is_upgraded_with_its_conflicts_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, b) = fresh(2);
    {
        let a = open(&dir, 1);
        let from_a = put(&a, "doc", b"a").await;
        let from_b = put(&b, "doc", b"b").await;
        a.ingest(&space(), vec![from_b.event]).await.unwrap();
        b.ingest(&space(), vec![from_a.event]).await.unwrap();
        // Make it look like a directory written by layout 1: no counters.
        let env = &a.inner.env;
        let t = a.inner.tables;
        let mut txn = env.write_txn().unwrap();
        t.space_meta.clear(&mut txn).unwrap();
        t.meta
            .put(&mut txn, META_FORMAT, &1u32.to_be_bytes())
            .unwrap();
        txn.commit().unwrap();
    }
    let a = open(&dir, 1);
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 1);
    let merged = put(&a, "doc", b"merged").await;
    assert!(!merged.conflict);
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 0);
}

#[tokio::test]
async fn digests_agree_exactly_when_the_same_events_are_applied() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    let (_dc, c) = fresh(3);
    for s in [&a, &b, &c] {
        s.configure_space(&space(), sum()).await.unwrap();
    }
    // Concurrent writes on shared and private keys, from three origins.
    for i in 0..3 {
        add(&a, "shared", i).await;
        add(&b, "shared", 10 * i).await;
        add(&c, &format!("c/{i}"), i).await;
    }
    add(&a, "a-only", 7).await;
    let ea = all_events(&a).await;
    let eb = all_events(&b).await;
    let ec = all_events(&c).await;

    // A: B's then C's, each as one batch. B: C's reversed, then A's one by one.
    // C: everything in one reversed batch (applied via the pending set).
    a.ingest(&space(), eb.clone()).await.unwrap();
    a.ingest(&space(), ec.clone()).await.unwrap();
    b.ingest(&space(), ec.iter().rev().cloned().collect())
        .await
        .unwrap();
    for e in &ea {
        b.ingest(&space(), vec![e.clone()]).await.unwrap();
    }
    let everything: Vec<Event> = ea.iter().chain(&eb).rev().cloned().collect();
    c.ingest(&space(), everything).await.unwrap();

    let da = a.digest(&space()).await.unwrap();
    assert_eq!(da, b.digest(&space()).await.unwrap());
    assert_eq!(da, c.digest(&space()).await.unwrap());
    assert_eq!(total(&a, "shared").await, Some(3 + 30));
    assert_eq!(total(&c, "shared").await, Some(3 + 30));
    assert_eq!(a.stats(&space()).await.unwrap().conflicts, 1);
    assert_eq!(c.stats(&space()).await.unwrap().conflicts, 1);

    // One event less, and the digest differs.
    let (_dd, d) = fresh(4);
    d.configure_space(&space(), sum()).await.unwrap();
    let mut all_but_last = all_events(&a).await;
    all_but_last.pop();
    d.ingest(&space(), all_but_last).await.unwrap();
    assert_ne!(d.digest(&space()).await.unwrap(), da);

    // A replica without merge state differs too: the state is part of the digest.
    let (_de, e) = fresh(5);
    e.ingest(&space(), all_events(&a).await).await.unwrap();
    assert_ne!(e.digest(&space()).await.unwrap(), da);

    // An unknown space has the digest of an empty one.
    let never = SpaceName::new("never").unwrap();
    let (_df, f) = fresh(6);
    f.configure_space(&never, lww()).await.unwrap();
    assert_eq!(
        a.digest(&never).await.unwrap(),
        f.digest(&never).await.unwrap()
    );
}
