//! The ingest: the one task that commits what the connections hand over to
//! the buffer (docs/guarantees.md). It coalesces queued batches into few, large
//! transactions, and when the buffer refuses (a lock another process holds,
//! a stalled disk) it holds the batch and retries, so back-pressure reaches
//! the sources before anything is dropped; what is dropped is counted.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::{BufferHandle, ProfileState, Refused};
use crate::record::{EventType, NewRecord};
use crate::status::{Batch, DropReason, StatusBoard};

/// Records merged into one append.
const INGEST_BATCH: usize = 10_000;
/// A buffer refusing appends for longer than this is announced by a
/// `system.error` when it takes them again.
const BLOCKED_WORTH_AN_EVENT: Duration = Duration::from_secs(2);

/// Commits what sources hand over. While one commit runs, further batches
/// queue up and go into the next transaction together (few, large commits).
pub async fn run(
    rx: Arc<Mutex<mpsc::Receiver<Batch>>>,
    buffer: BufferHandle,
    board: Arc<StatusBoard>,
    abort: CancellationToken,
) {
    // Held for the whole run; a restarted ingest takes it over.
    let mut rx = rx.lock().await;
    loop {
        // Beat while idle too: a silent ingest then means a commit that
        // hangs (a wedged disk), which the watchdog and /healthz must see.
        board.beat("ingest");
        let first = match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(_) => continue,
        };
        let mut records = first.records;
        let mut states: Vec<ProfileState> = first.state.into_iter().collect();
        while records.len() < INGEST_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    records.extend(more.records);
                    // Later snapshots of a connection supersede earlier
                    // ones; all their records commit together anyway.
                    if let Some(state) = more.state {
                        match states.iter_mut().find(|s| s.connection == state.connection) {
                            Some(slot) => *slot = state,
                            None => states.push(state),
                        }
                    }
                }
                Err(_) => break,
            }
        }
        commit(&buffer, &board, records, states, &abort).await;
    }
}

/// Commits one gathered batch. A buffer that refuses for a reason that
/// passes (a lock held by another process, a stalled disk) is retried with
/// backoff while the batch is held: the bounded queues behind it fill and
/// the sources wait before anything is dropped (docs/guarantees.md). What the buffer
/// can never take (full of records it may not evict), or still holds when
/// shutdown gives up, is dropped, counted per connection and announced.
async fn commit(
    buffer: &BufferHandle,
    board: &StatusBoard,
    records: Vec<NewRecord>,
    states: Vec<ProfileState>,
    abort: &CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut quiet = crate::throttle::Throttle::new(Duration::from_secs(60));
    let (mut records, mut states) = (records, states);
    loop {
        let refused = match buffer.try_append(records, states).await {
            Ok(_) => {
                if let Some(blocked) = board.set_intake_blocked(None) {
                    tracing::info!(
                        blocked_ms = blocked.as_millis() as u64,
                        "buffer accepts records again"
                    );
                    if blocked >= BLOCKED_WORTH_AN_EVENT {
                        let ev = NewRecord::event(
                            "",
                            EventType::SystemError,
                            serde_json::json!({
                                "error": "buffer_blocked",
                                "message": format!(
                                    "the buffer refused records for {} s; they were held and are now stored",
                                    blocked.as_secs()
                                ),
                                "duration_ms": blocked.as_millis() as u64,
                            }),
                        );
                        if let Err(e) = buffer.append(vec![ev]).await {
                            tracing::error!(error = %e, "could not record the buffer_blocked event");
                        }
                    }
                }
                return;
            }
            Err(refused) => refused,
        };
        let Refused {
            error,
            records: back,
            states: back_states,
        } = refused;
        // Full: the buffer already evicted all it may; Closed: shutting down.
        let hopeless = matches!(
            error,
            crate::buffer::BufferError::Full { .. } | crate::buffer::BufferError::Closed
        );
        if hopeless || abort.is_cancelled() {
            count_refused(board, &back);
            tracing::error!(error = %error, records = back.len(), "records could not be stored; dropped and counted");
            return;
        }
        board.set_intake_blocked(Some(&error.to_string()));
        if let Some(repeats) = quiet.check(&error.to_string()) {
            tracing::error!(error = %error, records = back.len(), repeats, "buffer refuses records; holding them and retrying");
        }
        board.beat("ingest");
        let delay = backoff.next_delay();
        tokio::select! {
            _ = abort.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        records = back;
        states = back_states;
    }
}

/// Counts records the buffer did not take, per connection (docs/guarantees.md).
fn count_refused(board: &StatusBoard, records: &[NewRecord]) {
    let mut per: std::collections::BTreeMap<&str, (u64, Option<String>)> = Default::default();
    for r in records {
        let e = per.entry(r.connection.as_str()).or_insert((0, None));
        e.0 += 1;
        if e.1.is_none() {
            e.1 = r.tag_name();
        }
    }
    for (connection, (n, sample)) in per {
        board.add_dropped(connection, DropReason::BufferRefused, n, sample.as_deref());
    }
}
