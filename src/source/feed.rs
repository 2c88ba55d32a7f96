//! The feed queue: the hand-off from the OPC UA session to the connection's
//! driver task (docs/guarantees.md: loss at the intake is never silent).
//!
//! The subscription callback runs on the OPC UA event loop and must never
//! block it, so this queue cannot make the callback wait. It is bounded by a
//! budget of queued values instead: while the driver is behind (it waits on
//! the buffer's bounded outlet, which waits on a slow or locked
//! database), values beyond the budget are dropped, counted as `queue_full`
//! and announced by `source.dropped`. Back-pressure therefore reaches the
//! OPC UA server first: the driver stops taking, this budget absorbs the
//! burst, and only then is anything dropped.
//!
//! Profile samples always pass: there are few of them (a handful per unit
//! or work center) and losing one would corrupt a batch or OEE record.
//! Control feeds (connected, disconnected, stop) always pass too.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use std::sync::Arc;

use super::backfill::round::{Round, WorkTx};
use super::reporter::IntakeLoss;
use super::value::TagMeta;
use crate::profile::{NodeKey, Sample};
use crate::record::NewRecord;
use crate::status::DropReason;

/// What the session side hands to the connection's driver task, in order.
pub(crate) enum Feed {
    /// One publish response: tag records and the profile's samples.
    /// `tags` names each record's tag (same order) when the connection
    /// keeps backfill marks, and is empty otherwise (and for records that
    /// are not the server's values, such as a bad tag's).
    Publish {
        records: Vec<NewRecord>,
        samples: Vec<Sample>,
        tags: Vec<Arc<TagMeta>>,
    },
    /// A session is up; the profile's reads go to it from now on, and the
    /// gaps to read back to its `backfill` reader. Sent before any
    /// monitored item exists, so it precedes the session's first publish.
    Connected {
        at_ms: i64,
        backfill: Option<WorkTx>,
    },
    /// Values read back from the server's history (docs/backfill.md).
    /// Not counted against the intake budget: the reader sends one round
    /// at a time and waits for the driver, so they are bounded already.
    Backfill(Round),
    /// The answer to the profile's read `id`: per node, its value and
    /// whether it was good.
    ReadDone {
        id: u64,
        results: Vec<(NodeKey, serde_json::Value, bool)>,
    },
    /// The session was lost (not sent on shutdown).
    Disconnected { at_ms: i64 },
    /// The connection task is stopping: the driver saves and ends. Sent
    /// rather than waiting for the channel to close, because the library
    /// may hold a subscription (and its sender of this channel) a little
    /// longer than the session.
    Stop,
}

impl Feed {
    pub(crate) fn records(records: Vec<NewRecord>) -> Feed {
        Feed::Publish {
            records,
            samples: Vec::new(),
            tags: Vec::new(),
        }
    }
}

/// Tag values all connections together may have queued between their OPC
/// UA sessions and their drivers: one budget for the process, so memory
/// stays bounded however many connections there are (a queued value takes
/// about 1 KiB: some 35 MB at most). With the queue into the buffer behind
/// it, 1 000 values/s ride out about 35 s of a buffer that takes nothing.
pub(crate) const QUEUED_VALUES: usize = 30_000;

/// Values queued now, all connections of the process.
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// Values waiting in the intake queues now (for `/metrics`).
pub fn queued_values() -> usize {
    QUEUED.load(Ordering::Relaxed)
}

/// Sending side, held by the subscription callback and the connection task.
#[derive(Clone)]
pub(crate) struct FeedTx {
    tx: mpsc::UnboundedSender<Feed>,
    queued: &'static AtomicUsize,
    budget: usize,
    loss: IntakeLoss,
}

/// Receiving side, held by the driver.
pub(crate) struct FeedRx {
    rx: mpsc::UnboundedReceiver<Feed>,
    queued: &'static AtomicUsize,
}

/// The receiver is gone (the connection task is stopping).
#[derive(Debug)]
pub(crate) struct Closed;

