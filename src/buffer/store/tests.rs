//! Unit tests of the store as a whole: sequencing, reads, acks, stats and
//! a model test over random operations. Eviction, limits and faults are
//! tested from the outside (`tests/buffer_model.rs`, `tests/buffer_faults.rs`,
//! `tests/buffer_crash.rs`).

use rusqlite::Connection;
use serde_json::json;

use super::schema::SCHEMA_VERSION;
use super::*;
use crate::buffer::{
    Append, BufferError, Limits, ProfileState, StoreOptions, StreamStats, TagMark,
};
use crate::config::Synchronous;
use crate::record::{Kind, NewRecord, RecordId, StoredRecord, StreamKey};

fn rec(connection: &str, kind: Kind, n: i64) -> NewRecord {
    NewRecord {
        connection: connection.into(),
        kind,
        ts_ms: 1_700_000_000_000 + n,
        data: json!({ "n": n }).to_string(),
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("buffer.db"), StoreOptions::default()).expect("open")
}

fn line1_tag() -> StreamKey {
    StreamKey::new("line1", Kind::Tag)
}

fn state(connection: &str, snapshot: &str) -> ProfileState {
    ProfileState {
        connection: connection.into(),
        snapshot: snapshot.into(),
    }
}

#[test]
fn profile_state_commits_with_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    assert_eq!(store.profile_state("dv").unwrap(), None);
    let seqs = store
        .append(Append {
            records: &[rec("dv", Kind::Batch, 1)],
            states: &[state("dv", r#"{"v":1}"#)],
            marks: &[],
        })
        .unwrap()
        .seqs;
    assert_eq!(seqs, vec![1]);
    assert_eq!(
        store.profile_state("dv").unwrap().as_deref(),
        Some(r#"{"v":1}"#)
    );
    // A state alone (shutdown) replaces it; other connections untouched.
    store
        .append(Append {
            records: &[],
            states: &[state("dv", r#"{"v":2}"#), state("om", "{}")],
            marks: &[],
        })
        .unwrap();
    assert_eq!(
        store.profile_state("dv").unwrap().as_deref(),
        Some(r#"{"v":2}"#)
    );
    assert_eq!(store.profile_state("om").unwrap().as_deref(), Some("{}"));
    drop(store);
    let store = open(&dir);
    assert_eq!(
        store.profile_state("dv").unwrap().as_deref(),
        Some(r#"{"v":2}"#)
    );
}

#[test]
fn version_2_database_gains_profile_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.db");
    {
        let mut store = open(&dir);
        store
            .append(Append::records(&[rec("line1", Kind::Tag, 1)]))
            .unwrap();
        // What a version 2 file looks like: no profile_state table.
        store
            .conn
            .execute_batch("DROP TABLE profile_state; PRAGMA user_version = 2;")
            .unwrap();
    }
    let mut store = Store::open(&path, StoreOptions::default()).expect("upgrade");
    assert_eq!(all(&store, &line1_tag()).len(), 1);
    store
        .append(Append {
            records: &[rec("line1", Kind::Tag, 2)],
            states: &[state("line1", "{}")],
            marks: &[],
        })
        .unwrap();
    assert_eq!(store.profile_state("line1").unwrap().as_deref(), Some("{}"));
    let version: i64 = store
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

fn mark(connection: &str, tag: &str, last_ms: i64, gaps: &[(i64, i64)]) -> TagMark {
    TagMark {
        connection: connection.into(),
        tag: tag.into(),
        last_ms,
        gaps: gaps.to_vec(),
    }
}

#[test]
fn tag_marks_commit_with_their_records_and_the_last_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    assert_eq!(store.tag_marks("line1").unwrap(), Vec::<TagMark>::new());
    let seqs = store
        .append(Append {
            records: &[rec("line1", Kind::Tag, 1), rec("line1", Kind::Tag, 2)],
            states: &[],
            marks: &[
                mark("line1", "T2", 20, &[]),
                mark("line1", "T1", 10, &[(3, 7), (8, 9)]),
                // Later in the same append: replaces the one above.
                mark("line1", "T1", 11, &[(3, 7)]),
            ],
        })
        .unwrap()
        .seqs;
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(
        store.tag_marks("line1").unwrap(),
        vec![
            mark("line1", "T1", 11, &[(3, 7)]),
            mark("line1", "T2", 20, &[])
        ],
        "ordered by tag"
    );

    // Marks alone commit; a later append replaces; connections are apart.
    let report = store
        .append(Append {
            records: &[],
            states: &[],
            marks: &[
                mark("line1", "T2", 25, &[(20, 25)]),
                mark("line2", "T1", 5, &[]),
            ],
        })
        .unwrap();
    assert!(report.seqs.is_empty());
    assert_eq!(
        store.tag_marks("line1").unwrap(),
        vec![
            mark("line1", "T1", 11, &[(3, 7)]),
            mark("line1", "T2", 25, &[(20, 25)])
        ]
    );
    assert_eq!(
        store.tag_marks("line2").unwrap(),
        vec![mark("line2", "T1", 5, &[])]
    );
    assert_eq!(store.tag_marks("line3").unwrap(), Vec::<TagMark>::new());
    let gaps: String = store
        .conn
        .query_row(
            "SELECT gaps FROM tag_marks WHERE connection = 'line1' AND tag = 'T2'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(gaps, "[[20,25]]", "stored as JSON pairs");

    drop(store);
    let store = open(&dir);
    assert_eq!(
        store.tag_marks("line1").unwrap(),
        vec![
            mark("line1", "T1", 11, &[(3, 7)]),
            mark("line1", "T2", 25, &[(20, 25)])
        ]
    );
    assert_eq!(all(&store, &line1_tag()).len(), 2);
}

#[test]
fn unreadable_gaps_load_as_none_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    store
        .append(Append {
            records: &[],
            states: &[],
            marks: &[
                mark("line1", "T1", 10, &[(1, 5)]),
                mark("line1", "T2", 20, &[(2, 6)]),
            ],
        })
        .unwrap();
    store
        .conn
        .execute_batch("UPDATE tag_marks SET gaps = '[[1,' WHERE tag = 'T1'")
        .unwrap();
    assert_eq!(
        store.tag_marks("line1").unwrap(),
        vec![
            mark("line1", "T1", 10, &[]),
            mark("line1", "T2", 20, &[(2, 6)])
        ]
    );
}

#[test]
fn version_5_database_gains_tag_marks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.db");
    {
        let mut store = open(&dir);
        store
            .append(Append {
                records: &[rec("line1", Kind::Tag, 1)],
                states: &[state("line1", "{}")],
                marks: &[],
            })
            .unwrap();
        // What a version 5 file looks like: no tag_marks table.
        store
            .conn
            .execute_batch("DROP TABLE tag_marks; PRAGMA user_version = 5;")
            .unwrap();
    }
    let mut store = Store::open(&path, StoreOptions::default()).expect("upgrade");
    assert_eq!(all(&store, &line1_tag()).len(), 1);
    assert_eq!(store.profile_state("line1").unwrap().as_deref(), Some("{}"));
    assert_eq!(store.tag_marks("line1").unwrap(), Vec::<TagMark>::new());
    let seqs = store
        .append(Append {
            records: &[rec("line1", Kind::Tag, 2)],
            states: &[],
            marks: &[mark("line1", "T1", 2, &[(1, 2)])],
        })
        .unwrap()
        .seqs;
    assert_eq!(seqs, vec![2], "the stream goes on");
    assert_eq!(
        store.tag_marks("line1").unwrap(),
        vec![mark("line1", "T1", 2, &[(1, 2)])]
    );
    let version: i64 = store
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // Only a version 4 file has dead letters to mark lost.
    let flagged: i64 = store
        .conn
        .query_row(
            "SELECT count(*) FROM meta WHERE key = 'mark_lost'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(flagged, 0);
    store.integrity_check().unwrap();
}

use super::replay_tests::noise;

#[test]
fn an_append_that_is_refused_stores_no_marks() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        limits: Limits {
            max_size: 320 * 1024,
            ..Limits::NONE
        },
        ..StoreOptions::default()
    };
    let mut store = Store::open(&dir.path().join("buffer.db"), options).unwrap();
    store
        .append(Append {
            records: &[rec("line1", Kind::Tag, 1)],
            states: &[],
            marks: &[mark("line1", "T1", 1, &[])],
        })
        .unwrap();
    // Larger than the whole buffer: nothing can make room for it.
    let big: Vec<NewRecord> = (0..1000)
        .map(|i| NewRecord {
            data: noise(i, 1000),
            ..rec("line1", Kind::Tag, 1000 + i as i64)
        })
        .collect();
    let error = store
        .append(Append {
            records: &big,
            states: &[],
            marks: &[
                mark("line1", "T1", 2000, &[(1, 1000)]),
                mark("line1", "T2", 2000, &[]),
            ],
        })
        .unwrap_err();
    assert!(
        matches!(error, BufferError::Full { records: 1000, .. }),
        "{error}"
    );
    assert_eq!(
        store.tag_marks("line1").unwrap(),
        vec![mark("line1", "T1", 1, &[])],
        "the marks went with their records"
    );
    assert!(
        all(&store, &line1_tag())
            .iter()
            .all(|r| r.ts_ms < rec("line1", Kind::Tag, 1000).ts_ms),
        "none of the refused records is stored"
    );
    store.integrity_check().unwrap();
}

fn all(store: &Store, stream: &StreamKey) -> Vec<StoredRecord> {
    store
        .read_after(stream, 0, usize::MAX, usize::MAX)
        .expect("read")
}

/// Recomputes invariant 4 the slow way and compares it with the counters,
/// pending and kept alike.
pub(super) fn assert_counters_match(store: &Store) {
    let mut stmt = store
        .conn
        .prepare(
            "SELECT s.id, s.records, s.bytes, s.retained, s.retained_bytes, \
             coalesce(sum(g.pending), 0), \
             coalesce(sum(CASE WHEN g.pending > 0 THEN g.size ELSE 0 END), 0), \
             coalesce(sum(CASE WHEN g.pending = 0 THEN g.kept ELSE 0 END), 0), \
             coalesce(sum(CASE WHEN g.pending = 0 THEN g.size ELSE 0 END), 0) \
             FROM streams s LEFT JOIN segments g ON g.stream = s.id GROUP BY s.id",
        )
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                [r.get::<_, i64>(1)?, r.get(2)?, r.get(3)?, r.get(4)?],
                [r.get::<_, i64>(5)?, r.get(6)?, r.get(7)?, r.get(8)?],
            ))
        })
        .expect("query");
    for row in rows {
        let (id, counters, real) = row.expect("row");
        assert_eq!(
            counters, real,
            "counters (records, bytes, retained, retained_bytes) of stream {id}"
        );
    }
}

