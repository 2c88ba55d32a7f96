//! The intake-loss announcer (docs/guarantees.md): turns the drops counted on the
//! status board into throttled `source.dropped` events.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::buffer::BufferHandle;
use crate::record::{EventType, NewRecord};
use crate::status::StatusBoard;

/// How often intake loss is announced.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// Announces intake loss (docs/guarantees.md): every `ANNOUNCE_EVERY`, one
/// `source.dropped` event per connection and reason that lost values since
/// the last one, with the count and a sample of tag names. Events are
/// appended straight to the buffer (not through the sources' queue); when
/// the buffer refuses them, the counts wait for the next round.
pub async fn run(board: Arc<StatusBoard>, buffer: BufferHandle, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        board.beat("announcer");
        let reports = board.take_drop_reports();
        if !reports.is_empty() {
            // Connections whose `events` leave `source.dropped` out (a
            // reload may change them).
            let quiet: HashSet<String> = board
                .connections()
                .into_iter()
                .filter(|(_, c)| !c.announces_drops)
                .map(|(id, _)| id)
                .collect();
            let mut events = Vec::new();
            for r in &reports {
                tracing::warn!(connection = %r.connection, reason = r.reason.as_str(), count = r.count, samples = ?r.samples, "values lost at the intake");
                // A connection's `events` list filters events about it;
                // the agent's own records always announce.
                if r.connection.is_empty() || !quiet.contains(&r.connection) {
                    events.push(NewRecord::event(
                        &r.connection,
                        EventType::SourceDropped,
                        serde_json::json!({
                            "reason": r.reason.as_str(),
                            "count": r.count,
                            "samples": r.samples,
                        }),
                    ));
                }
            }
            if !events.is_empty() {
                if let Err(e) = buffer.append(events).await {
                    tracing::warn!(error = %e, "could not record source.dropped; retrying with the next report");
                    board.restore_drop_reports(reports);
                }
            }
        }
        if stopping {
            return;
        }
    }
}
