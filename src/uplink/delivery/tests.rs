//! Model test of [`Delivery`]: random sequences of appends, fills, sends,
//! acknowledgements, refusals, oversized records, re-queued dead letters,
//! time passing and lost sessions, run against an in-memory buffer and
//! broker. After every step:
//! - only rows of a message the broker accepted were deleted, and only rows
//!   of a message refused [`MAX_REJECTIONS`] times (or too large to send)
//!   went to the dead letters;
//! - no pending row is stranded: each one at or below its stream's cursor
//!   is in a message still outstanding;
//! - a stream's messages go out in seq order until a refusal of that stream
//!   (which resends from the refused message);
//! - at most one `sync.completed` per session, and only once every row of
//!   the backlog found at connect time is settled.
//!
//! The run ends with a drain (no more refusals): every row must then be
//! delivered or dead-lettered, and a session that started with a backlog
//! must have announced `sync.completed` exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::{Action, Batch, Delivery, Message, SyncCompleted, MAX_REJECTIONS};
use crate::record::{Kind, RecordId, StreamKey};

/// The model's record ids: one counter, as the buffer's ids are unique.
fn id(n: i64) -> RecordId {
    RecordId { stream: 1, seq: n }
}

const WINDOW: usize = 6;
const STREAMS: usize = 3;

fn stream(i: usize) -> StreamKey {
    let kind = [Kind::Tag, Kind::Event, Kind::Batch][i % STREAMS];
    StreamKey::new(if kind == Kind::Event { "" } else { "line1" }, kind)
}

#[derive(Clone, Debug)]
enum Op {
    Append { stream: usize, rows: u64 },
    Fill { per_message: usize },
    Control { qos0: bool },
    TooLarge { stream: usize },
    Send { messages: usize },
    Ack { refuse: bool },
    Advance { ms: u64 },
    Requeue,
    Lose,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..STREAMS, 1u64..12).prop_map(|(stream, rows)| Op::Append { stream, rows }),
        4 => (1usize..6).prop_map(|per_message| Op::Fill { per_message }),
        1 => any::<bool>().prop_map(|qos0| Op::Control { qos0 }),
        1 => (0..STREAMS).prop_map(|stream| Op::TooLarge { stream }),
        4 => (1usize..8).prop_map(|messages| Op::Send { messages }),
        4 => prop::bool::weighted(0.3).prop_map(|refuse| Op::Ack { refuse }),
        2 => (0u64..9_000).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Requeue),
        1 => Just(Op::Lose),
    ]
}

/// A message as the model client and broker see it.
#[derive(Clone, Debug)]
struct Wire {
    pkid: u16,
    /// Row ids and the stream, for record messages.
    rows: Option<(StreamKey, Vec<RecordId>)>,
}

struct World {
    start: Instant,
    now: Instant,
    /// Pending rows per stream: seq -> id (what the buffer would return).
    buffer: BTreeMap<StreamKey, BTreeMap<u64, RecordId>>,
    /// Dead letters: id -> (stream, seq).
    dead: BTreeMap<RecordId, (StreamKey, u64)>,
    next_id: RecordId,
    next_seq: HashMap<StreamKey, u64>,
    delivery: Delivery,
    /// Submitted, not yet sent by the client (mirrors the library's queue).
    client: VecDeque<Wire>,
    /// Sent, awaiting PUBACK, oldest first (brokers acknowledge in order).
    wire: VecDeque<Wire>,
    next_pkid: u16,
    /// Row ids the broker accepted at least once.
    accepted: BTreeSet<RecordId>,
    /// Refusals per message first id in this session, as the broker counts.
    refusals: HashMap<RecordId, u32>,
    /// Row ids rejected as too large for any message.
    too_large: BTreeSet<RecordId>,
    /// Per stream, the last seq the broker accepted in this session, and
    /// whether a refusal of the stream allows reordering from then on.
    order: HashMap<StreamKey, (u64, bool)>,
    /// Backlog rows of this session not yet dead-lettered.
    backlog: BTreeSet<RecordId>,
    had_backlog: bool,
    syncs: u32,
}

