//! Behaviour the node relies on, each test on fresh temporary directories.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tempfile::TempDir;
use weft_crdt::limits::{MAX_PAYLOAD_BYTES, MAX_UNSIGNED_RUN};
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
    events_of(store, &space()).await
}

async fn events_of(store: &Store, space: &SpaceName) -> Vec<Event> {
    store
        .events_since(space, 0, usize::MAX)
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
    // A good ingest ahead of the bad one: it runs again when the batch is rerun with
    // each command isolated, from the encodings it came with.
    let good = signed_each(
        &[
            foreign_event(&key(8), 1, None, vec![1]),
            foreign_event(&key(8), 2, None, vec![2]),
        ],
        &key(8),
    );
    let (reply, good_answer) = oneshot::channel();
    let mut answers = Vec::new();
    let mut ingest_answer = None;
    let mut batch = vec![Command::Ingest {
        space: space(),
        events: good.clone(),
        prepared: good.iter().map(Prepared::of).collect(),
        reply,
    }];
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
                prepared: [&e1, &e2].into_iter().map(Prepared::of).collect(),
                reply,
            });
            ingest_answer = Some(answer);
        }
    }
    writer.run_batch(batch);

    let ingest = ingest_answer.unwrap().await.unwrap();
    assert!(matches!(ingest, Err(StoreError::Rejected { id, .. }) if id == e2.id()));
    let applied = good_answer.await.unwrap().unwrap().applied;
    assert_eq!(
        applied
            .iter()
            .map(|a| (a.lsn, a.event.clone()))
            .collect::<Vec<_>>(),
        [(1, good[0].clone()), (2, good[1].clone())]
    );
    let mut lsns = Vec::new();
    for answer in answers {
        lsns.push(answer.await.unwrap().unwrap().lsn);
    }
    assert_eq!(lsns, [3, 4, 5, 6], "the rejected command left no gap");
    let stats = b.stats(&space()).await.unwrap();
    assert_eq!((stats.events, stats.pending), (6, 0));
    assert_eq!(
        stats.version_vector.len(),
        2,
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
async fn a_directory_of_an_older_layout_is_refused_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = open(&dir, 1);
        put(&a, "doc", b"a").await;
        // Make it look like a directory written by layout 2.
        let mut txn = a.inner.env.write_txn().unwrap();
        a.inner
            .tables
            .meta
            .put(&mut txn, META_FORMAT, &2u32.to_be_bytes())
            .unwrap();
        txn.commit().unwrap();
    }
    match Store::open(dir.path(), key(1), StoreConfig::default()) {
        Err(
            e @ StoreError::UnsupportedLayout {
                found: 2,
                supported,
            },
        ) => {
            assert_eq!(supported, FORMAT_VERSION);
            assert!(e.to_string().contains("layout version 2"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a layout-2 directory was opened"),
    }
    // Refusing changed nothing: the recorded layout is still 2.
    let report = check(dir.path()).unwrap();
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("layout version")),
        "{report:#?}"
    );
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

// ---- Durability modes and map growth ----

fn open_with(dir: &TempDir, seed: u8, config: StoreConfig) -> Store {
    Store::open(dir.path(), key(seed), config).unwrap()
}

#[tokio::test]
async fn relaxed_durability_runs_without_sync_and_keeps_everything_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        durability: Durability::Relaxed {
            flush_every: Duration::from_millis(20),
        },
        ..StoreConfig::default()
    };
    {
        let store = open_with(&dir, 1, config.clone());
        let flags = store.inner.env.get_flags().unwrap();
        assert_ne!(
            flags & EnvFlags::NO_SYNC.bits(),
            0,
            "relaxed mode skips fsync"
        );
        for i in 0..50u8 {
            put(&store, &format!("k{i}"), &[i]).await;
        }
        // Let the timer flush at least once while the writer is idle.
        tokio::time::sleep(Duration::from_millis(60)).await;
        put(&store, "last", b"x").await;
    }
    assert!(
        !dir.path().join(crate::journal::JOURNAL_FILE).exists(),
        "relaxed mode keeps no journal"
    );
    // Full mode writes a journal of everything the relaxed run stored, so that a
    // machine crash from now on can be recovered from.
    let store = open(&dir, 1);
    let mut scan = crate::journal::Scan::open(&dir.path().join(crate::journal::JOURNAL_FILE))
        .unwrap()
        .expect("full mode writes a journal");
    let mut journaled = 0;
    for record in scan.by_ref() {
        for op in crate::journal::ops(&record.unwrap()).unwrap() {
            if let crate::journal::Op::Events { events, .. } = op {
                journaled += events.len();
            }
        }
    }
    assert_eq!(journaled, 51);
    assert_eq!(store.stats(&space()).await.unwrap().events, 51);
    assert_eq!(
        store.get(&space(), "last").await.unwrap()[0].payload,
        b"x".to_vec()
    );
}

/// Resident bytes of this process's mapping of `file`, from `/proc/self/smaps`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_grows_safely_while_relaxed_flushes_and_size_queries_run() {
    // Relaxed mode's flush thread syncs through the mapping, and `map_size` reads
    // LMDB's meta pages inside it; a resize unmaps it. Both must hold the map's lock:
    // without it this test crashed the process (SIGSEGV in `mdb_env_pick_meta`).
    let config = StoreConfig {
        map_size: 1 << 20,
        durability: Durability::Relaxed {
            flush_every: Duration::ZERO,
        },
        ..StoreConfig::default()
    };
    for round in 0..6u8 {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(&dir, 1, config.clone());
        let polling = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut largest = 0;
                for _ in 0..20_000 {
                    largest = largest.max(store.map_size());
                    tokio::task::yield_now().await;
                }
                largest
            })
        };
        let mut tasks = Vec::new();
        for t in 0..16u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    let payload = vec![round; 2048];
                    s.append(&space(), Write::put(format!("k/{t}/{i}"), payload))
                        .await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(polling.await.unwrap() >= 1 << 20);
        assert!(store.inner.map.grows.load(Ordering::Relaxed) >= 3);
        assert_eq!(store.stats(&space()).await.unwrap().events, 3_200);
        drop(store);
        let report = check(dir.path()).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }
}

/// The `/proc/self/smaps` entries of `file`'s mappings: (Rss in bytes, read-ahead
/// off). The store's map may be split in two (see `prefault::no_readahead_above`).
fn mappings_of(file: &std::path::Path) -> Vec<(u64, bool)> {
    let name = file.to_str().unwrap();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut found = Vec::new();
    let mut current: Option<(u64, bool)> = None;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if head.contains('-') && !head.ends_with(':') {
            found.extend(current.take());
            if line.ends_with(name) {
                current = Some((0, false));
            }
        } else if let Some(entry) = current.as_mut() {
            if let Some(kb) = line.strip_prefix("Rss:") {
                let kb = kb.trim().trim_end_matches("kB").trim();
                entry.0 = kb.parse::<u64>().unwrap() * 1024;
            } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                entry.1 = flags.split_whitespace().any(|f| f == "rr");
            }
        }
    }
    found.extend(current);
    found
}

fn resident_bytes_of(file: &std::path::Path) -> u64 {
    mappings_of(file).iter().map(|m| m.0).sum()
}

