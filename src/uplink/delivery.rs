//! What the uplink knows about the messages of one MQTT session, as a pure
//! state machine: no awaits, no clock, no buffer, no broker. The session
//! loop ([`super::link`]) feeds it what happened (a message submitted, sent
//! with a packet id, acknowledged or refused) and executes what it answers
//! (delete rows, dead-letter rows, hold a stream back, announce the end of a
//! backlog). Because nothing here waits, the whole bookkeeping is checked by
//! a model test against random sequences of events (`delivery/tests.rs`).
//!
//! Invariants (docs/guarantees.md):
//! - Rows are deleted only after the broker acknowledged, without refusing,
//!   the message that carried them ([`Action::Delete`]).
//! - Every buffered row at or below a stream's cursor belongs to a message
//!   still outstanding, or has been settled: nothing is skipped. A session
//!   lost for any reason drops the whole `Delivery`; the next one starts
//!   from each stream's oldest row, so an unacknowledged message is always
//!   sent again (duplicates possible, loss not).
//! - Within a stream, messages are submitted in seq order; only a refusal or
//!   rows put back by `plantgate buffer retry` move the cursor back.
//! - A refused message holds its stream back for a growing delay and is sent
//!   again; after [`MAX_REJECTIONS`] refusals its rows go to the dead letters
//!   and the stream moves on.
//! - One `sync.completed` per backlog: when every stream that had rows at
//!   connect time has been settled up to where it stood.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::record::{RecordId, StreamKey};

/// A message the broker refuses (MQTT 5 reason code >= 0x80) is sent this
/// many times in a session, then its records go to the dead letters so the
/// stream moves on.
pub const MAX_REJECTIONS: u32 = 4;

/// After a refusal its stream waits this long before the next attempt,
/// doubling per attempt of the same message (1 s, 2 s, 4 s): a broker that
/// refuses everything (an ACL) is not hammered, and the dead letters grow at
/// the pace of the backoff rather than of the intake.
const REJECTION_BACKOFF: Duration = Duration::from_secs(1);

/// The wait before sending a message again after its `attempts`-th refusal.
pub fn rejection_delay(attempts: u32) -> Duration {
    REJECTION_BACKOFF.saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
}

/// Buffer rows carried by one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub stream: StreamKey,
    /// Row ids, in seq order.
    pub ids: Vec<RecordId>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub submitted: Instant,
}

/// One message handed to the MQTT client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Records(Batch),
    /// Status and heartbeat messages: nothing to delete when acknowledged.
    Control {
        topic: String,
    },
    /// Records sent again for a replay request (or its result): nothing
    /// to delete either. They have their own, smaller share of the window
    /// ([`Delivery::has_replay_room`]) so live data keeps its own.
    Replay {
        request_id: String,
    },
}

/// What the session loop must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The broker has these rows: delete them, then report
    /// [`Delivery::delivered`].
    Delete(Batch),
    /// The broker refused this message; its stream waits `retry_in`, then
    /// the rows are sent again.
    Retry {
        batch: Batch,
        attempt: u32,
        retry_in: Duration,
        reason: String,
    },
    /// The broker refused this message [`MAX_REJECTIONS`] times: move the
    /// rows to the dead letters, then report [`Delivery::dead_lettered`].
    DeadLetter { batch: Batch, reason: String },
    /// The broker refused a status or heartbeat message. Nothing to retry:
    /// the next status change or heartbeat goes out anyway.
    ControlRefused { topic: String, reason: String },
    /// The broker refused a message of a replay. Not retried: the
    /// consumer asks again.
    ReplayRefused { request_id: String, reason: String },
    /// rumqttc reported a publish nobody submitted (a library bug if ever).
    UnknownSent { pkid: u16 },
}

/// The end of a backlog that was on disk when the session connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncCompleted {
    pub records: u64,
    pub duration: Duration,
}

/// Backlog tracking: per stream, the seq its newest row had at connect time.
#[derive(Debug)]
struct Backlog {
    targets: HashMap<StreamKey, u64>,
    started: Instant,
}

