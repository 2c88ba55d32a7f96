//! Upgrading buffers written by older plantgates: schema 3 (one row per
//! record) to segments, and schema 4 (segments that nothing kept once
//! delivered) to kept history. Real old files (tests/fixtures/, see the
//! README there) are opened by the service, and every record in them is
//! read back exactly, then delivered and deleted (or kept) as any other.

use std::path::Path;

use plantgate::buffer::{Append, Limits, OpenMode, Store, StoreOptions};
use plantgate::config::Synchronous;
use plantgate::record::{Kind, NewRecord, StoredRecord, StreamKey};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/buffer-v3.db");
const FIXTURE_V4: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/buffer-v4.db");
const T0: i64 = 1_764_000_000_000;

/// The `data` of tag record `seq` as the fixture's writer made it.
fn tag_data(seq: i64) -> String {
    let i = seq % 50;
    let v = ((seq as f64) * 0.1).sin() * 50.0 + seq as f64 * 1e-3;
    format!(
        "{{\"name\":\"TAG{i:05}\",\"node\":\"nsu=urn:plantgate:sim:deltav;s=LOAD/TAG{i:05}.CV\",\
         \"quality\":\"good\",\"status\":\"Good\",\"value\":{}}}",
        serde_json::to_string(&v).expect("number")
    )
}

fn copy_fixture(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("buffer.db");
    std::fs::copy(FIXTURE, &path).expect("copy the fixture");
    path
}

fn service(path: &Path) -> Store {
    service_with(path, Limits::NONE)
}

fn service_with(path: &Path, limits: Limits) -> Store {
    Store::open(
        path,
        StoreOptions {
            synchronous: Synchronous::Normal,
            limits,
            mode: OpenMode::Service,
        },
    )
    .expect("open the old buffer as the service")
}

fn user_version(p: &Path) -> i64 {
    rusqlite::Connection::open(p)
        .expect("open")
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version")
}

fn all(store: &Store, stream: &StreamKey) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        // Small reads: several per segment, as the uplink does.
        let rows = store
            .read_after(stream, after, 97, 64 * 1024)
            .expect("read");
        let Some(last) = rows.last() else {
            return out;
        };
        after = last.seq;
        out.extend(rows);
    }
}

#[test]
fn a_schema_3_buffer_is_read_back_whole_and_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_fixture(dir.path());
    assert_eq!(user_version(&path), 3, "the fixture is a schema-3 file");
    let store = service(&path);
    assert!(store.quarantined().is_none(), "an old file is not corrupt");
    store
        .integrity_check()
        .expect("integrity after the upgrade");

    // Every tag record, in order, with its seq, time and text; the acked
    // head (1..=100) and the dead letters (500..=504) are not pending.
    let tag = StreamKey::new("deltav-line1", Kind::Tag);
    let tags = all(&store, &tag);
    let want: Vec<i64> = (101..=1500).filter(|s| !(500..=504).contains(s)).collect();
    assert_eq!(tags.iter().map(|r| r.seq as i64).collect::<Vec<_>>(), want);
    for r in &tags {
        let seq = r.seq as i64;
        assert_eq!(r.ts_ms, T0 + seq * 20, "ts of seq {seq}");
        assert_eq!(r.data, tag_data(seq), "data of seq {seq}");
    }
    let batch = all(&store, &StreamKey::new("deltav-line1", Kind::Batch));
    assert_eq!(
        batch.iter().map(|r| r.data.clone()).collect::<Vec<_>>(),
        (1..=5)
            .map(|n| format!("{{\"batch_id\":\"B{n}\",\"event\":\"started\"}}"))
            .collect::<Vec<_>>()
    );
    let oee = all(&store, &StreamKey::new("optomes-1", Kind::Oee));
    assert_eq!(
        oee.iter().map(|r| (r.seq, r.ts_ms)).collect::<Vec<_>>(),
        (1..=3)
            .map(|n| (n as u64, T0 + n * 60_000))
            .collect::<Vec<_>>()
    );
    let events = all(&store, &StreamKey::new("", Kind::Event));
    assert_eq!(events.len(), 2, "agent.online and the dead-letter notice");
    assert_eq!(
        store
            .profile_state("deltav-line1")
            .expect("state")
            .as_deref(),
        Some("{\"open_batch\":\"B5\"}")
    );

    // Counters and figures carried over; the file is now of the new kind.
    let stats = store.stats().expect("stats");
    assert_eq!(stats.records, (tags.len() + 5 + 3 + 2) as u64);
    assert_eq!(stats.dead_letters, 5);
    let s = stats
        .streams
        .iter()
        .find(|s| s.stream() == tag)
        .expect("tag stream");
    assert_eq!(
        (s.records, s.first_seq, s.last_seq, s.next_seq),
        (1395, Some(101), Some(1500), 1501)
    );
    assert_eq!(s.oldest_ts_ms, Some(T0 + 101 * 20));
    assert!(
        stats.bytes < 256_444 / 3,
        "the segments take {} bytes where the rows took 256 444",
        stats.bytes
    );
    drop(store);
    assert_eq!(user_version(&path), 6);
    let legacy: i64 = rusqlite::Connection::open(&path)
        .expect("open")
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'records'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(legacy, 0, "the old table is gone once converted");

    // Reopened: the same, and new records continue the seqs.
    let mut store = service(&path);
    assert_eq!(all(&store, &tag).len(), tags.len());
    let more = NewRecord {
        connection: "deltav-line1".into(),
        kind: Kind::Tag,
        ts_ms: T0 + 1501 * 20,
        data: tag_data(1501),
    };
    let report = store
        .append(Append::records(std::slice::from_ref(&more)))
        .expect("append");
    assert_eq!(report.seqs, vec![1501]);

    // The dead letters come back with their seqs, in the old segments' gaps.
    assert_eq!(store.retry_dead_letters().expect("retry"), 5);
    let tags = all(&store, &tag);
    let want: Vec<i64> = (101..=1501).collect();
    assert_eq!(tags.iter().map(|r| r.seq as i64).collect::<Vec<_>>(), want);
    assert_eq!(tags[399].data, tag_data(500));

    // Everything drains: acked, nothing left, the counters agree.
    for stream in store.streams().expect("streams") {
        let ids: Vec<_> = all(&store, &stream).iter().map(|r| r.id).collect();
        assert_eq!(store.ack(&ids).expect("ack"), ids.len());
    }
    let stats = store.stats().expect("stats");
    assert_eq!((stats.records, stats.bytes, stats.dead_letters), (0, 0, 0));
    store.integrity_check().expect("integrity after draining");
}