/// Waits (at most 10 s) until at least `want` bytes of `file`'s mapping are resident.
async fn wait_resident(file: &std::path::Path, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rss = resident_bytes_of(file);
        if rss >= want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rss} bytes of {} resident, expected {want}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_map_is_faulted_in_ahead_of_the_writer_and_after_it_grows() {
    // Opened and read, a store has nothing populated; once it has written a few
    // pages, the prefault thread keeps 16 MiB past them mapped.
    let (dir, store) = fresh(1);
    let file = dir.path().canonicalize().unwrap().join("data.mdb");
    store.stats(&space()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = resident_bytes_of(&file);
    assert!(idle < 4 << 20, "{idle} bytes resident before any write");
    put(&store, "k", b"v").await;
    wait_resident(&file, 16 << 20).await;
    // The part above what was written when the thread found the map is read without
    // read-ahead, so that its pages come in one by one (single pages to dirty); the
    // part below keeps it.
    let maps = mappings_of(&file);
    assert!(
        maps.iter().any(|m| m.1) && maps.iter().any(|m| !m.1),
        "{maps:?}"
    );
    drop(store);

    // A 1 MiB map is populated whole. After it has grown (a new mapping, nothing
    // resident) the thread finds it again and populates what lies above the
    // high-water mark; a map grows when that mark passes 80% of the old size, 40% of
    // the new one, so more than half of the new map is resident.
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        &dir,
        1,
        StoreConfig {
            map_size: 1 << 20,
            ..StoreConfig::default()
        },
    );
    let file = dir.path().canonicalize().unwrap().join("data.mdb");
    put(&store, "k", b"v").await;
    wait_resident(&file, 1 << 20).await;
    for i in 0..40u32 {
        put(&store, &format!("big/{i}"), &[7; 60 << 10]).await;
    }
    let grown = store.map_size();
    assert!(grown > 1 << 20, "map is {grown}");
    wait_resident(&file, grown as u64 / 2).await;
    assert_eq!(store.stats(&space()).await.unwrap().events, 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_map_grows_from_a_tiny_start_and_every_write_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        map_size: 1 << 20,
        ..StoreConfig::default()
    };
    let store = open_with(&dir, 1, config.clone());
    assert_eq!(store.map_size(), 1 << 20);
    // Concurrent appends make batches of hundreds of 1 KiB events: several batches
    // need more room than the map has left and must be retried after growing it.
    let mut tasks = Vec::new();
    for t in 0..50u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            // Reads run alongside, so resizes have readers to wait for.
            for i in 0..100u32 {
                let payload = vec![(t + i) as u8; 1024];
                s.append(&space(), Write::put(format!("k/{t}/{i}"), payload))
                    .await?;
                if i % 10 == 0 {
                    s.stats(&space()).await?;
                }
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = store.stats(&space()).await.unwrap();
    assert_eq!(stats.events, 5_000);
    assert_eq!(stats.version_vector.get(&store.node_id()), 5_000);
    let all = store.events_since(&space(), 0, usize::MAX).await.unwrap();
    assert_eq!(all.len(), 5_000);
    assert!(all.iter().all(|a| a.event.payload.len() == 1024));
    let got = store.get(&space(), "k/49/99").await.unwrap();
    assert_eq!(got[0].payload, vec![(49 + 99) as u8; 1024]);
    assert!(store.map_size() >= 8 << 20, "map is {}", store.map_size());
    assert!(store.inner.map.grows.load(Ordering::Relaxed) >= 3);

    // Reopened with the tiny configured size, the store maps what its data needs and
    // keeps room to write.
    drop(store);
    let store = open_with(&dir, 1, config);
    assert!(store.map_size() > 5 << 20);
    put(&store, "after", &[1; 1024]).await;
    assert_eq!(store.stats(&space()).await.unwrap().events, 5_001);
}

#[tokio::test]
async fn a_batch_that_overflows_the_map_is_retried_whole_after_growing_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        map_size: 1 << 20,
        ..StoreConfig::default()
    };
    let store = open_with(&dir, 2, config);
    // Drive one batch by hand, so that it is certainly one transaction: 1,500 events
    // of 1 KiB cannot fit in a 1 MiB map.
    let (tx, _rx) = broadcast::channel(16);
    let mut writer = Writer::new(
        store.inner.env.clone(),
        store.inner.tables,
        key(2),
        Hlc::default(),
        2_000,
        tx,
    )
    .unwrap()
    .with_map(store.inner.map.clone());
    let mut answers = Vec::new();
    let mut batch = Vec::new();
    for i in 0..1_500u32 {
        let (reply, answer) = oneshot::channel();
        batch.push(Command::Append {
            space: space(),
            write: Write::put(format!("k{i}"), vec![i as u8; 1024]),
            reply,
        });
        answers.push(answer);
    }
    writer.run_batch(batch);
    let mut lsns = Vec::new();
    for answer in answers {
        lsns.push(answer.await.unwrap().unwrap().lsn);
    }
    assert_eq!(lsns, (1..=1_500).collect::<Vec<u64>>(), "no gap, no repeat");
    assert!(store.inner.map.retries.load(Ordering::Relaxed) >= 1);
    assert!(store.map_size() > 1 << 20);
    let stats = store.stats(&space()).await.unwrap();
    assert_eq!(stats.events, 1_500);
    let events = all_events(&store).await;
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev, Some(pair[0].hash()), "one chain, signed once");
    }
}

#[tokio::test]
async fn a_map_that_may_not_grow_refuses_the_write_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        map_size: 1 << 20,
        max_map_size: 1 << 20,
        max_batch: 1,
        ..StoreConfig::default()
    };
    let store = open_with(&dir, 3, config);
    let mut refused = None;
    for i in 0..2_000u32 {
        match store
            .append(&space(), Write::put(format!("k{i}"), vec![0; 1024]))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = refused.expect("a 1 MiB map took 2 MiB of events");
    assert!(matches!(e, StoreError::StoreFull { .. }), "{e}");
    assert_eq!(store.stats(&space()).await.unwrap().events, u64::from(i));
}

// ---- Reads in every shape ----

fn lsns(page: &EventPage) -> Vec<u64> {
    page.events.iter().map(|a| a.lsn).collect()
}

async fn read(store: &Store, query: EventQuery) -> EventPage {
    store.read_events(&space(), query).await.unwrap()
}