impl World {
    fn new() -> World {
        let now = Instant::now();
        World {
            start: now,
            now,
            buffer: BTreeMap::new(),
            dead: BTreeMap::new(),
            next_id: id(1),
            next_seq: HashMap::new(),
            delivery: Delivery::new(WINDOW, HashMap::new(), now),
            client: VecDeque::new(),
            wire: VecDeque::new(),
            next_pkid: 1,
            accepted: BTreeSet::new(),
            refusals: HashMap::new(),
            too_large: BTreeSet::new(),
            order: HashMap::new(),
            backlog: BTreeSet::new(),
            had_backlog: false,
            syncs: 0,
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Append { stream: i, rows } => self.append(stream(*i), *rows),
            Op::Fill { per_message } => self.fill(*per_message)?,
            Op::Control { qos0 } => {
                if self.delivery.has_room() {
                    self.delivery.submitted(Message::Control {
                        topic: "status".into(),
                    });
                    self.client.push_back(Wire {
                        pkid: if *qos0 { 0 } else { 1 },
                        rows: None,
                    });
                }
            }
            Op::TooLarge { stream: i } => self.too_large(&stream(*i))?,
            Op::Send { messages } => self.send(*messages)?,
            Op::Ack { refuse } => self.ack(*refuse)?,
            Op::Advance { ms } => self.now += Duration::from_millis(*ms),
            Op::Requeue => self.requeue(),
            Op::Lose => self.lose()?,
        }
        self.check()
    }

    fn append(&mut self, s: StreamKey, rows: u64) {
        for _ in 0..rows {
            let seq = self.next_seq.entry(s.clone()).or_insert(0);
            *seq += 1;
            self.buffer
                .entry(s.clone())
                .or_default()
                .insert(*seq, self.next_id);
            self.next_id = id(self.next_id.seq + 1);
        }
    }

    /// The next rows of `s` after the cursor, as `read_after` returns them.
    fn read(&self, s: &StreamKey, max: usize) -> Vec<(u64, RecordId)> {
        let after = self.delivery.cursor(s);
        self.buffer.get(s).map_or_else(Vec::new, |rows| {
            rows.range(after + 1..)
                .take(max)
                .map(|(q, id)| (*q, *id))
                .collect()
        })
    }