mod sequencing {
    use super::*;

    #[test]
    fn seq_starts_at_one_and_is_continuous_per_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        let batch: Vec<_> = (0..5).map(|n| rec("line1", Kind::Tag, n)).collect();
        assert_eq!(
            store.append(Append::records(&batch)).expect("append").seqs,
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(
            store
                .append(Append::records(&batch[..2]))
                .expect("append")
                .seqs,
            vec![6, 7],
            "second batch continues"
        );
    }

    #[test]
    fn streams_are_independent_even_when_interleaved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        let batch = vec![
            rec("line1", Kind::Tag, 0),
            rec("line1", Kind::Batch, 1),
            rec("line2", Kind::Tag, 2),
            rec("line1", Kind::Tag, 3),
            rec("", Kind::Event, 4),
            rec("line1", Kind::Batch, 5),
            rec("line1", Kind::Tag, 6),
        ];
        assert_eq!(
            store.append(Append::records(&batch)).expect("append").seqs,
            vec![1, 1, 1, 2, 1, 2, 3]
        );
        let seqs: Vec<u64> = all(&store, &line1_tag()).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let event = all(&store, &StreamKey::new("", Kind::Event));
        assert_eq!(event.len(), 1);
        assert_eq!(event[0].data, r#"{"n":4}"#);
    }

