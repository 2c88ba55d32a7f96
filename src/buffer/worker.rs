//! The buffer thread: the one owner of the [`Store`]. It serves the
//! handle's commands and takes the connections' submissions from the
//! intake queue; it is the only place records are coalesced into
//! transactions and profile snapshots and tag marks are merged.
//!
//! When the store refuses submitted records for a reason that passes (a
//! lock another process holds, a stalled disk), the worker holds them and
//! retries with backoff, and takes nothing more from the intake meanwhile:
//! the queue fills and the connections wait before anything is dropped
//! (docs/guarantees.md). Reads, acks and the other commands go on. What the
//! store can never take (full of records it may not evict), or still holds
//! when shutdown gives up, is dropped and reported to the observer, which
//! counts and announces it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::intake::{
    report_accepted, report_dropped, IntakeObserver, Submission, MAX_COALESCED_RECORDS,
};
use super::{
    Append, BufferError, DeadLetter, Eviction, Limits, ProfileState, RangeRead, Stats, Store,
    TagMark,
};
use crate::backoff::Backoff;
use crate::record::{EventType, NewRecord, RecordId, StoredRecord, StreamKey};
use crate::throttle::Throttle;

pub(super) type Reply<T> = oneshot::Sender<Result<T, BufferError>>;

/// A buffer refusing records for longer than this is announced by a
/// `system.error` (`buffer_blocked`) once it takes them again.
const BLOCKED_WORTH_AN_EVENT: Duration = Duration::from_secs(2);

/// How often an idle worker says it is alive.
const BEAT: Duration = Duration::from_secs(1);