#[tokio::test]
async fn read_events_pages_in_both_directions_with_filters_and_cursors() {
    let (_dir, store) = fresh(1);
    // lsn: 1 a/1 put, 2 b/1 put, 3 a/2 put (kind Renamed), 4 a/1 delete, 5 ab put,
    // 6 b/1 put, 7 a/2 put (kind Renamed)
    put(&store, "a/1", b"1").await;
    put(&store, "b/1", b"2").await;
    let mut renamed = Write::put("a/2", b"3".to_vec());
    renamed.kind = "Renamed".into();
    store.append(&space(), renamed.clone()).await.unwrap();
    store.append(&space(), Write::delete("a/1")).await.unwrap();
    put(&store, "ab", b"5").await;
    put(&store, "b/1", b"6").await;
    store.append(&space(), renamed).await.unwrap();

    // Oldest first, two per page, to the end.
    let mut query = EventQuery {
        limit: 2,
        ..EventQuery::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = read(&store, query.clone()).await;
        seen.extend(lsns(&page));
        if page.at_end {
            assert_eq!(page.next.as_ref().unwrap().as_str(), "c1-a-8");
            break;
        }
        query.start = page.next.unwrap().into();
    }
    assert_eq!(seen, [1, 2, 3, 4, 5, 6, 7]);

    // Latest, ascending: nothing now, and the cursor yields what comes next.
    let tail = read(
        &store,
        EventQuery {
            start: Start::Latest,
            ..EventQuery::default()
        },
    )
    .await;
    assert!(tail.events.is_empty() && tail.at_end);
    put(&store, "c", b"8").await;
    let page = read(
        &store,
        EventQuery {
            start: tail.next.unwrap().into(),
            ..EventQuery::default()
        },
    )
    .await;
    assert_eq!(lsns(&page), [8]);

    // Latest, descending: newest first, to the oldest, then no cursor.
    let page = read(
        &store,
        EventQuery {
            start: Start::Latest,
            limit: 3,
            descending: true,
            ..EventQuery::default()
        },
    )
    .await;
    assert_eq!(lsns(&page), [8, 7, 6]);
    assert!(!page.at_end);
    let rest = read(
        &store,
        EventQuery {
            start: page.next.unwrap().into(),
            limit: 10,
            descending: true,
            ..EventQuery::default()
        },
    )
    .await;
    assert_eq!(lsns(&rest), [5, 4, 3, 2, 1]);
    assert!(rest.at_end && rest.next.is_none());

    // AtLsn is inclusive, AfterLsn exclusive, in either direction.
    let at = |start, descending| EventQuery {
        start,
        limit: 2,
        descending,
        ..EventQuery::default()
    };
    assert_eq!(
        lsns(&read(&store, at(Start::AtLsn(3), false)).await),
        [3, 4]
    );
    assert_eq!(
        lsns(&read(&store, at(Start::AfterLsn(3), false)).await),
        [4, 5]
    );
    assert_eq!(lsns(&read(&store, at(Start::AtLsn(3), true)).await), [3, 2]);
    assert_eq!(
        lsns(&read(&store, at(Start::AfterLsn(3), true)).await),
        [2, 1]
    );
    assert_eq!(
        lsns(&read(&store, at(Start::AtLsn(99), true)).await),
        [8, 7]
    );
    assert!(read(&store, at(Start::AfterLsn(99), false))
        .await
        .events
        .is_empty());

    // A key prefix, merged by lsn across keys ("ab" is under "a", "a/" is not).
    let by_prefix = |prefix: &str, limit| EventQuery {
        key_prefix: Some(prefix.into()),
        limit,
        ..EventQuery::default()
    };
    assert_eq!(lsns(&read(&store, by_prefix("a/", 10)).await), [1, 3, 4, 7]);
    assert_eq!(
        lsns(&read(&store, by_prefix("a", 10)).await),
        [1, 3, 4, 5, 7]
    );
    assert_eq!(lsns(&read(&store, by_prefix("", 3)).await), [1, 2, 3]);
    assert!(read(&store, by_prefix("zzz", 10)).await.at_end);
    let first = read(&store, by_prefix("a/", 3)).await;
    assert_eq!(lsns(&first), [1, 3, 4]);
    let mut q = by_prefix("a/", 3);
    q.start = first.next.unwrap().into();
    let second = read(&store, q).await;
    assert_eq!(lsns(&second), [7]);
    assert!(second.at_end);
    let mut q = by_prefix("a", 2);
    q.descending = true;
    q.start = Start::Latest;
    assert_eq!(lsns(&read(&store, q).await), [7, 5]);

    // Op and kind filters, alone and with a prefix.
    let deletes = read(
        &store,
        EventQuery {
            op: Some(Op::Delete),
            ..EventQuery::default()
        },
    )
    .await;
    assert_eq!(lsns(&deletes), [4]);
    let mut q = by_prefix("a", 10);
    q.kind = Some("Renamed".into());
    assert_eq!(lsns(&read(&store, q).await), [3, 7]);

    // Cursors this store did not hand out are refused with a clear error.
    for (text, descending) in [
        ("garbage", false),
        ("c1-d-3", false),
        ("c1-a-3", true),
        ("c1-a-x", false),
        ("c9-a-3", false),
    ] {
        let q = EventQuery {
            start: Start::Cursor(text.into()),
            descending,
            ..EventQuery::default()
        };
        match store.read_events(&space(), q).await {
            Err(StoreError::BadCursor(msg)) => assert!(msg.contains(text), "{msg}"),
            other => panic!("cursor {text:?} accepted: {other:?}"),
        }
    }
    // Also for a space never written.
    let never = SpaceName::new("never").unwrap();
    let q = EventQuery {
        start: Start::Cursor("nope".into()),
        ..EventQuery::default()
    };
    assert!(matches!(
        store.read_events(&never, q).await,
        Err(StoreError::BadCursor(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rare_filter_is_bounded_by_the_scan_budget_and_continues_by_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        &dir,
        1,
        StoreConfig {
            durability: Durability::relaxed(),
            ..StoreConfig::default()
        },
    );
    let n = SCAN_BUDGET as u64 + 50;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..n - 1).step_by(8) {
                s.append(&space(), Write::put(format!("k{i}"), vec![1]))
                    .await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    store.append(&space(), Write::delete("k0")).await.unwrap();
    let mut query = EventQuery {
        op: Some(Op::Delete),
        ..EventQuery::default()
    };
    let page = read(&store, query.clone()).await;
    assert!(
        page.events.is_empty() && !page.at_end,
        "budget stops the scan"
    );
    query.start = page.next.unwrap().into();
    let page = read(&store, query).await;
    assert_eq!(lsns(&page), [n]);
    assert!(page.at_end);
}

#[tokio::test]
async fn key_history_and_reads_as_of_an_earlier_position() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    for s in [&a, &b] {
        s.configure_space(&space(), multi()).await.unwrap();
    }
    let a1 = put(&a, "doc", b"a1").await; // a: lsn 1
    put(&a, "other", b"x").await; // a: lsn 2
    let b1 = put(&b, "doc", b"b1").await;
    a.ingest(&space(), vec![b1.event.clone()]).await.unwrap(); // a: lsn 3, conflict
    let a2 = put(&a, "doc", b"a2").await; // a: lsn 4, resolves

    let history = a.key_history(&space(), "doc", None, 10).await.unwrap();
    assert_eq!(history.iter().map(|x| x.lsn).collect::<Vec<_>>(), [1, 3, 4]);
    assert_eq!(
        history.iter().map(|x| x.conflict).collect::<Vec<_>>(),
        [false, true, false]
    );
    let later = a.key_history(&space(), "doc", Some(1), 1).await.unwrap();
    assert_eq!(later.iter().map(|x| x.lsn).collect::<Vec<_>>(), [3]);
    assert!(a
        .key_history(&space(), "nope", None, 10)
        .await
        .unwrap()
        .is_empty());

    assert!(a.get_at(&space(), "doc", 0).await.unwrap().is_empty());
    assert_eq!(
        a.get_at(&space(), "doc", 2).await.unwrap(),
        vec![a1.event.clone()]
    );
    let mut both = vec![a1.event.clone(), b1.event.clone()];
    both.sort_by_key(Event::id);
    assert_eq!(a.get_at(&space(), "doc", 3).await.unwrap(), both);
    assert_eq!(
        a.get_at(&space(), "doc", u64::MAX).await.unwrap(),
        a.get(&space(), "doc").await.unwrap()
    );
    assert_eq!(a.get_at(&space(), "doc", 4).await.unwrap(), vec![a2.event]);

    // Merge spaces: the fold as of each position.
    let (_dc, c) = fresh(3);
    c.configure_space(&space(), sum()).await.unwrap();
    add(&c, "n", 1).await;
    add(&c, "m", 100).await;
    add(&c, "n", 2).await;
    c.append(&space(), Write::delete("n")).await.unwrap();
    add(&c, "n", 5).await;
    let sp = space();
    let at = |lsn| c.merged_state_at(&sp, "n", lsn);
    assert_eq!(at(0).await.unwrap(), None);
    assert_eq!(at(1).await.unwrap(), Some(cbor_int(1)));
    assert_eq!(at(2).await.unwrap(), Some(cbor_int(1)));
    assert_eq!(at(3).await.unwrap(), Some(cbor_int(3)));
    assert_eq!(at(4).await.unwrap(), Some(cbor_int(0)));
    assert_eq!(
        at(5).await.unwrap(),
        c.merged_state(&space(), "n").await.unwrap()
    );
    // A resolver space has no merge state.
    assert_eq!(a.merged_state_at(&space(), "doc", 4).await.unwrap(), None);
}

#[test]
fn an_events_id_is_read_from_the_start_of_its_encoding() {
    let k = key(7);
    let origin = NodeId::of(&k);
    for seq in [1, 23, 24, 255, 256, 65_535, 65_536, 1 << 32, u64::MAX] {
        let mut clock = VectorClock::new();
        clock.set(origin, seq);
        let e = UnsignedEvent {
            origin,
            seq,
            clock,
            hlc: Hlc::new(1_000, 0),
            key: "k".into(),
            op: Op::Put,
            kind: String::new(),
            payload: vec![1],
            meta: BTreeMap::new(),
            prev: (seq > 1).then_some(EventHash([3; 32])),
        };
        for e in [e.clone().seal_unsigned(), e.sign(&space(), &k)] {
            assert_eq!(
                tables::id_of_encoding(&e.encode()),
                Some(e.id()),
                "seq {seq}"
            );
        }
    }
    assert_eq!(tables::id_of_encoding(b"not an event"), None);
}

#[test]
fn history_chunks_round_trip_and_refuse_truncation() {
    let records = vec![
        tables::Record {
            lsn: 3,
            others: vec![],
        },
        tables::Record {
            lsn: 9,
            others: vec![4, 7],
        },
        tables::Record {
            lsn: 12,
            others: vec![1],
        },
    ];
    let mut chunk = Vec::new();
    let mut prev = 3;
    for r in &records {
        r.encode_into(prev, &mut chunk).unwrap();
        prev = r.lsn;
    }
    // Plain records are two bytes here, the others one more byte per member.
    assert_eq!(chunk.len(), 2 + 4 + 3);
    assert_eq!(tables::decode_chunk(3, &chunk, "k").unwrap(), records);
    assert_eq!(tables::last_record(3, &chunk, "k").unwrap(), records[2]);
    for cut in [0, 1, 3, chunk.len() - 1] {
        assert!(
            tables::decode_chunk(3, &chunk[..cut], "k").is_err(),
            "{cut}"
        );
        assert!(tables::last_record(3, &chunk[..cut], "k").is_err(), "{cut}");
    }
    // Out of order: a member after the event, a first record off the chunk's lsn.
    let bad = tables::Record {
        lsn: 5,
        others: vec![6],
    };
    assert!(bad.encode_into(3, &mut Vec::new()).is_err());
    let mut off = Vec::new();
    records[1].encode_into(3, &mut off).unwrap();
    assert!(tables::decode_chunk(3, &off, "k").is_err());
    // Long histories and far members take wider varints.
    let far = tables::Record {
        lsn: u64::MAX - 1,
        others: vec![1, 1 << 40],
    };
    let mut wide = Vec::new();
    far.encode_into(u64::MAX - 1, &mut wide).unwrap();
    assert_eq!(
        tables::decode_chunk(u64::MAX - 1, &wide, "k").unwrap(),
        [far]
    );
}

// ---- The offline checker ----

/// A directory with two spaces: a multi-value space with two origins, a conflict and a
/// parked event, and a counter space with merge states. Closed when this returns.
async fn populated() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, 1);
    let (_db, b) = fresh(2);
    let (_dc, c) = fresh(3);
    for s in [&a, &b, &c] {
        s.configure_space(&space(), multi()).await.unwrap();
    }
    put(&a, "doc", b"a").await;
    put(&a, "other", b"x").await;
    let from_b = put(&b, "doc", b"b").await;
    put(&b, "b-only", b"y").await;
    a.ingest(&space(), all_events(&b).await).await.unwrap();
    put(&a, "other", b"z").await;
    assert!(from_b.conflict || a.stats(&space()).await.unwrap().conflicts == 1);
    put(&c, "c", b"1").await;
    let c2 = put(&c, "c", b"2").await;
    assert_eq!(a.ingest(&space(), vec![c2.event]).await.unwrap().parked, 1);

    let counts = SpaceName::new("counts").unwrap();
    a.configure_space(&counts, weft_crdt::PolicyKind::Counter.policy())
        .await
        .unwrap();
    for n in [1, 2, 3] {
        a.append(&counts, Write::put("n", cbor_int(n)))
            .await
            .unwrap();
    }
    a.append(&counts, Write::put("m", cbor_int(7)))
        .await
        .unwrap();
    drop(a);
    dir
}

