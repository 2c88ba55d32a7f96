//! The session side of backfill (docs/backfill.md): one task per session
//! that reads the gaps the driver asks for with HistoryRead (raw,
//! unmodified), in bounded rounds, and hands each round's values to the
//! driver through the connection's feed, waiting until the driver has
//! passed them to the buffer before it reads more. So a long gap never
//! floods memory or the buffer's queue, and live values keep flowing in
//! between rounds.
//!
//! A round asks for at most [`NODES_PER_READ`] nodes and [`VALUES_PER_NODE`]
//! values per node, over the span of the gaps it covers (each node's values
//! outside its own gap are dropped here). A node with more goes on with its
//! continuation point. What a misbehaving server does is counted and never
//! stalls the connection:
//! - a node without history (its AccessLevel lacks HistoryRead, or the read
//!   returns a Bad status such as `BadHistoryOperationUnsupported`) ends its
//!   gap as "without history";
//! - a service the server does not have ends every gap of the round so;
//! - `BadContinuationPointInvalid`: the node is read again from the last
//!   value taken, without the continuation point;
//! - more values than asked: the first ones are taken, the rest counted and
//!   read again from the last value taken (the continuation point released).
//!
//! Continuation points belong to the session: when the session ends, the
//! server frees them with it.

use std::sync::Arc;
use std::time::Duration;

use opcua::client::{HistoryReadAction, Session};
use opcua::types::{
    AttributeId, ByteString, DataValue, ExtensionObject, HistoryData, HistoryReadResult,
    HistoryReadValueId, NamespaceMap, NodeId, ReadRawModifiedDetails, ReadValueId, StatusCode,
    TimestampsToReturn, Variant,
};
use tokio::sync::{mpsc, oneshot};

use super::marks::Gap;
use super::round::{Chunk, End, Round, Work, WorkTx};
use crate::nodeid::NodeRef;
use crate::source::feed::{Feed, FeedTx};
use crate::source::session::{self, AbortOnDrop};
use crate::source::value;

/// Nodes per HistoryRead request.
pub(crate) const NODES_PER_READ: usize = 20;
/// Values asked per node and request: with [`NODES_PER_READ`], at most
/// 10 000 values (a few MB) are held per round.
pub(crate) const VALUES_PER_NODE: u32 = 500;
/// How long the reader lets gap requests gather before its first round:
/// a session's first values arrive over its first publish responses, and
/// one round for many tags beats many rounds for one.
const SETTLE: Duration = Duration::from_millis(300);

/// Starts the reader of one session. It ends when the session's guard
/// is dropped, or when the driver is gone.
pub(crate) fn spawn(
    session: Arc<Session>,
    namespaces: NamespaceMap,
    connection: Arc<str>,
    feed: FeedTx,
) -> (WorkTx, AbortOnDrop) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = Reader {
        session,
        namespaces,
        connection,
        feed,
    };
    let task = tokio::spawn(reader.run(rx));
    (tx, AbortOnDrop::new(task))
}

struct Reader {
    session: Arc<Session>,
    namespaces: NamespaceMap,
    connection: Arc<str>,
    feed: FeedTx,
}

/// The round could not be done on this session (it failed, or the driver is
/// gone): the reader ends; the driver asks again on the next session.
struct SessionGone;

/// One node of a round.
struct Node {
    work: Work,
    id: NodeId,
    cp: ByteString,
    /// The newest value taken for the gap so far.
    progress: i64,
}

