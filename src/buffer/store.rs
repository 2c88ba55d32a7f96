//! Synchronous SQLite side of the buffer. See the module doc of `buffer` for
//! the invariants this file maintains.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{BufferError, Stats, StreamStats};
use crate::config::Synchronous;
use crate::record::{Kind, NewRecord, StoredRecord, StreamKey};

/// Accounted per-row cost on top of the JSON text (row header, ids, seq,
/// timestamp, index entry), so that many tiny records are not mistaken for
/// free when the size limit is enforced.
pub const ROW_OVERHEAD_BYTES: u64 = 48;

const SCHEMA_VERSION: i64 = 1;

/// Long enough to ride out a `plantgate buffer ...` command or a checkpoint
/// holding the write lock; short enough that a wedged peer surfaces as an
/// error instead of a silent hang.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    id         INTEGER PRIMARY KEY,
    connection TEXT NOT NULL,
    kind       TEXT NOT NULL,
    next_seq   INTEGER NOT NULL,
    records    INTEGER NOT NULL DEFAULT 0,
    bytes      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (connection, kind)
);
CREATE TABLE IF NOT EXISTS records (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    stream INTEGER NOT NULL REFERENCES streams(id),
    seq    INTEGER NOT NULL,
    ts_ms  INTEGER NOT NULL,
    data   TEXT NOT NULL,
    size   INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_stream_seq ON records (stream, seq);
";

/// The buffer database. Not `Sync`: one owner (the buffer thread, or a CLI
/// command) at a time.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    epoch: String,
}

/// Per-stream bookkeeping while one append transaction is open.
struct Pending<'a> {
    id: i64,
    connection: &'a str,
    kind: Kind,
    next_seq: i64,
    records: i64,
    bytes: i64,
}

impl Store {
    /// Opens or creates the buffer at `path`. Creating the file also creates
    /// its epoch, in the same transaction as the schema, so a database can
    /// never be observed without one.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Store, BufferError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| BufferError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let path = path.to_path_buf();
        let sql = |source| BufferError::Sqlite {
            op: "open",
            path: path.clone(),
            source,
        };