/// Changes the closed store in `dir` behind its back, in one raw write transaction.
fn tamper(dir: &TempDir, f: impl FnOnce(&Tables, &mut heed::RwTxn)) {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(64 << 20).max_dbs(MAX_DBS);
    let env = unsafe { options.open(dir.path()) }.unwrap();
    let t = Tables::create(&env).unwrap();
    let mut txn = env.write_txn().unwrap();
    f(&t, &mut txn);
    txn.commit().unwrap();
    drop(env);
}

fn violations_of(report: &CheckReport, space: &str) -> Vec<String> {
    report
        .spaces
        .iter()
        .find(|s| s.space == space)
        .map(|s| s.violations.clone())
        .unwrap_or_default()
}

fn sid_of(t: &Tables, txn: &heed::RwTxn, name: &str) -> tables::SpaceId {
    t.space_id(txn, name).unwrap().unwrap()
}

#[tokio::test]
async fn a_clean_store_checks_clean_and_check_changes_nothing() {
    let dir = populated().await;
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let todo = report.spaces.iter().find(|s| s.space == "todo").unwrap();
    assert_eq!(todo.events, 5);
    let counts = report.spaces.iter().find(|s| s.space == "counts").unwrap();
    assert_eq!(counts.events, 4);
    assert!(counts.skipped.is_empty(), "built-in merges are recomputed");
    // The store opens and works as before.
    let store = open(&dir, 1);
    assert_eq!(store.stats(&space()).await.unwrap().pending, 1);
    drop(store);
    // An open store is refused rather than checked under its writer's feet.
    let store = open(&dir, 1);
    assert!(matches!(check(dir.path()), Err(StoreError::AlreadyOpen(_))));
    drop(store);
}

#[tokio::test]
async fn a_missing_by_id_entry_is_named() {
    let dir = populated().await;
    let a = NodeId::of(&key(1));
    tamper(&dir, |t, txn| {
        let sid = sid_of(t, txn, "todo");
        assert!(t.by_id.delete(txn, &tables::id_key(sid, &a, 2)).unwrap());
    });
    let v = violations_of(&check(dir.path()).unwrap(), "todo");
    assert!(
        v.iter()
            .any(|m| m.contains(&format!("event {a}:2 at lsn 2: missing from by_id"))),
        "{v:#?}"
    );
}

#[tokio::test]
async fn a_wrong_version_vector_entry_is_named() {
    let dir = populated().await;
    let b = NodeId::of(&key(2));
    tamper(&dir, |t, txn| {
        let sid = sid_of(t, txn, "todo");
        t.vv.put(txn, &tables::origin_key(sid, &b), &5u64.to_be_bytes())
            .unwrap();
    });
    let v = violations_of(&check(dir.path()).unwrap(), "todo");
    assert!(
        v.iter().any(
            |m| m.contains(&format!("version vector says {b} is at seq 5")) && m.contains("1..=2")
        ),
        "{v:#?}"
    );
}

#[tokio::test]
async fn a_flipped_byte_in_a_stored_event_is_named() {
    let dir = populated().await;
    tamper(&dir, |t, txn| {
        let sid = sid_of(t, txn, "todo");
        let k = tables::event_key(sid, 3);
        let mut bytes = t.events.get(txn, &k).unwrap().unwrap().to_vec();
        // The payload "b" is the last byte string before meta, prev and sig; flip the
        // byte of its value, which keeps the CBOR well-formed.
        let at = bytes.iter().rposition(|&x| x == b'b').unwrap();
        bytes[at] ^= 0x01;
        t.events.put(txn, &k, &bytes).unwrap();
    });
    let v = violations_of(&check(dir.path()).unwrap(), "todo");
    let b = NodeId::of(&key(2));
    let named = |what: &str| {
        v.iter()
            .any(|m| m.contains(&format!("event {b}:1 at lsn 3")) && m.contains(what))
    };
    assert!(named("signature does not verify"), "{v:#?}");
    assert!(named("by_id records another hash"), "{v:#?}");
}

#[tokio::test]
async fn wrong_frontiers_counts_states_and_pending_entries_are_named() {
    let dir = populated().await;
    let c = NodeId::of(&key(3));
    tamper(&dir, |t, txn| {
        let todo = sid_of(t, txn, "todo");
        let counts = sid_of(t, txn, "counts");
        // The last history record of "other" names another event beside it.
        let (first, chunk) = t.chunk_at(txn, todo, b"other", u64::MAX).unwrap().unwrap();
        let mut records = tables::decode_chunk(first, chunk, "other").unwrap();
        records.last_mut().unwrap().others = vec![1];
        let mut wrong = Vec::new();
        let mut prev = first;
        for r in &records {
            r.encode_into(prev, &mut wrong).unwrap();
            prev = r.lsn;
        }
        t.by_key
            .put(txn, &tables::history_key(todo, "other", first), &wrong)
            .unwrap();
        t.space_meta
            .put(
                txn,
                &tables::space_meta_key(todo, tables::SPACE_CONFLICTS),
                &7u64.to_be_bytes(),
            )
            .unwrap();
        t.state
            .put(txn, &tables::record_key(counts, "n"), &cbor_int(99))
            .unwrap();
        // Corrupt the parked event's bytes.
        t.pending
            .put(txn, &tables::id_key(todo, &c, 2), b"garbage")
            .unwrap();
    });
    let report = check(dir.path()).unwrap();
    let v = violations_of(&report, "todo");
    assert!(
        v.iter()
            .any(|m| m.contains("by_key records the frontier") && m.contains("key \"other\"")),
        "{v:#?}"
    );
    assert!(
        v.iter().any(|m| m.contains("conflict count is 7")),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|m| m.contains(&format!("pending event {c}:2"))),
        "{v:#?}"
    );
    let v = violations_of(&report, "counts");
    assert!(
        v.iter().any(|m| m.contains("merge state of key \"n\"")),
        "{v:#?}"
    );
    assert!(!report.is_clean());
}

