//! Kept history (`buffer.retain_delivered`) and range reads for replay:
//! what is kept, what a range read finds, and that kept records never
//! change what is pending or announced.

use std::time::Duration;

use serde_json::json;

use super::tests::assert_counters_match;
use super::Store;
use crate::buffer::{Append, Limits, OpenMode, StoreOptions};
use crate::record::{now_ms, Kind, NewRecord, RecordId, StoredRecord, StreamKey};

const HOUR: Duration = Duration::from_secs(3600);

fn keeping(dir: &tempfile::TempDir, limits: Limits) -> Store {
    let options = StoreOptions {
        limits,
        ..StoreOptions::default()
    };
    Store::open(&dir.path().join("buffer.db"), options).expect("open")
}

fn retain(hours: u64) -> Limits {
    Limits {
        retain_delivered: HOUR * hours as u32,
        ..Limits::NONE
    }
}

fn tag() -> StreamKey {
    StreamKey::new("line1", Kind::Tag)
}

fn tags(n: i64, ts_ms: i64) -> Vec<NewRecord> {
    (1..=n)
        .map(|i| NewRecord {
            connection: "line1".into(),
            kind: Kind::Tag,
            ts_ms: ts_ms + i,
            data: json!({ "n": i }).to_string(),
        })
        .collect()
}

fn tag_stats(store: &Store) -> crate::buffer::StreamStats {
    let stats = store.stats().expect("stats");
    let found = stats.streams.into_iter().find(|s| s.stream() == tag());
    found.expect("the tag stream")
}

fn pending(store: &Store) -> Vec<StoredRecord> {
    store
        .read_after(&tag(), 0, usize::MAX, usize::MAX)
        .expect("read")
}

fn ids(records: &[StoredRecord], seqs: std::ops::RangeInclusive<u64>) -> Vec<RecordId> {
    records
        .iter()
        .filter(|r| seqs.contains(&r.seq))
        .map(|r| r.id)
        .collect()
}

fn range(store: &Store, from: u64, to: u64) -> (Vec<u64>, u64) {
    let read = store
        .read_range(&tag(), from, to, usize::MAX, usize::MAX)
        .expect("range");
    (
        read.records.iter().map(|r| r.seq).collect(),
        read.scanned_to,
    )
}

#[test]
fn delivered_records_are_kept_apart_and_replayable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = keeping(&dir, retain(1));
    let t0 = 1_700_000_000_000;
    store
        .append(Append::records(&tags(10, t0)))
        .expect("append");
    let sent = pending(&store);
    assert_eq!(store.ack(&ids(&sent, 1..=10)).expect("ack"), 10);

    let stats = store.stats().expect("stats");
    assert_eq!((stats.records, stats.bytes), (0, 0), "nothing pending");
    assert_eq!(stats.retained_records, 10);
    assert!(stats.retained_bytes > 0);
    assert_eq!(stats.retained_from_ms, Some(t0 + 1));
    assert_eq!(stats.streams[0].retained_first_seq, Some(1));
    assert!(
        pending(&store).is_empty(),
        "kept records are not sent again"
    );
    assert!(store.streams().expect("streams").is_empty());

    let read = store
        .read_range(&tag(), 1, 10, usize::MAX, usize::MAX)
        .expect("range");
    assert_eq!(read.records, sent, "the same records, byte for byte");
    assert_eq!(read.scanned_to, 10);
    // A duplicate acknowledgement touches nothing.
    assert_eq!(store.ack(&ids(&sent, 1..=10)).expect("ack"), 0);
    assert_counters_match(&store);
}

#[test]
fn without_retention_acknowledged_records_are_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = keeping(&dir, Limits::NONE);
    store
        .append(Append::records(&tags(10, now_ms())))
        .expect("append");
    let sent = pending(&store);
    store.ack(&ids(&sent, 1..=10)).expect("ack");
    assert_eq!(range(&store, 1, 10), (vec![], 10));
    assert_eq!(store.stats().expect("stats").retained_records, 0);
    assert_counters_match(&store);
}

#[test]
fn a_range_spans_delivered_pending_and_dead_lettered_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = keeping(&dir, retain(1));
    store
        .append(Append::records(&tags(10, now_ms())))
        .expect("append");
    let sent = pending(&store);
    store.ack(&ids(&sent, 1..=2)).expect("ack");
    store
        .dead_letter(&ids(&sent, 3..=4), "refused")
        .expect("dead letter");
    let all: Vec<u64> = (1..=10).collect();
    assert_eq!(range(&store, 1, 10), (all.clone(), 10));
    assert_counters_match(&store);

    // The rest delivered: the segment is kept, its dead letters are still
    // replayed from their own table.
    store.ack(&ids(&sent, 5..=10)).expect("ack");
    let stats = tag_stats(&store);
    assert_eq!(stats.records, 0);
    assert_eq!(stats.retained_records, 8, "all but the two dead letters");
    assert_eq!(range(&store, 1, 10), (all.clone(), 10));
    assert_counters_match(&store);

    // Re-queued, sent and delivered: kept like the others.
    assert_eq!(store.retry_dead_letters().expect("retry"), 2);
    assert_eq!(
        pending(&store).iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_counters_match(&store);
    store.ack(&ids(&sent, 3..=4)).expect("ack");
    let stats = tag_stats(&store);
    assert_eq!((stats.records, stats.retained_records), (0, 10));
    assert_eq!(range(&store, 1, 10), (all, 10));
    assert_counters_match(&store);
}

