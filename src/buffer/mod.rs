//! The durable record buffer: the single point where a record becomes
//! *accepted* (docs/guarantees.md: a record is accepted once committed here,
//! and only the broker's acknowledgement or an announced eviction removes
//! it).
//!
//! # Design constraints
//!
//! - **A commit is the promise.** A record is accepted when the SQLite
//!   transaction that inserted it has committed; nothing upstream may report
//!   success earlier, and nothing downstream may delete a record before the
//!   broker has acknowledged it. `kill -9` at any instant must leave every
//!   committed record intact and the file consistent (WAL mode; `synchronous = NORMAL`
//!   survives process crashes, `FULL` also power loss).
//! - **Throughput comes from batching.** One transaction per record is two
//!   orders of magnitude slower than one per thousand on real flash, so
//!   [`Store::append`] takes a slice, and [`BufferHandle`] coalesces appends
//!   that queue up while a commit is running into a single transaction.
//! - **Memory does not follow the backlog.** Ten million waiting records must
//!   not cost RAM: reads decode one segment at a time, per-stream counters
//!   make stats O(streams), and no operation materialises the whole table.
//! - **SQLite is synchronous.** The [`Store`] runs on one dedicated OS thread
//!   behind the async [`BufferHandle`], so disk stalls never block a tokio
//!   worker.
//!
//! # Invariants
//!
//! 1. Within a stream `(connection, kind)`, `seq` starts at 1 and is assigned
//!    `next_seq, next_seq + 1, ...` in the same transaction that stores the
//!    records, and `streams.next_seq` is advanced in that transaction. Stream
//!    rows are never deleted, so a seq is never reused, not even after every
//!    record of the stream was acked, nor across reopen.
//! 2. Pending records of a stream are therefore a subset of `1..next_seq`;
//!    records only stop being pending by [`Store::ack`], by an announced
//!    eviction (invariant 6) or into the dead letters, so a gap seen by a
//!    consumer is always explained.
//! 3. `epoch` is created in the same transaction as the schema and never
//!    changes for that file. A new file is a new epoch, which is what tells
//!    consumers that seqs restarted.
//! 4. `streams.records` is the number of that stream's pending records and
//!    `streams.bytes` the sum of `segments.size` of the segments holding
//!    them (a segment counts whole while any of its records is pending; dead
//!    letters are not counted there); every transaction that stores, removes
//!    or moves records updates them before it commits.
//! 5. A record is named by [`RecordId`](crate::record::RecordId) (its
//!    stream's row id and its seq), which is never reused: an ack arriving
//!    late cannot remove another record. A dead letter keeps its seq and gets
//!    it back on retry.
//! 6. **Only acks and announced evictions lose data.** Records leave the
//!    pending set by [`Store::ack`], by eviction, or by [`Store::dead_letter`]
//!    (moved, not lost). An eviction removes a *head* of a stream (every
//!    pending record with `seq <= last_seq`), and in the same transaction
//!    appends one `buffer.evicted` event per affected stream to the agent's
//!    own event stream, naming the exact seq range, and adds the count to
//!    `streams.evicted_total`. There is no eviction without its event; a
//!    segment found damaged is dropped the same way (reason `damaged`, see
//!    `store/repair.rs`).
//! 7. **Priority lanes** (docs/guarantees.md). Size eviction (`max_size`,
//!    `disk_full`) takes `tag` segments oldest first across all tag streams
//!    (oldest = lowest segment id, i.e. arrival order); a record of any other
//!    kind is taken only in a transaction that has already taken every
//!    remaining tag record. Age eviction (`max_age`) applies to all kinds
//!    alike. **Dead letters are bounded like pending records**: they take
//!    space in the same file, so the same lanes evict them: within a lane a
//!    stream's dead letters go before pending records (they are the ones the
//!    broker already refused), oldest first, and `max_age` expires them too.
//!    Their `buffer.evicted` event says `"reason": "dead_letter"` and names
//!    the limit in `"limit"`; `streams.evicted_total` counts them.
//! 8. **Eviction terminates.** Each size-eviction transaction frees more
//!    accounted bytes than its own events add, or it deletes nothing and
//!    reports "nothing evictable"; events created by an eviction are never
//!    part of that same eviction (ranges are chosen before they are
//!    inserted).
//! 9. **Size bound.** With [`Limits::max_size`] set, `PRAGMA max_page_count`
//!    holds the main file below `max_size` minus a WAL share (a quarter, at
//!    most 64 MiB) and, for the service, the disk reserve, and
//!    `wal_autocheckpoint`/`journal_size_limit` keep the WAL inside its
//!    share, so SQLite itself refuses to grow past the limit
//!    (`SQLITE_FULL`). A transaction larger than about an eighth of
//!    `max_size` can still push the WAL past its share for a moment; records
//!    are never split to avoid that, because an append is atomic by
//!    contract.
//! 10. **Disk full** (`SQLITE_FULL` below `max_page_count`): the service's
//!     reserve file (`buffer.db.reserve`) is released so the checkpoint and
//!     the eviction have room, and the file is held at the size it had when
//!     the disk filled (reason `disk_full` for what is evicted from then on),
//!     so freed pages are reused instead of growing the file. One
//!     `system.error` event says so. [`Store::evict_expired`] (called
//!     periodically) lifts that cap again so a disk that got space back is
//!     used.
//! 11. **Corruption is quarantined, never deleted.** [`Store::open`] with
//!     [`OpenMode::Service`] runs `PRAGMA quick_check` before writing
//!     anything (checkpoint-on-close is off while probing, so the bad file
//!     keeps its bytes), moves a corrupt file and its `-wal`/`-shm` to
//!     `buffer.db.corrupt-<UTC timestamp>[-wal|-shm]`, starts a fresh file
//!     with a new epoch and records a `system.error` event in it. I/O errors,
//!     a locked file or a newer schema are *not* corruption and are returned
//!     as errors: moving a healthy file aside would lose data. (Damage
//!     inside a segment's data, which `quick_check` does not read, costs that
//!     segment only: invariant 6.)
//!
//! # Segments: why the buffer is dense
//!
//! Records are stored in **segments**: the records of one stream committed
//! together (at most 4 096 records or 256 KiB of text) become one row of
//! `segments` and one zstd-compressed blob in `segment_data`. The blob
//! holds the columns seq delta, timestamp delta, length and the JSON text
//! (`store/segment.rs`); a stream's JSON repeats itself (tag names, node ids,
//! keys), and per-row overhead is paid once per segment instead of once
//! per record. A tag record of the load simulator takes about 230 bytes as
//! its own row and a few tens in a segment (README, "Buffer density").
//!
//! Blobs are written once and never changed. What changes is the row: the
//! set of seqs no longer pending (`gone`: acked, dead-lettered, expired;
//! nearly always one range at the head), the pending count and the head's
//! seq and time. A segment is deleted with its last pending record. Size
//! eviction takes whole head segments; expiry may stop inside one. Reads
//! decode a segment once for the several messages it fills and the acks
//! that follow (a cache of a few decoded segments).
//!
//! # How eviction runs
//!
//! Every eviction is a transaction of at most 64 segments (or 4 096 dead
//! letters) that removes head ranges and inserts their `buffer.evicted`
//! events (invariant 6), so the WAL and the write lock stay bounded
//! whatever the backlog. It is started from three places:
//!
//! - **Before an append**, when the pages in use plus what the append needs
//!   pass 90 % of the page cap: tags only (lane "tags"), down to 80 %, so
//!   that other kinds are kept as long as the file can physically hold them
//!   and the hard wall is rarely hit.
//! - **When an append hits the wall** (`SQLITE_FULL`): the store first tells
//!   the size cap from a full disk (invariant 10), then evicts along both
//!   lanes at least twice what the append needs, doubling on each retry.
//!   When nothing is left to take the append fails with
//!   [`BufferError::Full`] and nothing of it is accepted; the evictions made
//!   until then stay committed and announced.
//! - **Periodically**, [`Store::evict_expired`] removes every stream's
//!   expired head (below). At the cap, deleting records need not free a
//!   whole page for the announcement, so an expiry transaction may borrow a
//!   few pages of the WAL's share.
//!
//! Size eviction picks segments across streams by segment id (arrival
//! order), walking each stream's segments lazily, so memory is
//! O(streams). Dead lettering and re-queueing never evict: at the cap they
//! fail with [`BufferError::Full`] and move nothing (dead lettering is
//! retried after the next append's eviction made room, re-queueing once the
//! backlog has drained).
//!
//! # `max_age` is measured on `ts_ms`
//!
//! Age eviction compares a record's `ts_ms` (its source timestamp), the same
//! value `oldest_ts` in `/status` and the heartbeat reports, so an operator
//! can check the promise from the outside. It removes a stream's head while
//! the head is older than `max_age`; a young head protects older records
//! behind it (source timestamps need not be monotonic), which keeps every
//! eviction a contiguous head range. Consequence worth knowing: the first
//! value of a tag that has not changed for longer than `max_age` (OPC UA
//! reports its old source timestamp) is evicted by the next `evict_expired`
//! if it has not been delivered by then.
//!
//! # On-disk layout (`{data_dir}/buffer.db`, `PRAGMA user_version = 6`)
//!
//! ```text
//! meta     (key TEXT PRIMARY KEY, value TEXT)         -- 'epoch' → 32 hex chars
//! streams  (id INTEGER PRIMARY KEY,
//!           connection TEXT, kind TEXT,               -- UNIQUE (connection, kind)
//!           next_seq INTEGER,                         -- next seq to assign, starts at 1
//!           records INTEGER, bytes INTEGER,           -- pending counters (invariant 4)
//!           evicted_total INTEGER)                    -- records ever evicted (v2)
//! segments (id INTEGER PRIMARY KEY AUTOINCREMENT,     -- arrival order, never reused
//!           stream INTEGER REFERENCES streams(id),
//!           first_seq, last_seq INTEGER,              -- span of the seqs in the blob
//!           count INTEGER,                            -- records in the blob
//!           pending INTEGER,                          -- of them still pending
//!           head_seq, head_ts INTEGER,                -- the first pending record
//!           size INTEGER,                             -- blob + SEGMENT_OVERHEAD_BYTES
//!           gone BLOB)                                -- seqs no longer pending (ranges)
//! UNIQUE INDEX segments_stream_seq ON segments (stream, last_seq)
//! segment_data (id INTEGER PRIMARY KEY,               -- segments.id
//!           blob BLOB)                                -- format byte + zstd frame
//! dead_letters (id INTEGER PRIMARY KEY,
//!           stream, seq, ts_ms, data TEXT, size,      -- one row per record (v2)
//!           reason TEXT, dead_ms INTEGER)             -- why and when
//! INDEX dead_letters_stream_seq ON dead_letters (stream, seq)
//! profile_state (connection TEXT PRIMARY KEY,         -- (v3) a connection's profile
//!           snapshot TEXT, updated_ms INTEGER)        -- snapshot, written with its records
//! tag_marks (connection TEXT, tag TEXT,               -- (v6) PRIMARY KEY (connection, tag)
//!           last_ms INTEGER,                          -- newest source timestamp accepted
//!           gaps TEXT,                                -- JSON [[from_ms,to_ms],...] to read back
//!           updated_ms INTEGER)                       -- written with the records they describe
//! ```
//!
//! Spans of a stream's segments never overlap, so `(stream, last_seq)`
//! finds the segment of any seq. Files of versions 1 to 5 are upgraded when
//! they are opened (version 3 kept one row per record in `records`; those
//! rows are moved into segments in chunks, `store/upgrade.rs`; version 5
//! only lacks `tag_marks`); a file of a newer version is refused untouched.
//!
//! The code is split by concern under `store/` (see its module doc).

