//! The embeddable [`Node`]: a store, a network client and the sync loop that joins them.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use weft_crdt::{
    EventId, Merge, NodeId, Op, Policy, PolicyKind, Resolver, SpaceName, VectorClock, VersionVector,
};
use weft_net::{Multiaddr, NetClient, NetConfig, PeerId};
use weft_store::{Applied, Durability, EventPage, EventQuery, Store, StoreConfig, Write};

use crate::error::NodeError;
use crate::identity;
use crate::mode::SpaceMode;
use crate::payload::Payload;
use crate::sync::{self, SyncConfig};
use crate::sync_now::{self, SyncProgress, SyncReport};

/// Configures and starts a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    data_dir: PathBuf,
    spaces: BTreeMap<SpaceName, SpaceMode>,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    mdns: bool,
    policy: Policy,
    space_policies: BTreeMap<SpaceName, Policy>,
    api: Option<SocketAddr>,
    sync: SyncConfig,
    store: StoreConfig,
}

impl NodeBuilder {
    /// A node keeping its log and identity in `data_dir`, hosting the `default` space,
    /// listening on every interface on a free TCP port, with mDNS on and
    /// last-writer-wins.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeBuilder {
            data_dir: data_dir.into(),
            spaces: BTreeMap::new(),
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            policy: PolicyKind::Lww.policy(),
            space_policies: BTreeMap::new(),
            api: None,
            sync: SyncConfig::default(),
            store: StoreConfig::default(),
        }
    }

    /// Hosts `space` (repeatable), in [`SpaceMode::Full`] unless
    /// [`NodeBuilder::space_mode`] gives it another mode. With no space named, the node
    /// hosts `default`.
    pub fn space(mut self, space: SpaceName) -> Self {
        self.spaces.entry(space).or_default();
        self
    }

    /// Hosts `space` in `mode`: full (the default), pull-only (a read replica that
    /// refuses local writes) or push-only (a source that takes nothing in). See
    /// [`SpaceMode`].
    pub fn space_mode(mut self, space: SpaceName, mode: SpaceMode) -> Self {
        self.spaces.insert(space, mode);
        self
    }

    /// Listens on `addr` (repeatable). Default `/ip4/0.0.0.0/tcp/0`.
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Dials `addr` at start (repeatable).
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.bootstrap.push(addr);
        self
    }

    /// Turns LAN discovery by mDNS on or off (default on).
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    /// Chooses a built-in policy (resolver or mergeable value type) for every space
    /// without one of its own (default last-writer-wins).
    pub fn resolver(mut self, kind: PolicyKind) -> Self {
        self.policy = kind.policy();
        self
    }

    /// Uses an application's own resolver for every space without a policy of its own.
    pub fn custom_resolver(mut self, resolver: Arc<dyn Resolver>) -> Self {
        self.policy = Policy::Resolve(resolver);
        self
    }

    /// Uses an application's own merge function for every space without a policy of
    /// its own.
    pub fn merge(mut self, merge: Arc<dyn Merge>) -> Self {
        self.policy = Policy::Merge(merge);
        self
    }

    /// Hosts `space` with its own policy. A space keeps the policy it was created with:
    /// starting on a data directory that recorded another one is refused.
    pub fn space_policy(mut self, space: SpaceName, policy: Policy) -> Self {
        self.spaces.entry(space.clone()).or_default();
        self.space_policies.insert(space, policy);
        self
    }

    /// Serves the HTTP API on `addr` (port 0 picks a free port; see
    /// [`Node::api_addr`]). Without it the node serves no HTTP.
    pub fn api(mut self, addr: SocketAddr) -> Self {
        self.api = Some(addr);
        self
    }

    /// How commits reach the disk (default [`Durability::Full`]: every acknowledged
    /// write is fsynced first).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.store.durability = durability;
        self
    }

    /// How often the node pulls from a random peer even when gossip shows no gap
    /// (anti-entropy). Default 15 s, with up to 25% jitter.
    pub fn anti_entropy_interval(mut self, every: Duration) -> Self {
        self.sync.anti_entropy = every;
        self
    }

    /// Whether the node pulls by itself: on every new connection, when a peer
    /// subscribes to a space, when gossip shows a gap, and periodically (default on).
    /// Off, it pulls only in [`Node::sync_now`]; it still serves pulls, and still
    /// takes gossip from peers a pull exchange (either way) has shown to share its
    /// policy, but a gap that gossip reveals waits for the next sync.
    pub fn auto_pull(mut self, on: bool) -> Self {
        self.sync.auto_pull = on;
        self
    }

    /// The longest [`Node::sync_now`] waits for its pulls (default 5 minutes); pulls
    /// still running then go on in the background.
    pub fn sync_timeout(mut self, bound: Duration) -> Self {
        self.sync.sync_timeout = bound;
        self
    }

    /// Opens the store, starts the network and the sync loop, and (if configured) the
    /// HTTP API.
    pub async fn start(self) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            NodeError::io(
                format!("creating data directory {}", self.data_dir.display()),
                e,
            )
        })?;
        let lock = identity::lock_data_dir(&self.data_dir)?;
        let key = identity::load_or_create(&self.data_dir)?;
        let modes: BTreeMap<SpaceName, SpaceMode> = if self.spaces.is_empty() {
            [(SpaceName::default_space(), SpaceMode::Full)].into()
        } else {
            self.spaces
        };
        let store = Store::open(&self.data_dir.join("log"), key.clone(), self.store)?;
        let mut policies = BTreeMap::new();
        for space in modes.keys() {
            let policy = self
                .space_policies
                .get(space)
                .cloned()
                .unwrap_or_else(|| self.policy.clone());
            store.configure_space(space, policy.clone()).await?;
            policies.insert(space.clone(), policy);
        }

        let mut net_config = NetConfig::new(key);
        if !self.listen.is_empty() {
            net_config.listen = self.listen;
        }
        net_config.bootstrap = self.bootstrap;
        net_config.mdns = self.mdns;
        // Every hosted space is subscribed, push-only ones too: gossipsub publishes only
        // to topics the node subscribes to, and the sync loop ignores their incoming
        // gossip.
        net_config.spaces = modes.keys().cloned().collect();
        let (net, net_events) = weft_net::start(net_config)?;
        let mut listen = net.wait_listening(Duration::from_secs(10)).await?;
        // An unspecified address (0.0.0.0) is reported once per interface, one event at a
        // time: wait until the set stops growing so every address is known before the
        // node announces itself. Bounded: at most 40 polls of 25 ms.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let now = net.listen_addrs().await?;
            if now.len() == listen.len() {
                break;
            }
            listen = now;
        }
        tracing::debug!(?listen, "network listening");

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        // Subscribed before the node takes any write, so every local commit reaches
        // the publisher, in commit order.
        let applied_rx = store.subscribe();
        let inner = Arc::new(Inner {
            node_id: store.node_id(),
            store,
            net,
            policies,
            modes,
            sync_config: self.sync.clone(),
            peer_spaces: Default::default(),
            shutdown: shutdown_tx,
            tasks: std::sync::Mutex::new(Vec::new()),
            api_addr: std::sync::Mutex::new(None),
            _lock: lock,
        });
        let node = Node { inner };
        let loop_task = tokio::spawn(sync::run(
            node.clone(),
            net_events,
            applied_rx,
            shutdown_rx.clone(),
            self.sync,
        ));
        node.track(loop_task);
        if let Some(addr) = self.api {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| NodeError::io(format!("binding the HTTP API on {addr}"), e))?;
            let bound = listener
                .local_addr()
                .map_err(|e| NodeError::io("reading the HTTP API address", e))?;
            *lock_unpoisoned(&node.inner.api_addr) = Some(bound);
            let api_task = tokio::spawn(crate::api::serve(node.clone(), listener, shutdown_rx));
            node.track(api_task);
        }
        Ok(node)
    }
}