    #[test]
    fn seq_survives_reopen_and_full_drain() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = open(&dir);
            let batch: Vec<_> = (0..3).map(|n| rec("line1", Kind::Tag, n)).collect();
            store.append(Append::records(&batch)).expect("append");
        }
        let mut store = open(&dir);
        assert_eq!(
            store
                .append(Append::records(&[rec("line1", Kind::Tag, 9)]))
                .expect("append")
                .seqs,
            vec![4]
        );
        let ids: Vec<RecordId> = all(&store, &line1_tag()).iter().map(|r| r.id).collect();
        assert_eq!(store.ack(&ids).expect("ack"), 4);
        assert!(store.streams().expect("streams").is_empty());
        drop(store);

        let mut store = open(&dir);
        assert_eq!(
            store
                .append(Append::records(&[rec("line1", Kind::Tag, 10)]))
                .expect("append")
                .seqs,
            vec![5],
            "a drained stream must not restart at 1"
        );
    }

    #[test]
    fn empty_append_is_a_no_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        assert!(store
            .append(Append::records(&[]))
            .expect("append")
            .seqs
            .is_empty());
        let stats = store.stats().expect("stats");
        assert_eq!((stats.records, stats.streams.len()), (0, 0));
    }
}

mod epoch {
    use super::*;