mod handle;
pub mod intake;
mod store;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::Synchronous;
use crate::record::{Kind, NewRecord, StreamKey};

pub use handle::BufferHandle;
pub use intake::{IntakeObserver, Outlet, Submission, Unobserved, MAX_COALESCED_RECORDS};
pub use store::Store;

/// A profile snapshot (JSON text) to store with the records it goes with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileState {
    pub connection: String,
    pub snapshot: String,
}

/// One tag's backfill bookkeeping (docs/mqtt.md section on backfill): the last
/// source timestamp accepted for it and the gaps still to be read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagMark {
    pub connection: String,
    pub tag: String,
    /// Newest source timestamp (ms since the Unix epoch) accepted for the tag.
    pub last_ms: i64,
    /// Open intervals (from_ms, to_ms), both exclusive, still to be read back; oldest first.
    pub gaps: Vec<(i64, i64)>,
}

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
    /// Nothing accepted: the size limit or the disk is reached and no row is
    /// left that eviction may take.
    #[error(
        "buffer {} is full ({reason}): {records} records not accepted, nothing left to evict",
        path.display()
    )]
    Full {
        path: PathBuf,
        reason: EvictionReason,
        records: usize,
    },
    #[error("cannot move corrupt buffer database {} aside to {}: {source}", path.display(), moved_to.display())]
    Quarantine {
        path: PathBuf,
        moved_to: PathBuf,
        source: std::io::Error,
    },
    /// A segment's data does not decode (its checksum, its format): the
    /// service drops it and announces its records as evicted (reason
    /// `damaged`); a tool reports it.
    #[error("buffer {}: segment {segment} is damaged: {detail}", path.display())]
    Damaged {
        path: PathBuf,
        segment: i64,
        detail: String,
    },
    #[error("buffer is closed")]
    Closed,
}

