//! The one hand-off into the buffer (docs/guarantees.md): connections
//! [`Outlet::submit`] what they produced, the buffer worker takes it from
//! this queue, coalesces it into few, large transactions and reports the
//! outcome to an [`IntakeObserver`] (the agent's status board).
//!
//! The queue is bounded in *records*, not in submissions: a connection
//! hands over one submission per publish response, so what the worker can
//! gather into one commit must not depend on how the records were cut. A
//! submitter waits while the queue is full (back-pressure towards the
//! OPC UA session, whose own intake budget then absorbs the burst).

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{ProfileState, TagMark};
use crate::record::{Kind, NewRecord};

/// Upper bound on records the worker merges into one coalesced
/// transaction, so a burst cannot hold the write lock (and delay acks and
/// reads) for long. A single larger submission is still committed whole:
/// its atomicity is the contract.
pub const MAX_COALESCED_RECORDS: usize = 10_000;

/// Records that may wait in the queue: twice what one transaction takes,
/// so the next commit is gathered while one runs (about 10 MB of JSON).
pub const QUEUED_RECORDS: usize = 2 * MAX_COALESCED_RECORDS;

/// What a connection hands over in one go: records and, when a profile
/// produced them, the profile snapshot that commits in the same transaction
/// (docs/profiles.md: no duplicate batch events across restarts), and the
/// backfill marks of the tags they belong to, for the same reason across
/// `kill -9` (docs/mqtt.md, backfill). Marks or a state alone are a
/// submission too: they are committed even without records.
#[derive(Debug, Default)]
pub struct Submission {
    pub records: Vec<NewRecord>,
    pub state: Option<ProfileState>,
    pub marks: Vec<TagMark>,
    /// The queue room these records take, given back when the worker has
    /// taken them (dropping the submission).
    room: Option<OwnedSemaphorePermit>,
}

impl Submission {
    pub fn records(records: Vec<NewRecord>) -> Self {
        Submission {
            records,
            ..Default::default()
        }
    }

    pub fn with_state(records: Vec<NewRecord>, state: ProfileState) -> Self {
        Submission {
            records,
            state: Some(state),
            ..Default::default()
        }
    }

    pub fn with_marks(
        records: Vec<NewRecord>,
        state: Option<ProfileState>,
        marks: Vec<TagMark>,
    ) -> Self {
        Submission {
            records,
            state,
            marks,
            room: None,
        }
    }

    /// Records, state and marks, the queue room given back.
    pub(super) fn into_parts(self) -> (Vec<NewRecord>, Option<ProfileState>, Vec<TagMark>) {
        (self.records, self.state, self.marks)
    }
}

/// Readers that only care about the records (tests of a connection alone)
/// can `extend` with a submission.
impl IntoIterator for Submission {
    type Item = NewRecord;
    type IntoIter = std::vec::IntoIter<NewRecord>;

    fn into_iter(self) -> Self::IntoIter {
        self.records.into_iter()
    }
}

/// The buffer worker is gone (the agent is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the buffer is closed")]
pub struct Closed;

/// Where connections hand their records. Cheap to clone.
#[derive(Clone)]
pub struct Outlet {
    tx: mpsc::UnboundedSender<Submission>,
    room: Arc<Semaphore>,
    capacity: usize,
}

impl Outlet {
    /// A queue of `capacity` records and its receiving end. The buffer
    /// worker owns the receiver in the agent; tests of a connection alone
    /// read it themselves.
    pub fn queue(capacity: usize) -> (Outlet, mpsc::UnboundedReceiver<Submission>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(capacity));
        (Outlet { tx, room, capacity }, rx)
    }

    /// Queues `submission`, waiting while the queue is full. A submission
    /// larger than the whole queue waits for all of it and then goes alone.
    pub async fn submit(&self, mut submission: Submission) -> Result<(), Closed> {
        let want = submission.records.len().min(self.capacity);
        if want > 0 {
            let want = u32::try_from(want).unwrap_or(u32::MAX);
            let permit = self
                .room
                .clone()
                .acquire_many_owned(want)
                .await
                .map_err(|_| Closed)?;
            submission.room = Some(permit);
        }
        self.tx.send(submission).map_err(|_| Closed)
    }
}

/// What the buffer tells the rest of the agent about its intake; the
/// agent's status board implements it (`records_total`, drops, the
/// `intake` block of `/status`, the watchdog).
pub trait IntakeObserver: Send + Sync {
    /// `records` of `connection` (events not counted) were committed,
    /// taking `bytes` of the buffer's `max_size`; the newest has
    /// `newest_ts_ms`.
    fn accepted(&self, connection: &str, records: u64, bytes: u64, newest_ts_ms: i64);
    /// `records` of `connection` could not be stored and were dropped
    /// (`sample_tag`: one tag among them, for the operator).
    fn dropped(&self, connection: &str, records: u64, sample_tag: Option<&str>);
    /// The buffer refuses records and holds them (`Some(reason)`), or takes
    /// them again (`None`).
    fn blocked(&self, reason: Option<&str>);
    /// The worker is alive (called at least once a second unless a single
    /// database call hangs).
    fn alive(&self);
}

/// For a buffer nobody watches (tools, tests).
pub struct Unobserved;

impl IntakeObserver for Unobserved {
    fn accepted(&self, _: &str, _: u64, _: u64, _: i64) {}
    fn dropped(&self, _: &str, _: u64, _: Option<&str>) {}
    fn blocked(&self, _: Option<&str>) {}
    fn alive(&self) {}
}

