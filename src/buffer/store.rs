//! Synchronous SQLite side of the buffer. See the module doc of `buffer` for
//! the invariants this file maintains.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};

use super::{
    Append, AppendReport, BufferError, DeadLetter, Eviction, EvictionReason, Limits, OpenMode,
    ProfileState, Quarantined, Stats, StoreOptions, StreamStats,
};
use crate::config::Synchronous;
use crate::record::{now_ms, Kind, NewRecord, StoredRecord, StreamKey};

/// Accounted per-row cost on top of the JSON text (row header, ids, seq,
/// timestamp, index entry), so that many tiny records are not mistaken for
/// free when the size limit is enforced.
pub const ROW_OVERHEAD_BYTES: u64 = 48;

const SCHEMA_VERSION: i64 = 3;

/// Long enough to ride out a checkpoint or a short `plantgate buffer ...`
/// command holding the write lock; short, because every buffer command
/// queues behind a waiting one (reads, acks, `/healthz`'s probe). A longer
/// lock fails the append, and the ingest holds the records and retries
/// (SPEC 1.9); acks and maintenance are retried by their callers.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Proactive eviction starts when the pages in use (plus the estimate for
/// the incoming append) pass this share of the page cap...
const SOFT_HIGH_PERCENT: u64 = 90;
/// ...and goes down to this share, so that it runs once per burst rather
/// than on every append.
const SOFT_LOW_PERCENT: u64 = 80;
/// One eviction transaction takes at most this many rows: bounded WAL growth
/// and bounded write-lock time, whatever the backlog.
const CHUNK_MAX_ROWS: usize = 4096;
/// Smallest amount an eviction aims to free: below that, the event records
/// it writes would eat a noticeable part of what it frees.
const CHUNK_MIN_BYTES: u64 = 16 * 1024;
/// Evict-and-retry rounds for one append that hits the hard wall. Each
/// round frees at least twice what the append needs; more rounds than this
/// means something other than space is wrong.
const MAX_FULL_RETRIES: usize = 8;
/// Rounds of proactive eviction per append (each is one transaction).
const MAX_RELIEF_ROUNDS: usize = 64;
/// `max_page_count` accepted by SQLite as "no limit".
const UNLIMITED_PAGES: u64 = 4_294_967_294;
/// Extra pages an expiry transaction may take at the cap (see
/// `Store::evict_expired`); the WAL's share of max_size (at least 16 pages,
/// truncated to half at checkpoints) leaves that much room.
const EXPIRY_HEADROOM_PAGES: u64 = 8;
/// Fewest pages the main file is allowed: the schema alone takes about ten.
const MIN_DB_PAGES: u64 = 24;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    id            INTEGER PRIMARY KEY,
    connection    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    next_seq      INTEGER NOT NULL,
    records       INTEGER NOT NULL DEFAULT 0,
    bytes         INTEGER NOT NULL DEFAULT 0,
    evicted_total INTEGER NOT NULL DEFAULT 0,
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
CREATE TABLE IF NOT EXISTS dead_letters (
    id      INTEGER PRIMARY KEY,
    stream  INTEGER NOT NULL REFERENCES streams(id),
    seq     INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL,
    data    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    dead_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_stream_seq ON dead_letters (stream, seq);
CREATE TABLE IF NOT EXISTS profile_state (
    connection TEXT PRIMARY KEY,
    snapshot   TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Every column the code reads, per table: preparing these proves the schema
/// is what this version expects (a file with our table names but other
/// columns is as unusable as garbage).
const SCHEMA_PROBES: [&str; 5] = [
    "SELECT key, value FROM meta LIMIT 0",
    "SELECT id, connection, kind, next_seq, records, bytes, evicted_total FROM streams LIMIT 0",
    "SELECT id, stream, seq, ts_ms, data, size FROM records LIMIT 0",
    "SELECT id, stream, seq, ts_ms, data, size, reason, dead_ms FROM dead_letters LIMIT 0",
    "SELECT connection, snapshot, updated_ms FROM profile_state LIMIT 0",
];

/// The buffer database. Not `Sync`: one owner (the buffer thread, or a CLI
/// command) at a time.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    epoch: String,
    limits: Limits,
    page_size: u64,
    /// `max_page_count` derived from `limits.max_size`; `None` = unlimited.
    size_cap_pages: Option<u64>,
    /// Set when the filesystem filled below the size cap: the main file is
    /// held at the page count it had then (invariant 10).
    disk_cap_pages: Option<u64>,
    /// Keep a reserve file next to the database (service only, see
    /// [`Store::ensure_reserve`]).
    keep_reserve: bool,
    /// Size the reserve file should have.
    reserve_bytes: u64,
    /// A `system.error` about a full disk that could not be stored yet; it
    /// goes in right after the next append that fits (operators must hear
    /// about a full disk, and the event must survive outages like any other).
    pending_disk_error: Option<NewRecord>,
    /// What was found at the path when it had to be moved aside at open.
    quarantined: Option<Quarantined>,
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

/// Where rows of a stream live: waiting for delivery, or refused by the
/// broker and parked (both are bounded by the same limits, SPEC 1.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    Records,
    DeadLetters,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Records => "records",
            Table::DeadLetters => "dead_letters",
        }
    }
}

/// A head range chosen for eviction, before it is deleted: every row of
/// `table` of the stream with `first_seq <= seq <= last_seq`.
struct Range {
    table: Table,
    stream: i64,
    connection: String,
    kind: Kind,
    first_seq: i64,
    last_seq: i64,
    count: i64,
    bytes: i64,
}

/// The rows of one stream in one table, for expiry.
#[derive(Clone, Copy)]
struct Head<'a> {
    table: Table,
    stream: i64,
    connection: &'a str,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Tag rows only (proactive eviction).
    Tags,
    /// Tag rows, then, once none is left, every other kind.
    Any,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Does SQLite recognise the file: cheap, for the CLI.
    Light,
    /// `PRAGMA quick_check` over the whole file: for the service start.
    Quick,
}

/// Why opening failed: only `Corrupt` justifies moving the file aside.
enum OpenError {
    Corrupt(String),
    Fatal(BufferError),
}