    #[test]
    fn epoch_is_stable_across_reopen_and_new_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = open(&dir).epoch().to_string();
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(open(&dir).epoch(), first);

        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(open(&other).epoch(), first);
    }

    #[test]
    fn creates_missing_parent_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/buffer.db");
        let store = Store::open(
            &path,
            StoreOptions {
                synchronous: Synchronous::Full,
                ..StoreOptions::default()
            },
        )
        .expect("open");
        assert_eq!(store.path(), path);
        assert!(path.exists());
    }
}

mod reads {
    use super::*;

    fn filled(dir: &tempfile::TempDir) -> Store {
        let mut store = open(dir);
        let batch: Vec<_> = (1..=10).map(|n| rec("line1", Kind::Tag, n)).collect();
        store.append(Append::records(&batch)).expect("append");
        store
    }

    #[test]
    fn oldest_first_after_seq_and_max_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = filled(&dir);
        let got = store
            .read_after(&line1_tag(), 3, 4, usize::MAX)
            .expect("read");
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6, 7]);
        assert_eq!(got[0].connection, "line1");
        assert_eq!(got[0].kind, Kind::Tag);
        assert_eq!(got[0].ts_ms, 1_700_000_000_004);
        assert_eq!(got[0].data, r#"{"n":4}"#);
        assert!(store
            .read_after(&line1_tag(), 10, 5, usize::MAX)
            .expect("read")
            .is_empty());
        assert!(store
            .read_after(&StreamKey::new("nope", Kind::Tag), 0, 5, usize::MAX)
            .expect("read")
            .is_empty());
    }

    #[test]
    fn max_bytes_bounds_data_but_never_returns_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = filled(&dir);
        // Each `{"n":N}` for N < 10 is 7 bytes.
        let got = store.read_after(&line1_tag(), 0, 100, 21).expect("read");
        assert_eq!(got.len(), 3);
        let got = store.read_after(&line1_tag(), 0, 100, 20).expect("read");
        assert_eq!(got.len(), 2);
        let got = store.read_after(&line1_tag(), 0, 100, 1).expect("read");
        assert_eq!(got.len(), 1, "an oversized first row is still returned");
        let got = store
            .read_after(&line1_tag(), 0, 0, usize::MAX)
            .expect("read");
        assert_eq!(got.len(), 1, "max_records 0 behaves as 1");
    }

    #[test]
    fn oversized_record_is_returned_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        let mut big = rec("line1", Kind::Tag, 0);
        big.data = json!({ "s": "x".repeat(10_000) }).to_string();
        store
            .append(Append::records(&[big, rec("line1", Kind::Tag, 1)]))
            .expect("append");
        let got = store.read_after(&line1_tag(), 0, 100, 1000).expect("read");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].seq, 1);
        let got = store.read_after(&line1_tag(), 1, 100, 1000).expect("read");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].seq, 2);
    }

    #[test]
    fn streams_lists_only_streams_with_pending_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        store
            .append(Append::records(&[
                rec("b", Kind::Tag, 0),
                rec("a", Kind::Oee, 1),
                rec("a", Kind::Batch, 2),
            ]))
            .expect("append");
        assert_eq!(
            store.streams().expect("streams"),
            vec![
                StreamKey::new("a", Kind::Batch),
                StreamKey::new("a", Kind::Oee),
                StreamKey::new("b", Kind::Tag),
            ]
        );
        let id = all(&store, &StreamKey::new("a", Kind::Oee))[0].id;
        store.ack(&[id]).expect("ack");
        assert_eq!(store.streams().expect("streams").len(), 2);
    }
}