/// What the handle asks of the worker.
pub(super) enum Command {
    /// Records committed on their own verdict (the agent's events); queued
    /// submissions join the same transaction.
    Append {
        records: Vec<NewRecord>,
        reply: Reply<Vec<u64>>,
    },
    /// Answered once everything submitted before it is committed or, after
    /// `within`, dropped and reported.
    Flush {
        within: Duration,
        reply: oneshot::Sender<()>,
    },
    ProfileState {
        connection: String,
        reply: Reply<Option<String>>,
    },
    TagMarks {
        connection: String,
        reply: Reply<Vec<TagMark>>,
    },
    Streams {
        reply: Reply<Vec<StreamKey>>,
    },
    NextBdSeq {
        reply: Reply<u8>,
    },
    ReadAfter {
        stream: StreamKey,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
        reply: Reply<Vec<StoredRecord>>,
    },
    ReadRange {
        stream: StreamKey,
        seqs: std::ops::RangeInclusive<u64>,
        max_records: usize,
        max_bytes: usize,
        reply: Reply<RangeRead>,
    },
    Ack {
        ids: Vec<RecordId>,
        reply: Reply<usize>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    EvictExpired {
        now_ms: i64,
        reply: Reply<Vec<Eviction>>,
    },
    DeadLetter {
        ids: Vec<RecordId>,
        reason: String,
        reply: Reply<usize>,
    },
    DeadLetters {
        reply: Reply<Vec<DeadLetter>>,
    },
    RetryDeadLetters {
        reply: Reply<usize>,
    },
    SetLimits {
        limits: Limits,
        reply: Reply<()>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// One contribution to a transaction: a submission (no reply: its outcome
/// goes to the observer) or a direct append (answered).
struct Part {
    records: Vec<NewRecord>,
    state: Option<ProfileState>,
    marks: Vec<TagMark>,
    reply: Option<Reply<Vec<u64>>>,
}

impl Part {
    /// A direct append: the agent's own events, which carry no state.
    fn direct(records: Vec<NewRecord>, reply: Reply<Vec<u64>>) -> Part {
        Part {
            records,
            state: None,
            marks: Vec::new(),
            reply: Some(reply),
        }
    }

    /// Rows it writes: what bounds a coalesced transaction.
    fn rows(&self) -> usize {
        self.records.len() + self.marks.len()
    }
}

impl From<Submission> for Part {
    fn from(submission: Submission) -> Part {
        let (records, state, marks) = submission.into_parts();
        Part {
            records,
            state,
            marks,
            reply: None,
        }
    }
}

/// Submitted records the store refused for a passing reason, retried with
/// backoff, with the states and marks that must commit with them.
struct Held {
    records: Vec<NewRecord>,
    states: Vec<ProfileState>,
    marks: Marks,
    since: Instant,
    backoff: Backoff,
    retry_at: Instant,
    quiet: Throttle,
}

/// A flush waiting for the intake to be drained.
struct Flush {
    deadline: Instant,
    reply: oneshot::Sender<()>,
}

pub(super) struct Worker {
    store: Store,
    commands: mpsc::Receiver<Command>,
    intake: mpsc::UnboundedReceiver<Submission>,
    intake_open: bool,
    observer: Arc<dyn IntakeObserver>,
    appended: Arc<Notify>,
    commits: Arc<AtomicU64>,
    held: Option<Held>,
    /// A command taken while gathering appends that could not join; it is
    /// served next, so the command order is kept.
    next: Option<Command>,
    flushes: Vec<Flush>,
    last_beat: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        store: Store,
        commands: mpsc::Receiver<Command>,
        intake: mpsc::UnboundedReceiver<Submission>,
        observer: Arc<dyn IntakeObserver>,
        appended: Arc<Notify>,
        commits: Arc<AtomicU64>,
    ) -> Worker {
        Worker {
            store,
            commands,
            intake,
            intake_open: true,
            observer,
            appended,
            commits,
            held: None,
            next: None,
            flushes: Vec::new(),
            last_beat: None,
        }
    }

    /// Serves until [`Command::Close`] or every handle is gone, then closes
    /// the database. `runtime` is this thread's own (timers only): the
    /// store's calls block it, which is the point of the thread.
    pub(super) fn run(mut self, runtime: tokio::runtime::Runtime) {
        let close_reply = runtime.block_on(self.serve());
        self.close_intake();
        // Close the connection before answering `close()`, so the caller may
        // reopen or remove the file as soon as it returns. Commands still
        // queued are dropped here, which answers them with `Closed`.
        let Worker {
            store, commands, ..
        } = self;
        drop(commands);
        drop(store);
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    async fn serve(&mut self) -> Option<oneshot::Sender<()>> {
        let mut beat = tokio::time::interval(BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let later = || Instant::now() + Duration::from_secs(3600);
        loop {
            self.beat();
            let retry_at = self.held.as_ref().map(|h| h.retry_at);
            let give_up_at = match self.held {
                Some(_) => self.flushes.iter().map(|f| f.deadline).min(),
                None => None,
            };
            if let Some(command) = self.next.take() {
                if let Command::Close { reply } = command {
                    return Some(reply);
                }
                self.command(command);
                self.settle_flushes();
                continue;
            }
            let take_intake = self.held.is_none() && self.intake_open;
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None => return None,
                    Some(Command::Close { reply }) => return Some(reply),
                    Some(command) => self.command(command),
                },
                _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(later)), if give_up_at.is_some() => {
                    self.give_up_held("shutdown could not wait longer");
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(later)), if retry_at.is_some() => {
                    self.retry_held();
                }
                submission = self.intake.recv(), if take_intake => match submission {
                    Some(submission) => self.gather_and_commit(submission.into()),
                    None => self.intake_open = false,
                },
                _ = beat.tick() => {}
            }
            self.settle_flushes();
        }
    }

    /// Tells the observer the worker is alive, at most once a second (a
    /// busy worker may never reach its idle tick).
    fn beat(&mut self) {
        let now = Instant::now();
        if self
            .last_beat
            .map_or(true, |t| now.duration_since(t) >= BEAT)
        {
            self.last_beat = Some(now);
            self.observer.alive();
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Append { records, reply } => {
                self.gather_and_commit(Part::direct(records, reply))
            }
            Command::Flush { within, reply } => self.flushes.push(Flush {
                deadline: Instant::now() + within,
                reply,
            }),
            other => self.answer(other),
        }
    }

    /// Runs one read or maintenance command and sends its answer.
    fn answer(&mut self, command: Command) {
        match command {
            Command::ProfileState { connection, reply } => {
                let _ = reply.send(self.store.profile_state(&connection));
            }
            Command::TagMarks { connection, reply } => {
                let _ = reply.send(self.store.tag_marks(&connection));
            }
            Command::Streams { reply } => {
                let _ = reply.send(self.store.streams());
            }
            Command::NextBdSeq { reply } => {
                let _ = reply.send(self.store.next_bd_seq());
            }
            Command::ReadAfter {
                stream,
                after_seq,
                max_records,
                max_bytes,
                reply,
            } => {
                let result = self
                    .store
                    .read_after(&stream, after_seq, max_records, max_bytes);
                let _ = reply.send(result);
            }
            Command::ReadRange {
                stream,
                seqs,
                max_records,
                max_bytes,
                reply,
            } => {
                let result = self.store.read_range(
                    &stream,
                    *seqs.start(),
                    *seqs.end(),
                    max_records,
                    max_bytes,
                );
                let _ = reply.send(result);
            }
            Command::Ack { ids, reply } => {
                let _ = reply.send(self.store.ack(&ids));
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.store.stats());
            }
            Command::EvictExpired { now_ms, reply } => {
                let result = self.store.evict_expired(now_ms);
                if matches!(&result, Ok(e) if !e.is_empty()) {
                    self.wake();
                }
                let _ = reply.send(result);
            }
            Command::DeadLetter { ids, reason, reply } => {
                let result = self.store.dead_letter(&ids, &reason);
                if matches!(result, Ok(n) if n > 0) {
                    // Its system.error event is a new record.
                    self.wake();
                }
                let _ = reply.send(result);
            }
            Command::DeadLetters { reply } => {
                let _ = reply.send(self.store.dead_letters());
            }
            Command::RetryDeadLetters { reply } => {
                let result = self.store.retry_dead_letters();
                if matches!(result, Ok(n) if n > 0) {
                    self.wake();
                }
                let _ = reply.send(result);
            }
            Command::SetLimits { limits, reply } => {
                let _ = reply.send(self.store.set_limits(limits));
            }
            // `command` and `serve` handle these.
            Command::Append { .. } | Command::Flush { .. } | Command::Close { .. } => {}
        }
    }