// ---- Atomic transactions ----

fn five_writes() -> Vec<Write> {
    (0..5u8)
        .map(|i| Write::put(format!("t/{i}"), vec![i]))
        .collect()
}

#[tokio::test]
async fn a_transaction_commits_consecutive_seqs_all_or_nothing() {
    let (_dir, store) = fresh(1);
    put(&store, "before", b"x").await;
    let all = store
        .append_transaction(&space(), five_writes())
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|a| a.event.seq).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6]
    );
    assert_eq!(
        all.iter().map(|a| a.lsn).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6]
    );
    assert!(all
        .iter()
        .all(|a| a.event.meta.get(TXN_META_KEY).map(String::as_str) == Some("2/5")));
    for pair in all.windows(2) {
        assert_eq!(pair[1].event.prev, Some(pair[0].event.hash()));
    }

    // One bad write: nothing stored, no seq used.
    let mut writes = five_writes();
    writes[3] = Write::put("", b"no key".to_vec());
    assert!(matches!(
        store.append_transaction(&space(), writes).await,
        Err(StoreError::Invalid(_))
    ));
    // A write only the writer can refuse (the merge's check) also undoes the others.
    let sums = SpaceName::new("sums").unwrap();
    store.configure_space(&sums, sum()).await.unwrap();
    let writes = vec![
        Write::put("n", cbor_int(1)),
        Write::put("n", b"not a number".to_vec()),
    ];
    assert!(matches!(
        store.append_transaction(&sums, writes).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.stats(&sums).await.unwrap().events, 0);
    assert_eq!(store.merged_state(&sums, "n").await.unwrap(), None);
    let next = put(&store, "after", b"y").await;
    assert_eq!(
        (next.event.seq, next.lsn),
        (7, 7),
        "the failed ones used nothing"
    );

    // Reserved meta keys are refused in user writes.
    let mut w = Write::put("k", b"v".to_vec());
    w.meta.insert("weft.txn".into(), "1/1".into());
    assert!(matches!(
        store.append(&space(), w.clone()).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.append_transaction(&space(), vec![w]).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(store
        .append_transaction(&space(), Vec::new())
        .await
        .unwrap()
        .is_empty());
    assert!(check_after_drop(store).await);
}

async fn check_after_drop(store: Store) -> bool {
    let dir = store.inner.env.path().to_path_buf();
    drop(store);
    let report = check(&dir).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    true
}

#[tokio::test]
async fn a_replica_shows_nothing_of_a_transaction_until_all_of_it_arrives() {
    let (_da, a) = fresh(1);
    let (_db, b) = fresh(2);
    put(&a, "plain", b"0").await;
    a.append_transaction(&space(), five_writes()).await.unwrap();
    put(&a, "after", b"1").await; // depends on the whole transaction
                                  // The store signs only the last event of a transaction, and a batch must end each
                                  // origin's run on a signed event; signed one by one, any piece can travel alone.
    let e = signed_each(&all_events(&a).await, &key(1));
    assert_eq!(e.len(), 7);
    let mut sub = b.subscribe();

    // The plain event and the first two of the transaction.
    let out = b.ingest(&space(), e[..3].to_vec()).await.unwrap();
    assert_eq!((out.applied.len(), out.parked), (1, 2));
    assert!(b.get(&space(), "t/0").await.unwrap().is_empty());
    assert_eq!(b.stats(&space()).await.unwrap().events, 1);
    assert_eq!(
        b.version_vector(&space()).await.unwrap().get(&a.node_id()),
        1
    );
    assert_eq!(sub.recv().await.unwrap().lsn, 1);
    // A pull from b serves none of it.
    let page = b
        .pull_page(&space(), VersionVector::new(), 100, 1 << 20)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);

    // Two more, and the event after it: still nothing.
    let out = b
        .ingest(&space(), vec![e[3].clone(), e[4].clone(), e[6].clone()])
        .await
        .unwrap();
    assert_eq!((out.applied.len(), out.parked), (0, 3));
    assert!(b.get(&space(), "t/3").await.unwrap().is_empty());
    assert_eq!(b.stats(&space()).await.unwrap().pending, 5);

    // The last piece: the whole transaction, and what waited on it, in one ingest
    // (one writer command, so one commit).
    let out = b.ingest(&space(), vec![e[5].clone()]).await.unwrap();
    assert_eq!(
        out.applied.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6, 7]
    );
    assert_eq!(out.parked, 0);
    for i in 0..5u8 {
        assert_eq!(
            b.get(&space(), &format!("t/{i}")).await.unwrap()[0].payload,
            vec![i]
        );
    }
    for lsn in 2..=7 {
        assert_eq!(sub.recv().await.unwrap().lsn, lsn);
    }
    assert_eq!(
        a.digest(&space()).await.unwrap(),
        b.digest(&space()).await.unwrap()
    );

    // Delivered whole, in one batch, it applies at once; a duplicate delivery is
    // counted as such.
    let (_dc, c) = fresh(3);
    let out = c.ingest(&space(), e.clone()).await.unwrap();
    assert_eq!((out.applied.len(), out.parked), (7, 0));
    let out = c.ingest(&space(), e[1..6].to_vec()).await.unwrap();
    assert_eq!((out.applied.len(), out.duplicates), (0, 5));
    assert!(check_after_drop(b).await);
}

/// One origin's chain (from seq 1) with every event signed and re-linked: what an
/// origin that signs each event would have written.
fn signed_each(events: &[Event], k: &SigningKey) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for e in events {
        let mut unsigned = e.clone().into_unsigned();
        unsigned.prev = out.last().map(Event::hash);
        let signed = unsigned.sign(&space(), k);
        out.push(signed);
    }
    out
}

#[tokio::test]
async fn a_malformed_transaction_tag_is_rejected() {
    let (_db, b) = fresh(2);
    let k = key(9);
    let origin = NodeId::of(&k);
    let mut clock = VectorClock::new();
    clock.set(origin, 1);
    let mut meta = BTreeMap::new();
    meta.insert(TXN_META_KEY.to_owned(), "2/1".to_owned()); // does not cover seq 1
    let bad = UnsignedEvent {
        origin,
        seq: 1,
        clock,
        hlc: Hlc::new(1_000, 0),
        key: "k".into(),
        op: Op::Put,
        kind: String::new(),
        payload: vec![1],
        meta,
        prev: None,
    }
    .sign(&space(), &k);
    assert!(matches!(
        b.ingest(&space(), vec![bad]).await,
        Err(StoreError::Rejected { .. })
    ));
    assert_eq!(b.stats(&space()).await.unwrap().pending, 0);
}

// ---- One signature per commit ----

/// Runs `writes` as one batch of appends on a writer driven by hand (so they are
/// certainly one commit) and returns their answers in order.
/// A store without a journal, for tests that drive a second writer by hand: it would
/// commit past the store's journal. Reopened in full mode, the journal is written
/// from what the store holds.
fn open_relaxed(dir: &TempDir, seed: u8) -> Store {
    let config = StoreConfig {
        durability: Durability::relaxed(),
        ..StoreConfig::default()
    };
    Store::open(dir.path(), key(seed), config).unwrap()
}

async fn append_in_one_batch(store: &Store, seed: u8, writes: Vec<Write>) -> Vec<Applied> {
    let (tx, _rx) = broadcast::channel(16);
    let mut writer = Writer::new(
        store.inner.env.clone(),
        store.inner.tables,
        key(seed),
        Hlc::default(),
        writes.len(),
        tx,
    )
    .unwrap();
    run_appends(&mut writer, &space(), writes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

fn signed_seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.sig.is_some())
        .map(|e| e.seq)
        .collect()
}

