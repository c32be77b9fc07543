//! The HTTP API (JSON in and out), as DESIGN.md gives it. Served on loopback by default.
//!
//! Every handler validates its whole input before it touches the store, so a bad
//! request gets a 4xx with `{"error": "..."}` and leaves nothing behind.
//!
//! `POST /sync` runs [`Node::sync_now`] and answers 200 with the JSON
//! [`crate::SyncReport`]. With `?progress=1` it streams NDJSON instead
//! (`application/x-ndjson`): a `{"progress": {..}}` line at least once a second while
//! the sync runs, then one last line, `{"report": {..}}` or `{"error": "..."}`.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_crdt::{Op, SpaceName};
use weft_store::{Applied, EventQuery, Start};

use crate::error::NodeError;
use crate::node::{clock_json, Node, WriteRequest};
use crate::payload::Payload;

/// Most events one `GET /spaces/{space}/events` returns.
pub const MAX_EVENTS_PER_PAGE: usize = 1_000;
const DEFAULT_EVENTS_PER_PAGE: usize = 100;

/// A JSON error answer.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
            NodeError::UnknownSpace(_) => StatusCode::NOT_FOUND,
            NodeError::ReadOnlySpace(_) => StatusCode::FORBIDDEN,
            NodeError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!("API request failed: {e}");
        }
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(r.status(), format!("bad JSON body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", r.body_text()),
        )
    }
}

fn space(name: String) -> Result<SpaceName, ApiError> {
    SpaceName::new(name).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Builds the router for `node`.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/spaces/{space}/events", post(post_event).get(list_events))
        .route("/spaces/{space}/transactions", post(post_transaction))
        .route("/spaces/{space}/keys/{*key}", get(get_key))
        .route("/spaces/{space}/history/{*key}", get(key_history))
        .route("/status", get(status))
        .route("/sync", post(sync))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(node)
}

/// Serves the API on `listener` until `shutdown` turns true.
pub async fn serve(node: Node, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let app = router(node);
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("HTTP API stopped: {e}");
    }
}

/// Distinguishes `"value": null` (a JSON null value) from a missing `value`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostEvent {
    key: String,
    #[serde(default)]
    op: Option<String>,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

impl PostEvent {
    fn into_write(self) -> Result<WriteRequest, ApiError> {
        let op = match self.op.as_deref() {
            None | Some("put") => Op::Put,
            Some("delete") => Op::Delete,
            Some(other) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown op {other:?}: use \"put\" or \"delete\""),
                ))
            }
        };
        let value = self.value.as_ref().map(Payload::encode).transpose()?;
        Ok(WriteRequest {
            key: self.key,
            op,
            value,
            kind: self.kind,
            meta: self.meta,
        })
    }
}

async fn post_event(
    State(node): State<Node>,
    Path(name): Path<String>,
    body: Result<Json<PostEvent>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let space = space(name)?;
    let Json(body) = body?;
    let written = node.write(&space, body.into_write()?).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": written.id.to_string(), "lsn": written.lsn })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostTransaction {
    writes: Vec<PostEvent>,
}

async fn post_transaction(
    State(node): State<Node>,
    Path(name): Path<String>,
    body: Result<Json<PostTransaction>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let space = space(name)?;
    let Json(body) = body?;
    let writes = body
        .writes
        .into_iter()
        .map(PostEvent::into_write)
        .collect::<Result<Vec<_>, _>>()?;
    let written = node.transact(&space, writes).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "events": written
                .iter()
                .map(|w| json!({ "id": w.id.to_string(), "lsn": w.lsn }))
                .collect::<Vec<_>>(),
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    #[serde(default)]
    at: Option<u64>,
}

