//! Getting a usable database: connecting, telling a corrupt file from a
//! troubled environment, creating and upgrading the schema, and moving a
//! corrupt file aside (invariant 11).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};

use super::{sidecar, Store};
use crate::buffer::BufferError;
use crate::config::Synchronous;

/// `PRAGMA user_version` of the schema below. Files of versions 1 to 5 are
/// upgraded in place ([`migrate`], then `Store::convert_legacy` for the
/// records of versions 1 to 3); a newer file is refused untouched.
pub(super) const SCHEMA_VERSION: i64 = 6;

/// Long enough to ride out a checkpoint or a short `plantgate buffer ...`
/// command holding the write lock; short, because every buffer command
/// queues behind a waiting one (reads, acks, `/healthz`'s probe). A longer
/// lock fails the append, and the buffer worker holds the records and retries
/// (docs/guarantees.md: nothing is dropped silently at the intake); acks
/// and maintenance are retried by their callers.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

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
    retained      INTEGER NOT NULL DEFAULT 0,
    retained_bytes INTEGER NOT NULL DEFAULT 0,
    released_total INTEGER NOT NULL DEFAULT 0,
    UNIQUE (connection, kind)
);
CREATE TABLE IF NOT EXISTS segments (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    stream    INTEGER NOT NULL REFERENCES streams(id),
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    pending   INTEGER NOT NULL,
    head_seq  INTEGER NOT NULL,
    head_ts   INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    gone      BLOB,
    delivered_ms INTEGER,
    lost      BLOB,
    kept      INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS segments_stream_seq ON segments (stream, last_seq);
CREATE INDEX IF NOT EXISTS segments_pending ON segments (stream, last_seq) WHERE pending > 0;
CREATE INDEX IF NOT EXISTS segments_retained ON segments (delivered_ms) WHERE pending = 0;
CREATE TABLE IF NOT EXISTS segment_data (
    id   INTEGER PRIMARY KEY,
    blob BLOB NOT NULL
);
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
CREATE TABLE IF NOT EXISTS tag_marks (
    connection TEXT NOT NULL,
    tag        TEXT NOT NULL,
    last_ms    INTEGER NOT NULL,
    gaps       TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (connection, tag)
) WITHOUT ROWID;
";

/// Every column the code reads, per table: preparing these proves the schema
/// is what this version expects (a file with our table names but other
/// columns is as unusable as garbage).
const SCHEMA_PROBES: [&str; 7] = [
    "SELECT key, value FROM meta LIMIT 0",
    "SELECT id, connection, kind, next_seq, records, bytes, evicted_total, retained, \
     retained_bytes, released_total FROM streams LIMIT 0",
    "SELECT id, stream, first_seq, last_seq, count, pending, head_seq, head_ts, size, gone, \
     delivered_ms, lost, kept FROM segments LIMIT 0",
    "SELECT id, blob FROM segment_data LIMIT 0",
    "SELECT id, stream, seq, ts_ms, data, size, reason, dead_ms FROM dead_letters LIMIT 0",
    "SELECT connection, snapshot, updated_ms FROM profile_state LIMIT 0",
    "SELECT connection, tag, last_ms, gaps, updated_ms FROM tag_marks LIMIT 0",
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Does SQLite recognise the file: cheap, for the CLI.
    Light,
    /// `PRAGMA quick_check` over the whole file: for the service start.
    Quick,
}

/// Why opening failed: only `Corrupt` justifies moving the file aside.
pub(super) enum OpenError {
    Corrupt(String),
    Fatal(BufferError),
}

/// A connection to a checked file with an up-to-date schema.
pub(super) struct Connected {
    pub conn: Connection,
    pub epoch: String,
    pub page_size: u64,
}

/// SQLITE_NOTADB / SQLITE_CORRUPT are the file's fault; anything else
/// (EACCES, EIO, a lock) is the environment's, and must not cost the file
/// its place.
fn file_error<'a>(op: &'static str, path: &'a Path) -> impl Fn(rusqlite::Error) -> OpenError + 'a {
    move |source| match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            OpenError::Corrupt(source.to_string())
        }
        _ => OpenError::Fatal(BufferError::Sqlite {
            op,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// As [`file_error`], but while the schema is read or created a generic
/// SQLITE_ERROR ("no such column", "table already exists" with other
/// columns) also means the file is not ours.
fn schema_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl Fn(rusqlite::Error) -> OpenError + 'a {
    move |source| match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase)
        | Some(ErrorCode::DatabaseCorrupt)
        | Some(ErrorCode::Unknown) => OpenError::Corrupt(format!("broken schema: {source}")),
        _ => OpenError::Fatal(BufferError::Sqlite {
            op,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Opens `path` (creating its directory), checks it as `check` says,
/// switches to WAL and brings the schema up to date.
pub(super) fn connect(
    path: &Path,
    synchronous: Synchronous,
    check: Check,
) -> Result<Connected, OpenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| {
            OpenError::Fatal(BufferError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })
        })?;
    }
    let classify = |op| file_error(op, path);
    let mut conn = Connection::open(path).map_err(classify("open"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(classify("open"))?;
    // Until the file is known good, closing must not checkpoint a WAL
    // into it: a quarantined file keeps the bytes it was found with.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(classify("open"))?;
    check_file(&conn, path, check)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(classify("open"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::Fatal(BufferError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("cannot switch to WAL journal mode (got {mode:?})"),
        }));
    }
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(classify("open"))?;
    let epoch = init_schema(&mut conn, path)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
        .map_err(classify("open"))?;
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(classify("open"))?;
    Ok(Connected {
        conn,
        epoch,
        page_size: page_size.max(512) as u64,
    })
}

fn check_file(conn: &Connection, path: &Path, check: Check) -> Result<(), OpenError> {
    match check {
        Check::Light => {
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(file_error("open", path))?;
        }
        Check::Quick => {
            let classify = file_error("quick check", path);
            let mut stmt = conn.prepare("PRAGMA quick_check(20)").map_err(&classify)?;
            let problems = stmt
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(&classify)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(&classify)?;
            if !(problems.len() == 1 && problems[0] == "ok") {
                return Err(OpenError::Corrupt(format!(
                    "quick_check: {}",
                    problems.join("; ")
                )));
            }
        }
    }
    Ok(())
}

/// Creates or upgrades the schema and reads (or creates) the epoch, in one
/// IMMEDIATE transaction: two processes opening a fresh file at once must
/// not both create an epoch.
fn init_schema(conn: &mut Connection, path: &Path) -> Result<String, OpenError> {
    let classify = |op| schema_error(op, path);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(classify("open"))?;
    migrate(&tx, path)?;
    for probe in SCHEMA_PROBES {
        tx.prepare(probe).map_err(classify("open"))?;
    }
    let epoch = epoch(&tx, path)?;
    tx.commit().map_err(classify("open"))?;
    Ok(epoch)
}

/// Brings an older file up to [`SCHEMA_VERSION`]: version 1 lacks
/// `streams.evicted_total` and `dead_letters`, version 2 lacks
/// `profile_state`, versions up to 3 keep records one per row in `records`
/// instead of segments, versions up to 4 keep nothing once delivered (the
/// retention columns of `streams` and `segments`), versions up to 5 lack
/// `tag_marks`; the `CREATE ... IF NOT EXISTS` of [`SCHEMA`] adds the
/// missing tables and indexes. The rows of `records` are moved into
/// segments after this transaction, in chunks (`Store::convert_legacy`);
/// the version says 6 from here on, so an older plantgate refuses the file
/// meanwhile.
fn migrate(tx: &Transaction, path: &Path) -> Result<(), OpenError> {
    let classify = |op| schema_error(op, path);
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
    // Write only when something changes: reopening after a crash on a full
    // disk must not need a single new page.
    if version < SCHEMA_VERSION {
        if version == 1 {
            tx.execute_batch(
                "ALTER TABLE streams ADD COLUMN evicted_total INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(classify("upgrade"))?;
        }
        // A file from before segments (1 to 3) gets its `segments` table
        // from SCHEMA below, with every column; `streams` it has.
        let added = [
            ("streams", "retained", "INTEGER NOT NULL DEFAULT 0"),
            ("streams", "retained_bytes", "INTEGER NOT NULL DEFAULT 0"),
            ("streams", "released_total", "INTEGER NOT NULL DEFAULT 0"),
            ("segments", "delivered_ms", "INTEGER"),
            ("segments", "lost", "BLOB"),
            ("segments", "kept", "INTEGER NOT NULL DEFAULT 0"),
        ];
        for (table, column, decl) in added {
            add_column(tx, table, column, decl).map_err(classify("upgrade"))?;
        }
        if version == 4 {
            // Done at open by `Store::mark_dead_letters_lost`.
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('mark_lost', '1')",
                [],
            )
            .map_err(classify("upgrade"))?;
        }
        tx.execute_batch(SCHEMA).map_err(classify("open"))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(classify("open"))?;
    }
    Ok(())
}

/// Adds `column` to `table` when the table exists without it.
fn add_column(tx: &Transaction, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let columns = stmt
        .query_map(params![table], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    if columns.is_empty() || columns.iter().any(|c| c == column) {
        return Ok(());
    }
    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
}

/// The file's epoch, created with the schema (invariant 3).
fn epoch(tx: &Transaction, path: &Path) -> Result<String, OpenError> {
    let classify = |op| schema_error(op, path);
    let existing: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |row| {
            row.get(0)
        })
        .optional()
        .map_err(classify("open"))?;
    if let Some(epoch) = existing {
        return Ok(epoch);
    }
    // Seqs already handed out under a lost epoch would be re-announced under
    // a new one as if they started fresh.
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
    Ok(epoch)
}

/// Renames a corrupt database and its `-wal`/`-shm` to
/// `<name>.corrupt-<UTC timestamp>[-n]` (invariant 11). The WAL must move
/// with it: left behind, it would be replayed into the fresh file.
pub(super) fn quarantine(path: &Path) -> Result<PathBuf, BufferError> {
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

impl Store {
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
