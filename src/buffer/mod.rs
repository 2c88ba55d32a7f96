//! The durable record buffer: the single point where a record becomes
//! *accepted* (SPEC 1.1).
//!
//! # Design constraints
//!
//! - **A commit is the promise.** A record is accepted when the SQLite
//!   transaction that inserted it has committed; nothing upstream may report
//!   success earlier, and nothing downstream may delete a row before the broker
//!   has acknowledged it. `kill -9` at any instant must leave every committed
//!   row intact and the file consistent (WAL mode; `synchronous = NORMAL`
//!   survives process crashes, `FULL` also power loss).
//! - **Throughput comes from batching.** One transaction per record is two
//!   orders of magnitude slower than one per thousand on real flash, so
//!   [`Store::append`] takes a slice, and [`BufferHandle`] coalesces appends
//!   that queue up while a commit is running into a single transaction.
//! - **Memory does not follow the backlog.** Ten million waiting rows must not
//!   cost RAM: reads are bounded index range scans, per-stream counters make
//!   stats O(streams), and no operation materialises the whole table.
//! - **SQLite is synchronous.** The [`Store`] runs on one dedicated OS thread
//!   behind the async [`BufferHandle`], so disk stalls never block a tokio
//!   worker.
//!
//! # Invariants
//!
//! 1. Within a stream `(connection, kind)`, `seq` starts at 1 and is assigned
//!    `next_seq, next_seq + 1, ...` in the same transaction that inserts the
//!    rows, and `streams.next_seq` is advanced in that transaction. Stream rows
//!    are never deleted, so a seq is never reused, not even after every row of
//!    the stream was acked, nor across reopen.
//! 2. Pending rows of a stream are therefore a subset of `1..next_seq`; rows
//!    only disappear by [`Store::ack`] (or, later, announced eviction), so a
//!    gap seen by a consumer is always explained.
//! 3. `epoch` is created in the same transaction as the schema and never
//!    changes for that file. A new file is a new epoch, which is what tells
//!    consumers that seqs restarted.
//! 4. `streams.records` / `streams.bytes` equal the count and the sum of
//!    `records.size` of that stream's pending rows; every statement that
//!    inserts or deletes rows updates them in the same transaction.
//! 5. Row ids are never reused (`AUTOINCREMENT`): the uplink acks by id, and an
//!    ack arriving late must not delete a newer row that inherited the id.
//!
//! # On-disk layout (`{data_dir}/buffer.db`, `PRAGMA user_version = 1`)
//!
//! ```text
//! meta     (key TEXT PRIMARY KEY, value TEXT)         -- 'epoch' → 32 hex chars
//! streams  (id INTEGER PRIMARY KEY,
//!           connection TEXT, kind TEXT,               -- UNIQUE (connection, kind)
//!           next_seq INTEGER,                         -- next seq to assign, starts at 1
//!           records INTEGER, bytes INTEGER)           -- pending counters (invariant 4)
//! records  (id INTEGER PRIMARY KEY AUTOINCREMENT,     -- what the uplink acks
//!           stream INTEGER REFERENCES streams(id),
//!           seq INTEGER, ts_ms INTEGER,
//!           data TEXT,                                -- compact JSON, published verbatim
//!           size INTEGER)                             -- len(data) + ROW_OVERHEAD_BYTES
//! UNIQUE INDEX records_stream_seq ON records (stream, seq)
//! ```
//!
//! Rows reference their stream by a small integer instead of repeating the
//! connection name, which keeps both the table and the `(stream, seq)` index
//! compact at millions of rows.

mod handle;
mod store;

use std::path::PathBuf;

use serde::Serialize;

use crate::record::{Kind, StreamKey};

pub use handle::{BufferHandle, MAX_COALESCED_RECORDS};
pub use store::{Store, ROW_OVERHEAD_BYTES};

/// File name of the buffer database inside `agent.data_dir`.
pub const DB_FILE_NAME: &str = "buffer.db";

/// Failures of the buffer. Every variant names what was being done and on
/// which file, because "disk I/O error" alone is useless at 3 a.m.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("cannot create buffer directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("buffer {op} failed on {}: {source}", path.display())]
    Sqlite {
        op: &'static str,
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("buffer database {} is not usable: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("buffer {op} failed: cannot encode record data as JSON: {source}")]
    Encode {
        op: &'static str,
        source: serde_json::Error,
    },
    #[error("buffer is closed")]
    Closed,
}

impl BufferError {
    /// True when SQLite reported a full disk: the caller should evict and
    /// retry rather than treat the buffer as broken (SPEC 1.4).
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            BufferError::Sqlite { source, .. }
                if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        )
    }
}

/// Buffer totals, for `/status`, `/metrics` and `plantgate buffer stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Pending (accepted, not yet acknowledged) records.
    pub records: u64,
    /// Sum of the accounted sizes of pending records.
    pub bytes: u64,
    /// Oldest `ts_ms` among the first pending record of every stream, i.e. the
    /// age that head-first eviction would see.
    pub oldest_ts_ms: Option<i64>,
    /// Database file size (pages in use × page size), excluding the WAL.
    pub file_bytes: u64,
    /// Every stream ever seen, including drained ones (their `next_seq` still
    /// matters to consumers).
    pub streams: Vec<StreamStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StreamStats {
    pub connection: String,
    pub kind: Kind,
    pub records: u64,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The seq the next appended record will get.
    pub next_seq: u64,
    /// `ts_ms` of the first pending record.
    pub oldest_ts_ms: Option<i64>,
}

impl StreamStats {
    pub fn stream(&self) -> StreamKey {
        StreamKey::new(self.connection.clone(), self.kind)
    }
}