/// A connection's queue, sharing the process-wide budget.
pub(crate) fn channel(loss: IntakeLoss) -> (FeedTx, FeedRx) {
    channel_within(&QUEUED, QUEUED_VALUES, loss)
}

/// A queue counted in `queued` against `budget`.
fn channel_within(
    queued: &'static AtomicUsize,
    budget: usize,
    loss: IntakeLoss,
) -> (FeedTx, FeedRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        FeedTx {
            tx,
            queued,
            budget,
            loss,
        },
        FeedRx { rx, queued },
    )
}

fn values_in(feed: &Feed) -> usize {
    match feed {
        Feed::Publish { records, .. } => records.len(),
        _ => 0,
    }
}

impl FeedTx {
    /// Queues `feed` without waiting. Tag records over the budget are
    /// dropped and counted; everything else always goes through.
    pub(crate) fn send(&self, mut feed: Feed) -> Result<(), Closed> {
        let n = values_in(&feed);
        if n > 0 {
            let before = self.queued.fetch_add(n, Ordering::AcqRel);
            if before + n > self.budget {
                self.queued.fetch_sub(n, Ordering::AcqRel);
                if let Feed::Publish {
                    records,
                    samples,
                    tags,
                } = &mut feed
                {
                    let sample = records.first().and_then(NewRecord::tag_name);
                    self.loss
                        .record(DropReason::QueueFull, n as u64, sample.as_deref());
                    records.clear();
                    tags.clear();
                    if samples.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
        let n = values_in(&feed);
        self.tx.send(feed).map_err(|_| {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            Closed
        })
    }

    /// Counts values the server reported it discarded (the `Overflow` info
    /// bit of a monitored item's value, docs/guarantees.md): at least one per flag.
    pub(crate) fn server_overflow(&self, tag: &str) {
        self.loss.record(DropReason::ServerOverflow, 1, Some(tag));
    }
}

impl FeedRx {
    fn took(&self, feed: &Feed) {
        let n = values_in(feed);
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
    }

    pub(crate) async fn recv(&mut self) -> Option<Feed> {
        let feed = self.rx.recv().await?;
        self.took(&feed);
        Some(feed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Kind, NewRecord};
    use crate::source::ConnectionReporter;
    use crate::status::StatusBoard;

    fn tag(name: &str) -> NewRecord {
        NewRecord {
            connection: "c1".into(),
            kind: Kind::Tag,
            ts_ms: 0,
            data: serde_json::json!({"name": name, "value": 1}).to_string(),
        }
    }

    #[tokio::test]
    async fn over_budget_values_are_dropped_and_counted_samples_pass() {
        let board = StatusBoard::new();
        let (outlet, _queue) = crate::buffer::Outlet::queue(1);
        let reporter = ConnectionReporter::new("c1", board.clone(), outlet, Vec::new());
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let (tx, mut rx) = channel_within(&COUNTER, 3, reporter.intake_loss());
        tx.send(Feed::records(vec![tag("A"), tag("B")]))
            .expect("queued");
        // 2 + 2 > 3: the second publish is dropped whole.
        tx.send(Feed::records(vec![tag("C"), tag("D")]))
            .expect("dropped, not an error");
        tx.send(Feed::Disconnected { at_ms: 1 }).expect("control");
        assert!(
            matches!(rx.recv().await, Some(Feed::Publish { records, .. }) if records.len() == 2)
        );
        assert!(matches!(rx.recv().await, Some(Feed::Disconnected { .. })));
        // Room again once the driver took the first.
        tx.send(Feed::records(vec![tag("E"), tag("F"), tag("G")]))
            .expect("queued");
        assert!(
            matches!(rx.recv().await, Some(Feed::Publish { records, .. }) if records.len() == 3)
        );
        let c1 = &board.connections()[0].1;
        assert_eq!(c1.dropped[&DropReason::QueueFull], 2);
        let reports = board.take_drop_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].samples, vec!["C".to_string()]);
    }
}