#[tokio::test]
async fn a_commit_signs_its_last_local_event_and_every_run_limit_th() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_relaxed(&dir, 1);
    let n = 2 * MAX_UNSIGNED_RUN + 88;
    let writes = (0..n)
        .map(|i| Write::put(format!("k{}", i % 7), vec![i as u8]))
        .collect();
    let answers = append_in_one_batch(&store, 1, writes).await;
    let events = all_events(&store).await;
    assert_eq!(events.len(), n);
    let run = MAX_UNSIGNED_RUN as u64;
    assert_eq!(signed_seqs(&events), [run, 2 * run, n as u64]);
    // What the callers got is what is stored, signature included.
    assert_eq!(
        answers.into_iter().map(|a| a.event).collect::<Vec<_>>(),
        events
    );
    // Each unsigned event is vouched for by the chain up to a signature.
    assert!(matches!(
        events[0].verify(&space()),
        Err(EventError::Unsigned(_))
    ));
    weft_crdt::sync::verify_batch(&space(), &events).unwrap();
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev, Some(pair[0].hash()));
    }

    // A lone append is signed; a transaction signs its last event only. (Reopened:
    // the store's own writer did not see the batch driven by hand.)
    drop(store);
    let store = open(&dir, 1);
    let lone = put(&store, "lone", b"x").await;
    assert!(lone.event.verify(&space()).is_ok());
    let txn = store
        .append_transaction(&space(), five_writes())
        .await
        .unwrap();
    let sigs: Vec<bool> = txn.iter().map(|a| a.event.sig.is_some()).collect();
    assert_eq!(sigs, [false, false, false, false, true]);
    let events = all_events(&store).await;
    weft_crdt::sync::verify_batch(&space(), &events).unwrap();
    // A replica takes the whole log in one page, and the offline check agrees.
    let (_db, b) = fresh(2);
    let out = b.ingest(&space(), events.clone()).await.unwrap();
    assert_eq!(out.applied.len(), events.len());
    assert!(check_after_drop(store).await);
    assert!(check_after_drop(b).await);
}

#[tokio::test]
async fn reopening_after_unsigned_runs_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_relaxed(&dir, 1);
        let writes = (0..10)
            .map(|i| Write::put(format!("k{i}"), vec![i]))
            .collect();
        append_in_one_batch(&store, 1, writes).await;
    }
    let store = open(&dir, 1);
    let next = put(&store, "after", b"y").await;
    assert_eq!(next.event.seq, 11);
    let events = all_events(&store).await;
    assert_eq!(signed_seqs(&events), [10, 11]);
    assert_eq!(next.event.prev, Some(events[9].hash()));
    assert!(check_after_drop(store).await);
}

/// `origin`'s event `seq` on key `k`, after `prev`, with `deps` in its clock;
/// signed only when `signed`.
fn remote(
    k: &SigningKey,
    seq: u64,
    prev: Option<&Event>,
    deps: &[(NodeId, u64)],
    signed: bool,
) -> Event {
    let origin = NodeId::of(k);
    let mut clock = VectorClock::new();
    for (o, s) in deps {
        clock.set(*o, *s);
    }
    clock.set(origin, seq);
    let e = UnsignedEvent {
        origin,
        seq,
        clock,
        hlc: Hlc::new(1_000 + seq, 0),
        key: format!("r{seq}"),
        op: Op::Put,
        kind: String::new(),
        payload: vec![seq as u8],
        meta: BTreeMap::new(),
        prev: prev.map(Event::hash),
    };
    if signed {
        e.sign(&space(), k)
    } else {
        e.seal_unsigned()
    }
}

#[tokio::test]
async fn an_unsigned_head_vouched_for_by_a_parked_event_is_accepted_but_not_served() {
    let (dir, b) = fresh(2);
    let x = key(9);
    let y = NodeId::of(&key(8));
    // x1 is ready; x2 waits for y:1, which never comes; x3 signs the run.
    let x1 = remote(&x, 1, None, &[], false);
    let x2 = remote(&x, 2, Some(&x1), &[(y, 1)], false);
    let x3 = remote(&x, 3, Some(&x2), &[(y, 1)], true);
    let out = b.ingest(&space(), vec![x1, x2, x3]).await.unwrap();
    assert_eq!((out.applied.len(), out.parked), (1, 2));
    // A peer could not verify x1 alone, so a pull page leaves it out.
    let page = b
        .pull_page(&space(), VersionVector::new(), 100, 1 << 20)
        .await
        .unwrap();
    assert!(page.events.is_empty(), "{:?}", page.events);
    drop(b);
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:#?}");

    // Without its voucher the same head is reported.
    let xo = NodeId::of(&x);
    tamper(&dir, |t, txn| {
        let sid = sid_of(t, txn, "todo");
        assert!(t.pending.delete(txn, &tables::id_key(sid, &xo, 3)).unwrap());
    });
    let v = violations_of(&check(dir.path()).unwrap(), "todo");
    assert!(
        v.iter()
            .any(|m| m.contains(&format!("pending event {xo}:2 is unsigned"))),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|m| m.contains(&format!("events {xo}:1..=1 are unsigned"))),
        "{v:#?}"
    );
}

/// Rewrites the event at `lsn` of space "todo" with `f` and keeps `by_id`'s hash in
/// step, so that only what `f` broke is wrong.
fn rewrite_event(dir: &TempDir, lsn: u64, f: impl FnOnce(&mut Event)) {
    tamper(dir, |t, txn| {
        let sid = sid_of(t, txn, "todo");
        let k = tables::event_key(sid, lsn);
        let mut event = Event::decode(t.events.get(txn, &k).unwrap().unwrap()).unwrap();
        f(&mut event);
        let bytes = event.encode();
        t.events.put(txn, &k, &bytes).unwrap();
        let entry = tables::IdEntry {
            lsn,
            hash: tables::hash_of_encoding(&bytes),
        };
        t.by_id
            .put(
                txn,
                &tables::id_key(sid, &event.origin, event.seq),
                &entry.to_bytes(),
            )
            .unwrap();
    });
}

#[tokio::test]
async fn unsigned_events_without_a_valid_signature_after_them_are_named() {
    for case in ["head unsigned", "voucher forged"] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_relaxed(&dir, 1);
        let writes = (0..3)
            .map(|i| Write::put(format!("k{i}"), vec![i]))
            .collect();
        append_in_one_batch(&store, 1, writes).await;
        drop(store);
        assert!(check(dir.path()).unwrap().is_clean());
        rewrite_event(&dir, 3, |e| match case {
            "head unsigned" => e.sig = None,
            _ => {
                if let Some(sig) = &mut e.sig {
                    sig[7] ^= 1;
                }
            }
        });
        let a = NodeId::of(&key(1));
        let v = violations_of(&check(dir.path()).unwrap(), "todo");
        assert!(
            v.iter()
                .any(|m| m.contains(&format!("events {a}:1..=3 are unsigned"))),
            "{case}: {v:#?}"
        );
        if case == "voucher forged" {
            assert!(
                v.iter().any(|m| m.contains("signature does not verify")),
                "{case}: {v:#?}"
            );
        }
    }
}