fn lock_unpoisoned<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Inner {
    pub(crate) node_id: NodeId,
    pub(crate) store: Store,
    pub(crate) net: NetClient,
    pub(crate) policies: BTreeMap<SpaceName, Policy>,
    /// The mode of every hosted space (the same keys as `policies`).
    pub(crate) modes: BTreeMap<SpaceName, SpaceMode>,
    pub(crate) sync_config: SyncConfig,
    pub(crate) peer_spaces: sync::InFlight,
    shutdown: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    api_addr: std::sync::Mutex<Option<SocketAddr>>,
    // Held for the node's life: dropping it releases the data directory.
    _lock: File,
}

/// A running weft node. Cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

/// A write as the HTTP API and embedding applications express it.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// The record.
    pub key: String,
    /// Put or delete.
    pub op: Op,
    /// The value; must be `None` for a delete and `Some` for a put.
    pub value: Option<Payload>,
    /// The application's event type (may be empty).
    pub kind: String,
    /// Audit data.
    pub meta: BTreeMap<String, String>,
}

/// The acknowledgement of a durable local write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Written {
    /// The new event's id.
    #[serde(serialize_with = "display")]
    pub id: EventId,
    /// Its local position.
    pub lsn: u64,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// What a key reads as.
#[derive(Debug, Clone)]
pub struct Record {
    /// The key.
    pub key: String,
    /// The resolved value.
    pub value: Payload,
    /// For a conflict the resolver leaves open (multi-value), every concurrent value;
    /// otherwise empty.
    pub siblings: Vec<Payload>,
    /// The merged clock of the key's frontier: the history this value reflects.
    pub clock: VectorClock,
    /// The ids of the frontier events.
    pub frontier: Vec<EventId>,
}