    /// What the session loop's fill does: round-robin over streams not held
    /// back, one message per stream per round, until the window is full.
    fn fill(&mut self, per_message: usize) -> Result<(), TestCaseError> {
        let streams: Vec<StreamKey> = self.buffer.keys().cloned().collect();
        let mut progressed = true;
        while progressed && self.delivery.has_room() {
            progressed = false;
            for s in &streams {
                if !self.delivery.has_room() || self.delivery.held(s, self.now) {
                    continue;
                }
                let rows = self.read(s, per_message);
                let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                    let done = self.delivery.caught_up(s, self.now);
                    self.on_sync(done)?;
                    continue;
                };
                progressed = true;
                let ids: Vec<RecordId> = rows.iter().map(|r| r.1).collect();
                self.delivery.submitted(Message::Records(Batch {
                    stream: s.clone(),
                    ids: ids.clone(),
                    first_seq: first.0,
                    last_seq: last.0,
                    submitted: self.now,
                }));
                self.client.push_back(Wire {
                    pkid: 1,
                    rows: Some((s.clone(), ids)),
                });
            }
        }
        Ok(())
    }

    /// The next row of `s` cannot fit any message: dead-lettered unsent.
    fn too_large(&mut self, s: &StreamKey) -> Result<(), TestCaseError> {
        if self.delivery.held(s, self.now) {
            return Ok(());
        }
        let Some(&(seq, id)) = self.read(s, 1).first() else {
            return Ok(());
        };
        self.too_large.insert(id);
        self.delivery.skipped(s, seq);
        self.move_to_dead(s, &[id]);
        let done = self.delivery.dead_lettered(s, self.now);
        self.on_sync(done)
    }

    fn send(&mut self, n: usize) -> Result<(), TestCaseError> {
        for _ in 0..n {
            let Some(mut w) = self.client.pop_front() else {
                return Ok(());
            };
            if w.pkid != 0 {
                w.pkid = self.next_pkid;
                self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            }
            prop_assert_eq!(self.delivery.sent(w.pkid), None);
            if w.pkid != 0 {
                self.wire.push_back(w);
            }
        }
        Ok(())
    }

    fn ack(&mut self, refuse: bool) -> Result<(), TestCaseError> {
        let Some(w) = self.wire.pop_front() else {
            return Ok(());
        };
        let reason = refuse.then(|| "NotAuthorized".to_string());
        let action = self.delivery.acked(w.pkid, reason, self.now);
        let Some((s, ids)) = w.rows else {
            let expected = matches!(
                (&action, refuse),
                (Some(Action::ControlRefused { .. }), true) | (None, false)
            );
            prop_assert!(expected, "control message: {:?}", action);
            return Ok(());
        };
        let first = ids[0];
        if !refuse {
            self.refusals.remove(&first);
            for id in &ids {
                self.accepted.insert(*id);
            }
            let first_seq = self.seq_of(&s, first);
            let (last, reorder) = self.order.get(&s).copied().unwrap_or((0, false));
            if let Some(seq) = first_seq {
                prop_assert!(
                    reorder || seq > last,
                    "stream {:?}: seq {} accepted after {}",
                    s,
                    seq,
                    last
                );
                let last_seq = self.seq_of(&s, ids[ids.len() - 1]).unwrap_or(seq);
                self.order.insert(s.clone(), (last_seq.max(last), reorder));
            }
        } else {
            *self.refusals.entry(first).or_insert(0) += 1;
            self.order.entry(s.clone()).or_insert((0, false)).1 = true;
        }
        match action {
            Some(Action::Delete(b)) => {
                prop_assert!(!refuse);
                prop_assert_eq!(&b.ids, &ids);
                if let Some(rows) = self.buffer.get_mut(&s) {
                    rows.retain(|_, id| !ids.contains(id));
                }
                let done = self.delivery.delivered(&b, self.now);
                self.on_sync(done)?;
            }
            Some(Action::Retry { batch, attempt, .. }) => {
                prop_assert!(refuse);
                prop_assert_eq!(&batch.ids, &ids);
                prop_assert_eq!(Some(&attempt), self.refusals.get(&first));
                prop_assert!(attempt < MAX_REJECTIONS);
                prop_assert!(self.delivery.held(&s, self.now));
            }
            Some(Action::DeadLetter { batch, .. }) => {
                prop_assert!(refuse);
                prop_assert_eq!(self.refusals.remove(&first), Some(MAX_REJECTIONS));
                // A message may be dead-lettered while a copy of some of its
                // rows was accepted meanwhile (resent after an earlier
                // refusal); only rows still pending move.
                self.move_to_dead(&s, &batch.ids);
                let done = self.delivery.dead_lettered(&s, self.now);
                self.on_sync(done)?;
            }
            other => prop_assert!(false, "unexpected {:?} for a record message", other),
        }
        Ok(())
    }

    fn seq_of(&self, s: &StreamKey, id: RecordId) -> Option<u64> {
        self.buffer
            .get(s)
            .and_then(|rows| rows.iter().find(|(_, i)| **i == id).map(|(q, _)| *q))
            .or_else(|| self.dead.get(&id).map(|(_, q)| *q))
    }

    fn move_to_dead(&mut self, s: &StreamKey, ids: &[RecordId]) {
        if let Some(rows) = self.buffer.get_mut(s) {
            rows.retain(|seq, id| {
                if ids.contains(id) {
                    // Settled as far as the backlog is concerned, even if a
                    // `buffer retry` puts it back later.
                    self.backlog.remove(id);
                    self.dead.insert(*id, (s.clone(), *seq));
                    false
                } else {
                    true
                }
            });
        }
    }

    /// `plantgate buffer retry`: dead letters back into the buffer with
    /// their ids and seqs; the session loop notices the buffer changed under
    /// it and tells `Delivery` each stream's oldest row.
    fn requeue(&mut self) {
        for (id, (s, seq)) in std::mem::take(&mut self.dead) {
            self.buffer.entry(s).or_default().insert(seq, id);
        }
        let firsts: Vec<(StreamKey, u64)> = self
            .buffer
            .iter()
            .filter_map(|(s, rows)| rows.keys().next().map(|q| (s.clone(), *q)))
            .collect();
        for (s, first) in firsts {
            if self.delivery.rewind(&s, first) {
                // Older rows go out again after newer ones: allowed.
                self.order.entry(s).or_insert((0, false)).1 = true;
            }
        }
    }

    /// The connection drops: everything in flight is forgotten and a new
    /// session starts from the buffer as it is.
    fn lose(&mut self) -> Result<(), TestCaseError> {
        let backlog: HashMap<StreamKey, u64> = self
            .buffer
            .iter()
            .filter_map(|(s, rows)| rows.keys().next_back().map(|q| (s.clone(), *q)))
            .collect();
        self.backlog = self
            .buffer
            .values()
            .flat_map(|r| r.values().copied())
            .collect();
        self.had_backlog = !backlog.is_empty();
        prop_assert_eq!(self.had_backlog, !self.backlog.is_empty());
        self.delivery = Delivery::new(WINDOW, backlog, self.now);
        self.client.clear();
        self.wire.clear();
        self.refusals.clear();
        self.order.clear();
        self.syncs = 0;
        Ok(())
    }

    fn on_sync(&mut self, done: Option<SyncCompleted>) -> Result<(), TestCaseError> {
        let Some(done) = done else {
            return Ok(());
        };
        self.syncs += 1;
        prop_assert!(self.had_backlog, "sync.completed without a backlog");
        prop_assert_eq!(self.syncs, 1, "more than one sync.completed in a session");
        for rows in self.buffer.values() {
            for id in rows.values() {
                prop_assert!(
                    !self.backlog.contains(id),
                    "sync.completed while backlog row {:?} is pending",
                    id
                );
            }
        }
        prop_assert!(done.duration <= self.now - self.start);
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        // Gone from the buffer means accepted or dead-lettered.
        for id in (1..self.next_id.seq).map(id) {
            let pending = self.buffer.values().any(|r| r.values().any(|i| *i == id));
            if !pending && !self.dead.contains_key(&id) {
                prop_assert!(
                    self.accepted.contains(&id),
                    "row {:?} deleted unaccepted",
                    id
                );
            }
        }
        // No stranded row: pending at or below the cursor means outstanding.
        let outstanding: BTreeSet<RecordId> = self
            .client
            .iter()
            .chain(self.wire.iter())
            .filter_map(|w| w.rows.as_ref())
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        for (s, rows) in &self.buffer {
            let cursor = self.delivery.cursor(s);
            for (seq, id) in rows.range(..=cursor) {
                prop_assert!(
                    outstanding.contains(id),
                    "stream {:?}: row seq {} (id {:?}) is below the cursor {} but not outstanding",
                    s,
                    seq,
                    id,
                    cursor
                );
            }
        }
        prop_assert_eq!(
            self.delivery.outstanding(),
            self.client.len() + self.wire.len()
        );
        Ok(())
    }

    /// No more refusals: time passes, the window fills and drains until
    /// nothing is left.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..10_000 {
            self.now += Duration::from_secs(10);
            self.fill(4)?;
            let pending = self.buffer.values().any(|r| !r.is_empty());
            if !pending && self.delivery.outstanding() == 0 {
                break;
            }
            self.send(WINDOW)?;
            while !self.wire.is_empty() {
                self.ack(false)?;
            }
            self.check()?;
        }
        prop_assert!(
            self.buffer.values().all(|r| r.is_empty()),
            "rows left after the drain: {:?}",
            self.buffer
        );
        if self.had_backlog {
            prop_assert_eq!(
                self.syncs,
                1,
                "backlog delivered without sync.completed: {:?}",
                self.delivery
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 5_000, ..ProptestConfig::default() })]

    #[test]
    fn delivery_keeps_every_row_until_acknowledged(ops in prop::collection::vec(arb_op(), 1..150)) {
        let mut world = World::new();
        for op in &ops {
            world.step(op)?;
        }
        world.drain()?;
    }
}