fn sql_err<'a>(op: &'static str, path: &'a Path) -> impl Fn(rusqlite::Error) -> BufferError + 'a {
    move |source| BufferError::Sqlite {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn is_sqlite_full(e: &BufferError) -> bool {
    matches!(e, BufferError::Sqlite { source, .. }
        if source.sqlite_error_code() == Some(ErrorCode::DiskFull))
}

fn accounted(data: &str) -> i64 {
    data.len() as i64 + ROW_OVERHEAD_BYTES as i64
}

/// An event of the agent itself (connection ""), as `status::event_record`
/// builds them; duplicated here so the buffer does not depend on `status`.
fn agent_event(event_type: &str, ts_ms: i64, details: serde_json::Value) -> NewRecord {
    NewRecord {
        connection: String::new(),
        kind: Kind::Event,
        ts_ms,
        data: serde_json::json!({ "type": event_type, "details": details }).to_string(),
    }
}

fn connection_value(connection: &str) -> serde_json::Value {
    if connection.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(connection.to_string())
    }
}

/// The `buffer.evicted` event announcing `e`.
/// Dead letters evicted say so in `reason` (SPEC 1.11) and name the limit
/// that took them in `limit`.
pub(crate) fn eviction_event(e: &Eviction, ts_ms: i64) -> NewRecord {
    let mut details = serde_json::json!({
        "connection": connection_value(&e.connection),
        "kind": e.kind.as_str(),
        "first_seq": e.first_seq,
        "last_seq": e.last_seq,
        "count": e.count,
        "reason": e.reason.as_str(),
    });
    if e.dead_letters {
        details["reason"] = "dead_letter".into();
        details["limit"] = e.reason.as_str().into();
    }
    agent_event("buffer.evicted", ts_ms, details)
}

/// The `system.error` event naming rows moved to dead letters.
pub(crate) fn dead_letter_event(
    connection: &str,
    kind: Kind,
    first_seq: u64,
    last_seq: u64,
    count: u64,
    reason: &str,
    ts_ms: i64,
) -> NewRecord {
    agent_event(
        "system.error",
        ts_ms,
        serde_json::json!({
            "message": "records moved to dead letters",
            "connection": connection_value(connection),
            "kind": kind.as_str(),
            "first_seq": first_seq,
            "last_seq": last_seq,
            "count": count,
            "reason": reason,
        }),
    )
}

/// Inserts records inside `tx`, assigning seqs and updating the stream
/// counters (invariants 1 and 4). Shared by appends and by the events the
/// buffer writes itself, so both follow the same rules.
fn insert_records(
    tx: &Transaction,
    path: &Path,
    op: &'static str,
    records: &[NewRecord],
) -> Result<Vec<u64>, BufferError> {
    let sql = sql_err(op, path);
    let mut seqs = Vec::with_capacity(records.len());
    // A batch touches few streams; a linear scan beats hashing owned keys.
    let mut touched: Vec<Pending> = Vec::new();
    let mut find = tx
        .prepare_cached("SELECT id, next_seq FROM streams WHERE connection = ?1 AND kind = ?2")
        .map_err(&sql)?;
    let mut create = tx
        .prepare_cached(
            "INSERT INTO streams (connection, kind, next_seq) VALUES (?1, ?2, 1) RETURNING id",
        )
        .map_err(&sql)?;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO records (stream, seq, ts_ms, data, size) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(&sql)?;
    for record in records {
        let data = &record.data;
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
                    .map_err(&sql)?;
                let (id, next_seq) = match found {
                    Some(found) => found,
                    None => (
                        create
                            .query_row(params![record.connection, kind], |row| row.get(0))
                            .map_err(&sql)?,
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
        let size = accounted(data);
        let stream = &mut touched[slot];
        insert
            .execute(params![
                stream.id,
                stream.next_seq,
                record.ts_ms,
                data,
                size
            ])
            .map_err(&sql)?;
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
        .map_err(&sql)?;
    for s in &touched {
        advance
            .execute(params![s.id, s.next_seq, s.records, s.bytes])
            .map_err(&sql)?;
    }
    Ok(seqs)
}

fn insert_new(
    tx: &Transaction,
    path: &Path,
    op: &'static str,
    records: &[NewRecord],
) -> Result<Vec<u64>, BufferError> {
    insert_records(tx, path, op, records)
}

/// Deletes the chosen head ranges, counts them as evicted and announces them,
/// all inside `tx` (invariant 6). Returns `None`, leaving `tx` to be rolled
/// back, when the events would take more than the rows free (invariant 8).
fn delete_and_announce(
    tx: &Transaction,
    path: &Path,
    ranges: Vec<Range>,
    reason: EvictionReason,
    ts_ms: i64,
    check_cost: bool,
) -> Result<Option<Vec<Eviction>>, BufferError> {
    let sql = sql_err("evict", path);
    let evictions: Vec<Eviction> = ranges
        .iter()
        .map(|r| Eviction {
            connection: r.connection.clone(),
            kind: r.kind,
            first_seq: r.first_seq as u64,
            last_seq: r.last_seq as u64,
            count: r.count as u64,
            bytes: r.bytes as u64,
            reason,
            dead_letters: r.table == Table::DeadLetters,
        })
        .collect();
    let events: Vec<NewRecord> = evictions.iter().map(|e| eviction_event(e, ts_ms)).collect();
    let freed: i64 = ranges.iter().map(|r| r.bytes).sum();
    let cost: i64 = events.iter().map(|e| accounted(&e.data)).sum();
    if check_cost && freed <= cost {
        return Ok(None);
    }
    {
        let mut delete = tx
            .prepare_cached("DELETE FROM records WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3")
            .map_err(&sql)?;
        let mut delete_dead = tx
            .prepare_cached("DELETE FROM dead_letters WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3")
            .map_err(&sql)?;
        let mut shrink = tx
            .prepare_cached(
                "UPDATE streams SET records = records - ?2, bytes = bytes - ?3, \
                 evicted_total = evicted_total + ?2 WHERE id = ?1",
            )
            .map_err(&sql)?;
        // Dead letters are not in the pending counters (invariant 4).
        let mut count_dead = tx
            .prepare_cached("UPDATE streams SET evicted_total = evicted_total + ?2 WHERE id = ?1")
            .map_err(&sql)?;
        for r in &ranges {
            let stmt = match r.table {
                Table::Records => &mut delete,
                Table::DeadLetters => &mut delete_dead,
            };
            let n = stmt
                .execute(params![r.stream, r.first_seq, r.last_seq])
                .map_err(&sql)?;
            if n as i64 != r.count {
                // The range was read in this same transaction; a mismatch
                // means the index and the table disagree.
                return Err(BufferError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!(
                        "evicting seq {}..={} of {}/{}: expected {} rows, deleted {n}",
                        r.first_seq, r.last_seq, r.connection, r.kind, r.count
                    ),
                });
            }
            match r.table {
                Table::Records => shrink.execute(params![r.stream, r.count, r.bytes]),
                Table::DeadLetters => count_dead.execute(params![r.stream, r.count]),
            }
            .map_err(&sql)?;
        }
    }
    // After the deletes, so the events can reuse the pages just freed even
    // when the file is at its cap.
    insert_records(tx, path, "evict", &events)?;
    Ok(Some(evictions))
}

/// `(id, connection, kind)` of the streams, all or only those with pending
/// rows, in table order.
fn stream_names(
    tx: &Transaction,
    path: &Path,
    op: &'static str,
    pending_only: bool,
) -> Result<Vec<(i64, String, Kind)>, BufferError> {
    let sql = sql_err(op, path);
    let mut stmt = tx
        .prepare_cached(if pending_only {
            "SELECT id, connection, kind FROM streams WHERE records > 0"
        } else {
            "SELECT id, connection, kind FROM streams"
        })
        .map_err(&sql)?;
    let rows = stmt
        .query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })
        .map_err(&sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, connection, kind) = row.map_err(&sql)?;
        let kind = Kind::parse(&kind).ok_or_else(|| BufferError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("unknown record kind {kind:?}"),
        })?;
        out.push((id, connection, kind));
    }
    Ok(out)
}