mod acknowledgements {
    use super::*;

    #[test]
    fn ack_deletes_exactly_the_given_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        let batch: Vec<_> = (1..=5).map(|n| rec("line1", Kind::Tag, n)).collect();
        store.append(Append::records(&batch)).expect("append");
        store
            .append(Append::records(&[rec("line2", Kind::Tag, 0)]))
            .expect("append");
        let rows = all(&store, &line1_tag());
        // Out of order on purpose: PUBACKs need not arrive in seq order.
        assert_eq!(store.ack(&[rows[3].id, rows[1].id]).expect("ack"), 2);
        let left: Vec<u64> = all(&store, &line1_tag()).iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![1, 3, 5]);
        assert_eq!(all(&store, &StreamKey::new("line2", Kind::Tag)).len(), 1);
        assert_counters_match(&store);
    }

    #[test]
    fn unknown_and_repeated_ids_are_harmless() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        store
            .append(Append::records(&[rec("line1", Kind::Tag, 1)]))
            .expect("append");
        let id = all(&store, &line1_tag())[0].id;
        let unknown = [
            RecordId {
                stream: id.stream,
                seq: 999_999,
            },
            RecordId { stream: 77, seq: 1 },
            RecordId {
                stream: id.stream,
                seq: -1,
            },
        ];
        assert_eq!(
            store
                .ack(&[id, id, unknown[0], unknown[1], unknown[2]])
                .expect("ack"),
            1
        );
        assert_eq!(store.ack(&[id]).expect("ack"), 0);
        assert_eq!(store.ack(&[]).expect("ack"), 0);
        assert_counters_match(&store);
    }

    #[test]
    fn row_ids_are_not_reused_after_the_newest_row_is_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        store
            .append(Append::records(&[rec("line1", Kind::Tag, 1)]))
            .expect("append");
        let old = all(&store, &line1_tag())[0].id;
        store.ack(&[old]).expect("ack");
        drop(store);
        let mut store = open(&dir);
        store
            .append(Append::records(&[rec("line1", Kind::Tag, 2)]))
            .expect("append");
        let new = all(&store, &line1_tag())[0].id;
        assert!(new > old, "a late ack of {old:?} must not hit the new row");
    }
}

mod stats {
    use super::*;

    #[test]
    fn stats_reflect_pending_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        let mut batch: Vec<_> = (1..=4).map(|n| rec("line1", Kind::Tag, n)).collect();
        batch.push(rec("line1", Kind::Batch, -5));
        store.append(Append::records(&batch)).expect("append");
        let rows = all(&store, &line1_tag());
        store.ack(&[rows[0].id, rows[3].id]).expect("ack");