/// A notification that a key has concurrent values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The space.
    pub space: SpaceName,
    /// The key in conflict.
    pub key: String,
    /// The event whose application made (or extended) the conflict.
    pub event: EventId,
    /// Its local position.
    pub lsn: u64,
}

/// A snapshot of a node for `weft status` and `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// The node's peer id (its NodeId).
    pub peer_id: String,
    /// Addresses the node listens on.
    pub listen: Vec<String>,
    /// Per hosted space.
    pub spaces: BTreeMap<String, SpaceStatus>,
    /// Connected peers.
    pub peers: Vec<String>,
    /// Per peer and space, the last sync exchange: the peer's version vector as it then
    /// stood, how many events each side lacked, and how long ago it was.
    pub peer_sync: BTreeMap<String, BTreeMap<String, PeerSyncStatus>>,
    /// What the node has exchanged with all peers since it started.
    pub traffic: TrafficStatus,
}

/// Counters of a node's network traffic since it started, over all peers and spaces
/// (the operator's view of [`Node::traffic`]).
#[derive(Debug, Clone, Serialize)]
pub struct TrafficStatus {
    /// Bytes read from peers' TCP connections, framing and encryption included.
    pub bytes_in: u64,
    /// Bytes written to peers' TCP connections.
    pub bytes_out: u64,
    /// TCP connections opened, inbound and outbound.
    pub connections: u64,
    /// Gossip messages this node published, and the events in them.
    pub gossip_messages_sent: u64,
    /// Events in the gossip messages this node published.
    pub gossip_events_sent: u64,
    /// Gossip messages received (decoded, on a hosted space's topic).
    pub gossip_messages_received: u64,
    /// Events in the gossip messages received.
    pub gossip_events_received: u64,
    /// Pull requests this node sent.
    pub pulls_sent: u64,
    /// Events received in answer to them.
    pub events_pulled: u64,
    /// Pull requests from peers this node answered.
    pub pulls_served: u64,
    /// Events in the pages it sent them.
    pub events_served: u64,
}

impl From<weft_net::Traffic> for TrafficStatus {
    fn from(t: weft_net::Traffic) -> Self {
        TrafficStatus {
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            connections: t.connections,
            gossip_messages_sent: t.gossip_messages_sent,
            gossip_events_sent: t.gossip_events_sent,
            gossip_messages_received: t.gossip_messages_received,
            gossip_events_received: t.gossip_events_received,
            pulls_sent: t.pulls_sent,
            events_pulled: t.events_pulled,
            pulls_served: t.pulls_served,
            events_served: t.events_served,
        }
    }
}

