//! Model-based test of the buffer (the style of Vector's disk_v2 model
//! tests): proptest generates sequences of actions, which are applied to the
//! real `Store` on a real file and to a trivial in-memory model; after every
//! action the pending rows, seqs, counters, dead letters and the evicted
//! ranges must agree. Size eviction depends on SQLite's page usage, which
//! the model cannot predict, so there the store decides *when* and the
//! model checks *what*: every eviction must be a head range of its stream,
//! exact in count, of a tag stream unless no tag row is left, and announced
//! by an event with exactly that content.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use plantgate::buffer::{Append, Eviction, EvictionReason, Limits, OpenMode, Store, StoreOptions};
use plantgate::record::{Kind, NewRecord, RecordId, StreamKey};
use proptest::prelude::*;
use serde_json::json;

const MAX_SIZE: u64 = 160 * 1024;
const MAX_AGE_MS: i64 = 500;
/// Timestamp the model gives the buffer's own wall-clock events: far newer
/// than any `now` the actions use, so never expired, like the real ones.
const WALL_CLOCK: i64 = i64::MAX / 4;

/// Evictions seen over all cases (size/tag, age, size/other, of dead
/// letters), to show that the generated sequences do reach the interesting
/// states.
static SEEN: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

fn streams() -> Vec<StreamKey> {
    vec![
        StreamKey::new("line1", Kind::Tag),
        StreamKey::new("line2", Kind::Tag),
        StreamKey::new("line1", Kind::Batch),
        StreamKey::new("mes", Kind::Oee),
        StreamKey::new("", Kind::Event),
    ]
}

#[derive(Clone, Debug)]
enum Action {
    /// (stream index, ts_ms, pad length) per record.
    Append(Vec<(usize, i64, usize)>),
    Read {
        stream: usize,
        after: u64,
        max: usize,
    },
    /// Acks the remembered reads selected by the mask bits.
    Ack(u64),
    EvictExpired(i64),
    DeadLetter(u64),
    Retry,
    /// Drop without close, reopen: what a crash looks like to the next process.
    Reopen,
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => prop::collection::vec((0..5usize, 0..2_000i64, prop_oneof![4 => 0..200usize, 1 => 200..4_000usize]), 0..12)
            .prop_map(Action::Append),
        4 => (0..5usize, 0..40u64, 1..30usize).prop_map(|(stream, after, max)| Action::Read { stream, after, max }),
        4 => any::<u64>().prop_map(Action::Ack),
        1 => (0..3_000i64).prop_map(Action::EvictExpired),
        1 => any::<u64>().prop_map(|m| Action::DeadLetter(m & 0x7)),
        1 => Just(Action::Retry),
        1 => Just(Action::Reopen),
    ]
}