    /// Commits `first` with the submissions and direct appends already
    /// queued behind it, up to about [`MAX_COALESCED_RECORDS`] (a single
    /// larger one is still committed whole: its atomicity is the contract).
    fn gather_and_commit(&mut self, first: Part) {
        // Marks count like records: a run of marks-only submissions (no
        // queue room taken) must not grow one transaction without bound.
        let mut total = first.rows();
        let mut parts = vec![first];
        while total < MAX_COALESCED_RECORDS && self.held.is_none() {
            match self.intake.try_recv() {
                Ok(submission) => {
                    let part = Part::from(submission);
                    total += part.rows();
                    parts.push(part);
                }
                Err(_) => break,
            }
        }
        while total < MAX_COALESCED_RECORDS && self.next.is_none() {
            match self.commands.try_recv() {
                Ok(Command::Append { records, reply }) => {
                    total += records.len();
                    parts.push(Part::direct(records, reply));
                }
                Ok(other) => self.next = Some(other),
                Err(_) => break,
            }
        }
        self.commit(parts);
    }

    fn commit(&mut self, parts: Vec<Part>) {
        let total = parts.iter().map(|p| p.records.len()).sum();
        let mut all = Vec::with_capacity(total);
        let mut merged: Vec<ProfileState> = Vec::new();
        let mut merged_marks = Marks::default();
        let mut shares = Vec::with_capacity(parts.len());
        for part in parts {
            let range = all.len()..all.len() + part.records.len();
            all.extend(part.records);
            if let Some(state) = &part.state {
                merge_state(&mut merged, state.clone());
            }
            // Cloned: a part that fails on its own below keeps its marks.
            merged_marks.merge(part.marks.iter().cloned());
            shares.push((range, part.state, part.marks, part.reply));
        }
        let error = match self.store.append(Append {
            records: &all,
            states: &merged,
            marks: &merged_marks.list,
        }) {
            Ok(report) => {
                self.committed(&all, report.stored_bytes);
                let mut seqs = report.seqs.into_iter();
                for (range, _, _, reply) in shares {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(seqs.by_ref().take(range.len()).collect()));
                    } else {
                        seqs.by_ref().take(range.len()).for_each(drop);
                    }
                }
                return;
            }
            Err(error) => error,
        };
        if shares.len() == 1 {
            if let Some((_, state, marks, reply)) = shares.pop() {
                self.refused(all, state, marks, reply, error);
            }
            return;
        }
        let out_of_space = error.is_disk_full();
        let reason = error.to_string();
        tracing::warn!(error = %reason, parts = shares.len(),
            "coalesced buffer append failed; deciding part by part");
        for (range, state, marks, reply) in shares {
            let records = all.get(range).unwrap_or_default();
            // A lock or a stalled disk fails every part alike, each after
            // the busy timeout: submissions are held together, in order,
            // without trying each. Out of space, each part tries on its
            // own (a nearly full disk may still take the smaller ones), but
            // none overtakes one that is held.
            if reply.is_none() && (!out_of_space || self.held.is_some()) {
                self.hold(records.to_vec(), state, marks, &reason);
                continue;
            }
            let states: Vec<ProfileState> = state.iter().cloned().collect();
            match self.store.append(Append {
                records,
                states: &states,
                marks: &marks,
            }) {
                Ok(report) => {
                    self.committed(records, report.stored_bytes);
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(report.seqs));
                    }
                }
                Err(error) => self.refused(records.to_vec(), state, marks, reply, error),
            }
        }
    }

    /// A part the store did not take: a direct append gets the error, a
    /// submission is held and retried, or dropped when it never can be.
    fn refused(
        &mut self,
        records: Vec<NewRecord>,
        state: Option<ProfileState>,
        marks: Vec<TagMark>,
        reply: Option<Reply<Vec<u64>>>,
        error: BufferError,
    ) {
        match reply {
            Some(reply) => {
                let _ = reply.send(Err(error));
            }
            // Full: the store already evicted all it may.
            None if matches!(error, BufferError::Full { .. }) => {
                let why = error.to_string();
                self.drop_records(&records, &why);
                drop_marks(&marks, &why);
            }
            None => self.hold(records, state, marks, &error.to_string()),
        }
    }

    fn hold(
        &mut self,
        records: Vec<NewRecord>,
        state: Option<ProfileState>,
        marks: Vec<TagMark>,
        reason: &str,
    ) {
        let held = self.held.get_or_insert_with(|| {
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            Held {
                records: Vec::new(),
                states: Vec::new(),
                marks: Marks::default(),
                since: Instant::now(),
                retry_at: Instant::now() + backoff.next_delay(),
                backoff,
                quiet: Throttle::new(Duration::from_secs(60)),
            }
        });
        held.records.extend(records);
        if let Some(state) = state {
            merge_state(&mut held.states, state);
        }
        held.marks.merge(marks);
        if let Some(repeats) = held.quiet.check(reason) {
            tracing::error!(error = %reason, records = held.records.len(), repeats,
                "buffer refuses records; holding them and retrying");
        }
        self.observer.blocked(Some(reason));
    }

    fn retry_held(&mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        let error = match self.store.append(Append {
            records: &held.records,
            states: &held.states,
            marks: &held.marks.list,
        }) {
            Ok(report) => {
                self.committed(&held.records, report.stored_bytes);
                self.observer.blocked(None);
                self.unblocked(held.since.elapsed());
                return;
            }
            Err(error) => error,
        };
        if matches!(error, BufferError::Full { .. }) {
            self.observer.blocked(None);
            let why = error.to_string();
            self.drop_records(&held.records, &why);
            drop_marks(&held.marks.list, &why);
            return;
        }
        let reason = error.to_string();
        if let Some(repeats) = held.quiet.check(&reason) {
            tracing::error!(error = %reason, records = held.records.len(), repeats,
                "buffer refuses records; holding them and retrying");
        }
        self.observer.blocked(Some(&reason));
        held.retry_at = Instant::now() + held.backoff.next_delay();
        self.held = Some(held);
    }

    /// The held records are stored after `blocked`: logged, and announced
    /// when it lasted long enough to matter (docs/mqtt.md, `buffer_blocked`).
    fn unblocked(&mut self, blocked: Duration) {
        tracing::info!(
            blocked_ms = blocked.as_millis() as u64,
            "buffer accepts records again"
        );
        if blocked < BLOCKED_WORTH_AN_EVENT {
            return;
        }
        let event = NewRecord::event(
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
        let events = [event];
        match self.store.append(Append::records(&events)) {
            Ok(report) => self.committed(&events, report.stored_bytes),
            Err(e) => tracing::error!(error = %e, "could not record the buffer_blocked event"),
        }
    }

    fn give_up_held(&mut self, why: &str) {
        if let Some(held) = self.held.take() {
            self.observer.blocked(None);
            self.drop_records(&held.records, why);
            drop_marks(&held.marks.list, why);
        }
    }

    /// Records that will not be stored: reported per connection (counted
    /// and announced as `buffer_refused` by the observer) and logged.
    fn drop_records(&mut self, records: &[NewRecord], why: &str) {
        if records.is_empty() {
            return;
        }
        tracing::error!(error = %why, records = records.len(),
            "records could not be stored; dropped and counted");
        report_dropped(self.observer.as_ref(), records);
    }

    /// Answers the flushes whose submissions are all committed or dropped.
    fn settle_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        while self.held.is_none() {
            match self.intake.try_recv() {
                Ok(submission) => self.gather_and_commit(submission.into()),
                Err(_) => break,
            }
        }
        if self.held.is_none() {
            for flush in self.flushes.drain(..) {
                let _ = flush.reply.send(());
            }
        }
    }

    /// At close: commits what is still queued; what the store will not
    /// take now is dropped and reported.
    fn close_intake(&mut self) {
        loop {
            if self.held.is_some() {
                self.give_up_held("the buffer is closing");
            }
            match self.intake.try_recv() {
                Ok(submission) => self.gather_and_commit(submission.into()),
                Err(_) => break,
            }
        }
        self.give_up_held("the buffer is closing");
    }

    fn committed(&self, records: &[NewRecord], stored_bytes: u64) {
        if records.is_empty() {
            return;
        }
        report_accepted(self.observer.as_ref(), records, stored_bytes);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.wake();
    }

    /// New rows to publish: wake current waiters and leave a permit.
    fn wake(&self) {
        self.appended.notify_waiters();
        self.appended.notify_one();
    }
}