/// Streams with rows in `table`, optionally only tag streams or only the
/// others, in `StreamKey` order.
fn streams_in(
    tx: &Transaction,
    path: &Path,
    table: Table,
    tags: Option<bool>,
) -> Result<Vec<(i64, String, Kind)>, BufferError> {
    let mut out = match table {
        Table::Records => stream_names(tx, path, "evict", true)?,
        Table::DeadLetters => {
            let sql = sql_err("evict", path);
            let mut stmt = tx
                .prepare_cached("SELECT DISTINCT stream FROM dead_letters")
                .map_err(&sql)?;
            let ids = stmt
                .query_map([], |row| row.get::<_, i64>(0))
                .map_err(&sql)?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(&sql)?;
            let mut all = stream_names(tx, path, "evict", false)?;
            all.retain(|(id, _, _)| ids.contains(id));
            all
        }
    };
    out.retain(|(_, _, kind)| tags.map_or(true, |t| t == (*kind == Kind::Tag)));
    out.sort_unstable_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
    Ok(out)
}

/// Picks head rows oldest-first (lowest row id) across `streams` until
/// `want` accounted bytes or `max_rows` rows are reached, walking each
/// stream's `(stream, seq)` index lazily: memory is O(streams), not O(rows).
/// Adds the picks to `ranges`; returns (bytes, rows) picked.
fn pick_oldest(
    tx: &Transaction,
    path: &Path,
    table: Table,
    streams: &[(i64, String, Kind)],
    want: u64,
    max_rows: usize,
    ranges: &mut Vec<Range>,
) -> Result<(u64, usize), BufferError> {
    let sql = sql_err("evict", path);
    let mut stmts = Vec::with_capacity(streams.len());
    for _ in streams {
        stmts.push(
            tx.prepare(&format!(
                "SELECT id, seq, size FROM {} WHERE stream = ?1 ORDER BY seq",
                table.name()
            ))
            .map_err(&sql)?,
        );
    }
    let mut cursors = Vec::with_capacity(streams.len());
    for (stmt, s) in stmts.iter_mut().zip(streams) {
        cursors.push(stmt.query(params![s.0]).map_err(&sql)?);
    }
    let step = |rows: &mut rusqlite::Rows| -> Result<Option<(i64, i64, i64)>, BufferError> {
        match rows.next().map_err(&sql)? {
            Some(row) => Ok(Some((
                row.get(0).map_err(&sql)?,
                row.get(1).map_err(&sql)?,
                row.get(2).map_err(&sql)?,
            ))),
            None => Ok(None),
        }
    };
    let mut heads = Vec::with_capacity(cursors.len());
    for c in cursors.iter_mut() {
        heads.push(step(c)?);
    }
    let mut picked: Vec<Option<Range>> = streams.iter().map(|_| None).collect();
    let (mut bytes, mut rows) = (0u64, 0usize);
    while bytes < want && rows < max_rows {
        let Some(i) = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|(id, _, _)| (id, i)))
            .min()
            .map(|(_, i)| i)
        else {
            break;
        };
        let Some((_, seq, size)) = heads[i] else {
            break;
        };
        let (stream, connection, kind) = &streams[i];
        match &mut picked[i] {
            Some(r) => {
                r.last_seq = seq;
                r.count += 1;
                r.bytes += size;
            }
            slot @ None => {
                *slot = Some(Range {
                    table,
                    stream: *stream,
                    connection: connection.clone(),
                    kind: *kind,
                    first_seq: seq,
                    last_seq: seq,
                    count: 1,
                    bytes: size,
                })
            }
        }
        bytes = bytes.saturating_add(size.max(0) as u64);
        rows += 1;
        heads[i] = step(&mut cursors[i])?;
    }
    ranges.extend(picked.into_iter().flatten());
    Ok((bytes, rows))
}

