//! Buffer totals for `/status`, `/metrics` and `plantgate buffer stats`,
//! from the per-stream counters rather than from the rows (invariant 4), so
//! their cost does not grow with the backlog.

use rusqlite::{params, OptionalExtension};

use super::tx::Tx;
use super::{sidecar, Store};
use crate::buffer::{BufferError, Stats, StreamStats};

impl Store {
    /// Totals and per-stream figures from one consistent snapshot. Cost is
    /// O(streams · log segments + dead letters): counters come from
    /// `streams`, first/last seq from the head and tail segments.
    pub fn stats(&self) -> Result<Stats, BufferError> {
        self.repairing_ref(|s| s.stats_once())
    }

    fn stats_once(&self) -> Result<Stats, BufferError> {
        let mut out = self.snapshot("stats", |tx| {
            let mut out = Stats::default();
            for s in stream_stats(tx)? {
                out.records += s.records;
                out.bytes += s.bytes;
                out.evicted_total += s.evicted_total;
                out.retained_records += s.retained_records;
                out.retained_bytes += s.retained_bytes;
                out.retained_released_total += s.retained_released_total;
                out.retained_from_ms = match (out.retained_from_ms, s.retained_from_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                out.oldest_ts_ms = match (out.oldest_ts_ms, s.oldest_ts_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                out.streams.push(s);
            }
            let e = tx.err();
            let dead: i64 = tx
                .conn()
                .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))
                .map_err(&e)?;
            out.dead_letters = dead.max(0) as u64;
            let requeues: Option<i64> = tx
                .conn()
                .query_row(
                    "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'requeues'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&e)?;
            out.requeues = requeues.unwrap_or(0).max(0) as u64;
            let pages: i64 = tx
                .conn()
                .pragma_query_value(None, "page_count", |r| r.get(0))
                .map_err(&e)?;
            out.file_bytes = (pages.max(0) as u64).saturating_mul(self.page_size);
            Ok(out)
        })?;
        out.streams
            .sort_unstable_by(|a, b| (&a.connection, a.kind).cmp(&(&b.connection, b.kind)));
        out.wal_bytes = std::fs::metadata(sidecar(&self.path, "-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(out)
    }
}

/// Every stream's figures, in table order.
fn stream_stats(tx: &Tx<'_>) -> Result<Vec<StreamStats>, BufferError> {
    let e = tx.err();
    let mut list = tx.stmt(
        "SELECT id, connection, kind, next_seq, records, bytes, evicted_total, retained, \
         retained_bytes, released_total FROM streams",
    )?;
    let mut first = tx.stmt(
        "SELECT head_seq, head_ts FROM segments INDEXED BY segments_pending \
         WHERE stream = ?1 AND pending > 0 ORDER BY last_seq ASC LIMIT 1",
    )?;
    // Kept segments sit below the pending ones: the oldest is at the
    // stream's low end of the (stream, last_seq) index.
    let mut kept_first = tx.stmt(
        "SELECT first_seq, head_ts FROM segments WHERE stream = ?1 AND pending = 0 \
         ORDER BY last_seq ASC LIMIT 1",
    )?;

    let mut out = Vec::new();
    let mut rows = list.query([]).map_err(&e)?;
    while let Some(row) = rows.next().map_err(&e)? {
        let id: i64 = row.get(0).map_err(&e)?;
        let kind: String = row.get(2).map_err(&e)?;
        let next_seq: i64 = row.get(3).map_err(&e)?;
        let records: i64 = row.get(4).map_err(&e)?;
        let bytes: i64 = row.get(5).map_err(&e)?;
        let evicted: i64 = row.get(6).map_err(&e)?;
        let retained: i64 = row.get(7).map_err(&e)?;
        let retained_bytes: i64 = row.get(8).map_err(&e)?;
        let released: i64 = row.get(9).map_err(&e)?;
        let head: Option<(i64, i64)> = first
            .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(&e)?;
        let kept: Option<(i64, i64)> = if retained > 0 {
            kept_first
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(&e)?
        } else {
            None
        };
        let tail = match tx.tail_segment(id)? {
            Some(row) => Some(tx.last_pending(&row)?),
            None => None,
        };
        out.push(StreamStats {
            connection: row.get(1).map_err(&e)?,
            kind: tx.parse_kind(&kind)?,
            records: records.max(0) as u64,
            bytes: bytes.max(0) as u64,
            first_seq: head.map(|(seq, _)| seq as u64),
            last_seq: tail.map(|seq| seq as u64),
            next_seq: next_seq as u64,
            oldest_ts_ms: head.map(|(_, ts)| ts),
            evicted_total: evicted.max(0) as u64,
            retained_records: retained.max(0) as u64,
            retained_bytes: retained_bytes.max(0) as u64,
            retained_first_seq: kept.map(|(seq, _)| seq as u64),
            retained_from_ms: kept.map(|(_, ts)| ts),
            retained_released_total: released.max(0) as u64,
        });
    }
    Ok(out)
}