async fn get_key(
    State(node): State<Node>,
    Path((name, key)): Path<(String, String)>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let space = space(name)?;
    let Query(q) = query?;
    let record = match q.at {
        Some(lsn) => node.get_at(&space, &key, lsn).await?,
        None => node.get(&space, &key).await?,
    };
    match record {
        Some(r) => Ok(Json(json!({
            "key": r.key,
            "value": r.value.to_json(),
            "siblings": r.siblings.iter().map(Payload::to_json).collect::<Vec<_>>(),
            "clock": clock_json(&r.clock),
        }))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("key {key:?} has no value in space {space}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Events after this lsn (the cursor of DESIGN.md's API).
    #[serde(default)]
    since: Option<u64>,
    /// `oldest` | `latest` | an lsn to start at (inclusive).
    #[serde(default)]
    start: Option<String>,
    /// Events strictly after this lsn in the direction of the read.
    #[serde(default)]
    after: Option<u64>,
    /// Resume from a page's `cursor`.
    #[serde(default)]
    cursor: Option<String>,
    /// Only keys starting with this.
    #[serde(default)]
    prefix: Option<String>,
    /// `put` | `delete`.
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// `asc` (default) | `desc`.
    #[serde(default)]
    order: Option<String>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

impl EventsQuery {
    fn into_query(self) -> Result<EventQuery, ApiError> {
        let given = [
            self.since.is_some(),
            self.start.is_some(),
            self.after.is_some(),
            self.cursor.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(bad("give at most one of since, start, after and cursor"));
        }
        let descending = match self.order.as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(o) => return Err(bad(format!("order must be asc or desc, not {o:?}"))),
        };
        let start = if let Some(c) = self.cursor {
            Start::Cursor(c)
        } else if let Some(lsn) = self.since.or(self.after) {
            Start::AfterLsn(lsn)
        } else {
            match self.start.as_deref() {
                // Newest first reads from the newest event unless told otherwise.
                None if descending => Start::Latest,
                None | Some("oldest") => Start::Oldest,
                Some("latest") => Start::Latest,
                Some(n) => Start::AtLsn(n.parse().map_err(|_| {
                    bad(format!("start must be oldest, latest or an lsn, not {n:?}"))
                })?),
            }
        };
        let op = match self.op.as_deref() {
            None => None,
            Some("put") => Some(Op::Put),
            Some("delete") => Some(Op::Delete),
            Some(o) => return Err(bad(format!("op must be put or delete, not {o:?}"))),
        };
        let limit = self.limit.unwrap_or(DEFAULT_EVENTS_PER_PAGE);
        if limit == 0 || limit > MAX_EVENTS_PER_PAGE {
            return Err(bad(format!(
                "limit must be between 1 and {MAX_EVENTS_PER_PAGE}"
            )));
        }
        Ok(EventQuery {
            start,
            key_prefix: self.prefix,
            op,
            kind: self.kind,
            limit,
            descending,
        })
    }
}

/// The JSON form of an applied event, shared by the API and `weft log`.
pub(crate) fn event_json(a: &Applied) -> Value {
    let e = &a.event;
    json!({
        "lsn": a.lsn,
        "id": e.id().to_string(),
        "origin": e.origin.to_string(),
        "seq": e.seq,
        "key": e.key,
        "op": e.op.as_str(),
        "kind": e.kind,
        "value": match e.op { Op::Put => Payload(e.payload.clone()).to_json(), Op::Delete => Value::Null },
        "meta": e.meta,
        "hlc": e.hlc.0,
    })
}

async fn list_events(
    State(node): State<Node>,
    Path(name): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let space = space(name)?;
    let Query(q) = query?;
    let since = q.since.or(q.after).unwrap_or(0);
    let page = node.read_events(&space, q.into_query()?).await?;
    let next = page.events.last().map_or(since, |a| a.lsn);
    Ok(Json(json!({
        "events": page.events.iter().map(event_json).collect::<Vec<_>>(),
        "next": next,
        "cursor": page.next.as_ref().map(|c| c.as_str().to_owned()),
        "at_end": page.at_end,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn key_history(
    State(node): State<Node>,
    Path((name, key)): Path<(String, String)>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let space = space(name)?;
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS_PER_PAGE);
    if limit == 0 || limit > MAX_EVENTS_PER_PAGE {
        return Err(bad(format!(
            "limit must be between 1 and {MAX_EVENTS_PER_PAGE}"
        )));
    }
    let events = node.key_history(&space, &key, q.after, limit).await?;
    let next = events.last().map_or(q.after.unwrap_or(0), |a| a.lsn);
    Ok(Json(json!({
        "key": key,
        "events": events.iter().map(event_json).collect::<Vec<_>>(),
        "next": next,
    })))
}

async fn status(State(node): State<Node>) -> Result<Json<Value>, ApiError> {
    let st = node.status().await?;
    serde_json::to_value(st)
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Progress lines that may wait for a slow streaming client; past that, progress
/// lines are dropped (the next one supersedes them), never the final line.
const PROGRESS_LINES_BUFFERED: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncQuery {
    /// `1`/`true`: stream NDJSON progress lines before the report.
    #[serde(default)]
    progress: Option<String>,
}

fn ndjson_line(v: &Value) -> String {
    let mut line = v.to_string();
    line.push('\n');
    line
}

async fn sync(
    State(node): State<Node>,
    query: Result<Query<SyncQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let stream = match q.progress.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => return Err(bad(format!("progress must be 1 or 0, not {other:?}"))),
    };
    if !stream {
        let report = node.sync_now().await?;
        return serde_json::to_value(report)
            .map(|v| Json(v).into_response())
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    }
    let (lines, rx) = mpsc::channel::<Result<String, Infallible>>(PROGRESS_LINES_BUFFERED);
    let progress_lines = lines.clone();
    // The sync runs to its end even if the client goes away: its pulls are useful, and
    // it is bounded by the node's sync timeout.
    tokio::spawn(async move {
        let result = node
            .sync_now_with_progress(move |p| {
                let _ = progress_lines.try_send(Ok(ndjson_line(&json!({ "progress": p }))));
            })
            .await;
        let last = match result {
            Ok(report) => json!({ "report": report }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        let _ = lines.send(Ok(ndjson_line(&last))).await;
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
}