impl Reader {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Work>) {
        let mut queue: Vec<Work> = Vec::new();
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(w) => queue.push(w),
                    None => return,
                }
                tokio::time::sleep(SETTLE).await;
            }
            while let Ok(w) = rx.try_recv() {
                queue.push(w);
            }
            // Neighbours in time share a round: its span stays short.
            queue.sort_by_key(|w| w.gap.from_ms);
            let take = queue.len().min(NODES_PER_READ);
            let batch: Vec<Work> = queue.drain(..take).collect();
            match self.read(batch).await {
                Ok(again) => queue.extend(again),
                Err(SessionGone) => return,
            }
        }
    }

    /// Reads `batch` to the end (or until a node must be read again, which
    /// it returns).
    async fn read(&self, batch: Vec<Work>) -> Result<Vec<Work>, SessionGone> {
        let mut first = Vec::new();
        let mut nodes = Vec::new();
        for work in batch {
            match NodeRef::parse(&work.tag.node)
                .map_err(|_| StatusCode::BadNodeIdInvalid)
                .and_then(|r| session::resolve(&r, &self.namespaces))
            {
                Ok(id) => nodes.push(Node {
                    progress: work.gap.from_ms,
                    work,
                    id,
                    cp: ByteString::null(),
                }),
                Err(status) => first.push(ended(work, End::NoHistory(status_text(status)))),
            }
        }
        let (mut nodes, without) = self.with_history(nodes).await?;
        first.extend(without);
        if nodes.is_empty() {
            return self.hand_over(first).await.map(|()| Vec::new());
        }
        let details = ReadRawModifiedDetails {
            is_read_modified: false,
            start_time: datetime(nodes.iter().map(|n| n.work.gap.from_ms).min().unwrap_or(0)),
            end_time: datetime(nodes.iter().map(|n| n.work.gap.to_ms).max().unwrap_or(0)),
            num_values_per_node: VALUES_PER_NODE,
            return_bounds: false,
        };
        let envelope = (
            nodes.iter().map(|n| n.work.gap.from_ms).min().unwrap_or(0),
            nodes.iter().map(|n| n.work.gap.to_ms).max().unwrap_or(0),
        );
        let mut again = Vec::new();
        let mut chunks = first;
        while !nodes.is_empty() {
            let ids: Vec<HistoryReadValueId> = nodes
                .iter()
                .map(|n| HistoryReadValueId {
                    node_id: n.id.clone(),
                    continuation_point: n.cp.clone(),
                    ..Default::default()
                })
                .collect();
            let results = match self.history_read(&details, &ids, false).await {
                Ok(results) => results,
                Err(status) if lost(status) => return Err(SessionGone),
                Err(status) => {
                    // The service itself is refused: no node has history here.
                    let why = status_text(status);
                    chunks.extend(
                        nodes
                            .drain(..)
                            .map(|n| ended(n.work, End::NoHistory(why.clone()))),
                    );
                    break;
                }
            };
            let mut next = Vec::new();
            let mut release = Vec::new();
            let mut results = results.into_iter();
            for mut node in nodes.drain(..) {
                // A result missing from the response reads as the node's Bad.
                let result = results.next().unwrap_or_else(|| HistoryReadResult {
                    status_code: StatusCode::BadUnexpectedError,
                    ..Default::default()
                });
                match self.take(&mut node, result, envelope) {
                    Step::Continue(chunk) => {
                        chunks.push(chunk);
                        next.push(node);
                    }
                    Step::Ended(chunk, cp) => {
                        chunks.push(chunk);
                        release.extend(releasing(&node, cp));
                    }
                    Step::Again(chunk, cp) => {
                        chunks.push(chunk);
                        release.extend(releasing(&node, cp));
                        let gap = Gap {
                            from_ms: node.progress,
                            to_ms: node.work.gap.to_ms,
                        };
                        again.push(Work {
                            tag: node.work.tag,
                            gap,
                        });
                    }
                }
            }
            if !release.is_empty() {
                // Best effort: the session frees them at its end anyway.
                let _ = self.history_read(&details, &release, true).await;
            }
            nodes = next;
            self.hand_over(std::mem::take(&mut chunks)).await?;
        }
        self.hand_over(chunks).await?;
        Ok(again)
    }

    /// Splits off the nodes whose AccessLevel says they keep no history (a
    /// server may answer HistoryRead for them with an empty Good, which
    /// would hide that nothing can be read back).
    async fn with_history(&self, nodes: Vec<Node>) -> Result<(Vec<Node>, Vec<Chunk>), SessionGone> {
        let ids: Vec<ReadValueId> = nodes
            .iter()
            .map(|n| ReadValueId {
                node_id: n.id.clone(),
                attribute_id: AttributeId::AccessLevel as u32,
                ..Default::default()
            })
            .collect();
        let read = tokio::time::timeout(
            session::REQUEST_TIMEOUT,
            self.session.read(&ids, TimestampsToReturn::Neither, 0.0),
        )
        .await;
        let levels = match read {
            Ok(Ok(values)) => values,
            Ok(Err(e)) if lost(e.status()) => return Err(SessionGone),
            Err(_) => return Err(SessionGone),
            // Cannot tell: let HistoryRead answer for each node.
            Ok(Err(_)) => Vec::new(),
        };
        let mut keep = Vec::new();
        let mut without = Vec::new();
        for (i, node) in nodes.into_iter().enumerate() {
            let level = levels.get(i).and_then(|dv| match dv.value {
                Some(Variant::Byte(b)) if dv.status().is_good() => Some(b),
                _ => None,
            });
            match level {
                Some(b) if b & ACCESS_HISTORY_READ == 0 => {
                    without.push(ended(
                        node.work,
                        End::NoHistory("no history (AccessLevel)".into()),
                    ));
                }
                _ => keep.push(node),
            }
        }
        Ok((keep, without))
    }

    async fn history_read(
        &self,
        details: &ReadRawModifiedDetails,
        ids: &[HistoryReadValueId],
        release: bool,
    ) -> Result<Vec<HistoryReadResult>, StatusCode> {
        let call = self.session.history_read(
            HistoryReadAction::ReadRawModifiedDetails(details.clone()),
            TimestampsToReturn::Both,
            release,
            ids,
        );
        match tokio::time::timeout(session::REQUEST_TIMEOUT, call).await {
            Ok(r) => r.map_err(|e| e.status()),
            Err(_) => Err(StatusCode::BadTimeout),
        }
    }

    /// What one node's result gives.
    fn take(&self, node: &mut Node, result: HistoryReadResult, envelope: (i64, i64)) -> Step {
        let status = result.status_code;
        let mut chunk = Chunk {
            tag: node.work.tag.clone(),
            to_ms: node.work.gap.to_ms,
            records: Vec::new(),
            end: End::More,
            skipped: 0,
            restarted: false,
        };
        if status == StatusCode::BadContinuationPointInvalid {
            chunk.restarted = true;
            return Step::Again(chunk, ByteString::null());
        }
        if status == StatusCode::BadNoData {
            // Historized, nothing in the span.
            chunk.end = End::Done;
            return Step::Ended(chunk, ByteString::null());
        }
        if status.is_bad() {
            chunk.end = End::NoHistory(status_text(status));
            return Step::Ended(chunk, ByteString::null());
        }
        let values: Vec<DataValue> =
            ExtensionObject::into_inner_as::<HistoryData>(result.history_data)
                .and_then(|d| d.data_values)
                .unwrap_or_default();
        let asked = VALUES_PER_NODE as usize;
        let over = values.len().saturating_sub(asked);
        chunk.skipped += over as u64;
        let gap = node.work.gap;
        let mut beyond = false;
        for dv in values.iter().take(asked) {
            let ts = value::value_ts_ms(dv);
            if ts < envelope.0 || ts > envelope.1 {
                // Not asked for at all.
                chunk.skipped += 1;
                beyond |= ts > envelope.1;
                continue;
            }
            if ts >= gap.to_ms {
                // The subscription delivered this one; the rest is later still.
                beyond = true;
                continue;
            }
            if ts <= gap.from_ms {
                // Before this tag's own gap (the round spans several).
                continue;
            }
            if ts <= node.progress {
                // Repeated, or out of order: never emitted twice.
                chunk.skipped += 1;
                continue;
            }
            node.progress = ts;
            chunk
                .records
                .push(value::backfill_record(&self.connection, &node.work.tag, dv));
        }
        let cp = result.continuation_point;
        if over > 0 {
            return Step::Again(chunk, cp);
        }
        if beyond || cp.is_null_or_empty() {
            chunk.end = End::Done;
            return Step::Ended(chunk, cp);
        }
        node.cp = cp;
        Step::Continue(chunk)
    }

    /// Gives the driver a round's chunks and waits until it has handed
    /// them to the buffer.
    async fn hand_over(&self, chunks: Vec<Chunk>) -> Result<(), SessionGone> {
        if chunks.is_empty() {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.feed
            .send(Feed::Backfill(Round { chunks, ack }))
            .map_err(|_| SessionGone)?;
        done.await.map_err(|_| SessionGone)
    }
}