impl BufferError {
    /// True when SQLite reported a full disk: the caller should evict and
    /// retry rather than treat the buffer as broken.
    /// [`BufferError::Full`] means the buffer already did that and nothing was
    /// left to evict: the records were not accepted.
    pub fn is_disk_full(&self) -> bool {
        match self {
            BufferError::Full { .. } => true,
            BufferError::Sqlite { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            _ => false,
        }
    }

    /// True for `SQLITE_IOERR` (EIO and friends): the operation was rolled
    /// back and the file is consistent, but the storage is misbehaving.
    pub fn is_io_error(&self) -> bool {
        matches!(
            self,
            BufferError::Sqlite { source, .. }
                if source.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure)
        )
    }
}

/// Size and age bounds of the buffer (`buffer.max_size`, `buffer.max_age`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the database file plus its WAL may take on disk. Values below
    /// about 128 KiB are raised to what an empty database needs.
    pub max_size: u64,
    /// Records whose `ts_ms` is older than this are evicted by
    /// [`Store::evict_expired`].
    pub max_age: Duration,
    /// Delivered records are kept this long for replay (zero: deleted on
    /// acknowledgement); kept records give way to anything undelivered.
    pub retain_delivered: Duration,
}

impl Limits {
    /// No bound at all: what the CLI and tests use.
    pub const NONE: Limits = Limits {
        max_size: u64::MAX,
        max_age: Duration::MAX,
        retain_delivered: Duration::ZERO,
    };