        let stats = store.stats().expect("stats");
        // A segment counts whole while any of its records is pending.
        let segment_bytes = |kind: &str| -> u64 {
            store
                .conn
                .query_row(
                    "SELECT sum(g.size) FROM segments g JOIN streams s ON s.id = g.stream \
                     WHERE s.kind = ?1",
                    [kind],
                    |r| r.get::<_, i64>(0),
                )
                .expect("segment bytes") as u64
        };
        let (tag_bytes, batch_bytes) = (segment_bytes("tag"), segment_bytes("batch"));
        assert_eq!(stats.records, 3);
        assert_eq!(stats.bytes, tag_bytes + batch_bytes);
        assert_eq!(stats.oldest_ts_ms, Some(1_700_000_000_000 - 5));
        assert!(stats.file_bytes > 0);
        assert_eq!(
            stats.streams,
            vec![
                StreamStats {
                    connection: "line1".into(),
                    kind: Kind::Tag,
                    records: 2,
                    bytes: tag_bytes,
                    first_seq: Some(2),
                    last_seq: Some(3),
                    next_seq: 5,
                    oldest_ts_ms: Some(1_700_000_000_002),
                    evicted_total: 0,
                    retained_records: 0,
                    retained_bytes: 0,
                    retained_first_seq: None,
                    retained_from_ms: None,
                    retained_released_total: 0,
                },
                StreamStats {
                    connection: "line1".into(),
                    kind: Kind::Batch,
                    records: 1,
                    bytes: batch_bytes,
                    first_seq: Some(1),
                    last_seq: Some(1),
                    next_seq: 2,
                    oldest_ts_ms: Some(1_700_000_000_000 - 5),
                    evicted_total: 0,
                    retained_records: 0,
                    retained_bytes: 0,
                    retained_first_seq: None,
                    retained_from_ms: None,
                    retained_released_total: 0,
                },
            ]
        );

        let rest: Vec<RecordId> = all(&store, &line1_tag()).iter().map(|r| r.id).collect();
        store.ack(&rest).expect("ack");
        let stats = store.stats().expect("stats");
        let tag = &stats.streams[0];
        assert_eq!(tag.stream(), line1_tag());
        assert_eq!((tag.records, tag.bytes), (0, 0));
        assert_eq!((tag.first_seq, tag.last_seq, tag.next_seq), (None, None, 5));
        assert_counters_match(&store);
    }

    #[test]
    fn integrity_check_passes_on_a_used_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        store
            .append(Append::records(&[rec("line1", Kind::Tag, 1)]))
            .expect("append");
        store.integrity_check().expect("integrity");
    }
}

mod known_errors {
    use super::*;

    #[test]
    fn a_non_database_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.db");
        std::fs::write(&path, vec![0x42u8; 8192]).expect("write");
        let err = match Store::open(&path, StoreOptions::default()) {
            Ok(_) => panic!("garbage opened as a database"),
            Err(err) => err,
        };
        let msg = err.to_string();
        assert!(msg.contains("open") && msg.contains("buffer.db"), "{msg}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "user_version", 99)
                .expect("pragma");
        }
        assert!(matches!(
            Store::open(&path, StoreOptions::default()),
            Err(BufferError::Corrupt { .. })
        ));
    }
}

