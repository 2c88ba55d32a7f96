//! Synchronous SQLite side of the buffer: one [`Store`] owns the database
//! file. The invariants it keeps, the schema and the eviction rules are in
//! the module doc of `buffer`; the files here split the work by concern:
//!
//! - `schema`: connecting, checking the file, creating and upgrading the
//!   schema, quarantine of a corrupt file; `upgrade`: records of a
//!   schema-3 file moved into segments;
//! - `segment` (pure: encoding and decoding a segment's blob), `seqset`
//!   (pure: the seqs of a segment no longer pending), `cache` (the codec
//!   and the decoded segments kept) and `segrow` (segments as rows:
//!   finding, decoding, taking records out);
//! - `tx`: the one transaction helper and the per-stream counter changes
//!   every write applies with its records;
//! - `space`: `max_size` as SQLite pragmas, the disk reserve, telling the
//!   size cap from a full disk;
//! - `append`: accepting records (and profile snapshots) with their seqs;
//! - `evict`: the size-pressure path (priority lanes) and the expiry path
//!   (`max_age`), each range announced in its own transaction;
//! - `read`: what the uplink reads and acks;
//! - `dead_letters`: records the broker refused, parked, listed and
//!   re-queued;
//! - `repair`: a segment whose data no longer decodes, dropped and
//!   announced;
//! - `stats`: totals for `/status`, `/metrics` and the CLI.

mod append;
mod cache;
mod dead_letters;
mod evict;
mod insert;
mod read;
mod repair;
#[cfg(test)]
pub(crate) mod replay_tests;
mod schema;
mod segment;
mod segrow;
mod seqset;
mod space;
mod stats;
#[cfg(test)]
mod tests;
mod tx;
mod upgrade;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode};

use super::{BufferError, Limits, OpenMode, Quarantined, StoreOptions};
use crate::record::{now_ms, EventType, Kind, NewRecord};
use cache::Segments;
use schema::{Check, OpenError};

/// Accounted per-row cost of a dead letter on top of its JSON text (row
/// header, ids, seq, timestamp, index entry), so that many tiny records are
/// not mistaken for free when the size limit is enforced.
const ROW_OVERHEAD_BYTES: u64 = 48;

/// The buffer database. Not `Sync`: one owner (the buffer thread, or a CLI
/// command) at a time.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    epoch: String,
    /// zstd contexts and the decoded-segment cache.
    segments: RefCell<Segments>,
    limits: Limits,
    page_size: u64,
    /// `max_page_count` derived from `limits.max_size`; `None` = unlimited.
    size_cap_pages: Option<u64>,
    /// Set when the filesystem filled below the size cap: the main file is
    /// held at the page count it had then (invariant 10).
    disk_cap_pages: Option<u64>,
    /// Keep a reserve file next to the database (the service only: see
    /// `Store::ensure_reserve`).
    keep_reserve: bool,
    /// Drop and announce damaged segments (the service only: see
    /// `repair`).
    repairs: bool,
    /// Size the reserve file should have.
    reserve_bytes: u64,
    /// A `system.error` about a full disk that could not be stored yet; it
    /// goes in right after the next append that fits (operators must hear
    /// about a full disk, and the event must survive outages like any other).
    pending_disk_error: Option<NewRecord>,
    /// What was found at the path when it had to be moved aside at open.
    quarantined: Option<Quarantined>,
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
        match options.mode {
            OpenMode::Tool => match Self::open_once(path, &options, Check::Light) {
                Ok(store) => Ok(store),
                Err(OpenError::Fatal(e)) => Err(e),
                Err(OpenError::Corrupt(detail)) => Err(BufferError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!("cannot open it: {detail}"),
                }),
            },
            OpenMode::Service => Self::open_service(path, &options),
        }
    }

    fn open_service(path: &Path, options: &StoreOptions) -> Result<Store, BufferError> {
        let mut first = Self::open_once(path, options, Check::Quick);
        if let Err(OpenError::Fatal(e)) = &first {
            // A restart on a full disk: the reserve is what lets it start,
            // instead of failing (and being restarted) forever.
            if e.is_disk_full() && std::fs::remove_file(sidecar(path, ".reserve")).is_ok() {
                tracing::warn!(path = %path.display(), "disk full at start: released the buffer's disk reserve");
                first = Self::open_once(path, options, Check::Quick);
            }
        }
        let reason = match first {
            Ok(store) => return Ok(store),
            Err(OpenError::Fatal(e)) => return Err(e),
            Err(OpenError::Corrupt(reason)) => reason,
        };
        let moved_to = schema::quarantine(path)?;
        tracing::error!(path = %path.display(), moved_to = %moved_to.display(), %reason,
            "buffer database was corrupt and has been moved aside; starting a new one");
        let mut store = match Self::open_once(path, options, Check::Quick) {
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
            EventType::SystemError,
            now_ms(),
            serde_json::json!({
                "message": "buffer database was corrupt and has been moved aside",
                "moved_to": moved_to.display().to_string(),
                "reason": reason,
            }),
        );
        store.append(super::Append::records(std::slice::from_ref(&event)))?;
        store.quarantined = Some(Quarantined { moved_to, reason });
        Ok(store)
    }

    /// One attempt: connect (checking the file as `check` says), bring the
    /// schema up to date, apply the limits.
    fn open_once(path: &Path, options: &StoreOptions, check: Check) -> Result<Store, OpenError> {
        let codec = segment::Codec::new().map_err(|e| {
            OpenError::Fatal(BufferError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("cannot set up the segment codec: {e}"),
            })
        })?;
        let segments = RefCell::new(Segments::new(codec));
        let opened = schema::connect(path, options.synchronous, check)?;
        let mut store = Store {
            conn: opened.conn,
            path: path.to_path_buf(),
            epoch: opened.epoch,
            segments,
            limits: options.limits,
            page_size: opened.page_size,
            size_cap_pages: None,
            disk_cap_pages: None,
            keep_reserve: options.mode == OpenMode::Service,
            repairs: options.mode == OpenMode::Service,
            reserve_bytes: 0,
            pending_disk_error: None,
            quarantined: None,
        };
        store.convert_legacy().map_err(OpenError::Fatal)?;
        store.mark_dead_letters_lost().map_err(OpenError::Fatal)?;
        store.apply_limits().map_err(OpenError::Fatal)?;
        store.ensure_reserve();
        tracing::debug!(path = %store.path.display(), epoch = %store.epoch, "buffer opened");
        Ok(store)
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

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> BufferError + '_ {
        sql_err(op, &self.path)
    }

    fn corrupt(&self, detail: String) -> BufferError {
        BufferError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    fn parse_kind(&self, kind: &str) -> Result<Kind, BufferError> {
        Kind::parse(kind).ok_or_else(|| self.corrupt(format!("unknown record kind {kind:?}")))
    }
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

/// What a dead-letter row costs against `max_size`: its JSON text plus the
/// fixed overhead.
fn accounted(data: &str) -> i64 {
    data.len() as i64 + ROW_OVERHEAD_BYTES as i64
}

/// An event of the agent itself (connection "").
fn agent_event(event: EventType, ts_ms: i64, details: serde_json::Value) -> NewRecord {
    NewRecord::event_at("", event, ts_ms, details)
}

/// The `connection` of an event's details: `null` for the agent itself.
fn connection_value(connection: &str) -> serde_json::Value {
    if connection.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(connection.to_string())
    }
}

/// `path` with `suffix` appended to its file name (`buffer.db` → `buffer.db-wal`).
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}