    pub fn from_config(config: &crate::config::BufferConfig) -> Limits {
        Limits {
            max_size: config.max_size,
            max_age: config.max_age,
            retain_delivered: config.retain_delivered,
        }
    }

    pub(crate) fn max_age_ms(&self) -> Option<i64> {
        i64::try_from(self.max_age.as_millis()).ok()
    }

    pub(crate) fn retain_ms(&self) -> i64 {
        i64::try_from(self.retain_delivered.as_millis()).unwrap_or(i64::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::NONE
    }
}

/// Why rows were evicted; the `reason` of a `buffer.evicted` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictionReason {
    MaxSize,
    MaxAge,
    DiskFull,
    /// The records' segment was found damaged on disk and dropped.
    Damaged,
}

impl EvictionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::MaxSize => "max_size",
            EvictionReason::MaxAge => "max_age",
            EvictionReason::DiskFull => "disk_full",
            EvictionReason::Damaged => "damaged",
        }
    }
}

impl std::fmt::Display for EvictionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One evicted head range of one stream, as announced by its
/// `buffer.evicted` event: every pending row of the stream with
/// `first_seq <= seq <= last_seq` (`count` of them) is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Eviction {
    pub connection: String,
    pub kind: Kind,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    /// Accounted bytes freed.
    pub bytes: u64,
    pub reason: EvictionReason,
    /// The rows were dead letters (refused by the broker), not pending rows;
    /// the range then covers the stream's dead letters in it, and `count` may
    /// be less than its span (seqs in between were delivered).
    pub dead_letters: bool,
}

impl Eviction {
    pub fn stream(&self) -> StreamKey {
        StreamKey::new(self.connection.clone(), self.kind)
    }
}

/// What one [`Store::append`] commits, atomically: records, the profile
/// snapshots and the tag marks that go with them (any may be empty).
#[derive(Clone, Copy, Debug, Default)]
pub struct Append<'a> {
    pub records: &'a [NewRecord],
    /// Stored in the same transaction as `records`, replacing the previous
    /// snapshot of their connection.
    pub states: &'a [ProfileState],
    /// Stored in the same transaction as `records`, replacing the previous
    /// mark of their (connection, tag); a later one in the slice wins, so a
    /// mark never claims a value whose record was not committed with it.
    pub marks: &'a [TagMark],
}

