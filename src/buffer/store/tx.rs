//! The one way the store runs a transaction ([`Store::write`],
//! [`Store::snapshot`]), and the per-stream counter changes ([`Counters`])
//! that every write applies in the same transaction as its rows.

use std::cell::RefCell;
use std::path::Path;

use rusqlite::{params, CachedStatement, Connection, Params, Transaction, TransactionBehavior};

use super::cache::Segments;
use super::{is_sqlite_full, sql_err, Store};
use crate::buffer::BufferError;
use crate::record::{Kind, StreamKey};

/// What a write does when SQLite answers `SQLITE_FULL` (the page cap or the
/// filesystem).
#[derive(Clone, Copy, Debug)]
pub(super) enum OnFull {
    /// Hand SQLite's error to the caller, which evicts and retries (appends)
    /// or lets its own caller do so (evictions, acks).
    Pass,
    /// Report [`BufferError::Full`] with `records` not accepted. For writes
    /// that must not evict to make room for themselves (dead letters,
    /// re-queueing): they fail, move nothing, and are retried later.
    Refuse { records: usize },
}

/// An open transaction, with what its errors must name: the operation and
/// the file.
pub(super) struct Tx<'a> {
    tx: Transaction<'a>,
    path: &'a Path,
    op: &'static str,
    /// The codec and the decoded-segment cache of the store.
    pub segments: &'a RefCell<Segments>,
    /// Keep a segment once its last record is delivered
    /// (`buffer.retain_delivered` above zero) instead of deleting it.
    pub retain: bool,
}

impl<'a> Tx<'a> {
    /// Maps a SQLite error to one naming this transaction's operation.
    pub fn err(&self) -> impl Fn(rusqlite::Error) -> BufferError + '_ {
        sql_err(self.op, self.path)
    }

    pub fn damaged(&self, segment: i64, detail: String) -> BufferError {
        BufferError::Damaged {
            path: self.path.to_path_buf(),
            segment,
            detail,
        }
    }

    pub fn corrupt(&self, detail: String) -> BufferError {
        BufferError::Corrupt {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    /// A cached prepared statement: every statement of the store runs often.
    pub fn stmt(&self, sql: &str) -> Result<CachedStatement<'_>, BufferError> {
        self.tx.prepare_cached(sql).map_err(self.err())
    }

    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize, BufferError> {
        self.tx.execute(sql, params).map_err(self.err())
    }

    /// For what the wrappers above do not cover (pragmas, statements built
    /// at run time); map errors with [`Tx::err`].
    pub fn conn(&self) -> &Connection {
        &self.tx
    }

    pub fn parse_kind(&self, kind: &str) -> Result<Kind, BufferError> {
        Kind::parse(kind).ok_or_else(|| self.corrupt(format!("unknown record kind {kind:?}")))
    }

    /// Every stream, or only those with pending rows, in table order.
    pub fn streams(&self, pending_only: bool) -> Result<Vec<StreamRow>, BufferError> {
        let mut stmt = self.stmt(if pending_only {
            "SELECT id, connection, kind FROM streams WHERE records > 0"
        } else {
            "SELECT id, connection, kind FROM streams"
        })?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, connection, kind) = row.map_err(self.err())?;
            let kind = self.parse_kind(&kind)?;
            out.push(StreamRow {
                id,
                key: StreamKey::new(connection, kind),
            });
        }
        Ok(out)
    }
}

/// A row of `streams`: rows elsewhere name their stream by `id` only.
#[derive(Clone, Debug)]
pub(super) struct StreamRow {
    pub id: i64,
    pub key: StreamKey,
}