#[test]
fn refusals_back_off_then_dead_letter() {
    let now = Instant::now();
    let s = stream(0);
    let mut d = Delivery::new(4, HashMap::from([(s.clone(), 3)]), now);
    let batch = Batch {
        stream: s.clone(),
        ids: vec![id(10), id(11), id(12)],
        first_seq: 1,
        last_seq: 3,
        submitted: now,
    };
    let mut delays = Vec::new();
    for pkid in 1..=MAX_REJECTIONS as u16 {
        d.submitted(Message::Records(batch.clone()));
        assert_eq!(d.cursor(&s), 3);
        assert_eq!(d.sent(pkid), None);
        match d.acked(pkid, Some("QuotaExceeded".into()), now) {
            Some(Action::Retry { retry_in, .. }) => {
                delays.push(retry_in.as_secs());
                assert_eq!(d.cursor(&s), 0, "resent from the refused message");
                assert!(d.held(&s, now));
                assert!(!d.held(&s, now + retry_in));
            }
            Some(Action::DeadLetter { batch: b, reason }) => {
                assert_eq!(b, batch);
                assert!(reason.contains("QuotaExceeded"), "{reason}");
                assert_eq!(pkid, MAX_REJECTIONS as u16);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delays, [1, 2, 4]);
    let done = d.dead_lettered(&s, now + Duration::from_secs(7));
    assert_eq!(
        done,
        Some(SyncCompleted {
            records: 0,
            duration: Duration::from_secs(7)
        })
    );
    assert_eq!(d.outstanding(), 0);
}

#[test]
fn unknown_packets_are_reported_not_guessed() {
    let now = Instant::now();
    let mut d = Delivery::new(4, HashMap::new(), now);
    assert_eq!(d.sent(7), Some(Action::UnknownSent { pkid: 7 }));
    assert_eq!(d.acked(7, None, now), None);
    d.submitted(Message::Control { topic: "hb".into() });
    assert_eq!(d.sent(0), None, "QoS 0: sent, never acknowledged");
    assert_eq!(d.outstanding(), 0);
}

#[test]
fn replay_messages_have_their_own_share_of_the_window() {
    let now = Instant::now();
    let mut d = Delivery::new(2, HashMap::new(), now);
    let replay = || Message::Replay {
        request_id: "r".into(),
    };
    // Replays fill their own share and leave the live window alone.
    for _ in 0..3 {
        assert!(d.has_replay_room(3));
        d.submitted(replay());
    }
    assert!(!d.has_replay_room(3));
    assert!(d.has_room(), "live data still has its whole window");
    d.submitted(Message::Control { topic: "t".into() });
    d.submitted(Message::Control { topic: "t".into() });
    assert!(!d.has_room());
    // Acknowledged or refused, a replay message frees its place; a refusal
    // is reported, never retried or turned into a delete.
    assert_eq!(d.sent(1), None);
    assert_eq!(d.sent(2), None);
    assert_eq!(d.acked(1, None, now), None);
    assert!(d.has_replay_room(3));
    assert_eq!(
        d.acked(2, Some("NotAuthorized".into()), now),
        Some(Action::ReplayRefused {
            request_id: "r".into(),
            reason: "NotAuthorized".into()
        })
    );
    assert_eq!(d.outstanding(), 3);
}