/// Tells `observer` what one commit accepted: per connection, the records
/// that are not events, what they take of `max_size` (the commit's
/// `stored_bytes` shared out by the length of their text: records are
/// compressed together, not one by one), and the newest of their
/// timestamps.
pub(super) fn report_accepted(
    observer: &dyn IntakeObserver,
    records: &[NewRecord],
    stored_bytes: u64,
) {
    let text: u64 = records.iter().map(|r| r.data.len() as u64).sum();
    let share = stored_bytes as f64 / text.max(1) as f64;
    let mut per: Vec<(&str, u64, u64, i64)> = Vec::new();
    for r in records.iter().filter(|r| r.kind != Kind::Event) {
        let bytes = (r.data.len() as f64 * share).round() as u64;
        // Records of one connection arrive together: the last entry is
        // nearly always the one.
        match per.iter_mut().rev().find(|(c, ..)| *c == r.connection) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += bytes;
                entry.3 = entry.3.max(r.ts_ms);
            }
            None => per.push((&r.connection, 1, bytes, r.ts_ms)),
        }
    }
    for (connection, n, bytes, newest) in per {
        observer.accepted(connection, n, bytes, newest);
    }
}

/// Tells `observer` about records that were dropped, per connection with a
/// sample tag name.
pub(super) fn report_dropped(observer: &dyn IntakeObserver, records: &[NewRecord]) {
    let mut per: Vec<(&str, u64, Option<String>)> = Vec::new();
    for r in records {
        match per.iter_mut().find(|(c, _, _)| *c == r.connection) {
            Some(entry) => {
                entry.1 += 1;
                if entry.2.is_none() {
                    entry.2 = r.tag_name();
                }
            }
            None => per.push((&r.connection, 1, r.tag_name())),
        }
    }
    for (connection, n, sample) in per {
        observer.dropped(connection, n, sample.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: i64) -> NewRecord {
        NewRecord {
            connection: "c1".into(),
            kind: Kind::Tag,
            ts_ms: n,
            data: format!(r#"{{"name":"T{n}","value":{n}}}"#),
        }
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_submitter_wait_until_the_worker_takes() {
        let (outlet, mut rx) = Outlet::queue(3);
        outlet
            .submit(Submission::records(vec![rec(1), rec(2)]))
            .await
            .expect("room");
        // Two more do not fit next to the first two.
        let second = tokio::spawn({
            let outlet = outlet.clone();
            async move {
                outlet
                    .submit(Submission::records(vec![rec(3), rec(4)]))
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "waits for room");
        // A state-only submission takes no room.
        outlet
            .submit(Submission::with_state(
                Vec::new(),
                ProfileState {
                    connection: "c1".into(),
                    snapshot: "{}".into(),
                },
            ))
            .await
            .expect("no room needed");
        let first = rx.recv().await.expect("first");
        assert_eq!(first.records.len(), 2);
        drop(first);
        second.await.expect("joins").expect("room again");
        let mut got = Vec::new();
        while let Ok(s) = rx.try_recv() {
            got.push((s.records.len(), s.state.is_some()));
        }
        assert_eq!(got, vec![(0, true), (2, false)]);
    }

    #[tokio::test]
    async fn marks_alone_take_no_room_and_keep_their_order() {
        let (outlet, mut rx) = Outlet::queue(1);
        outlet
            .submit(Submission::records(vec![rec(1)]))
            .await
            .expect("room");
        let mark = TagMark {
            connection: "c1".into(),
            tag: "T1".into(),
            last_ms: 1,
            gaps: vec![(0, 1)],
        };
        // The queue is full, yet marks alone go in at once.
        outlet
            .submit(Submission::with_marks(Vec::new(), None, vec![mark.clone()]))
            .await
            .expect("no room needed");
        let first = rx.recv().await.expect("first");
        assert_eq!((first.records.len(), first.marks.len()), (1, 0));
        let second = rx.recv().await.expect("second");
        let (records, state, marks) = second.into_parts();
        assert!(records.is_empty() && state.is_none());
        assert_eq!(marks, vec![mark]);
    }

    #[tokio::test]
    async fn a_closed_queue_is_an_error_not_a_hang() {
        let (outlet, rx) = Outlet::queue(10);
        drop(rx);
        assert!(outlet
            .submit(Submission::records(vec![rec(1)]))
            .await
            .is_err());
    }

    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(String, u64, String)>>);

    impl IntakeObserver for Seen {
        fn accepted(&self, c: &str, n: u64, _: u64, newest: i64) {
            self.0
                .lock()
                .expect("lock")
                .push((c.into(), n, newest.to_string()));
        }
        fn dropped(&self, c: &str, n: u64, sample: Option<&str>) {
            self.0
                .lock()
                .expect("lock")
                .push((c.into(), n, sample.unwrap_or("").into()));
        }
        fn blocked(&self, _: Option<&str>) {}
        fn alive(&self) {}
    }

    #[test]
    fn outcomes_are_reported_per_connection_without_events() {
        let mut records = vec![rec(5), rec(9), rec(7)];
        records.push(NewRecord::event(
            "c1",
            crate::record::EventType::SystemError,
            serde_json::json!({}),
        ));
        records.push(NewRecord {
            connection: "c2".into(),
            ..rec(3)
        });
        let seen = Seen::default();
        report_accepted(&seen, &records, 1_000);
        report_dropped(&seen, &records);
        let got = seen.0.into_inner().expect("lock");
        assert_eq!(
            got,
            vec![
                ("c1".into(), 3, "9".into()),
                ("c2".into(), 1, "3".into()),
                ("c1".into(), 4, "T5".into()),
                ("c2".into(), 1, "T3".into()),
            ]
        );
    }
}