impl<'a> Append<'a> {
    /// Records and no profile state or marks: what most appends are.
    pub fn records(records: &'a [NewRecord]) -> Append<'a> {
        Append {
            records,
            states: &[],
            marks: &[],
        }
    }
}

/// What [`Store::append`] did: the seqs of the accepted records (input
/// order) and the evictions it had to make first, in the order they were
/// committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendReport {
    pub seqs: Vec<u64>,
    pub evicted: Vec<Eviction>,
    /// What the accepted records take of `max_size` (their segments).
    pub stored_bytes: u64,
}

/// How [`Store::open`] opens the file. The default suits a command or a
/// test: no limits, `synchronous = NORMAL`, [`OpenMode::Tool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    pub synchronous: Synchronous,
    pub limits: Limits,
    pub mode: OpenMode,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            synchronous: Synchronous::Normal,
            limits: Limits::NONE,
            mode: OpenMode::Tool,
        }
    }
}

/// Who opens the file, which decides what the open may do to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// `plantgate buffer ...` and tests, which may run next to the service:
    /// a cheap check only, a corrupt file is an error and stays where it is,
    /// no disk reserve.
    #[default]
    Tool,
    /// The service, owner of the file: `PRAGMA quick_check` over the whole
    /// file, a corrupt file is quarantined (invariant 11), a disk reserve is
    /// kept next to it (invariant 10).
    Service,
}

/// A corrupt file found at open and moved aside: see [`Store::quarantined`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The corrupt file's new name (its `-wal`/`-shm`, if any, sit next to it
    /// with those suffixes).
    pub moved_to: PathBuf,
    /// What was found wrong with it.
    pub reason: String,
}

/// A run of dead-lettered rows of one stream that were moved together (same
/// reason, same time), listed by `plantgate buffer dead-letters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub connection: String,
    pub kind: Kind,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Rows in the run; less than `last_seq - first_seq + 1` when rows in
    /// between were delivered.
    pub count: u64,
    pub bytes: u64,
    pub reason: String,
    /// When they were moved, milliseconds since the Unix epoch.
    pub dead_at_ms: i64,
}

/// What [`Store::read_range`] found of a seq range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeRead {
    /// Records still held, in seq order.
    pub records: Vec<crate::record::StoredRecord>,
    /// Every seq up to here has been looked at: one not in `records` is
    /// no longer held. Below the range's end when the read was cut short.
    pub scanned_to: u64,
}

/// Buffer totals, for `/status`, `/metrics` and `plantgate buffer stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Pending (accepted, not yet acknowledged) records.
    pub records: u64,
    /// What the pending records take: the accounted sizes of the segments
    /// holding them (compressed data plus a fixed cost per segment).
    pub bytes: u64,
    /// Oldest `ts_ms` among the first pending record of every stream, i.e. the
    /// age that head-first eviction would see.
    pub oldest_ts_ms: Option<i64>,
    /// Database size (pages × page size, free pages included), excluding the WAL.
    pub file_bytes: u64,
    /// Current size of the `-wal` file on disk.
    pub wal_bytes: u64,
    /// Rows ever evicted, all streams (sum of the per-stream counters).
    pub evicted_total: u64,
    /// Rows waiting in the dead-letter table.
    pub dead_letters: u64,
    /// Delivered records kept for replay (`buffer.retain_delivered`), in
    /// segments with nothing pending, and what those segments take. Not in
    /// `records`/`bytes`: they give way to anything undelivered.
    pub retained_records: u64,
    pub retained_bytes: u64,
    /// `ts_ms` of the oldest kept record: replay reaches back to here.
    pub retained_from_ms: Option<i64>,
    /// Kept records let go, ever (for room, or past `retain_delivered`):
    /// not a loss, they had been delivered.
    pub retained_released_total: u64,
    /// How many times dead letters were put back (`plantgate buffer retry`),
    /// ever, by any process: the uplink reads its streams again when it
    /// changes.
    pub requeues: u64,
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
    /// Rows of this stream ever evicted.
    pub evicted_total: u64,
    /// Delivered records of this stream kept for replay, their bytes, and
    /// the seq and `ts_ms` where that history starts.
    pub retained_records: u64,
    pub retained_bytes: u64,
    pub retained_first_seq: Option<u64>,
    pub retained_from_ms: Option<i64>,
    pub retained_released_total: u64,
}

impl StreamStats {
    pub fn stream(&self) -> StreamKey {
        StreamKey::new(self.connection.clone(), self.kind)
    }
}