/// What a node knows of one peer's replica of a space.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSyncStatus {
    /// The peer's version vector at the last exchange.
    pub version_vector: BTreeMap<String, u64>,
    /// Events the peer had that this node lacked (this node is behind by).
    pub behind: u64,
    /// Events this node has that the peer lacked (this node is ahead by).
    pub ahead: u64,
    /// Milliseconds since that exchange.
    pub last_sync_ms_ago: u64,
}

/// Per-space status.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceStatus {
    /// Origin (peer id) -> highest contiguous seq applied.
    pub version_vector: BTreeMap<String, u64>,
    /// Events applied.
    pub events: u64,
    /// Events waiting for their causal dependencies.
    pub pending: u64,
    /// Local position of the latest applied event.
    pub last_lsn: u64,
    /// Keys whose frontier holds concurrent events.
    pub conflicts: u64,
    /// How this node replicates the space: `full`, `pull-only` or `push-only`.
    pub mode: SpaceMode,
    /// The space's conflict policy, as `name/version`.
    pub resolver: String,
    /// Hex blake3 digest of the version vector and the resolved state: equal on two
    /// replicas exactly when they hold the same events.
    pub digest: String,
    /// Peers this node refuses to exchange the space with because they use another
    /// policy for it: peer id -> their policy.
    pub incompatible_peers: BTreeMap<String, String>,
}

pub(crate) fn clock_json(clock: &VectorClock) -> BTreeMap<String, u64> {
    clock.iter().map(|(o, s)| (o.to_string(), s)).collect()
}

pub(crate) fn vv_json(vv: &VersionVector) -> BTreeMap<String, u64> {
    clock_json(vv.as_clock())
}

impl Node {
    fn track(&self, task: JoinHandle<()>) {
        lock_unpoisoned(&self.inner.tasks).push(task);
    }