#[tokio::test]
async fn a_partial_transaction_in_the_log_is_named() {
    let (dir, store) = fresh(1);
    let all = store
        .append_transaction(&space(), five_writes()[..3].to_vec())
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    drop(store);
    assert!(check(dir.path()).unwrap().is_clean());
    // Take the last member out of every table, as if the group had been cut short.
    let a = NodeId::of(&key(1));
    tamper(&dir, |t, txn| {
        let sid = sid_of(t, txn, "todo");
        assert!(t.events.delete(txn, &tables::event_key(sid, 3)).unwrap());
        assert!(t.by_id.delete(txn, &tables::id_key(sid, &a, 3)).unwrap());
        assert!(t
            .by_key
            .delete(txn, &tables::history_key(sid, "t/2", 3))
            .unwrap());
        t.vv.put(txn, &tables::origin_key(sid, &a), &2u64.to_be_bytes())
            .unwrap();
    });
    let v = violations_of(&check(dir.path()).unwrap(), "todo");
    assert!(
        v.iter()
            .any(|m| m.contains(&format!("transaction 1/3 of {a} is partial"))),
        "{v:#?}"
    );

    // A group interrupted by an event outside it is named too.
    let (dir, store) = fresh(1);
    store
        .append_transaction(&space(), five_writes()[..2].to_vec())
        .await
        .unwrap();
    drop(store);
    rewrite_event(&dir, 2, |e| {
        e.meta.remove(TXN_META_KEY);
    });
    let v = violations_of(&check(dir.path()).unwrap(), "todo");
    assert!(
        v.iter()
            .any(|m| m.contains(&format!("transaction 1/2 of {a} is partial"))),
        "{v:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_spans_chunks_and_reads_back_whole_in_both_directions() {
    let (dir, a) = fresh(1);
    let (_db, b) = fresh(2);
    // 700 writes of "hot" between others, and every 25th a concurrent one from b, so
    // some records name other frontier members.
    for i in 0..700u32 {
        put(&a, "hot", &i.to_be_bytes()).await;
        put(&a, &format!("cold/{i}"), b"c").await;
        if i % 25 == 0 {
            let from_b = b
                .append(&space(), Write::put("hot", vec![0xb0, i as u8]))
                .await
                .unwrap();
            a.ingest(&space(), vec![from_b.event]).await.unwrap();
        }
    }
    let log = a.events_since(&space(), 0, usize::MAX).await.unwrap();
    let hot: Vec<&Applied> = log.iter().filter(|x| x.event.key == "hot").collect();
    assert!(hot.len() > 700);
    assert!(hot.iter().any(|x| x.conflict), "b's writes were concurrent");

    // The history is in several chunks.
    {
        let txn = a.inner.env.read_txn().unwrap();
        let t = a.inner.tables;
        let sid = t.space_id(&txn, "todo").unwrap().unwrap();
        let chunks = t
            .by_key
            .prefix_iter(&txn, &tables::history_key(sid, "hot", 0)[..4 + 3 + 1])
            .unwrap()
            .count();
        assert!(chunks >= 3, "{chunks} chunks");
    }

    let lsns = |v: &[Applied]| v.iter().map(|x| x.lsn).collect::<Vec<_>>();
    let expected: Vec<u64> = hot.iter().map(|x| x.lsn).collect();
    let history = a
        .key_history(&space(), "hot", None, usize::MAX)
        .await
        .unwrap();
    assert_eq!(lsns(&history), expected);
    assert_eq!(
        history.iter().map(|x| x.conflict).collect::<Vec<_>>(),
        hot.iter().map(|x| x.conflict).collect::<Vec<_>>()
    );
    let middle = expected[expected.len() / 2];
    let tail = a
        .key_history(&space(), "hot", Some(middle), 1000)
        .await
        .unwrap();
    assert_eq!(lsns(&tail), expected[expected.len() / 2 + 1..]);
    for descending in [false, true] {
        let page = read(
            &a,
            EventQuery {
                key_prefix: Some("hot".into()),
                limit: 1000,
                descending,
                start: if descending {
                    Start::Latest
                } else {
                    Start::Oldest
                },
                ..EventQuery::default()
            },
        )
        .await;
        let mut want = expected.clone();
        if descending {
            want.reverse();
        }
        assert_eq!(lsns(&page.events), want, "descending: {descending}");
    }

    // The frontier as of every lsn of the key is what the log recomputes.
    let mut frontier = weft_crdt::Frontier::new();
    for x in &hot {
        frontier.apply(&x.event);
        let at: Vec<_> = a
            .get_at(&space(), "hot", x.lsn)
            .await
            .unwrap()
            .iter()
            .map(Event::id)
            .collect();
        assert_eq!(at, frontier.ids(), "as of lsn {}", x.lsn);
    }
    drop(a);
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:#?}");
}

/// What a machine crash may leave of a full-mode directory: the state file still names
/// the run that had it open, under a boot that is over, and the LMDB file (written
/// without fsync) holds anything: here, garbage.
fn crash_machine(dir: &TempDir) {
    std::fs::write(
        dir.path().join(crate::journal::STATE_FILE),
        "open 00000000-0000-0000-0000-00000000dead\n",
    )
    .unwrap();
    let data = dir.path().join("data.mdb");
    let len = std::fs::metadata(&data).unwrap().len().min(1 << 20);
    std::fs::write(&data, vec![0xA5; len as usize]).unwrap();
}

#[tokio::test]
async fn after_a_machine_crash_the_store_is_rebuilt_from_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (_other_dir, other) = fresh(2);
    let sums = SpaceName::new("sums").unwrap();
    for i in 0..10 {
        put(&other, &format!("r{i}"), b"x").await;
    }
    let remote = all_events(&other).await;
    let (events, stats, digest, total, last_own) = {
        let store = open(&dir, 1);
        store.configure_space(&sums, sum()).await.unwrap();
        for i in 0..300u32 {
            put(&store, &format!("k{}", i % 17), &[i as u8]).await;
        }
        for n in 1..=5 {
            add_to(&store, &sums, "total", n).await;
        }
        store
            .append_transaction(
                &space(),
                vec![
                    Write::put("a", b"1".to_vec()),
                    Write::put("b", b"2".to_vec()),
                ],
            )
            .await
            .unwrap();
        store.ingest(&space(), remote[..4].to_vec()).await.unwrap();
        // A gap: the last four wait in the pending set for 5 and 6.
        let parked = store.ingest(&space(), remote[6..].to_vec()).await.unwrap();
        assert_eq!(parked.parked, 4);
        let last = store
            .events_since(&space(), 0, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .rfind(|a| a.event.origin == store.node_id())
            .unwrap();
        assert!(last.event.seq > 300);
        (
            all_events(&store).await,
            store.stats(&space()).await.unwrap(),
            store.digest(&space()).await.unwrap(),
            store.merged_state(&sums, "total").await.unwrap(),
            last,
        )
    };
    assert_eq!(total, Some(cbor_int(15)));
    crash_machine(&dir);

    let store = open(&dir, 1);
    assert!(dir.path().join("data.mdb.torn").exists());
    assert_eq!(all_events(&store).await, events);
    let now = store.stats(&space()).await.unwrap();
    assert_eq!(
        (now.events, now.pending, now.conflicts),
        (stats.events, stats.pending, stats.conflicts)
    );
    assert_eq!(now.version_vector, stats.version_vector);
    assert_eq!(store.digest(&space()).await.unwrap(), digest);
    // The merge space waits for its merge, then is folded from its whole log.
    store.configure_space(&sums, sum()).await.unwrap();
    assert_eq!(store.merged_state(&sums, "total").await.unwrap(), total);
    add_to(&store, &sums, "total", 1).await;
    assert_eq!(
        store.merged_state(&sums, "total").await.unwrap(),
        Some(cbor_int(16))
    );
    // This node's chain goes on from its old head, and the parked events still
    // complete when their causes arrive.
    let next = put(&store, "after", b"y").await;
    assert_eq!(next.event.seq, last_own.event.seq + 1);
    assert_eq!(next.event.prev, Some(last_own.event.hash()));
    let out = store.ingest(&space(), remote[4..6].to_vec()).await.unwrap();
    assert_eq!(out.applied.len(), 6);
    drop(store);
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // And a second crash rebuilds all of it again, the new writes included.
    let events = {
        let store = open(&dir, 1);
        all_events(&store).await
    };
    crash_machine(&dir);
    let store = open(&dir, 1);
    assert_eq!(all_events(&store).await, events);
}

/// A second writer on `store`'s environment and journal, for driving a batch by hand
/// in full mode. The store's own writer must stay idle while it is used.
fn journaled_writer(store: &Store, dir: &TempDir) -> Writer {
    let journal_path = dir.path().join(journal::JOURNAL_FILE);
    let position = {
        let txn = store.inner.env.read_txn().unwrap();
        let bytes = store
            .inner
            .tables
            .meta
            .get(&txn, tables::META_JOURNAL)
            .unwrap()
            .unwrap();
        journal::Position::from_bytes(bytes).unwrap()
    };
    let j = journal::Journal::open_at(&journal_path, position)
        .unwrap()
        .unwrap();
    let (flush, durable) = journal::Flush::start(&j, 8).unwrap();
    let (tx, _rx) = broadcast::channel(16);
    Writer::new(
        store.inner.env.clone(),
        store.inner.tables,
        key(1),
        Hlc::default(),
        2_000,
        tx,
    )
    .unwrap()
    .with_map(store.inner.map.clone())
    .with_journal(j, flush, durable.written.clone())
}

/// A merge whose `check` accepts the payload `flaky` once and refuses it after: a
/// misbehaving application merge.
#[derive(Debug, Default)]
struct Flaky(std::sync::atomic::AtomicUsize);

impl weft_crdt::Merge for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn check(&self, _op: Op, payload: &[u8]) -> Result<(), weft_crdt::MergeError> {
        if payload == b"flaky" && self.0.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(weft_crdt::MergeError("changed its mind".into()));
        }
        Ok(())
    }
    fn apply(
        &self,
        _state: Option<&[u8]>,
        event: &Event,
    ) -> Result<Vec<u8>, weft_crdt::MergeError> {
        Ok(event.payload.clone())
    }
    fn read(&self, state: &[u8]) -> Result<Option<Vec<u8>>, weft_crdt::MergeError> {
        Ok(Some(state.to_vec()))
    }
}