impl Store {
    /// Runs `body` in one IMMEDIATE transaction (the write lock is taken
    /// up front, so two writers queue instead of failing at commit) and
    /// commits it when `body` returns `Ok`; an error rolls back everything
    /// `body` did. `on_full` says what `SQLITE_FULL` becomes.
    pub(super) fn write<T>(
        &mut self,
        op: &'static str,
        on_full: OnFull,
        body: impl FnOnce(&Tx<'_>) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        let result = self.commit_with(op, body);
        match on_full {
            OnFull::Pass => result,
            OnFull::Refuse { records } => result.map_err(|e| {
                if is_sqlite_full(&e) {
                    BufferError::Full {
                        path: self.path.clone(),
                        reason: self.cap_reason(),
                        records,
                    }
                } else {
                    e
                }
            }),
        }
    }

    /// As [`Store::write`] with `OnFull::Pass`, on a shared reference: for
    /// the repair of a damaged segment found while reading.
    pub(super) fn commit_with<T>(
        &self,
        op: &'static str,
        body: impl FnOnce(&Tx<'_>) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        let err = sql_err(op, &self.path);
        let tx = Tx {
            tx: Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
                .map_err(&err)?,
            path: &self.path,
            op,
            segments: &self.segments,
            retain: !self.limits.retain_delivered.is_zero(),
        };
        let value = body(&tx)?;
        tx.tx.commit().map_err(&err)?;
        Ok(value)
    }

    /// Runs `body` on one consistent read snapshot (a deferred transaction,
    /// ended without writing anything): figures read in several statements
    /// then agree with each other even while another process writes.
    pub(super) fn snapshot<T>(
        &self,
        op: &'static str,
        body: impl FnOnce(&Tx<'_>) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        let tx = Tx {
            tx: self
                .conn
                .unchecked_transaction()
                .map_err(sql_err(op, &self.path))?,
            path: &self.path,
            op,
            segments: &self.segments,
            retain: !self.limits.retain_delivered.is_zero(),
        };
        let value = body(&tx)?;
        tx.tx.finish().map_err(sql_err(op, &self.path))?;
        Ok(value)
    }
}

/// The change one transaction makes to one stream's row in `streams`.
/// Collected while rows are inserted or deleted and written once at the
/// end ([`Counters::write`]), so that the counters always equal the rows
/// (invariant 4) and a batch costs one UPDATE per stream, not per row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct StreamDelta {
    pub stream: i64,
    /// Pending rows added (positive) or removed (negative).
    pub records: i64,
    /// Accounted bytes of those rows, same sign.
    pub bytes: i64,
    /// Rows evicted, pending rows and dead letters alike.
    pub evicted: i64,
    /// The seq after the highest one appended: appends move `next_seq`,
    /// nothing else does (seqs are never reused, invariant 1).
    pub next_seq: Option<i64>,
    /// Lowest and highest seq of the rows appended or removed: what an
    /// announcement names.
    pub seqs: Option<(i64, i64)>,
    /// Delivered records kept for replay, added or removed, and the
    /// accounted bytes of their segments.
    pub retained: i64,
    pub retained_bytes: i64,
    /// Kept records let go (for room, or older than `retain_delivered`).
    pub released: i64,
}

impl StreamDelta {
    /// `count` records from `first` to `last` were appended in a segment
    /// of `size` accounted bytes.
    pub fn appended(&mut self, first: i64, last: i64, count: i64, size: i64) {
        self.records += count;
        self.bytes += size;
        self.widen(first);
        self.widen(last);
        self.next_seq = Some(self.next_seq.map_or(last + 1, |n| n.max(last + 1)));
    }

    /// `count` records (seqs `first..=last`) left the pending records
    /// (acked, or moved to dead letters); `freed` accounted bytes went
    /// with them (a segment's size once its last record goes, a dead
    /// letter's own size).
    pub fn removed(&mut self, first: i64, last: i64, count: i64, freed: i64) {
        self.records -= count;
        self.bytes -= freed;
        self.widen(first);
        self.widen(last);
    }

    /// `rows` records are pending again (a re-queue) and their segments
    /// take `bytes` more (either may be negative: a segment rewritten).
    pub fn grew(&mut self, rows: i64, bytes: i64) {
        self.records += rows;
        self.bytes += bytes;
    }

    /// `count` records were evicted, freeing `bytes` accounted bytes;
    /// `pending` when they were pending records (dead letters are not in
    /// the pending counters).
    pub fn evicted(&mut self, count: i64, bytes: i64, pending: bool) {
        self.evicted += count;
        if pending {
            self.records -= count;
            self.bytes -= bytes;
        }
    }

    /// A delivered segment of `size` bytes is kept, with `count` records
    /// that can be replayed.
    pub fn kept(&mut self, count: i64, size: i64) {
        self.retained += count;
        self.retained_bytes += size;
    }

    /// A kept segment left (`count` records, `size` bytes); `released` when
    /// that is the retention's own doing rather than a re-queue rewriting it.
    pub fn unkept(&mut self, count: i64, size: i64, released: bool) {
        self.retained -= count;
        self.retained_bytes -= size;
        if released {
            self.released += count;
        }
    }

    fn widen(&mut self, seq: i64) {
        self.seqs = Some(match self.seqs {
            Some((first, last)) => (first.min(seq), last.max(seq)),
            None => (seq, seq),
        });
    }
}

/// The [`StreamDelta`]s of one transaction. A transaction touches few
/// streams; a linear scan beats hashing.
#[derive(Debug, Default)]
pub(super) struct Counters(Vec<StreamDelta>);

impl Counters {
    pub fn stream(&mut self, stream: i64) -> &mut StreamDelta {
        let slot = match self.0.iter().position(|d| d.stream == stream) {
            Some(slot) => slot,
            None => {
                self.0.push(StreamDelta {
                    stream,
                    ..StreamDelta::default()
                });
                self.0.len() - 1
            }
        };
        &mut self.0[slot]
    }

    pub fn iter(&self) -> impl Iterator<Item = &StreamDelta> {
        self.0.iter()
    }

    /// Applies every delta inside `tx`, one UPDATE per stream.
    pub fn write(&self, tx: &Tx<'_>) -> Result<(), BufferError> {
        let mut update = tx.stmt(
            "UPDATE streams SET next_seq = coalesce(?2, next_seq), \
             records = records + ?3, bytes = bytes + ?4, evicted_total = evicted_total + ?5, \
             retained = retained + ?6, retained_bytes = retained_bytes + ?7, \
             released_total = released_total + ?8 WHERE id = ?1",
        )?;
        for d in &self.0 {
            update
                .execute(params![
                    d.stream,
                    d.next_seq,
                    d.records,
                    d.bytes,
                    d.evicted,
                    d.retained,
                    d.retained_bytes,
                    d.released
                ])
                .map_err(tx.err())?;
        }
        Ok(())
    }
}