    /// This node's id (the same key as its libp2p PeerId).
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// This node's libp2p PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.net.local_peer_id()
    }

    /// The address the HTTP API is bound to, if it was configured.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        *lock_unpoisoned(&self.inner.api_addr)
    }

    /// The spaces this node hosts.
    pub fn spaces(&self) -> impl Iterator<Item = &SpaceName> {
        self.inner.policies.keys()
    }

    /// The conflict policy of a hosted space.
    pub fn policy(&self, space: &SpaceName) -> Option<&Policy> {
        self.inner.policies.get(space)
    }

    /// The mode of a hosted space.
    pub fn space_mode(&self, space: &SpaceName) -> Option<SpaceMode> {
        self.inner.modes.get(space).copied()
    }

    /// The addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        Ok(self.inner.net.listen_addrs().await?)
    }

    /// Connects to a peer now (in addition to bootstrap and mDNS).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        Ok(self.inner.net.dial(addr).await?)
    }

    pub(crate) fn check_space(&self, space: &SpaceName) -> Result<&Policy, NodeError> {
        self.inner
            .policies
            .get(space)
            .ok_or_else(|| NodeError::UnknownSpace(space.clone()))
    }

    /// Refuses writes to a space that is not hosted or is pull-only here.
    fn check_writable(&self, space: &SpaceName) -> Result<(), NodeError> {
        self.check_space(space)?;
        match self.space_mode(space) {
            Some(mode) if !mode.takes_local_writes() => {
                Err(NodeError::ReadOnlySpace(space.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Appends a write; returns once it is durable. It is gossiped to peers right after.
    pub async fn write(&self, space: &SpaceName, req: WriteRequest) -> Result<Written, NodeError> {
        self.check_writable(space)?;
        let applied = self
            .inner
            .store
            .append(space, to_store_write(req)?)
            .await
            .map_err(store_error)?;
        // The sync loop gossips it from the store's commit feed; the write is durable
        // and acknowledged whatever happens to gossip, since peers that miss it pull it.
        Ok(Written {
            id: applied.event.id(),
            lsn: applied.lsn,
        })
    }

    /// Puts a serde value (stored as CBOR) under `key`.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        space: &SpaceName,
        key: &str,
        value: &T,
    ) -> Result<Written, NodeError> {
        self.write(
            space,
            WriteRequest {
                key: key.to_owned(),
                op: Op::Put,
                value: Some(Payload::encode(value)?),
                kind: String::new(),
                meta: BTreeMap::new(),
            },
        )
        .await
    }

    /// Deletes `key` (writes a tombstone).
    pub async fn delete(&self, space: &SpaceName, key: &str) -> Result<Written, NodeError> {
        self.write(
            space,
            WriteRequest {
                key: key.to_owned(),
                op: Op::Delete,
                value: None,
                kind: String::new(),
                meta: BTreeMap::new(),
            },
        )
        .await
    }

    /// Reads `key` as the space's resolver decides; `None` when it has no value (never
    /// written, or deleted).
    pub async fn get(&self, space: &SpaceName, key: &str) -> Result<Option<Record>, NodeError> {
        let policy = self.check_space(space)?;
        let frontier = self
            .inner
            .store
            .get(space, key)
            .await
            .map_err(store_error)?;
        let state = match (policy, frontier.is_empty()) {
            (Policy::Merge(_), false) => self
                .inner
                .store
                .merged_state(space, key)
                .await
                .map_err(store_error)?,
            _ => None,
        };
        resolve(policy, key, frontier, state)
    }

    /// Reads `key` as it stood on this node right after local position `lsn` was
    /// applied (time travel); `None` when it had no value then.
    pub async fn get_at(
        &self,
        space: &SpaceName,
        key: &str,
        lsn: u64,
    ) -> Result<Option<Record>, NodeError> {
        let policy = self.check_space(space)?;
        let store = &self.inner.store;
        let frontier = store.get_at(space, key, lsn).await.map_err(store_error)?;
        let state = match (policy, frontier.is_empty()) {
            (Policy::Merge(_), false) => store
                .merged_state_at(space, key, lsn)
                .await
                .map_err(store_error)?,
            _ => None,
        };
        resolve(policy, key, frontier, state)
    }

    /// Appends several writes as one transaction: all of them or none become durable,
    /// with consecutive seqs, and no reader on any replica ever sees part of them.
    pub async fn transact(
        &self,
        space: &SpaceName,
        writes: Vec<WriteRequest>,
    ) -> Result<Vec<Written>, NodeError> {
        self.check_writable(space)?;
        if writes.is_empty() {
            return Err(NodeError::Invalid(
                "a transaction needs at least one write".into(),
            ));
        }
        let writes = writes
            .into_iter()
            .map(to_store_write)
            .collect::<Result<Vec<_>, _>>()?;
        let applied = self
            .inner
            .store
            .append_transaction(space, writes)
            .await
            .map_err(store_error)?;
        let written = applied
            .iter()
            .map(|a| Written {
                id: a.event.id(),
                lsn: a.lsn,
            })
            .collect();
        Ok(written)
    }

    /// Reads the log in any shape: from the oldest or latest position, at or after an
    /// lsn, or from a cursor; filtered by key prefix, op and kind; paginated.
    pub async fn read_events(
        &self,
        space: &SpaceName,
        query: EventQuery,
    ) -> Result<EventPage, NodeError> {
        self.check_space(space)?;
        self.inner
            .store
            .read_events(space, query)
            .await
            .map_err(store_error)
    }

    /// Every event of one key, in local order, after local position `after`.
    pub async fn key_history(
        &self,
        space: &SpaceName,
        key: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Applied>, NodeError> {
        self.check_space(space)?;
        self.inner
            .store
            .key_history(space, key, after, limit)
            .await
            .map_err(store_error)
    }

    /// Applied events with local position after `after`, oldest first, at most `limit`.
    pub async fn events_since(
        &self,
        space: &SpaceName,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Applied>, NodeError> {
        self.check_space(space)?;
        self.inner
            .store
            .events_since(space, after, limit)
            .await
            .map_err(store_error)
    }

    /// Every conflict from now on in `space`: an applied event that left its key with
    /// several concurrent events in its frontier. Reads show the siblings (multi-value)
    /// or the resolver's pick.
    pub fn conflicts(&self, space: &SpaceName) -> impl Stream<Item = Conflict> + Send + 'static {
        let space = space.clone();
        BroadcastStream::new(self.inner.store.subscribe()).filter_map(move |r| match r {
            Ok(a) if a.space == space && a.conflict => Some(Conflict {
                space: a.space.clone(),
                key: a.event.key.clone(),
                event: a.event.id(),
                lsn: a.lsn,
            }),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("conflict subscriber lagged: {e}");
                None
            }
        })
    }

    /// Every event applied from now on in `space` (local writes and replicated ones),
    /// in local order. A subscriber that falls far behind skips ahead; it can re-read
    /// what it missed with [`Node::events_since`].
    pub fn subscribe(
        &self,
        space: &SpaceName,
    ) -> impl Stream<Item = Arc<Applied>> + Send + 'static {
        let space = space.clone();
        BroadcastStream::new(self.inner.store.subscribe()).filter_map(move |r| match r {
            Ok(a) if a.space == space => Some(a),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("subscriber lagged: {e}");
                None
            }
        })
    }

    /// The version vector of a space.
    pub async fn version_vector(&self, space: &SpaceName) -> Result<VersionVector, NodeError> {
        self.check_space(space)?;
        self.inner
            .store
            .version_vector(space)
            .await
            .map_err(store_error)
    }

    fn incompatible_peers(&self, space: &SpaceName) -> BTreeMap<String, String> {
        lock_unpoisoned(&self.inner.peer_spaces)
            .incompatible
            .iter()
            .filter(|((_, s), _)| s == space)
            .map(|((p, _), policy)| (p.to_string(), policy.to_string()))
            .collect()
    }

    /// Node id, listen addresses, peers and per-space counts.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let mut spaces = BTreeMap::new();
        let mut version_vectors = BTreeMap::new();
        for (s, policy) in &self.inner.policies {
            let st = self.inner.store.stats(s).await.map_err(store_error)?;
            let digest = self.inner.store.digest(s).await.map_err(store_error)?;
            spaces.insert(
                s.to_string(),
                SpaceStatus {
                    version_vector: vv_json(&st.version_vector),
                    events: st.events,
                    pending: st.pending,
                    last_lsn: st.last_lsn,
                    conflicts: st.conflicts,
                    mode: self.space_mode(s).unwrap_or_default(),
                    resolver: policy.identity().to_string(),
                    digest: digest.iter().map(|b| format!("{b:02x}")).collect(),
                    incompatible_peers: self.incompatible_peers(s),
                },
            );
            version_vectors.insert(s.clone(), st.version_vector);
        }
        let listen = self
            .inner
            .net
            .listen_addrs()
            .await?
            .iter()
            .map(|a| a.to_string())
            .collect();
        let peers = self
            .inner
            .net
            .connected_peers()
            .await?
            .iter()
            .map(|p| p.to_string())
            .collect();
        let seen: Vec<_> = lock_unpoisoned(&self.inner.peer_spaces)
            .seen
            .iter()
            .map(|((p, s), v)| (*p, s.clone(), v.clone()))
            .collect();
        let mut peer_sync: BTreeMap<String, BTreeMap<String, PeerSyncStatus>> = BTreeMap::new();
        for (peer, space, sync) in seen {
            // Only hosted spaces are ever pulled, so the lookup always succeeds.
            let Some(mine) = version_vectors.get(&space) else {
                continue;
            };
            let lag = sync::events_lacking;
            peer_sync.entry(peer.to_string()).or_default().insert(
                space.to_string(),
                PeerSyncStatus {
                    version_vector: vv_json(&sync.version_vector),
                    behind: lag(&sync.version_vector, mine),
                    ahead: lag(mine, &sync.version_vector),
                    last_sync_ms_ago: sync.last_sync.elapsed().map_or(0, |d| d.as_millis() as u64),
                },
            );
        }
        Ok(NodeStatus {
            peer_id: self.inner.node_id.to_string(),
            listen,
            spaces,
            peers,
            peer_sync,
            traffic: self.traffic().into(),
        })
    }

    /// Pulls every hosted space that takes events in (full and pull-only) from every
    /// connected peer now, waits until each pull is done (within the bound of
    /// [`NodeBuilder::sync_timeout`]) and reports, per peer and space, what was pulled
    /// and pushed. A pull of the same peer and space that is already running is
    /// joined, not repeated. Failures of single exchanges are in the report; the call
    /// fails only when the node cannot run a sync at all.
    pub async fn sync_now(&self) -> Result<SyncReport, NodeError> {
        sync_now::sync_now(self, &mut |_: &SyncProgress| {}).await
    }

    /// [`Node::sync_now`], calling `on_progress` as events arrive (at least once a
    /// second while the sync runs, and once at the end) with the events applied so far
    /// and the total the peers' version vectors lead it to expect.
    pub async fn sync_now_with_progress(
        &self,
        mut on_progress: impl FnMut(&SyncProgress) + Send,
    ) -> Result<SyncReport, NodeError> {
        sync_now::sync_now(self, &mut on_progress).await
    }

    /// Stops the sync loop and the HTTP API and waits for them. Writes already
    /// acknowledged are durable; the store closes when the last handle is dropped.
    pub async fn shutdown(self) {
        let _ = self.inner.shutdown.send(true);
        let tasks = std::mem::take(&mut *lock_unpoisoned(&self.inner.tasks));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    /// What this node has sent and received over the network since it started: bytes
    /// on the wire, per protocol, and gossip and pull counts (see [`weft_net::Traffic`]).
    pub fn traffic(&self) -> weft_net::Traffic {
        self.inner.net.traffic()
    }
}

fn to_store_write(req: WriteRequest) -> Result<Write, NodeError> {
    let payload = match (req.op, req.value) {
        (Op::Put, Some(p)) => p.0,
        (Op::Put, None) => return Err(NodeError::Invalid("a put needs a value".into())),
        (Op::Delete, None) => Vec::new(),
        (Op::Delete, Some(_)) => return Err(NodeError::Invalid("a delete takes no value".into())),
    };
    Ok(Write {
        key: req.key,
        op: req.op,
        kind: req.kind,
        payload,
        meta: req.meta,
    })
}

/// What a key reads as, from its frontier (and merge state), by the space's policy.
fn resolve(
    policy: &Policy,
    key: &str,
    frontier: Vec<weft_crdt::Event>,
    state: Option<Vec<u8>>,
) -> Result<Option<Record>, NodeError> {
    if frontier.is_empty() {
        return Ok(None);
    }
    let mut clock = VectorClock::new();
    for e in &frontier {
        clock.merge(&e.clock);
    }
    let (value, siblings) = match policy {
        Policy::Resolve(resolver) => {
            let refs: Vec<_> = frontier.iter().collect();
            let resolution = resolver.resolve(&refs);
            let Some(winner) = resolution.value else {
                return Ok(None);
            };
            (
                Payload(winner.payload.clone()),
                resolution
                    .siblings
                    .iter()
                    .map(|e| Payload(e.payload.clone()))
                    .collect(),
            )
        }
        Policy::Merge(merge) => {
            let Some(state) = state else {
                return Ok(None);
            };
            match merge.read(&state) {
                Ok(Some(v)) => (Payload(v), Vec::new()),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(NodeError::Invalid(format!(
                        "the stored state of {key:?} cannot be read by the {} merge: {e}",
                        merge.name()
                    )))
                }
            }
        }
    };
    Ok(Some(Record {
        key: key.to_owned(),
        value,
        siblings,
        clock,
        frontier: frontier.iter().map(|e| e.id()).collect(),
    }))
}

/// Store errors caused by the caller's input become [`NodeError::Invalid`], so the API
/// answers them with a 4xx.
pub(crate) fn store_error(e: weft_store::StoreError) -> NodeError {
    match e {
        weft_store::StoreError::Invalid(reason) => NodeError::Invalid(reason.to_string()),
        e @ weft_store::StoreError::BadCursor(_) => NodeError::Invalid(e.to_string()),
        other => NodeError::Store(other),
    }
}