#[test]
fn a_schema_4_buffer_keeps_what_it_delivers_from_now_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    std::fs::copy(FIXTURE_V4, &path).expect("copy the fixture");
    assert_eq!(user_version(&path), 4, "the fixture is a schema-4 file");
    let limits = Limits {
        retain_delivered: std::time::Duration::from_secs(86_400),
        ..Limits::NONE
    };
    let mut store = service_with(&path, limits);
    assert!(store.quarantined().is_none());
    assert_eq!(store.epoch(), "a2958ac534e541a58bfe60d0085aa011");
    store
        .integrity_check()
        .expect("integrity after the upgrade");
    assert_eq!(user_version(&path), 6);

    // What was pending still is, exactly (1..=1000 were delivered and
    // deleted by the old version; 1500..=1504 are dead letters).
    let tag = StreamKey::new("deltav-line1", Kind::Tag);
    let tags = all(&store, &tag);
    let want: Vec<i64> = (1001..=3000)
        .filter(|s| !(1500..=1504).contains(s))
        .collect();
    assert_eq!(tags.iter().map(|r| r.seq as i64).collect::<Vec<_>>(), want);
    for r in &tags {
        let seq = r.seq as i64;
        assert_eq!((r.ts_ms, r.data.clone()), (T0 + seq * 10, tag_data(seq)));
    }
    let stats = store.stats().expect("stats");
    assert_eq!((stats.dead_letters, stats.retained_records), (5, 0));

    // A replay of the whole stream: what the old version deleted is
    // missing, the rest (dead letters included) comes back.
    let read = store
        .read_range(&tag, 1, 3000, usize::MAX, usize::MAX)
        .expect("range");
    let got: Vec<i64> = read.records.iter().map(|r| r.seq as i64).collect();
    assert_eq!(got, (1001..=3000).collect::<Vec<_>>());

    // Delivered from now on: kept, and still replayable.
    let ids: Vec<_> = tags.iter().map(|r| r.id).collect();
    assert_eq!(store.ack(&ids).expect("ack"), ids.len());
    let stats = store.stats().expect("stats");
    let s = stats
        .streams
        .iter()
        .find(|s| s.stream() == tag)
        .expect("tag stream");
    assert_eq!((s.records, s.bytes), (0, 0));
    assert_eq!(s.retained_records, 1995);
    assert_eq!(s.retained_first_seq, Some(1001));
    assert_eq!(s.retained_from_ms, Some(T0 + 1001 * 10));
    let read = store
        .read_range(&tag, 1490, 1510, usize::MAX, usize::MAX)
        .expect("range");
    assert_eq!(
        read.records.len(),
        21,
        "kept records and dead letters alike"
    );
    assert_eq!(read.records[10].data, tag_data(1500));
    store.integrity_check().expect("integrity after delivery");
}

#[test]
fn an_upgrade_cut_short_goes_on_at_the_next_open() {
    // A crash in the middle of the upgrade leaves segments for the lower
    // seqs and rows for the rest: simulated by converting, then putting
    // back (as schema 3 would hold them) rows the upgrade had not reached.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_fixture(dir.path());
    let conn = rusqlite::Connection::open(&path).expect("open");
    // Keep the fixture's rows of seq > 1000 aside, then let the upgrade
    // see only the rest.
    conn.execute_batch(
        "CREATE TABLE later AS SELECT * FROM records WHERE seq > 1000 AND stream = 1;
         DELETE FROM records WHERE seq > 1000 AND stream = 1;",
    )
    .expect("split");
    drop(conn);
    let store = service(&path);
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "CREATE TABLE records (
             id INTEGER PRIMARY KEY AUTOINCREMENT, stream INTEGER NOT NULL,
             seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, data TEXT NOT NULL,
             size INTEGER NOT NULL);
         CREATE UNIQUE INDEX records_stream_seq ON records (stream, seq);
         INSERT INTO records SELECT * FROM later;
         DROP TABLE later;",
    )
    .expect("the rows the upgrade had not reached");
    drop(conn);
    let store = service(&path);
    let tags = all(&store, &StreamKey::new("deltav-line1", Kind::Tag));
    let want: Vec<i64> = (101..=1500).filter(|s| !(500..=504).contains(s)).collect();
    assert_eq!(tags.iter().map(|r| r.seq as i64).collect::<Vec<_>>(), want);
    for r in &tags {
        assert_eq!(r.data, tag_data(r.seq as i64));
    }
}