/// Vector-style model test: the real store and a trivial in-memory model
/// get the same pseudo-random operations, including reopen (what a crash
/// looks like to the next process), and must agree after every step.
mod invariants {
    use super::*;
    use std::collections::BTreeMap;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*: deterministic, so a failure replays exactly.
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Default)]
    struct ModelStream {
        next_seq: u64,
        /// seq → (id, data)
        pending: BTreeMap<u64, (i64, String)>,
    }

    #[test]
    fn store_matches_model_under_random_operations() {
        let streams = [
            StreamKey::new("line1", Kind::Tag),
            StreamKey::new("line1", Kind::Batch),
            StreamKey::new("mes", Kind::Oee),
            StreamKey::new("", Kind::Event),
        ];
        for seed in 1..=4u64 {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = open(&dir);
            let mut model: BTreeMap<StreamKey, ModelStream> = BTreeMap::new();
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for step in 0..300 {
                match rng.below(10) {
                    0..=3 => {
                        let n = rng.below(20) as usize;
                        let batch: Vec<NewRecord> = (0..n)
                            .map(|_| {
                                let s = &streams[rng.below(streams.len() as u64) as usize];
                                rec(&s.connection, s.kind, rng.below(1000) as i64)
                            })
                            .collect();
                        let seqs = store.append(Append::records(&batch)).expect("append").seqs;
                        for (r, seq) in batch.iter().zip(&seqs) {
                            let m = model
                                .entry(StreamKey::new(r.connection.clone(), r.kind))
                                .or_default();
                            m.next_seq = m.next_seq.max(1);
                            assert_eq!(*seq, m.next_seq, "seed {seed} step {step}");
                            m.next_seq += 1;
                            let data = r.data.clone();
                            m.pending.insert(*seq, (0, data));
                        }
                    }
                    4..=6 => {
                        // Ack a random subset of what a reader would see.
                        let s = &streams[rng.below(streams.len() as u64) as usize];
                        let got = store
                            .read_after(s, 0, 1 + rng.below(30) as usize, usize::MAX)
                            .expect("read");
                        let ids: Vec<RecordId> = got
                            .iter()
                            .filter(|_| rng.below(3) != 0)
                            .map(|r| r.id)
                            .collect();
                        let n = store.ack(&ids).expect("ack");
                        assert_eq!(n, ids.len());
                        if let Some(m) = model.get_mut(s) {
                            for r in got.iter().filter(|r| ids.contains(&r.id)) {
                                m.pending.remove(&r.seq);
                            }
                        }
                    }
                    7 => {
                        drop(store);
                        store = open(&dir);
                    }
                    _ => {
                        let s = &streams[rng.below(streams.len() as u64) as usize];
                        let after = rng.below(40);
                        let max = 1 + rng.below(10) as usize;
                        let got = store.read_after(s, after, max, usize::MAX).expect("read");
                        let want: Vec<(u64, String)> = model
                            .get(s)
                            .map(|m| {
                                m.pending
                                    .range(after + 1..)
                                    .take(max)
                                    .map(|(seq, (_, d))| (*seq, d.clone()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let got: Vec<(u64, String)> =
                            got.into_iter().map(|r| (r.seq, r.data)).collect();
                        assert_eq!(got, want, "seed {seed} step {step}");
                    }
                }
                let stats = store.stats().expect("stats");
                let want_records: usize = model.values().map(|m| m.pending.len()).sum();
                assert_eq!(
                    stats.records as usize, want_records,
                    "seed {seed} step {step}"
                );
                for s in &stats.streams {
                    let m = &model[&s.stream()];
                    assert_eq!(s.next_seq, m.next_seq);
                    assert_eq!(s.first_seq, m.pending.keys().next().copied());
                    assert_eq!(s.last_seq, m.pending.keys().next_back().copied());
                }
                let with_rows: Vec<StreamKey> = model
                    .iter()
                    .filter(|(_, m)| !m.pending.is_empty())
                    .map(|(k, _)| k.clone())
                    .collect();
                assert_eq!(store.streams().expect("streams"), with_rows);
            }
            assert_counters_match(&store);
            store.integrity_check().expect("integrity");
        }
    }
}

#[test]
fn sparkplug_bd_seq_counts_on_across_reopens_and_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    assert_eq!(store.next_bd_seq().unwrap(), 0);
    assert_eq!(store.next_bd_seq().unwrap(), 1);
    drop(store);
    let mut store = open(&dir);
    assert_eq!(store.next_bd_seq().unwrap(), 2, "a restart goes on");
    for want in 3..=255u8 {
        assert_eq!(store.next_bd_seq().unwrap(), want);
    }
    assert_eq!(store.next_bd_seq().unwrap(), 0, "after 255 comes 0");
}
