//! What a connection task reports through: its state (to the status board,
//! hence the retained status and `/status`), its events, and its records
//! (to the buffer's outlet, the one hand-off, docs/guarantees.md); and the
//! synchronous counter of its intake loss.

use std::sync::Arc;

use crate::buffer::{Outlet, ProfileState, Submission, TagMark};
use crate::record::{EventType, NewRecord};
use crate::status::{ConnState, DropReason, StatusBoard, Subscriptions};

/// What a connection task uses to report: its state (to the board, hence the
/// retained status, and as a `connection.status_changed` event filtered by
/// the connection's `events` list) and its records.
#[derive(Clone)]
pub struct ConnectionReporter {
    id: String,
    board: Arc<StatusBoard>,
    outlet: Outlet,
    events: Arc<Vec<EventType>>,
}

impl ConnectionReporter {
    pub fn new(id: &str, board: Arc<StatusBoard>, outlet: Outlet, events: Vec<EventType>) -> Self {
        board.register_connection(id);
        ConnectionReporter {
            id: id.to_string(),
            board,
            outlet,
            events: Arc::new(events),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The subscriptions this connection's session set up.
    pub fn set_subscriptions(&self, wanted: usize, created: usize) {
        self.board
            .set_subscriptions(&self.id, Subscriptions { wanted, created });
    }

    /// A handle the OPC UA callback uses to count values it could not pass on.
    pub fn intake_loss(&self) -> IntakeLoss {
        IntakeLoss {
            board: self.board.clone(),
            connection: Arc::from(self.id.as_str()),
        }
    }

    pub fn wants_event(&self, event: EventType) -> bool {
        self.events.contains(&event)
    }

    /// Records a state change; emits `connection.status_changed` if it is one.
    pub async fn set_state(&self, state: ConnState, reason: &str) {
        let Some(previous) = self.board.set_connection_state(&self.id, state, reason) else {
            return;
        };
        if previous == state {
            return;
        }
        tracing::info!(connection = %self.id, state = state.as_str(), previous = previous.as_str(), reason, "connection state changed");
        if self.wants_event(EventType::ConnectionStatusChanged) {
            let ev = NewRecord::event(
                &self.id,
                EventType::ConnectionStatusChanged,
                serde_json::json!({"state": state.as_str(), "previous": previous.as_str(), "reason": reason}),
            );
            self.send(Submission::records(vec![ev])).await;
        }
    }

    /// Emits an event about this connection if its `events` list wants it.
    pub async fn event(&self, event: EventType, details: serde_json::Value) {
        if self.wants_event(event) {
            let ev = NewRecord::event(&self.id, event, details);
            self.send(Submission::records(vec![ev])).await;
        }
    }

    /// A `system.error` event about this connection (e.g. a node that went
    /// missing), subject to the connection's `events` list like every event
    /// about the connection.
    pub async fn system_error(&self, details: serde_json::Value) {
        self.event(EventType::SystemError, details).await;
    }

    /// An event about the agent itself (connection `null`, agent stream),
    /// not filtered by this connection's `events` list: used for things the
    /// connections share, such as the OPC UA application certificate.
    pub async fn agent_event(&self, event: EventType, details: serde_json::Value) {
        let ev = NewRecord::event("", event, details);
        self.send(Submission::records(vec![ev])).await;
    }

    /// Hands records to the buffer. Waits when the buffer is behind
    /// (back-pressure), never drops.
    pub async fn records(&self, records: Vec<NewRecord>) {
        if !records.is_empty() {
            self.send(Submission::records(records)).await;
        }
    }

    /// Hands records with what commits with them: the profile snapshot (if
    /// any) and the tags' backfill marks (docs/backfill.md). Nothing is
    /// sent when all three are empty.
    pub async fn submit(
        &self,
        records: Vec<NewRecord>,
        snapshot: Option<String>,
        marks: Vec<TagMark>,
    ) {
        if records.is_empty() && snapshot.is_none() && marks.is_empty() {
            return;
        }
        let state = snapshot.map(|snapshot| ProfileState {
            connection: self.id.clone(),
            snapshot,
        });
        self.send(Submission::with_marks(records, state, marks))
            .await;
    }

    /// Changes this connection's backfill figures in `/status`.
    pub fn backfill_status(&self, change: impl FnOnce(&mut crate::status::BackfillStatus)) {
        self.board.backfill(&self.id, change);
    }

    async fn send(&self, submission: Submission) {
        if self.outlet.submit(submission).await.is_err() {
            // Only during shutdown: the buffer is closed.
            tracing::debug!(connection = %self.id, "buffer closed; nothing more is handed over");
        }
    }
}

/// Counts one connection's intake loss (docs/guarantees.md); see
/// [`StatusBoard::add_dropped`]. Cheap to clone and synchronous.
#[derive(Clone)]
pub struct IntakeLoss {
    board: Arc<StatusBoard>,
    connection: Arc<str>,
}

impl IntakeLoss {
    pub fn record(&self, reason: DropReason, count: u64, sample_tag: Option<&str>) {
        self.board
            .add_dropped(&self.connection, reason, count, sample_tag);
    }
}