/// Runs `writes` through `writer` as one batch of appends to `space` and returns
/// each command's answer.
async fn run_appends(
    writer: &mut Writer,
    space: &SpaceName,
    writes: Vec<Write>,
) -> Vec<Result<Applied, StoreError>> {
    let mut answers = Vec::new();
    let mut batch = Vec::new();
    for write in writes {
        let (reply, answer) = oneshot::channel();
        batch.push(Command::Append {
            space: space.clone(),
            write,
            reply,
        });
        answers.push(answer);
    }
    writer.run_batch(batch);
    let mut out = Vec::new();
    for answer in answers {
        out.push(answer.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_sealed_batch_asks_each_merge_check_once_and_leaves_no_hole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 1);
    let flaky = SpaceName::new("flaky").unwrap();
    let policy = Policy::Merge(Arc::new(Flaky::default()));
    store.configure_space(&flaky, policy.clone()).await.unwrap();
    store
        .append(&flaky, Write::put("first", b"0".to_vec()))
        .await
        .unwrap();
    let mut writer = journaled_writer(&store, &dir);
    let (reply, configured) = oneshot::channel();
    writer.run_batch(vec![Command::Configure {
        space: flaky.clone(),
        policy,
        reply,
    }]);
    configured.await.unwrap().unwrap();
    // Sealed and journaled ahead: `flaky` passed its check when it was sealed, and is
    // not asked again when the batch is applied (it would refuse now).
    let writes = [&b"a"[..], b"flaky", b"b"]
        .into_iter()
        .map(|v| Write::put("k", v.to_vec()))
        .collect();
    let results = run_appends(&mut writer, &flaky, writes).await;
    drop(writer);
    let seqs: Vec<u64> = results
        .iter()
        .map(|r| r.as_ref().unwrap().event.seq)
        .collect();
    assert_eq!(seqs, [2, 3, 4], "every sealed write stored, no seq skipped");
    let events = events_of(&store, &flaky).await;
    assert_eq!(events.len(), 4);
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev, Some(pair[0].hash()));
    }
    weft_crdt::sync::verify_batch(&flaky, &events).unwrap();
    drop(store);
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test]
async fn appends_journaled_ahead_of_their_batch_are_rebuilt_exactly_after_a_machine_crash() {
    let dir = tempfile::tempdir().unwrap();
    let other = SpaceName::new("other").unwrap();
    let config = StoreConfig {
        map_size: 1 << 20,
        ..StoreConfig::default()
    };
    let store = open_with(&dir, 1, config.clone());
    put(&store, "first", b"0").await;
    store
        .append(&other, Write::put("first", b"0".to_vec()))
        .await
        .unwrap();
    // One batch driven by hand through a second writer on the same journal (the
    // store's own writer stays idle), so it is certainly one batch: appends to spaces
    // that exist, sealed and journaled before they are applied. 1,500 appends of 1 KiB
    // do not fit in a 1 MiB map: the record is rewound, the map grown, and the batch
    // sealed and journaled again.
    let mut writer = journaled_writer(&store, &dir);
    let mut answers = Vec::new();
    let mut batch = Vec::new();
    for i in 0..1_500u32 {
        let (reply, answer) = oneshot::channel();
        batch.push(Command::Append {
            space: if i % 4 == 0 { other.clone() } else { space() },
            write: Write::put(format!("k{}", i % 13), vec![i as u8; 1024]),
            reply,
        });
        answers.push(answer);
    }
    writer.run_batch(batch);
    let mut applied = Vec::new();
    for answer in answers {
        applied.push(answer.await.unwrap().unwrap());
    }
    drop(writer);
    assert!(store.inner.map.retries.load(Ordering::Relaxed) >= 1);

    let todo = events_of(&store, &space()).await;
    let others = events_of(&store, &other).await;
    assert_eq!((todo.len(), others.len()), (1 + 1_125, 1 + 375));
    // Each space's chain: signed at its first (lone) append, then at every run-limit-th
    // event of the batch and at the batch's last.
    let run = MAX_UNSIGNED_RUN as u64;
    assert_eq!(
        signed_seqs(&todo),
        [1, 1 + run, 1 + 2 * run, 1 + 3 * run, 1 + 4 * run, 1_126]
    );
    assert_eq!(signed_seqs(&others), [1, 1 + run, 376]);
    for (sp, events) in [(space(), &todo), (other.clone(), &others)] {
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
        for pair in events.windows(2) {
            assert_eq!(pair[1].prev, Some(pair[0].hash()));
        }
        weft_crdt::sync::verify_batch(&sp, events).unwrap();
        // What each caller was answered is what is stored, signature included.
        for a in applied.iter().filter(|a| a.space == sp) {
            assert_eq!(&a.event, &events[a.event.seq as usize - 1]);
        }
    }
    drop(store);
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");

    crash_machine(&dir);
    let store = open_with(&dir, 1, config);
    assert!(dir.path().join("data.mdb.torn").exists());
    // Compared whole, signatures included (`assert!`: a failure would print 1,500 KiB).
    assert!(
        events_of(&store, &space()).await == todo,
        "rebuilt log differs"
    );
    assert!(
        events_of(&store, &other).await == others,
        "rebuilt log differs"
    );
    let next = put(&store, "after", b"y").await;
    assert_eq!(next.event.prev, Some(todo[todo.len() - 1].hash()));
    drop(store);
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

async fn add_to(store: &Store, space: &SpaceName, k: &str, n: i64) -> Applied {
    store
        .append(space, Write::put(k, cbor_int(n)))
        .await
        .unwrap()
}

#[tokio::test]
async fn after_a_killed_process_the_journal_past_the_last_commit_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (_other_dir, other) = fresh(2);
    let stranger = put(&other, "s", b"never committed").await.event;
    {
        let store = open(&dir, 1);
        for i in 0..20u8 {
            put(&store, &format!("k{i}"), &[i]).await;
        }
    }
    // A batch written to the journal whose commit never happened: the process died
    // between the two, under this boot.
    let path = dir.path().join(crate::journal::JOURNAL_FILE);
    let mut scan = crate::journal::Scan::open(&path).unwrap().unwrap();
    for record in scan.by_ref() {
        record.unwrap();
    }
    let mut journal = crate::journal::Journal::open_at(&path, scan.at())
        .unwrap()
        .unwrap();
    let bytes = stranger.encode();
    crate::journal::put_events(journal.payload(), "todo", [bytes.as_slice()].into_iter());
    journal.append().unwrap();
    journal.sync().unwrap();
    drop(journal);
    crate::journal::write_state(
        dir.path(),
        &crate::journal::LastRun::Open(crate::journal::boot_id()),
    )
    .unwrap();

    {
        let store = open(&dir, 1);
        assert!(
            !dir.path().join("data.mdb.torn").exists(),
            "the same boot trusts LMDB"
        );
        assert_eq!(store.stats(&space()).await.unwrap().events, 20);
    }
    // Cut from the journal, so a later rebuild does not apply it either.
    crash_machine(&dir);
    let store = open(&dir, 1);
    let events = all_events(&store).await;
    assert_eq!(events.len(), 20);
    assert!(events.iter().all(|e| e.origin == store.node_id()));
}

#[tokio::test]
async fn check_reports_a_journal_that_lacks_what_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir, 1);
        for i in 0..5u8 {
            put(&store, &format!("k{i}"), &[i]).await;
        }
    }
    let report = check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The chain ends after the first record, as if the rest had never been flushed.
    let path = dir.path().join(crate::journal::JOURNAL_FILE);
    let mut scan = crate::journal::Scan::open(&path).unwrap().unwrap();
    scan.next().unwrap().unwrap();
    let end = scan.at().end;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0; 8], end).unwrap();
    let report = check(dir.path()).unwrap();
    let all = report.violations.join("\n");
    assert!(all.contains("valid chain ends at record 1"), "{all}");
    assert!(
        all.contains("4 events of space todo are not in it"),
        "{all}"
    );
}