        let mut conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(BufferError::Corrupt {
                path,
                detail: format!("cannot switch to WAL journal mode (got {mode:?})"),
            });
        }
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync).map_err(sql)?;

        // IMMEDIATE: two processes opening a fresh file at once must not both
        // create an epoch.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sql)?;
        if version > SCHEMA_VERSION {
            return Err(BufferError::Corrupt {
                path,
                detail: format!(
                    "schema version {version} is newer than this plantgate understands \
                     ({SCHEMA_VERSION}); refusing to touch it"
                ),
            });
        }
        tx.execute_batch(SCHEMA).map_err(sql)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql)?;
        let existing: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(sql)?;
        let epoch = match existing {
            Some(epoch) => epoch,
            None => {
                // Seqs already handed out under a lost epoch would be
                // re-announced under a new one as if they started fresh.
                let streams: i64 = tx
                    .query_row("SELECT count(*) FROM streams", [], |row| row.get(0))
                    .map_err(sql)?;
                if streams > 0 {
                    return Err(BufferError::Corrupt {
                        path,
                        detail: "streams exist but the epoch is missing".into(),
                    });
                }
                let epoch = uuid::Uuid::new_v4().simple().to_string();
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
                    params![epoch],
                )
                .map_err(sql)?;
                epoch
            }
        };
        tx.commit().map_err(sql)?;
        tracing::debug!(path = %path.display(), %epoch, "buffer opened");
        Ok(Store { conn, path, epoch })
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> BufferError + '_ {
        move |source| BufferError::Sqlite {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, detail: String) -> BufferError {
        BufferError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    /// Accepts `records` in one transaction and returns their seqs in input
    /// order. Either all of them are committed or none is.
    pub fn append(&mut self, records: &[NewRecord]) -> Result<Vec<u64>, BufferError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let path = &self.path;
        let sql = |source| BufferError::Sqlite {
            op: "append",
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let mut seqs = Vec::with_capacity(records.len());
        // A batch touches few streams; a linear scan beats hashing owned keys.
        let mut touched: Vec<Pending> = Vec::new();
        {
            let mut find = tx
                .prepare_cached(
                    "SELECT id, next_seq FROM streams WHERE connection = ?1 AND kind = ?2",
                )
                .map_err(sql)?;
            let mut create = tx
                .prepare_cached(
                    "INSERT INTO streams (connection, kind, next_seq) VALUES (?1, ?2, 1) RETURNING id",
                )
                .map_err(sql)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO records (stream, seq, ts_ms, data, size) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            for record in records {
                let slot = match touched
                    .iter()
                    .position(|p| p.kind == record.kind && p.connection == record.connection)
                {
                    Some(slot) => slot,
                    None => {
                        let kind = record.kind.as_str();
                        let found: Option<(i64, i64)> = find
                            .query_row(params![record.connection, kind], |row| {
                                Ok((row.get(0)?, row.get(1)?))
                            })
                            .optional()
                            .map_err(sql)?;
                        let (id, next_seq) = match found {
                            Some(found) => found,
                            None => (
                                create
                                    .query_row(params![record.connection, kind], |row| row.get(0))
                                    .map_err(sql)?,
                                1,
                            ),
                        };
                        touched.push(Pending {
                            id,
                            connection: &record.connection,
                            kind: record.kind,
                            next_seq,
                            records: 0,
                            bytes: 0,
                        });
                        touched.len() - 1
                    }
                };
                let data =
                    serde_json::to_string(&record.data).map_err(|source| BufferError::Encode {
                        op: "append",
                        source,
                    })?;
                let size = data.len() as i64 + ROW_OVERHEAD_BYTES as i64;
                let stream = &mut touched[slot];
                insert
                    .execute(params![
                        stream.id,
                        stream.next_seq,
                        record.ts_ms,
                        data,
                        size
                    ])
                    .map_err(sql)?;
                seqs.push(stream.next_seq as u64);
                stream.next_seq += 1;
                stream.records += 1;
                stream.bytes += size;
            }
            let mut advance = tx
                .prepare_cached(
                    "UPDATE streams SET next_seq = ?2, records = records + ?3, bytes = bytes + ?4 \
                     WHERE id = ?1",
                )
                .map_err(sql)?;
            for s in &touched {
                advance
                    .execute(params![s.id, s.next_seq, s.records, s.bytes])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        Ok(seqs)
    }

    /// Streams that have pending rows, in `StreamKey` order.
    pub fn streams(&self) -> Result<Vec<StreamKey>, BufferError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT connection, kind FROM streams WHERE records > 0")
            .map_err(self.err("streams"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(self.err("streams"))?;
        let mut out = Vec::new();
        for row in rows {
            let (connection, kind) = row.map_err(self.err("streams"))?;
            out.push(StreamKey::new(connection, self.parse_kind(&kind)?));
        }
        // `StreamKey`'s order (kinds in declaration order), not SQL text order.
        out.sort_unstable();
        Ok(out)
    }

    fn parse_kind(&self, kind: &str) -> Result<Kind, BufferError> {
        Kind::parse(kind).ok_or_else(|| self.corrupt(format!("unknown record kind {kind:?}")))
    }

    fn stream_id(&self, stream: &StreamKey, op: &'static str) -> Result<Option<i64>, BufferError> {
        self.conn
            .prepare_cached("SELECT id FROM streams WHERE connection = ?1 AND kind = ?2")
            .and_then(|mut stmt| {
                stmt.query_row(params![stream.connection, stream.kind.as_str()], |row| {
                    row.get(0)
                })
                .optional()
            })
            .map_err(self.err(op))
    }

    /// Oldest-first rows of `stream` with `seq > after_seq`: at most
    /// `max_records` rows and at most `max_bytes` of `data`, except that the
    /// first row is always returned so an oversized record cannot wedge its
    /// stream. `max_records` is treated as at least 1 for the same reason.
    pub fn read_after(
        &self,
        stream: &StreamKey,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, BufferError> {
        let Some(stream_id) = self.stream_id(stream, "read")? else {
            return Ok(Vec::new());
        };
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(max_records.max(1)).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, seq, ts_ms, data FROM records \
                 WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(self.err("read"))?;
        let mut rows = stmt
            .query(params![stream_id, after, limit])
            .map_err(self.err("read"))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(self.err("read"))? {
            let data: String = row.get(3).map_err(self.err("read"))?;
            if !out.is_empty() && bytes.saturating_add(data.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(data.len());
            let seq: i64 = row.get(1).map_err(self.err("read"))?;
            out.push(StoredRecord {
                id: row.get(0).map_err(self.err("read"))?,
                connection: stream.connection.clone(),
                kind: stream.kind,
                seq: seq as u64,
                ts_ms: row.get(2).map_err(self.err("read"))?,
                data,
            });
        }
        Ok(out)
    }

    /// Deletes exactly the rows with these ids in one transaction and returns
    /// how many existed. Unknown ids (already acked, evicted) are ignored:
    /// duplicate PUBACKs after a reconnect are normal.
    pub fn ack(&mut self, ids: &[i64]) -> Result<usize, BufferError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let path = &self.path;
        let sql = |source| BufferError::Sqlite {
            op: "ack",
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let mut deleted = 0usize;
        // (stream id, rows, bytes); acks usually cover one stream.
        let mut per_stream: Vec<(i64, i64, i64)> = Vec::new();
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM records WHERE id = ?1 RETURNING stream, size")
                .map_err(sql)?;
            for id in ids {
                let gone: Option<(i64, i64)> = delete
                    .query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
                    .map_err(sql)?;
                if let Some((stream, size)) = gone {
                    deleted += 1;
                    match per_stream.iter_mut().find(|(s, _, _)| *s == stream) {
                        Some(entry) => {
                            entry.1 += 1;
                            entry.2 += size;
                        }
                        None => per_stream.push((stream, 1, size)),
                    }
                }
            }
            let mut shrink = tx
                .prepare_cached(
                    "UPDATE streams SET records = records - ?2, bytes = bytes - ?3 WHERE id = ?1",
                )
                .map_err(sql)?;
            for (stream, rows, bytes) in &per_stream {
                shrink.execute(params![stream, rows, bytes]).map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        Ok(deleted)
    }

    /// Totals and per-stream figures from one consistent snapshot. Cost is
    /// O(streams · log rows): counters come from `streams`, first/last seq
    /// from the ends of the `(stream, seq)` index.
    pub fn stats(&self) -> Result<Stats, BufferError> {
        let e = self.err("stats");
        let tx = self.conn.unchecked_transaction().map_err(&e)?;
        let mut out = Stats::default();
        {
            let mut list = tx
                .prepare_cached(
                    "SELECT id, connection, kind, next_seq, records, bytes FROM streams",
                )
                .map_err(&e)?;
            let mut first = tx
                .prepare_cached(
                    "SELECT seq, ts_ms FROM records WHERE stream = ?1 ORDER BY seq ASC LIMIT 1",
                )
                .map_err(&e)?;
            let mut last = tx
                .prepare_cached(
                    "SELECT seq FROM records WHERE stream = ?1 ORDER BY seq DESC LIMIT 1",
                )
                .map_err(&e)?;
            let mut rows = list.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let id: i64 = row.get(0).map_err(&e)?;
                let kind: String = row.get(2).map_err(&e)?;
                let next_seq: i64 = row.get(3).map_err(&e)?;
                let records: i64 = row.get(4).map_err(&e)?;
                let bytes: i64 = row.get(5).map_err(&e)?;
                let head: Option<(i64, i64)> = first
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(&e)?;
                let tail: Option<i64> = last
                    .query_row(params![id], |r| r.get(0))
                    .optional()
                    .map_err(&e)?;
                let s = StreamStats {
                    connection: row.get(1).map_err(&e)?,
                    kind: self.parse_kind(&kind)?,
                    records: records.max(0) as u64,
                    bytes: bytes.max(0) as u64,
                    first_seq: head.map(|(seq, _)| seq as u64),
                    last_seq: tail.map(|seq| seq as u64),
                    next_seq: next_seq as u64,
                    oldest_ts_ms: head.map(|(_, ts)| ts),
                };
                out.records += s.records;
                out.bytes += s.bytes;
                out.oldest_ts_ms = match (out.oldest_ts_ms, s.oldest_ts_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                out.streams.push(s);
            }
        }
        out.streams
            .sort_unstable_by(|a, b| (&a.connection, a.kind).cmp(&(&b.connection, b.kind)));
        let pages: i64 = tx
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(&e)?;
        let page_size: i64 = tx
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(&e)?;
        out.file_bytes = (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64);
        tx.finish().map_err(&e)?;
        Ok(out)
    }

    /// Runs `PRAGMA integrity_check`; `Err(Corrupt)` lists what SQLite found.
    /// Reads the whole file: for diagnostics and tests, not the hot path.
    pub fn integrity_check(&self) -> Result<(), BufferError> {
        let e = self.err("integrity check");
        let mut stmt = self.conn.prepare("PRAGMA integrity_check").map_err(&e)?;
        let problems = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(&e)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&e)?;
        if problems.len() == 1 && problems[0] == "ok" {
            Ok(())
        } else {
            Err(self.corrupt(format!("integrity check: {}", problems.join("; "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(connection: &str, kind: Kind, n: i64) -> NewRecord {
        NewRecord {
            connection: connection.into(),
            kind,
            ts_ms: 1_700_000_000_000 + n,
            data: json!({ "n": n }),
        }
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("buffer.db"), Synchronous::Normal).expect("open")
    }

    fn line1_tag() -> StreamKey {
        StreamKey::new("line1", Kind::Tag)
    }

    fn all(store: &Store, stream: &StreamKey) -> Vec<StoredRecord> {
        store
            .read_after(stream, 0, usize::MAX, usize::MAX)
            .expect("read")
    }

    /// Recomputes invariant 4 the slow way and compares it with the counters.
    fn assert_counters_match(store: &Store) {
        let mut stmt = store
            .conn
            .prepare(
                "SELECT s.id, s.records, s.bytes, count(r.id), coalesce(sum(r.size), 0) \
                 FROM streams s LEFT JOIN records r ON r.stream = s.id GROUP BY s.id",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .expect("query");
        for row in rows {
            let (id, records, bytes, real_records, real_bytes) = row.expect("row");
            assert_eq!(
                (records, bytes),
                (real_records, real_bytes),
                "counters of stream {id}"
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
            assert_eq!(store.append(&batch).expect("append"), vec![1, 2, 3, 4, 5]);
            assert_eq!(
                store.append(&batch[..2]).expect("append"),
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
                store.append(&batch).expect("append"),
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
                store.append(&batch).expect("append");
            }
            let mut store = open(&dir);
            assert_eq!(
                store.append(&[rec("line1", Kind::Tag, 9)]).expect("append"),
                vec![4]
            );
            let ids: Vec<i64> = all(&store, &line1_tag()).iter().map(|r| r.id).collect();
            assert_eq!(store.ack(&ids).expect("ack"), 4);
            assert!(store.streams().expect("streams").is_empty());
            drop(store);

            let mut store = open(&dir);
            assert_eq!(
                store
                    .append(&[rec("line1", Kind::Tag, 10)])
                    .expect("append"),
                vec![5],
                "a drained stream must not restart at 1"
            );
        }

        #[test]
        fn empty_append_is_a_no_op() {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = open(&dir);
            assert!(store.append(&[]).expect("append").is_empty());
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
            let store = Store::open(&path, Synchronous::Full).expect("open");
            assert_eq!(store.path(), path);
            assert!(path.exists());
        }
    }

    mod reads {
        use super::*;

        fn filled(dir: &tempfile::TempDir) -> Store {
            let mut store = open(dir);
            let batch: Vec<_> = (1..=10).map(|n| rec("line1", Kind::Tag, n)).collect();
            store.append(&batch).expect("append");
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
            big.data = json!({ "s": "x".repeat(10_000) });
            store
                .append(&[big, rec("line1", Kind::Tag, 1)])
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
                .append(&[
                    rec("b", Kind::Tag, 0),
                    rec("a", Kind::Oee, 1),
                    rec("a", Kind::Batch, 2),
                ])
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
            store.append(&batch).expect("append");
            store.append(&[rec("line2", Kind::Tag, 0)]).expect("append");
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
            store.append(&[rec("line1", Kind::Tag, 1)]).expect("append");
            let id = all(&store, &line1_tag())[0].id;
            assert_eq!(store.ack(&[id, id, 999_999, -1]).expect("ack"), 1);
            assert_eq!(store.ack(&[id]).expect("ack"), 0);
            assert_eq!(store.ack(&[]).expect("ack"), 0);
            assert_counters_match(&store);
        }

        #[test]
        fn row_ids_are_not_reused_after_the_newest_row_is_acked() {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = open(&dir);
            store.append(&[rec("line1", Kind::Tag, 1)]).expect("append");
            let old = all(&store, &line1_tag())[0].id;
            store.ack(&[old]).expect("ack");
            drop(store);
            let mut store = open(&dir);
            store.append(&[rec("line1", Kind::Tag, 2)]).expect("append");
            let new = all(&store, &line1_tag())[0].id;
            assert!(new > old, "a late ack of {old} must not hit the new row");
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
            store.append(&batch).expect("append");
            let rows = all(&store, &line1_tag());
            store.ack(&[rows[0].id, rows[3].id]).expect("ack");

            let stats = store.stats().expect("stats");
            let per_row = 7 + ROW_OVERHEAD_BYTES;
            assert_eq!(stats.records, 3);
            assert_eq!(stats.bytes, 2 * per_row + (8 + ROW_OVERHEAD_BYTES));
            assert_eq!(stats.oldest_ts_ms, Some(1_700_000_000_000 - 5));
            assert!(stats.file_bytes > 0);
            assert_eq!(
                stats.streams,
                vec![
                    StreamStats {
                        connection: "line1".into(),
                        kind: Kind::Tag,
                        records: 2,
                        bytes: 2 * per_row,
                        first_seq: Some(2),
                        last_seq: Some(3),
                        next_seq: 5,
                        oldest_ts_ms: Some(1_700_000_000_002),
                    },
                    StreamStats {
                        connection: "line1".into(),
                        kind: Kind::Batch,
                        records: 1,
                        bytes: 8 + ROW_OVERHEAD_BYTES,
                        first_seq: Some(1),
                        last_seq: Some(1),
                        next_seq: 2,
                        oldest_ts_ms: Some(1_700_000_000_000 - 5),
                    },
                ]
            );

            let rest: Vec<i64> = all(&store, &line1_tag()).iter().map(|r| r.id).collect();
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
            store.append(&[rec("line1", Kind::Tag, 1)]).expect("append");
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
            let err = match Store::open(&path, Synchronous::Normal) {
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
                Store::open(&path, Synchronous::Normal),
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
                            let seqs = store.append(&batch).expect("append");
                            for (r, seq) in batch.iter().zip(&seqs) {
                                let m = model
                                    .entry(StreamKey::new(r.connection.clone(), r.kind))
                                    .or_default();
                                m.next_seq = m.next_seq.max(1);
                                assert_eq!(*seq, m.next_seq, "seed {seed} step {step}");
                                m.next_seq += 1;
                                let data = serde_json::to_string(&r.data).expect("json");
                                m.pending.insert(*seq, (0, data));
                            }
                        }
                        4..=6 => {
                            // Ack a random subset of what a reader would see.
                            let s = &streams[rng.below(streams.len() as u64) as usize];
                            let got = store
                                .read_after(s, 0, 1 + rng.below(30) as usize, usize::MAX)
                                .expect("read");
                            let ids: Vec<i64> = got
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
}