/// What a node does after a round.
enum Step {
    /// Read on with its continuation point.
    Continue(Chunk),
    /// Its gap is done (or cannot be read); a continuation point left
    /// over is released.
    Ended(Chunk, ByteString),
    /// Read again from its progress, as new work; the continuation point
    /// (if any) is released.
    Again(Chunk, ByteString),
}

/// The continuation point of `node` to release, if there is one.
fn releasing(node: &Node, cp: ByteString) -> Option<HistoryReadValueId> {
    (!cp.is_null_or_empty()).then(|| HistoryReadValueId {
        node_id: node.id.clone(),
        continuation_point: cp,
        ..Default::default()
    })
}

const ACCESS_HISTORY_READ: u8 = 4;

fn ended(work: Work, end: End) -> Chunk {
    Chunk {
        tag: work.tag,
        to_ms: work.gap.to_ms,
        records: Vec::new(),
        end,
        skipped: 0,
        restarted: false,
    }
}

/// The session is gone (or not answering): a status of the channel, not of
/// the history.
fn lost(status: StatusCode) -> bool {
    use opcua::types::SubStatusCode as S;
    matches!(
        status.sub_code(),
        S::BadTimeout
            | S::BadConnectionClosed
            | S::BadSessionClosed
            | S::BadSessionIdInvalid
            | S::BadSecureChannelClosed
            | S::BadNotConnected
            | S::BadCommunicationError
            | S::BadServerNotConnected
            | S::BadRequestTimeout
    )
}

fn status_text(status: StatusCode) -> String {
    value::status_name(status)
}

/// Milliseconds since the Unix epoch as an OPC UA DateTime.
fn datetime(ts_ms: i64) -> opcua::types::DateTime {
    match chrono::DateTime::from_timestamp_millis(ts_ms) {
        Some(dt) => opcua::types::DateTime::from(dt),
        None => opcua::types::DateTime::null(),
    }
}