#[test]
fn records_evicted_inside_a_segment_are_never_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_age: HOUR,
        ..retain(1)
    };
    let mut store = keeping(&dir, limits);
    let now = now_ms();
    let mut records = tags(5, now - 2 * 3_600_000);
    records.extend(tags(5, now));
    store.append(Append::records(&records)).expect("append");
    let evicted = store.evict_expired(now).expect("expire");
    assert_eq!(evicted.len(), 1);
    assert_eq!((evicted[0].first_seq, evicted[0].last_seq), (1, 5));
    assert_eq!(range(&store, 1, 10), ((6..=10).collect(), 10));
    let rest = pending(&store);
    store.ack(&ids(&rest, 6..=10)).expect("ack");
    let stats = store.stats().expect("stats");
    assert_eq!(stats.retained_records, 5);
    assert_eq!(range(&store, 1, 10), ((6..=10).collect(), 10));
    assert_counters_match(&store);
}

#[test]
fn kept_history_expires_silently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = keeping(&dir, retain(1));
    let now = now_ms();
    store
        .append(Append::records(&tags(10, now)))
        .expect("append");
    let sent = pending(&store);
    store.ack(&ids(&sent, 1..=10)).expect("ack");
    assert!(store.evict_expired(now).expect("expire").is_empty());
    assert_eq!(store.stats().expect("stats").retained_records, 10);

    let later = now + 2 * 3_600_000;
    assert!(
        store.evict_expired(later).expect("expire").is_empty(),
        "letting kept records go is not an eviction"
    );
    let stats = store.stats().expect("stats");
    assert_eq!((stats.retained_records, stats.retained_bytes), (0, 0));
    assert_eq!(stats.retained_released_total, 10);
    assert_eq!(stats.evicted_total, 0);
    assert_eq!(range(&store, 1, 10), (vec![], 10));
    assert_counters_match(&store);
}

#[test]
fn a_range_read_is_bounded_and_says_how_far_it_looked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = keeping(&dir, retain(1));
    store
        .append(Append::records(&tags(100, now_ms())))
        .expect("append");
    let sent = pending(&store);
    store.ack(&ids(&sent, 1..=60)).expect("ack");
    let read = store
        .read_range(&tag(), 11, 100, 30, usize::MAX)
        .expect("range");
    assert_eq!(read.records.len(), 30);
    assert_eq!((read.records[0].seq, read.scanned_to), (11, 40));
    let bytes = sent[40].data.len() * 3;
    let read = store
        .read_range(&tag(), 41, 100, 100, bytes)
        .expect("range");
    assert_eq!(read.records.len(), 3);
    assert_eq!(read.scanned_to, 43);
    // Beyond what the stream ever had: looked at, nothing found.
    assert_eq!(range(&store, 101, 200), (vec![], 200));
    let other = StreamKey::new("nobody", Kind::Tag);
    let read = store
        .read_range(&other, 1, 5, 10, usize::MAX)
        .expect("range");
    assert!(read.records.is_empty());
    assert_eq!(read.scanned_to, 5);
}

/// Incompressible `data` of about `len` bytes: the store compresses
/// segments, so only this reaches a size limit. Shared by the buffer's tests.
pub(crate) fn noise(seed: u64, len: usize) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = String::with_capacity(len + 16);
    out.push_str("{\"v\":\"");
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(&format!("{:016x}", x >> 1));
    }
    out.push_str("\"}");
    out
}

#[test]
fn kept_history_gives_way_to_undelivered_records_without_an_eviction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        limits: Limits {
            max_size: 320 * 1024,
            ..retain(24)
        },
        mode: OpenMode::Service,
        ..StoreOptions::default()
    };
    let mut store = Store::open(&dir.path().join("buffer.db"), options).expect("open");
    let batch = |from: u64| -> Vec<NewRecord> {
        (from..from + 10)
            .map(|i| NewRecord {
                connection: "line1".into(),
                kind: Kind::Tag,
                ts_ms: now_ms(),
                data: noise(i, 1000),
            })
            .collect()
    };
    // Delivered history first...
    for round in 0..15 {
        let report = store
            .append(Append::records(&batch(round * 10)))
            .expect("append");
        assert!(report.evicted.is_empty());
        let sent = pending(&store);
        store.ack(&ids(&sent, 0..=u64::MAX)).expect("ack");
    }
    let before = store.stats().expect("stats");
    assert!(before.retained_records > 100, "{before:?}");
    // ...then an outage: everything new stays pending and fits, because
    // the kept history makes room.
    for round in 15..25 {
        let report = store
            .append(Append::records(&batch(round * 10)))
            .expect("append");
        assert!(
            report.evicted.is_empty(),
            "undelivered records evicted while kept history remained: {:?} {:?}",
            report.evicted,
            store.stats()
        );
    }
    let after = store.stats().expect("stats");
    assert_eq!(after.records, 100, "every undelivered record kept");
    assert_eq!(after.evicted_total, 0);
    assert!(after.retained_released_total > 0, "{after:?}");
    assert!(after.retained_records < before.retained_records);
    assert_counters_match(&store);
}