#[derive(Debug)]
pub struct Delivery {
    /// Messages outstanding at most (submitted and not yet acknowledged).
    window: usize,
    /// Submitted, not yet reported sent by rumqttc. rumqttc reports
    /// `Outgoing::Publish(pkid)` in submission order, so a FIFO pairs each
    /// message with its packet id.
    fifo: VecDeque<Message>,
    /// Sent, awaiting PUBACK, by packet id.
    inflight: HashMap<u16, Message>,
    /// Last seq submitted (or settled without sending) per stream.
    cursors: HashMap<StreamKey, u64>,
    /// Streams held back after a refusal, until when.
    holds: HashMap<StreamKey, Instant>,
    /// Refusals per message (keyed by its first record id) in this session.
    rejections: HashMap<RecordId, u32>,
    /// The backlog found at connect time, until it is delivered.
    backlog: Option<Backlog>,
    /// Records acknowledged in this session (reported by `sync.completed`).
    delivered: u64,
    /// Replay messages outstanding (part of `fifo` and `inflight`).
    replays: usize,
}

impl Delivery {
    /// A new session's bookkeeping. `backlog` holds, per stream with rows
    /// on disk at connect time, the seq of its newest row.
    pub fn new(window: usize, backlog: HashMap<StreamKey, u64>, now: Instant) -> Self {
        Delivery {
            window: window.max(1),
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            cursors: HashMap::new(),
            holds: HashMap::new(),
            rejections: HashMap::new(),
            backlog: (!backlog.is_empty()).then_some(Backlog {
                targets: backlog,
                started: now,
            }),
            delivered: 0,
            replays: 0,
        }
    }