impl Store {
    /// Opens or creates the buffer at `path`. Creating the file also creates
    /// its epoch, in the same transaction as the schema, so a database can
    /// never be observed without one.
    ///
    /// With [`OpenMode::Tool`] a corrupt file is reported as
    /// [`BufferError::Corrupt`] (or the SQLite error that revealed it) and
    /// left where it is: the service may be using it. With
    /// [`OpenMode::Service`] the whole file is verified with
    /// `PRAGMA quick_check` (reads every page: seconds for a GiB on slow
    /// flash) and a corrupt file is quarantined (invariant 11) instead of
    /// failing; see [`Store::quarantined`]. Errors that are not corruption
    /// (permissions, I/O, a newer schema, a lock held too long) are returned
    /// in both modes and nothing is moved.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, BufferError> {
        let StoreOptions {
            synchronous,
            limits,
            mode,
        } = options;
        match mode {
            OpenMode::Tool => match Self::open_inner(path, synchronous, limits, Check::Light) {
                Ok(store) => Ok(store),
                Err(OpenError::Fatal(e)) => Err(e),
                Err(OpenError::Corrupt(detail)) => Err(BufferError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("cannot open it: {detail}"),
                }),
            },
            OpenMode::Service => Self::open_service(path, synchronous, limits),
        }
    }

    fn open_service(
        path: &Path,
        synchronous: Synchronous,
        limits: Limits,
    ) -> Result<Store, BufferError> {
        let mut first = Self::open_inner(path, synchronous, limits, Check::Quick);
        if let Err(OpenError::Fatal(e)) = &first {
            // A restart on a full disk: the reserve is what lets it start,
            // instead of failing (and being restarted) forever.
            if e.is_disk_full() && std::fs::remove_file(sidecar(path, ".reserve")).is_ok() {
                tracing::warn!(path = %path.display(), "disk full at start: released the buffer's disk reserve");
                first = Self::open_inner(path, synchronous, limits, Check::Quick);
            }
        }
        let reason = match first {
            Ok(store) => return Ok(store),
            Err(OpenError::Fatal(e)) => return Err(e),
            Err(OpenError::Corrupt(reason)) => reason,
        };
        let moved_to = quarantine(path)?;
        tracing::error!(path = %path.display(), moved_to = %moved_to.display(), %reason,
            "buffer database was corrupt and has been moved aside; starting a new one");
        let mut store = match Self::open_inner(path, synchronous, limits, Check::Quick) {
            Ok(store) => store,
            Err(OpenError::Fatal(e)) => return Err(e),
            Err(OpenError::Corrupt(detail)) => {
                return Err(BufferError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("fresh database after quarantine: {detail}"),
                })
            }
        };
        let event = agent_event(
            "system.error",
            now_ms(),
            serde_json::json!({
                "message": "buffer database was corrupt and has been moved aside",
                "moved_to": moved_to.display().to_string(),
                "reason": reason,
            }),
        );
        store.append(Append::records(std::slice::from_ref(&event)))?;
        store.quarantined = Some(Quarantined { moved_to, reason });
        Ok(store)
    }

    fn open_inner(
        path: &Path,
        synchronous: Synchronous,
        limits: Limits,
        check: Check,
    ) -> Result<Store, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| {
                OpenError::Fatal(BufferError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })
            })?;
        }
        let path = path.to_path_buf();
        // SQLITE_NOTADB / SQLITE_CORRUPT are the file's fault; anything else
        // (EACCES, EIO, a lock) is the environment's, and must not cost the
        // file its place.
        let classify = |op: &'static str| {
            let path = path.clone();
            move |source: rusqlite::Error| match source.sqlite_error_code() {
                Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
                    OpenError::Corrupt(source.to_string())
                }
                _ => OpenError::Fatal(BufferError::Sqlite {
                    op,
                    path: path.clone(),
                    source,
                }),
            }
        };
        let conn = Connection::open(&path).map_err(classify("open"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(classify("open"))?;
        // Until the file is known good, closing must not checkpoint a WAL
        // into it: a quarantined file keeps the bytes it was found with.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(classify("open"))?;
        match check {
            Check::Light => {
                conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(classify("open"))?;
            }
            Check::Quick => {
                let mut stmt = conn
                    .prepare("PRAGMA quick_check(20)")
                    .map_err(classify("quick check"))?;
                let problems = stmt
                    .query_map([], |row| row.get::<_, String>(0))
                    .map_err(classify("quick check"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(classify("quick check"))?;
                if !(problems.len() == 1 && problems[0] == "ok") {
                    return Err(OpenError::Corrupt(format!(
                        "quick_check: {}",
                        problems.join("; ")
                    )));
                }
            }
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(classify("open"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::Fatal(BufferError::Corrupt {
                path,
                detail: format!("cannot switch to WAL journal mode (got {mode:?})"),
            }));
        }
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(classify("open"))?;
        let epoch = Self::init_schema(conn, &path)?;
        let (conn, epoch) = epoch;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
            .map_err(classify("open"))?;
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(classify("open"))?;
        let mut store = Store {
            conn,
            path,
            epoch,
            limits,
            page_size: page_size.max(512) as u64,
            size_cap_pages: None,
            disk_cap_pages: None,
            keep_reserve: check == Check::Quick,
            reserve_bytes: 0,
            pending_disk_error: None,
            quarantined: None,
        };
        store.apply_limits().map_err(OpenError::Fatal)?;
        store.ensure_reserve();
        tracing::debug!(path = %store.path.display(), epoch = %store.epoch, "buffer opened");
        Ok(store)
    }

    /// Creates or upgrades the schema and reads (or creates) the epoch, in
    /// one IMMEDIATE transaction: two processes opening a fresh file at once
    /// must not both create an epoch.
    fn init_schema(mut conn: Connection, path: &Path) -> Result<(Connection, String), OpenError> {
        // In here a generic SQLITE_ERROR ("no such column", "table already
        // exists" with other columns) means the schema is not ours.
        let classify = |op: &'static str| {
            move |source: rusqlite::Error| match source.sqlite_error_code() {
                Some(ErrorCode::NotADatabase)
                | Some(ErrorCode::DatabaseCorrupt)
                | Some(ErrorCode::Unknown) => {
                    OpenError::Corrupt(format!("broken schema: {source}"))
                }
                _ => OpenError::Fatal(BufferError::Sqlite {
                    op,
                    path: path.to_path_buf(),
                    source,
                }),
            }
        };
        let epoch = {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(classify("open"))?;
            let version: i64 = tx
                .pragma_query_value(None, "user_version", |row| row.get(0))
                .map_err(classify("open"))?;
            if version > SCHEMA_VERSION {
                return Err(OpenError::Fatal(BufferError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!(
                        "schema version {version} is newer than this plantgate understands \
                         ({SCHEMA_VERSION}); refusing to touch it"
                    ),
                }));
            }
            // Write only when something changes: reopening after a crash
            // on a full disk must not need a single new page.
            if version < SCHEMA_VERSION {
                if version == 1 {
                    tx.execute_batch(
                        "ALTER TABLE streams ADD COLUMN evicted_total INTEGER NOT NULL DEFAULT 0",
                    )
                    .map_err(classify("upgrade"))?;
                }
                tx.execute_batch(SCHEMA).map_err(classify("open"))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(classify("open"))?;
            }
            for probe in SCHEMA_PROBES {
                tx.prepare(probe).map_err(classify("open"))?;
            }
            let existing: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |row| {
                    row.get(0)
                })
                .optional()
                .map_err(classify("open"))?;
            let epoch = match existing {
                Some(epoch) => epoch,
                None => {
                    // Seqs already handed out under a lost epoch would be
                    // re-announced under a new one as if they started fresh.
                    let streams: i64 = tx
                        .query_row("SELECT count(*) FROM streams", [], |row| row.get(0))
                        .map_err(classify("open"))?;
                    if streams > 0 {
                        return Err(OpenError::Corrupt(
                            "streams exist but the epoch is missing".into(),
                        ));
                    }
                    let epoch = uuid::Uuid::new_v4().simple().to_string();
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
                        params![epoch],
                    )
                    .map_err(classify("open"))?;
                    epoch
                }
            };
            tx.commit().map_err(classify("open"))?;
            epoch
        };
        Ok((conn, epoch))
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Set when the file found at the path was corrupt and has been moved
    /// aside ([`OpenMode::Service`] only); the fresh database already holds
    /// a `system.error` event saying so.
    pub fn quarantined(&self) -> Option<&Quarantined> {
        self.quarantined.as_ref()
    }

    /// Changes the limits of this connection. A smaller `max_size` takes
    /// effect through eviction at the next append; the file itself does not
    /// shrink (free pages are reused).
    pub fn set_limits(&mut self, limits: Limits) -> Result<(), BufferError> {
        self.limits = limits;
        self.disk_cap_pages = None;
        self.apply_limits()
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> BufferError + '_ {
        sql_err(op, &self.path)
    }

    fn corrupt(&self, detail: String) -> BufferError {
        BufferError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    /// Translates `limits.max_size` into pragmas (invariant 9): a quarter of
    /// the budget (at most 64 MiB) for the WAL, the disk reserve (service
    /// only), the rest for the main file. The reserve is part of the budget:
    /// `max_size` bounds everything the buffer takes on disk.
    fn apply_limits(&mut self) -> Result<(), BufferError> {
        let ps = self.page_size;
        // Room for one checkpoint of a full WAL share plus an eviction
        // transaction: what it takes to get out of a full disk.
        let reserve_pages = |autocheckpoint: u64| 2 * autocheckpoint + (256 * 1024) / ps;
        let (cap, autocheckpoint, journal_limit) = if self.limits.max_size == u64::MAX {
            self.reserve_bytes = reserve_pages(1000) * ps;
            (None, 1000, 64 * 1024 * 1024)
        } else {
            let total = self.limits.max_size / ps;
            let wal = (total / 4).clamp(16, 16_384);
            // Checkpoint early and truncate the WAL to half its share, so
            // the frames since the last reset plus one transaction fit.
            let autocheckpoint = (wal / 4).max(2);
            // A small buffer gets a smaller reserve rather than no room;
            // a tiny one (the main file at its minimum) none.
            let reserve = if self.keep_reserve {
                reserve_pages(autocheckpoint)
                    .min(total / 8)
                    .min(total.saturating_sub(wal + MIN_DB_PAGES))
            } else {
                0
            };
            self.reserve_bytes = reserve * ps;
            let db = total.saturating_sub(wal + reserve).max(MIN_DB_PAGES);
            (Some(db), autocheckpoint, (wal / 2) * ps)
        };
        self.size_cap_pages = cap;
        self.set_page_cap(self.cap_pages())?;
        let e = self.err("apply limits");
        self.conn
            .query_row(
                &format!("PRAGMA wal_autocheckpoint = {autocheckpoint}"),
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&e)?;
        self.conn
            .query_row(
                &format!("PRAGMA journal_size_limit = {journal_limit}"),
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&e)?;
        Ok(())
    }

    /// Makes sure `buffer.db.reserve` exists with [`Store::reserve_bytes`]
    /// of real (not sparse) blocks. In WAL mode a full disk is a trap: the
    /// checkpoint cannot grow the main file, so the WAL cannot restart, so
    /// not even a DELETE can commit. Releasing the reserve on the first
    /// `SQLITE_FULL` gives the checkpoint and the eviction the room they
    /// need. Best effort: a disk too full to hold it simply has none.
    fn ensure_reserve(&self) {
        if !self.keep_reserve {
            return;
        }
        let path = sidecar(&self.path, ".reserve");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= self.reserve_bytes) {
            return;
        }
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&path)?;
            let zeros = vec![0u8; 64 * 1024];
            let mut left = self.reserve_bytes;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        })();
        if let Err(e) = written {
            // A partial reserve would compete with the database for the
            // last free blocks.
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), error = %e, "cannot create the buffer's disk reserve");
        }
    }

    /// Deletes the reserve file; true if there was one.
    fn release_reserve(&self) -> bool {
        let path = sidecar(&self.path, ".reserve");
        let released = std::fs::remove_file(&path).is_ok();
        if released {
            tracing::warn!(path = %path.display(), "disk full: released the buffer's disk reserve");
        }
        released
    }

    /// The binding page cap: the configured size or, after the disk filled,
    /// the size the file had then.
    fn cap_pages(&self) -> Option<u64> {
        match (self.size_cap_pages, self.disk_cap_pages) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Reason to give for evictions forced by the current cap.
    fn cap_reason(&self) -> EvictionReason {
        match (self.size_cap_pages, self.disk_cap_pages) {
            (Some(size), Some(disk)) if disk < size => EvictionReason::DiskFull,
            (None, Some(_)) => EvictionReason::DiskFull,
            _ => EvictionReason::MaxSize,
        }
    }

    /// Pages an append of `bytes` accounted bytes may need. Rows cost more
    /// than their accounted size on pages (fill factor, index, interior
    /// pages, overflow chains): assume half again, plus two.
    fn pages_for(&self, bytes: u64) -> u64 {
        bytes.saturating_mul(3) / 2 / self.page_size + 2
    }

    /// (page_count, freelist_count): pages of the database and how many of
    /// them are free for reuse. Both read page 1 only.
    fn page_usage(&self) -> Result<(u64, u64), BufferError> {
        let e = self.err("page usage");
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(&e)?;
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .map_err(&e)?;
        Ok((pages.max(0) as u64, free.max(0) as u64))
    }

    /// The last stored profile snapshot of `connection`, if any.
    pub fn profile_state(&self, connection: &str) -> Result<Option<String>, BufferError> {
        self.conn
            .prepare_cached("SELECT snapshot FROM profile_state WHERE connection = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![connection], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("profile state"))
    }

    /// Accepts `input.records` and stores `input.states` in one transaction:
    /// all of it is committed or none. A profile's records and the snapshot
    /// saying it produced them therefore commit together, so a restart
    /// neither repeats nor loses a derived record; with no records only the
    /// states are written (the shutdown snapshot).
    ///
    /// The report holds the seqs in input order and the evictions made to
    /// fit the records, in commit order. Those evictions are committed (each
    /// with its `buffer.evicted` event) even when the append itself then
    /// fails with [`BufferError::Full`], which means nothing was accepted
    /// and nothing was left to evict.
    pub fn append(&mut self, input: Append<'_>) -> Result<AppendReport, BufferError> {
        let Append { records, states } = input;
        let mut report = AppendReport::default();
        if records.is_empty() && states.is_empty() {
            return Ok(report);
        }
        let incoming: u64 = records.iter().map(|r| accounted(&r.data) as u64).sum();
        if let Err(e) = self.relieve_pressure(incoming, &mut report.evicted) {
            if !e.is_disk_full() {
                return Err(e);
            }
            // The hard wall below still holds; relief is only an early start.
            tracing::debug!(error = %e, "proactive eviction hit the wall");
        }
        let mut want = incoming.saturating_mul(2).max(CHUNK_MIN_BYTES);
        let mut last_reason = EvictionReason::MaxSize;
        for _ in 0..=MAX_FULL_RETRIES {
            match self.insert(records, states) {
                Ok(seqs) => {
                    report.seqs = seqs;
                    self.flush_disk_error();
                    return Ok(report);
                }
                Err(e) if is_sqlite_full(&e) => {
                    let reason = self.on_full(incoming)?;
                    last_reason = reason;
                    let freed = match self.evict(Lane::Any, want, reason, &mut report.evicted) {
                        Ok(freed) => freed,
                        Err(e) if e.is_disk_full() => 0,
                        Err(e) => return Err(e),
                    };
                    if freed == 0 {
                        break;
                    }
                    want = want.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
        Err(BufferError::Full {
            path: self.path.clone(),
            reason: last_reason,
            records: records.len(),
        })
    }

    fn insert(
        &mut self,
        records: &[NewRecord],
        states: &[ProfileState],
    ) -> Result<Vec<u64>, BufferError> {
        let path = &self.path;
        let sql = sql_err("append", path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let seqs = insert_records(&tx, path, "append", records)?;
        if !states.is_empty() {
            let now = now_ms();
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO profile_state (connection, snapshot, updated_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (connection) DO UPDATE SET snapshot = excluded.snapshot, \
                     updated_ms = excluded.updated_ms",
                )
                .map_err(&sql)?;
            for state in states {
                upsert
                    .execute(params![state.connection, state.snapshot, now])
                    .map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)?;
        Ok(seqs)
    }

    /// Stores the pending disk-full `system.error`, if any; keeps it pending
    /// while even that small insert does not fit.
    fn flush_disk_error(&mut self) {
        if let Some(ev) = self.pending_disk_error.take() {
            if self.insert(std::slice::from_ref(&ev), &[]).is_err() {
                self.pending_disk_error = Some(ev);
            }
        }
    }

    /// An insert hit SQLITE_FULL: decides whether that was `max_page_count`
    /// or the filesystem, and in the latter case holds the file at its
    /// current size so freed pages get reused (invariant 10).
    fn on_full(&mut self, incoming: u64) -> Result<EvictionReason, BufferError> {
        let (pages, _) = self.page_usage()?;
        if let Some(cap) = self.cap_pages() {
            // The failed transaction was rolled back, so the count is what
            // it was before: if the append could have needed the pages up to
            // the cap, the cap refused it. (Counted generously: calling a
            // full disk "max_size" only mislabels the eviction, while the
            // other way round would freeze the file below its limit.)
            if pages + self.pages_for(incoming) >= cap {
                return Ok(self.cap_reason());
            }
        }
        tracing::warn!(path = %self.path.display(), pages,
            "filesystem full below buffer.max_size; holding the buffer at its current size");
        if self.disk_cap_pages.is_none() {
            let max_size = self.limits.max_size;
            self.pending_disk_error = Some(agent_event(
                "system.error",
                now_ms(),
                serde_json::json!({
                    "message": "disk full: the buffer is held at its current size and evicts per the priority lanes",
                    "path": self.path.display().to_string(),
                    "buffer_bytes": pages.saturating_mul(self.page_size),
                    "max_size": max_size,
                }),
            ));
        }
        self.release_reserve();
        self.disk_cap_pages = Some(pages.max(MIN_DB_PAGES));
        self.apply_limits()?;
        // Let the WAL restart from its beginning, reusing the space it has.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
        Ok(EvictionReason::DiskFull)
    }

    /// Proactive, tags-only eviction when the pages in use approach the cap
    /// (invariant 9). Other kinds are left to the hard wall, so they are
    /// kept as long as the file can physically hold them.
    fn relieve_pressure(
        &mut self,
        incoming: u64,
        out: &mut Vec<Eviction>,
    ) -> Result<(), BufferError> {
        let Some(cap) = self.cap_pages() else {
            return Ok(());
        };
        let ps = self.page_size;
        let incoming_pages = self.pages_for(incoming);
        let (pages, free) = self.page_usage()?;
        let mut used = pages.saturating_sub(free) + incoming_pages;
        if used * 100 <= cap * SOFT_HIGH_PERCENT {
            return Ok(());
        }
        let target = cap * SOFT_LOW_PERCENT / 100;
        let reason = self.cap_reason();
        for _ in 0..MAX_RELIEF_ROUNDS {
            if used <= target {
                break;
            }
            let want = ((used - target) * ps).max(CHUNK_MIN_BYTES);
            if self.evict(Lane::Tags, want, reason, out)? == 0 {
                break;
            }
            let (pages, free) = self.page_usage()?;
            used = pages.saturating_sub(free) + incoming_pages;
        }
        Ok(())
    }

    /// Evicts along `lane` until `want` accounted bytes are freed or nothing
    /// is left, in transactions of at most [`CHUNK_MAX_ROWS`] rows. Returns
    /// the bytes freed.
    fn evict(
        &mut self,
        lane: Lane,
        want: u64,
        reason: EvictionReason,
        out: &mut Vec<Eviction>,
    ) -> Result<u64, BufferError> {
        let mut freed = 0u64;
        while freed < want {
            let chunk = self.evict_chunk(lane, want - freed, reason)?;
            if chunk.is_empty() {
                break;
            }
            for e in &chunk {
                tracing::warn!(connection = %e.connection, kind = %e.kind,
                    first_seq = e.first_seq, last_seq = e.last_seq, count = e.count,
                    reason = %e.reason, "buffer evicted records");
                freed = freed.saturating_add(e.bytes);
            }
            out.extend(chunk);
        }
        Ok(freed)
    }

    /// One eviction transaction (invariants 6-8). Empty when nothing (useful)
    /// is evictable.
    fn evict_chunk(
        &mut self,
        lane: Lane,
        want: u64,
        reason: EvictionReason,
    ) -> Result<Vec<Eviction>, BufferError> {
        let path = &self.path;
        let sql = sql_err("evict", path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let mut ranges = Vec::new();
        let (mut bytes, mut rows) = (0u64, 0usize);
        // Within a lane, rows the broker refused (dead letters) go before
        // rows still waiting for delivery: they are the least likely to be
        // delivered (SPEC 1.11). Other kinds only in a transaction that has
        // taken every tag row: the tag walks stopped short of `want` and of
        // the row cap only because they ran out of rows.
        let order = [
            (true, Table::DeadLetters),
            (true, Table::Records),
            (false, Table::DeadLetters),
            (false, Table::Records),
        ];
        for (tags, table) in order {
            if bytes >= want || rows >= CHUNK_MAX_ROWS || (!tags && lane == Lane::Tags) {
                break;
            }
            let streams = streams_in(&tx, path, table, Some(tags))?;
            let (b, r) = pick_oldest(
                &tx,
                path,
                table,
                &streams,
                want - bytes,
                CHUNK_MAX_ROWS - rows,
                &mut ranges,
            )?;
            bytes += b;
            rows += r;
        }
        if rows == 0 || bytes == 0 {
            return Ok(Vec::new());
        }
        match delete_and_announce(&tx, path, ranges, reason, now_ms(), true)? {
            Some(evictions) => {
                tx.commit().map_err(&sql)?;
                Ok(evictions)
            }
            None => Ok(Vec::new()),
        }
    }

    /// Evicts every stream's head rows whose `ts_ms` is older than
    /// `now_ms - max_age` (all kinds; see the module doc on why `ts_ms` and
    /// why heads), announcing each range with a `buffer.evicted` event dated
    /// `now_ms`. Also lifts a disk-full cap (invariant 10) so that space the
    /// disk got back is used again. Call it periodically (e.g. every minute).
    pub fn evict_expired(&mut self, now_ms: i64) -> Result<Vec<Eviction>, BufferError> {
        if self.disk_cap_pages.take().is_some() {
            tracing::info!(path = %self.path.display(), "retrying to grow the buffer after a full disk");
            self.apply_limits()?;
            self.ensure_reserve();
        }
        let mut out = Vec::new();
        let Some(age) = self.limits.max_age_ms() else {
            return Ok(out);
        };
        let cutoff = now_ms.saturating_sub(age);
        // Pending rows first, then dead letters (SPEC 1.11), each in
        // stream order.
        let mut streams = Vec::new();
        {
            let tx = self
                .conn
                .unchecked_transaction()
                .map_err(self.err("evict expired"))?;
            for table in [Table::Records, Table::DeadLetters] {
                for s in streams_in(&tx, &self.path, table, None)? {
                    streams.push((table, s));
                }
            }
        }
        for (table, (id, connection, kind)) in streams {
            let head = Head {
                table,
                stream: id,
                connection: &connection,
                kind,
            };
            loop {
                let chunk = match self.expire_chunk(&head, cutoff, now_ms) {
                    Err(e) if is_sqlite_full(&e) => {
                        // At the cap, deleting rows need not free a whole
                        // page for the announcement; expired rows must go
                        // anyway, so this one transaction may use a few
                        // pages of the WAL's share of max_size.
                        self.set_page_cap(self.cap_pages().map(|c| c + EXPIRY_HEADROOM_PAGES))?;
                        let retry = self.expire_chunk(&head, cutoff, now_ms);
                        self.set_page_cap(self.cap_pages())?;
                        self.full_to_error(retry, 0)?
                    }
                    other => other?,
                };
                let Some((evictions, full_chunk)) = chunk else {
                    break;
                };
                for e in &evictions {
                    tracing::warn!(connection = %e.connection, kind = %e.kind,
                        first_seq = e.first_seq, last_seq = e.last_seq, count = e.count,
                        "buffer evicted expired records");
                }
                out.extend(evictions);
                if !full_chunk {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One expiry transaction over the head of one stream's rows in one
    /// table: the rows older than `cutoff` (at most a chunk) deleted and
    /// announced. None when the head is not expired; else the evictions and
    /// whether the chunk was full (more may be expired).
    fn expire_chunk(
        &mut self,
        head: &Head<'_>,
        cutoff: i64,
        now_ms: i64,
    ) -> Result<Option<(Vec<Eviction>, bool)>, BufferError> {
        let Head {
            table,
            stream: id,
            connection,
            kind,
        } = *head;
        let path = &self.path;
        let sql = sql_err("evict expired", path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let mut range: Option<Range> = None;
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT seq, size, ts_ms FROM {} WHERE stream = ?1 ORDER BY seq",
                    table.name()
                ))
                .map_err(&sql)?;
            let mut rows = stmt.query(params![id]).map_err(&sql)?;
            let mut n = 0;
            while n < CHUNK_MAX_ROWS {
                let Some(row) = rows.next().map_err(&sql)? else {
                    break;
                };
                let ts: i64 = row.get(2).map_err(&sql)?;
                if ts >= cutoff {
                    break;
                }
                let seq: i64 = row.get(0).map_err(&sql)?;
                let size: i64 = row.get(1).map_err(&sql)?;
                match &mut range {
                    Some(r) => {
                        r.last_seq = seq;
                        r.count += 1;
                        r.bytes += size;
                    }
                    None => {
                        range = Some(Range {
                            table,
                            stream: id,
                            connection: connection.to_string(),
                            kind,
                            first_seq: seq,
                            last_seq: seq,
                            count: 1,
                            bytes: size,
                        })
                    }
                }
                n += 1;
            }
        }
        let Some(range) = range else {
            return Ok(None);
        };
        let full_chunk = range.count as usize >= CHUNK_MAX_ROWS;
        let rows = vec![range];
        // Age eviction must happen whatever it costs: the cost check
        // of size eviction does not apply (an expired row is gone
        // even if its announcement is larger than it was).
        let evictions =
            delete_and_announce(&tx, path, rows, EvictionReason::MaxAge, now_ms, false)?
                .unwrap_or_default();
        tx.commit().map_err(&sql)?;
        Ok(Some((evictions, full_chunk)))
    }

    /// Sets SQLite's `max_page_count` (`None` = unlimited).
    fn set_page_cap(&self, pages: Option<u64>) -> Result<(), BufferError> {
        let pages = pages.unwrap_or(UNLIMITED_PAGES);
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(self.err("apply limits"))?;
        Ok(())
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
        let sql = sql_err("ack", path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let mut deleted = 0usize;
        // (stream id, rows, bytes); acks usually cover one stream.
        let mut per_stream: Vec<(i64, i64, i64)> = Vec::new();
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM records WHERE id = ?1 RETURNING stream, size")
                .map_err(&sql)?;
            for id in ids {
                let gone: Option<(i64, i64)> = delete
                    .query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
                    .map_err(&sql)?;
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
                .map_err(&sql)?;
            for (stream, rows, bytes) in &per_stream {
                shrink.execute(params![stream, rows, bytes]).map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)?;
        Ok(deleted)
    }

    /// Moves the rows with these ids (the records of a message the broker
    /// rejected repeatedly) into the dead-letter table, keeping stream, seq,
    /// timestamp, data and row id, and in the same transaction appends one
    /// agent-level `system.error` event per affected stream naming them.
    /// Rows of the agent's own event stream are moved without such an event:
    /// announcing a rejected event with another event the broker may reject
    /// the same way could go on forever; they still show in
    /// [`Stats::dead_letters`](super::Stats) and [`Store::dead_letters`].
    /// Unknown ids are ignored. Returns the number of rows moved. At the
    /// size cap or on a full disk this fails with [`BufferError::Full`] and
    /// moves nothing (the rows stay pending; the next append's eviction
    /// makes room).
    pub fn dead_letter(&mut self, ids: &[i64], reason: &str) -> Result<usize, BufferError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let result = self.dead_letter_inner(ids, reason);
        self.full_to_error(result, ids.len())
    }

    /// Maps SQLITE_FULL of a maintenance operation to [`BufferError::Full`].
    fn full_to_error<T>(
        &self,
        result: Result<T, BufferError>,
        records: usize,
    ) -> Result<T, BufferError> {
        result.map_err(|e| {
            if is_sqlite_full(&e) {
                BufferError::Full {
                    path: self.path.clone(),
                    reason: self.cap_reason(),
                    records,
                }
            } else {
                e
            }
        })
    }

    fn dead_letter_inner(&mut self, ids: &[i64], reason: &str) -> Result<usize, BufferError> {
        let now = now_ms();
        let path = &self.path;
        let sql = sql_err("dead letter", path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        // (stream id, first seq, last seq, rows, bytes)
        let mut per_stream: Vec<(i64, i64, i64, i64, i64)> = Vec::new();
        {
            let mut take = tx
                .prepare_cached(
                    "DELETE FROM records WHERE id = ?1 RETURNING stream, seq, ts_ms, data, size",
                )
                .map_err(&sql)?;
            let mut keep = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (id, stream, seq, ts_ms, data, size, reason, dead_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(&sql)?;
            for id in ids {
                let row: Option<(i64, i64, i64, String, i64)> = take
                    .query_row(params![id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()
                    .map_err(&sql)?;
                let Some((stream, seq, ts_ms, data, size)) = row else {
                    continue;
                };
                keep.execute(params![id, stream, seq, ts_ms, data, size, reason, now])
                    .map_err(&sql)?;
                match per_stream.iter_mut().find(|s| s.0 == stream) {
                    Some(s) => {
                        s.1 = s.1.min(seq);
                        s.2 = s.2.max(seq);
                        s.3 += 1;
                        s.4 += size;
                    }
                    None => per_stream.push((stream, seq, seq, 1, size)),
                }
            }
        }
        let mut events = Vec::new();
        let mut keyed = Vec::new();
        {
            let mut shrink = tx
                .prepare_cached(
                    "UPDATE streams SET records = records - ?2, bytes = bytes - ?3 WHERE id = ?1 \
                     RETURNING connection, kind",
                )
                .map_err(&sql)?;
            for &(stream, first, last, rows, bytes) in &per_stream {
                let (connection, kind): (String, String) = shrink
                    .query_row(params![stream, rows, bytes], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(&sql)?;
                let kind = Kind::parse(&kind).ok_or_else(|| BufferError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("unknown record kind {kind:?}"),
                })?;
                keyed.push((StreamKey::new(connection, kind), first, last, rows));
            }
        }
        keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, first, last, rows) in keyed {
            tracing::error!(connection = %key.connection, kind = %key.kind, first_seq = first,
                last_seq = last, count = rows, %reason, "records moved to dead letters");
            if key.connection.is_empty() && key.kind == Kind::Event {
                continue;
            }
            events.push(dead_letter_event(
                &key.connection,
                key.kind,
                first as u64,
                last as u64,
                rows as u64,
                reason,
                now,
            ));
        }
        insert_new(&tx, path, "dead letter", &events)?;
        tx.commit().map_err(&sql)?;
        Ok(per_stream.iter().map(|s| s.3 as usize).sum())
    }

    /// The dead-letter table as runs (rows of one stream moved together for
    /// the same reason), ordered by stream and seq. Holds one entry per run,
    /// not per row.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, BufferError> {
        let e = self.err("dead letters");
        let tx = self.conn.unchecked_transaction().map_err(&e)?;
        let names = stream_names(&tx, &self.path, "dead letters", false)?;
        let mut out: Vec<DeadLetter> = Vec::new();
        let mut last_stream = None;
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT stream, seq, size, reason, dead_ms FROM dead_letters \
                     ORDER BY stream, seq",
                )
                .map_err(&e)?;
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let stream: i64 = row.get(0).map_err(&e)?;
                let seq = row.get::<_, i64>(1).map_err(&e)? as u64;
                let size = row.get::<_, i64>(2).map_err(&e)?.max(0) as u64;
                let reason: String = row.get(3).map_err(&e)?;
                let dead_ms: i64 = row.get(4).map_err(&e)?;
                if let Some(run) = out.last_mut().filter(|run| {
                    last_stream == Some(stream) && run.reason == reason && run.dead_at_ms == dead_ms
                }) {
                    run.last_seq = seq;
                    run.count += 1;
                    run.bytes += size;
                    continue;
                }
                let Some((_, connection, kind)) = names.iter().find(|n| n.0 == stream) else {
                    return Err(self.corrupt(format!("dead letter of unknown stream {stream}")));
                };
                last_stream = Some(stream);
                out.push(DeadLetter {
                    connection: connection.clone(),
                    kind: *kind,
                    first_seq: seq,
                    last_seq: seq,
                    count: 1,
                    bytes: size,
                    reason,
                    dead_at_ms: dead_ms,
                });
            }
        }
        tx.finish().map_err(&e)?;
        out.sort_by(|a, b| {
            (&a.connection, a.kind, a.first_seq).cmp(&(&b.connection, b.kind, b.first_seq))
        });
        Ok(out)
    }

    /// Moves every dead letter back into the pending records with its
    /// original seq and row id: they will be published again, and consumers
    /// drop duplicates by seq. One transaction; SQLite moves the rows without
    /// loading them into memory. Returns the number of rows re-queued. A
    /// running uplink has already passed those seqs: it must restart its
    /// cursors for the streams whose `first_seq` went down. Re-queueing
    /// never evicts: with no room (size cap or full disk) it fails with
    /// [`BufferError::Full`] and moves nothing; retry once the backlog has
    /// drained.
    pub fn retry_dead_letters(&mut self) -> Result<usize, BufferError> {
        let result = self.retry_dead_letters_inner();
        self.full_to_error(result, 0)
    }

    fn retry_dead_letters_inner(&mut self) -> Result<usize, BufferError> {
        let path = &self.path;
        let sql = sql_err("retry dead letters", path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let mut per_stream: Vec<(i64, i64, i64)> = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT stream, count(*), sum(size) FROM dead_letters GROUP BY stream",
                )
                .map_err(&sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(&sql)?;
            for row in rows {
                per_stream.push(row.map_err(&sql)?);
            }
        }
        if per_stream.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO records (id, stream, seq, ts_ms, data, size) \
             SELECT id, stream, seq, ts_ms, data, size FROM dead_letters",
            [],
        )
        .map_err(&sql)?;
        let moved = tx.execute("DELETE FROM dead_letters", []).map_err(&sql)?;
        {
            let mut grow = tx
                .prepare_cached(
                    "UPDATE streams SET records = records + ?2, bytes = bytes + ?3 WHERE id = ?1",
                )
                .map_err(&sql)?;
            for (stream, rows, bytes) in &per_stream {
                grow.execute(params![stream, rows, bytes]).map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)?;
        tracing::info!(records = moved, "dead letters re-queued");
        Ok(moved)
    }

    /// Totals and per-stream figures from one consistent snapshot. Cost is
    /// O(streams · log rows + dead letters): counters come from `streams`,
    /// first/last seq from the ends of the `(stream, seq)` index.
    pub fn stats(&self) -> Result<Stats, BufferError> {
        let e = self.err("stats");
        let tx = self.conn.unchecked_transaction().map_err(&e)?;
        let mut out = Stats::default();
        {
            let mut list = tx
                .prepare_cached(
                    "SELECT id, connection, kind, next_seq, records, bytes, evicted_total \
                     FROM streams",
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
                let evicted: i64 = row.get(6).map_err(&e)?;
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
                    evicted_total: evicted.max(0) as u64,
                };
                out.records += s.records;
                out.bytes += s.bytes;
                out.evicted_total += s.evicted_total;
                out.oldest_ts_ms = match (out.oldest_ts_ms, s.oldest_ts_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                out.streams.push(s);
            }
        }
        out.streams
            .sort_unstable_by(|a, b| (&a.connection, a.kind).cmp(&(&b.connection, b.kind)));
        let dead: i64 = tx
            .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))
            .map_err(&e)?;
        out.dead_letters = dead.max(0) as u64;
        let pages: i64 = tx
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(&e)?;
        out.file_bytes = (pages.max(0) as u64).saturating_mul(self.page_size);
        tx.finish().map_err(&e)?;
        out.wal_bytes = std::fs::metadata(sidecar(&self.path, "-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
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

/// `path` with `suffix` appended to its file name (`buffer.db` → `buffer.db-wal`).
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Renames a corrupt database and its `-wal`/`-shm` to
/// `<name>.corrupt-<UTC timestamp>[-n]` (invariant 11). The WAL must move
/// with it: left behind, it would be replayed into the fresh file.
fn quarantine(path: &Path) -> Result<PathBuf, BufferError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let base = sidecar(path, &format!(".corrupt-{stamp}"));
    let mut target = base.clone();
    let mut n = 1;
    while target.exists() || sidecar(&target, "-wal").exists() {
        target = sidecar(&base, &format!("-{n}"));
        n += 1;
    }
    let moved = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| BufferError::Quarantine {
            path: from.to_path_buf(),
            moved_to: to.to_path_buf(),
            source,
        })
    };
    moved(path, &target)?;
    for suffix in ["-wal", "-shm"] {
        let from = sidecar(path, suffix);
        if from.exists() {
            moved(&from, &sidecar(&target, suffix))?;
        }
    }
    Ok(target)
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
            })
            .unwrap();
        assert_eq!(store.profile_state("line1").unwrap().as_deref(), Some("{}"));
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
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
            let ids: Vec<i64> = all(&store, &line1_tag()).iter().map(|r| r.id).collect();
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
            assert_eq!(store.ack(&[id, id, 999_999, -1]).expect("ack"), 1);
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
            store.append(Append::records(&batch)).expect("append");
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
                        evicted_total: 0,
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
                        evicted_total: 0,
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