/// Acks and dead letters need earlier reads; drop the ones that cannot refer
/// to anything (Vector's `sanitize_raw_actions`).
fn sanitize(actions: Vec<Action>) -> Vec<Action> {
    let mut read = false;
    actions
        .into_iter()
        .filter(|a| match a {
            Action::Read { .. } => {
                read = true;
                true
            }
            Action::Ack(_) | Action::DeadLetter(_) => read,
            _ => true,
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Row {
    ts: i64,
    data: String,
}

#[derive(Default, Debug)]
struct ModelStream {
    next_seq: u64,
    pending: BTreeMap<u64, Row>,
    evicted: u64,
}

#[derive(Default, Debug)]
struct Model {
    streams: BTreeMap<StreamKey, ModelStream>,
    dead: BTreeMap<(StreamKey, u64), Row>,
}

impl Model {
    fn stream(&mut self, key: &StreamKey) -> &mut ModelStream {
        let s = self.streams.entry(key.clone()).or_default();
        s.next_seq = s.next_seq.max(1);
        s
    }

    fn push(&mut self, key: &StreamKey, ts: i64, data: String) -> u64 {
        let s = self.stream(key);
        let seq = s.next_seq;
        s.next_seq += 1;
        s.pending.insert(seq, Row { ts, data });
        seq
    }

    fn tags_pending(&self) -> usize {
        self.streams
            .iter()
            .filter(|(k, _)| k.kind == Kind::Tag)
            .map(|(_, s)| s.pending.len())
            .sum()
    }

    /// Dead letters of the tag lane (`tags`) or of the other kinds.
    fn dead_in_lane(&self, tags: bool) -> usize {
        self.dead
            .keys()
            .filter(|(k, _)| (k.kind == Kind::Tag) == tags)
            .count()
    }

    /// Seqs of one stream's dead letters, in order.
    fn dead_seqs(&self, key: &StreamKey) -> Vec<u64> {
        self.dead
            .keys()
            .filter(|(k, _)| k == key)
            .map(|(_, seq)| *seq)
            .collect()
    }

    /// Checks one eviction the store reported against the model and applies
    /// it, including its announcement.
    fn apply_eviction(&mut self, e: &Eviction, event_ts: i64) -> Result<(), TestCaseError> {
        if e.kind != Kind::Tag && e.reason != EvictionReason::MaxAge {
            prop_assert_eq!(self.tags_pending(), 0, "{:?} while tag rows remain", e);
            prop_assert_eq!(
                self.dead_in_lane(true),
                0,
                "{:?} while tag dead letters remain",
                e
            );
        }
        if !e.dead_letters && e.reason != EvictionReason::MaxAge {
            // Within a lane, dead letters go first.
            prop_assert_eq!(
                self.dead_in_lane(e.kind == Kind::Tag),
                0,
                "{:?} while dead letters of its lane remain",
                e
            );
        }
        let connection = if e.connection.is_empty() {
            json!(null)
        } else {
            json!(e.connection)
        };
        if e.dead_letters {
            SEEN[3].fetch_add(1, Ordering::Relaxed);
            let key = e.stream();
            let seqs = self.dead_seqs(&key);
            prop_assert_eq!(
                seqs.first().copied(),
                Some(e.first_seq),
                "dead-letter eviction must start at the first: {:?}",
                e
            );
            let gone: Vec<u64> = seqs.into_iter().filter(|s| *s <= e.last_seq).collect();
            prop_assert_eq!(gone.len() as u64, e.count, "exact count: {:?}", e);
            for seq in gone {
                self.dead.remove(&(key.clone(), seq));
            }
            self.stream(&key).evicted += e.count;
            let data = json!({"type": "buffer.evicted", "details": {
                "connection": connection, "kind": e.kind.as_str(), "first_seq": e.first_seq,
                "last_seq": e.last_seq, "count": e.count, "reason": "dead_letter",
                "limit": e.reason.as_str()}});
            self.push(&StreamKey::new("", Kind::Event), event_ts, data.to_string());
            return Ok(());
        }
        let s = self.stream(&e.stream());
        let head = s.pending.keys().next().copied();
        prop_assert_eq!(
            head,
            Some(e.first_seq),
            "eviction must start at the head: {:?}",
            e
        );
        let gone: Vec<u64> = s.pending.range(..=e.last_seq).map(|(k, _)| *k).collect();
        prop_assert_eq!(gone.len() as u64, e.count, "exact count: {:?}", e);
        for seq in gone {
            s.pending.remove(&seq);
        }
        s.evicted += e.count;
        let data = json!({"type": "buffer.evicted", "details": {
            "connection": connection, "kind": e.kind.as_str(), "first_seq": e.first_seq,
            "last_seq": e.last_seq, "count": e.count, "reason": e.reason.as_str()}});
        self.push(&StreamKey::new("", Kind::Event), event_ts, data.to_string());
        Ok(())
    }
}

fn limits() -> Limits {
    Limits {
        max_size: MAX_SIZE,
        max_age: Duration::from_millis(MAX_AGE_MS as u64),
        // Kept history must never change what is pending or announced.
        retain_delivered: Duration::from_secs(3600),
    }
}

fn open(path: &Path) -> Store {
    let options = StoreOptions {
        limits: limits(),
        mode: OpenMode::Service,
        ..StoreOptions::default()
    };
    Store::open(path, options).expect("open")
}

fn compare(store: &Store, model: &Model, step: usize) -> Result<(), TestCaseError> {
    let stats = store.stats().expect("stats");
    let mut with_rows = Vec::new();
    for (key, m) in &model.streams {
        let got: Vec<(u64, String)> = store
            .read_after(key, 0, usize::MAX, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|r| (r.seq, r.data))
            .collect();
        let want: Vec<(u64, String)> = m
            .pending
            .iter()
            .map(|(s, r)| (*s, r.data.clone()))
            .collect();
        prop_assert_eq!(got, want, "step {}: pending rows of {:?}", step, key);
        let s = stats.streams.iter().find(|s| &s.stream() == key);
        prop_assert!(
            s.is_some(),
            "step {}: stream {:?} missing from stats",
            step,
            key
        );
        let s = s.expect("checked");
        prop_assert_eq!(
            s.next_seq,
            m.next_seq,
            "step {}: next_seq of {:?}",
            step,
            key
        );
        prop_assert_eq!(s.records, m.pending.len() as u64);
        prop_assert_eq!(
            s.evicted_total,
            m.evicted,
            "step {}: evicted of {:?}",
            step,
            key
        );
        prop_assert_eq!(s.first_seq, m.pending.keys().next().copied());
        prop_assert_eq!(s.last_seq, m.pending.keys().next_back().copied());
        if !m.pending.is_empty() {
            with_rows.push(key.clone());
        }
    }
    prop_assert_eq!(stats.streams.len(), model.streams.len());
    prop_assert_eq!(store.streams().expect("streams"), with_rows);
    prop_assert_eq!(stats.dead_letters, model.dead.len() as u64);
    prop_assert_eq!(
        stats.evicted_total,
        model.streams.values().map(|s| s.evicted).sum::<u64>()
    );
    let dead: u64 = store
        .dead_letters()
        .expect("dead letters")
        .iter()
        .map(|d| d.count)
        .sum();
    prop_assert_eq!(dead, model.dead.len() as u64);
    Ok(())
}

/// After a refused maintenance operation: the store must be unchanged.
/// Returns a marker telling the caller to skip the model update.
fn continue_after_full(store: &Store, model: &Model, step: usize) -> Result<usize, TestCaseError> {
    compare(store, model, step)?;
    Ok(usize::MAX)
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let keys = streams();
    let mut store = open(&path);
    let mut model = Model::default();
    // (stream, seq, id) of rows returned by reads, newest last.
    let mut reads: Vec<(StreamKey, u64, RecordId)> = Vec::new();
    let mut n = 0u64;
    for (step, action) in actions.into_iter().enumerate() {
        match action {
            Action::Append(spec) => {
                let records: Vec<NewRecord> = spec
                    .iter()
                    .map(|(i, ts, pad)| {
                        n += 1;
                        NewRecord {
                            connection: keys[*i].connection.clone(),
                            kind: keys[*i].kind,
                            ts_ms: *ts,
                            data: json!({"n": n, "pad": "x".repeat(*pad)}).to_string(),
                        }
                    })
                    .collect();
                let report = store.append(Append::records(&records));
                prop_assert!(
                    report.is_ok(),
                    "step {}: append failed: {:?}",
                    step,
                    report.err()
                );
                let report = report.expect("checked");
                for e in &report.evicted {
                    SEEN[if e.kind == Kind::Tag { 0 } else { 2 }].fetch_add(1, Ordering::Relaxed);
                    prop_assert_eq!(e.reason, EvictionReason::MaxSize);
                    model.apply_eviction(e, WALL_CLOCK)?;
                }
                for (r, seq) in records.iter().zip(&report.seqs) {
                    let want = model.push(
                        &StreamKey::new(r.connection.clone(), r.kind),
                        r.ts_ms,
                        r.data.clone(),
                    );
                    prop_assert_eq!(*seq, want, "step {}: seq", step);
                }
            }
            Action::Read { stream, after, max } => {
                let key = &keys[stream];
                let got = store.read_after(key, after, max, usize::MAX).expect("read");
                let want: Vec<u64> = model
                    .streams
                    .get(key)
                    .map(|m| {
                        m.pending
                            .range(after + 1..)
                            .take(max)
                            .map(|(s, _)| *s)
                            .collect()
                    })
                    .unwrap_or_default();
                prop_assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), want);
                reads.extend(got.into_iter().map(|r| (key.clone(), r.seq, r.id)));
                let excess = reads.len().saturating_sub(64);
                reads.drain(..excess);
            }
            Action::Ack(mask) => {
                let chosen: Vec<(StreamKey, u64, RecordId)> = reads
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 64)) != 0)
                    .map(|(_, r)| r.clone())
                    .collect();
                let ids: Vec<RecordId> = chosen.iter().map(|r| r.2).collect();
                let acked = store.ack(&ids).expect("ack");
                let mut want = 0;
                for (key, seq, _) in &chosen {
                    if let Some(m) = model.streams.get_mut(key) {
                        if m.pending.remove(seq).is_some() {
                            want += 1;
                        }
                    }
                }
                prop_assert_eq!(acked, want, "step {}: acked", step);
            }
            Action::EvictExpired(now) => {
                let got = store.evict_expired(now).expect("evict_expired");
                let cutoff = now - MAX_AGE_MS;
                let mut want = Vec::new();
                let snapshot: Vec<StreamKey> = model
                    .streams
                    .iter()
                    .filter(|(_, s)| !s.pending.is_empty())
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in snapshot {
                    let s = model.stream(&key);
                    let expired: Vec<u64> = s
                        .pending
                        .iter()
                        .take_while(|(_, r)| r.ts < cutoff)
                        .map(|(seq, _)| *seq)
                        .collect();
                    if let (Some(first), Some(last)) = (expired.first(), expired.last()) {
                        let e = Eviction {
                            connection: key.connection.clone(),
                            kind: key.kind,
                            first_seq: *first,
                            last_seq: *last,
                            count: expired.len() as u64,
                            bytes: 0,
                            reason: EvictionReason::MaxAge,
                            dead_letters: false,
                        };
                        model.apply_eviction(&e, now)?;
                        want.push(e);
                    }
                }
                // Then the dead letters, per stream, head first.
                let dead_streams: std::collections::BTreeSet<StreamKey> =
                    model.dead.keys().map(|(k, _)| k.clone()).collect();
                for key in dead_streams {
                    let expired: Vec<u64> = model
                        .dead
                        .iter()
                        .filter(|((k, _), _)| *k == key)
                        .take_while(|(_, r)| r.ts < cutoff)
                        .map(|((_, seq), _)| *seq)
                        .collect();
                    if let (Some(first), Some(last)) = (expired.first(), expired.last()) {
                        let e = Eviction {
                            connection: key.connection.clone(),
                            kind: key.kind,
                            first_seq: *first,
                            last_seq: *last,
                            count: expired.len() as u64,
                            bytes: 0,
                            reason: EvictionReason::MaxAge,
                            dead_letters: true,
                        };
                        model.apply_eviction(&e, now)?;
                        want.push(e);
                    }
                }
                SEEN[1].fetch_add(want.len() as u64, Ordering::Relaxed);
                let got: Vec<Eviction> = got
                    .into_iter()
                    .map(|e| Eviction { bytes: 0, ..e })
                    .collect();
                prop_assert_eq!(got, want, "step {}: expired", step);
            }
            Action::DeadLetter(mask) => {
                let chosen: Vec<(StreamKey, u64, RecordId)> = reads
                    .iter()
                    .rev()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, r)| r.clone())
                    .collect();
                let ids: Vec<RecordId> = chosen.iter().map(|r| r.2).collect();
                let moved = match store.dead_letter(&ids, "rejected") {
                    Ok(moved) => moved,
                    // At the cap: nothing moved, the model stays as it is.
                    Err(e) if e.is_disk_full() => continue_after_full(&store, &model, step)?,
                    Err(e) => panic!("dead letter: {e}"),
                };
                if moved == usize::MAX {
                    continue;
                }
                let mut groups: BTreeMap<StreamKey, Vec<u64>> = BTreeMap::new();
                for (key, seq, _) in &chosen {
                    if let Some(row) = model
                        .streams
                        .get_mut(key)
                        .and_then(|m| m.pending.remove(seq))
                    {
                        model.dead.insert((key.clone(), *seq), row);
                        groups.entry(key.clone()).or_default().push(*seq);
                    }
                }
                prop_assert_eq!(moved, groups.values().map(Vec::len).sum::<usize>());
                for (key, seqs) in groups {
                    if key.connection.is_empty() && key.kind == Kind::Event {
                        continue;
                    }
                    let data = json!({"type": "system.error", "details": {
                        "message": "records moved to dead letters",
                        "connection": if key.connection.is_empty() { json!(null) } else { json!(key.connection) },
                        "kind": key.kind.as_str(),
                        "first_seq": seqs.iter().min(), "last_seq": seqs.iter().max(),
                        "count": seqs.len(), "reason": "rejected"}});
                    model.push(
                        &StreamKey::new("", Kind::Event),
                        WALL_CLOCK,
                        data.to_string(),
                    );
                }
            }
            Action::Retry => {
                let moved = match store.retry_dead_letters() {
                    Ok(moved) => moved,
                    Err(e) if e.is_disk_full() => {
                        continue_after_full(&store, &model, step)?;
                        continue;
                    }
                    Err(e) => panic!("retry: {e}"),
                };
                prop_assert_eq!(moved, model.dead.len());
                for ((key, seq), row) in std::mem::take(&mut model.dead) {
                    model.stream(&key).pending.insert(seq, row);
                }
            }
            Action::Reopen => {
                drop(store);
                store = open(&path);
            }
        }
        compare(&store, &model, step)?;
    }
    store.integrity_check().expect("integrity");
    // The file never outgrew the limit.
    let on_disk: u64 = ["", "-wal", ".reserve"]
        .iter()
        .map(|s| {
            std::fs::metadata(format!("{}{s}", path.display()))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    prop_assert!(on_disk <= MAX_SIZE, "{} bytes on disk", on_disk);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn store_behaves_like_the_model(actions in prop::collection::vec(arb_action(), 1..120).prop_map(sanitize)) {
        run(actions)?;
        eprintln!("evictions so far: size/tag {} age {} size/other {} dead letters {}", SEEN[0].load(Ordering::Relaxed),
            SEEN[1].load(Ordering::Relaxed), SEEN[2].load(Ordering::Relaxed), SEEN[3].load(Ordering::Relaxed));
    }
}