/// Queue order is production order: a later snapshot of a connection
/// supersedes an earlier one, and committing only the last is exact because
/// all the records before it commit in the same transaction.
fn merge_state(states: &mut Vec<ProfileState>, state: ProfileState) {
    match states.iter_mut().find(|s| s.connection == state.connection) {
        Some(slot) => *slot = state,
        None => states.push(state),
    }
}

/// Tag marks merged in queue order, one per (connection, tag): as with
/// profile snapshots, a later mark supersedes an earlier one, and keeping
/// only the last is exact because the records before it commit with it.
#[derive(Default)]
struct Marks {
    list: Vec<TagMark>,
    /// Where each (connection, tag) sits in `list`: a coalesced group can
    /// carry a mark for every tag of every connection.
    at: HashMap<(String, String), usize>,
}

impl Marks {
    fn merge(&mut self, marks: impl IntoIterator<Item = TagMark>) {
        for mark in marks {
            match self.at.entry((mark.connection.clone(), mark.tag.clone())) {
                Entry::Occupied(slot) => {
                    if let Some(old) = self.list.get_mut(*slot.get()) {
                        *old = mark;
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(self.list.len());
                    self.list.push(mark);
                }
            }
        }
    }
}

/// Marks not stored because their records were not. Nothing is emitted
/// twice for it (the stored mark still describes the stored records), but
/// a gap only they held is saved again with the tag's next mark at the
/// earliest, so the loss is logged.
fn drop_marks(marks: &[TagMark], why: &str) {
    if marks.is_empty() {
        return;
    }
    tracing::warn!(error = %why, marks = marks.len(),
        "backfill marks not stored with their records; dropped");
}