    /// Messages submitted and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.fifo.len() + self.inflight.len()
    }

    /// Whether another message may be submitted (replay messages do not
    /// count: they have their own share).
    pub fn has_room(&self) -> bool {
        self.outstanding() - self.replays < self.window
    }

    /// Whether another replay message may be submitted, with at most `cap`
    /// of them outstanding.
    pub fn has_replay_room(&self, cap: usize) -> bool {
        self.replays < cap
    }

    /// Whether a backlog found at connect time is still being delivered.
    pub fn syncing(&self) -> bool {
        self.backlog.is_some()
    }

    /// While the backlog found at connect time is being delivered: the
    /// seq the stream's newest row had then. Records up to it were
    /// accepted before this session (Sparkplug marks them historical).
    pub fn backlog_target(&self, stream: &StreamKey) -> Option<u64> {
        self.backlog.as_ref()?.targets.get(stream).copied()
    }

    /// The stream's next message starts after this seq.
    pub fn cursor(&self, stream: &StreamKey) -> u64 {
        self.cursors.get(stream).copied().unwrap_or(0)
    }

    /// Forgets holds that ended by `now`; true if `stream` is still held.
    pub fn held(&mut self, stream: &StreamKey, now: Instant) -> bool {
        self.holds.retain(|_, until| *until > now);
        self.holds.contains_key(stream)
    }

    /// When the earliest hold ends, if any stream is held.
    pub fn next_release(&self) -> Option<Instant> {
        self.holds.values().min().copied()
    }

    /// A message was handed to the MQTT client.
    pub fn submitted(&mut self, message: Message) {
        match &message {
            Message::Records(b) => {
                self.cursors.insert(b.stream.clone(), b.last_seq);
            }
            Message::Replay { .. } => self.replays += 1,
            Message::Control { .. } => {}
        }
        self.fifo.push_back(message);
    }

    /// Rows up to `last_seq` were dealt with without being sent (too large
    /// for any message, so dead-lettered): the stream moves past them.
    pub fn skipped(&mut self, stream: &StreamKey, last_seq: u64) {
        self.cursors.insert(stream.clone(), last_seq);
    }

    /// rumqttc sent the oldest submitted message with this packet id (0 for
    /// QoS 0, which is never acknowledged).
    pub fn sent(&mut self, pkid: u16) -> Option<Action> {
        let Some(message) = self.fifo.pop_front() else {
            return Some(Action::UnknownSent { pkid });
        };
        if pkid != 0 {
            self.inflight.insert(pkid, message);
        } else if matches!(message, Message::Replay { .. }) {
            self.replays -= 1;
        }
        None
    }

    /// The broker acknowledged packet `pkid`; `refused` carries its reason
    /// when it refused the message.
    pub fn acked(&mut self, pkid: u16, refused: Option<String>, now: Instant) -> Option<Action> {
        let batch = match self.inflight.remove(&pkid)? {
            Message::Records(b) => b,
            Message::Control { topic } => {
                return refused.map(|reason| Action::ControlRefused { topic, reason })
            }
            Message::Replay { request_id } => {
                self.replays -= 1;
                return refused.map(|reason| Action::ReplayRefused { request_id, reason });
            }
        };
        let key = batch
            .ids
            .first()
            .copied()
            .unwrap_or(RecordId { stream: 0, seq: 0 });
        let Some(reason) = refused else {
            self.rejections.remove(&key);
            return Some(Action::Delete(batch));
        };
        let attempts = self.rejections.entry(key).or_insert(0);
        *attempts += 1;
        let attempt = *attempts;
        if attempt >= MAX_REJECTIONS {
            self.rejections.remove(&key);
            let reason = format!("broker refused the message {MAX_REJECTIONS} times: {reason}");
            return Some(Action::DeadLetter { batch, reason });
        }
        let retry_in = rejection_delay(attempt);
        let hold = self.holds.entry(batch.stream.clone()).or_insert(now);
        *hold = (*hold).max(now + retry_in);
        // Send it again, and what followed it in its stream, to keep order.
        let cursor = self.cursors.entry(batch.stream.clone()).or_insert(0);
        *cursor = (*cursor).min(batch.first_seq.saturating_sub(1));
        Some(Action::Retry {
            batch,
            attempt,
            retry_in,
            reason,
        })
    }

    /// The rows of an acknowledged message were deleted.
    pub fn delivered(&mut self, batch: &Batch, now: Instant) -> Option<SyncCompleted> {
        let n = batch.ids.len() as u64;
        self.delivered += n;
        self.settled(&batch.stream, now)
    }

    /// Rows of `stream` went to the dead letters (refused too often, or too
    /// large to send).
    pub fn dead_lettered(&mut self, stream: &StreamKey, now: Instant) -> Option<SyncCompleted> {
        self.settled(stream, now)
    }

    /// Nothing is left to read after the stream's cursor: its backlog may be
    /// delivered even though the cursor stands below the target (rows past
    /// it were acknowledged by a message sent before a refusal rewound it).
    pub fn caught_up(&mut self, stream: &StreamKey, now: Instant) -> Option<SyncCompleted> {
        self.check_backlog(stream, true, now)
    }

    fn settled(&mut self, stream: &StreamKey, now: Instant) -> Option<SyncCompleted> {
        self.check_backlog(stream, false, now)
    }

    /// A stream's backlog is delivered once no message still outstanding
    /// starts at or below its target, and its cursor passed the target or
    /// nothing is left to read: a later message acknowledged (or
    /// dead-lettered) while an earlier one awaits its PUBACK or a retry does
    /// not count.
    fn check_backlog(
        &mut self,
        stream: &StreamKey,
        caught_up: bool,
        now: Instant,
    ) -> Option<SyncCompleted> {
        let target = *self.backlog.as_ref()?.targets.get(stream)?;
        let reached = (caught_up || self.cursor(stream) >= target)
            && !self.messages().any(|m| match m {
                Message::Records(b) => b.stream == *stream && b.first_seq <= target,
                Message::Control { .. } | Message::Replay { .. } => false,
            });
        let backlog = self.backlog.as_mut()?;
        if reached {
            backlog.targets.remove(stream);
        }
        if !backlog.targets.is_empty() {
            return None;
        }
        let done = SyncCompleted {
            records: self.delivered,
            duration: now.saturating_duration_since(backlog.started),
        };
        self.backlog = None;
        Some(done)
    }

    /// Every message outstanding.
    fn messages(&self) -> impl Iterator<Item = &Message> {
        self.fifo.iter().chain(self.inflight.values())
    }

    /// Rows were put back into the buffer by another process (dead letters
    /// re-queued by `plantgate buffer retry`), possibly between rows still
    /// in flight: read `stream` again from its oldest row, `first_seq`.
    /// Rows in flight may go out twice (allowed; a manual retry is rare),
    /// none is left behind. True when the cursor moved.
    pub fn rewind(&mut self, stream: &StreamKey, first_seq: u64) -> bool {
        let Some(cursor) = self.cursors.get_mut(stream) else {
            return false;
        };
        let to = first_seq.saturating_sub(1);
        if to >= *cursor {
            return false;
        }
        *cursor = to;
        true
    }

    /// Records acknowledged in this session.
    pub fn delivered_total(&self) -> u64 {
        self.delivered
    }
}

#[cfg(test)]
mod tests;
