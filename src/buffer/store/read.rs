//! What the uplink needs: the streams with pending records, bounded reads
//! in seq order, acks that remove exactly the acknowledged records, and
//! reads of any range still held (pending, kept or dead-lettered) for a
//! replay.

use rusqlite::{params, OptionalExtension};

use super::segrow::{visit_pending, SegRow, Taking};
use super::tx::{Counters, OnFull, Tx};
use super::Store;
use crate::buffer::{BufferError, RangeRead};
use crate::record::{RecordId, StoredRecord, StreamKey};

impl Store {
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

    /// Oldest-first pending records of `stream` with `seq > after_seq`: at
    /// most `max_records` and at most `max_bytes` of `data`, except that the
    /// first record is always returned so an oversized record cannot wedge
    /// its stream. `max_records` is treated as at least 1 for the same
    /// reason.
    pub fn read_after(
        &self,
        stream: &StreamKey,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, BufferError> {
        self.repairing_ref(|s| s.read_once(stream, after_seq, max_records, max_bytes))
    }

    fn read_once(
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
        let limit = max_records.max(1);
        self.snapshot("read", |tx| {
            let mut out = Vec::new();
            let mut bytes = 0usize;
            visit_pending(tx, stream_id, after, |_, e| {
                if !out.is_empty() && bytes.saturating_add(e.data.len()) > max_bytes {
                    return false;
                }
                bytes = bytes.saturating_add(e.data.len());
                out.push(StoredRecord {
                    id: RecordId {
                        stream: stream_id,
                        seq: e.seq,
                    },
                    connection: stream.connection.clone(),
                    kind: stream.kind,
                    seq: e.seq as u64,
                    ts_ms: e.ts_ms,
                    data: e.data.to_string(),
                });
                out.len() < limit
            })?;
            Ok(out)
        })
    }

    /// The records of `stream` with `from_seq <= seq <= to_seq` that the
    /// buffer still holds, pending, kept for replay or dead-lettered, in
    /// seq order: at most `max_records` and `max_bytes` of `data` (the
    /// first always). `scanned_to` says how far the read looked, so the
    /// caller knows which seqs up to there are missing.
    pub fn read_range(
        &self,
        stream: &StreamKey,
        from_seq: u64,
        to_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<RangeRead, BufferError> {
        self.repairing_ref(|s| s.read_range_once(stream, from_seq, to_seq, max_records, max_bytes))
    }

    fn read_range_once(
        &self,
        stream: &StreamKey,
        from_seq: u64,
        to_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<RangeRead, BufferError> {
        let done = RangeRead {
            records: Vec::new(),
            scanned_to: to_seq,
        };
        let Some(stream_id) = self.stream_id(stream, "replay read")? else {
            return Ok(done);
        };
        let from = i64::try_from(from_seq.max(1)).unwrap_or(i64::MAX);
        let to = i64::try_from(to_seq).unwrap_or(i64::MAX);
        if to < from {
            return Ok(done);
        }
        let limit = max_records.max(1);
        self.snapshot("replay read", |tx| {
            // (seq, ts, data) from segments and from dead letters, each in
            // seq order and each cut at `limit`: merged, they are complete
            // up to the lower of the two cuts.
            let mut found: Vec<(i64, i64, String)> = Vec::new();
            let mut cut = i64::MAX;
            let mut cursor = tx.all_segments_after(stream_id, from - 1)?;
            'segments: while let Some(row) = cursor.next()? {
                if row.first_seq > to {
                    break;
                }
                let seg = tx.decode(&row)?;
                for i in seg.after(from - 1)..seg.len() {
                    let e = seg.get(i);
                    if e.seq > to {
                        break 'segments;
                    }
                    // Pending, or delivered and still in the blob: all
                    // but what left undelivered (whose copy, if any, is a
                    // dead letter).
                    let held = !row.lost.contains(e.seq);
                    if held {
                        found.push((e.seq, e.ts_ms, e.data.to_string()));
                        if found.len() >= limit {
                            cut = e.seq;
                            break 'segments;
                        }
                    }
                }
            }
            let mut letters: Vec<(i64, i64, String)> = tx
                .stmt(
                    "SELECT seq, ts_ms, data FROM dead_letters \
                     WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3 ORDER BY seq LIMIT ?4",
                )?
                .query_map(params![stream_id, from, to, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(tx.err())?
                .collect::<Result<_, _>>()
                .map_err(tx.err())?;
            if letters.len() >= limit {
                cut = cut.min(letters.last().map_or(i64::MAX, |l| l.0));
            }
            found.append(&mut letters);
            found.sort_by_key(|f| f.0);
            found.dedup_by_key(|f| f.0);
            let mut out = RangeRead {
                records: Vec::new(),
                scanned_to: to_seq,
            };
            let mut bytes = 0usize;
            let mut truncated = cut < to;
            for (seq, ts_ms, data) in found {
                if seq > cut {
                    break;
                }
                if out.records.len() >= limit
                    || (!out.records.is_empty() && bytes.saturating_add(data.len()) > max_bytes)
                {
                    truncated = true;
                    break;
                }
                bytes = bytes.saturating_add(data.len());
                out.records.push(StoredRecord {
                    id: RecordId {
                        stream: stream_id,
                        seq,
                    },
                    connection: stream.connection.clone(),
                    kind: stream.kind,
                    seq: seq as u64,
                    ts_ms,
                    data,
                });
            }
            // Cut short: everything up to the last record returned has been
            // looked at, nothing beyond it.
            if let (true, Some(last)) = (truncated, out.records.last()) {
                out.scanned_to = last.seq;
            }
            Ok(out)
        })
    }

    /// Removes exactly the records with these ids in one transaction and
    /// returns how many were pending. Unknown ids (already acked, evicted)
    /// are ignored: duplicate PUBACKs after a reconnect are normal.
    pub fn ack(&mut self, ids: &[RecordId]) -> Result<usize, BufferError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        self.repairing(|s| s.ack_once(&ids))
    }

    fn ack_once(&mut self, ids: &[RecordId]) -> Result<usize, BufferError> {
        self.write("ack", OnFull::Pass, |tx| {
            let mut counters = Counters::default();
            let mut removed = 0usize;
            for_each_segment(tx, ids, |row, seqs| {
                removed += tx
                    .take_from(row, seqs, Taking::Delivered, &mut counters)?
                    .indexes
                    .len();
                Ok(())
            })?;
            counters.write(tx)?;
            Ok(removed)
        })
    }
}

/// Calls `f` once per segment holding some of `ids` (sorted), with the
/// seqs of `ids` in its span. Ids in no segment are skipped.
pub(super) fn for_each_segment(
    tx: &Tx<'_>,
    ids: &[RecordId],
    mut f: impl FnMut(&mut SegRow, &[i64]) -> Result<(), BufferError>,
) -> Result<(), BufferError> {
    let mut seqs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let Some(mut row) = tx.segment_holding(id.stream, id.seq)? else {
            i += 1;
            continue;
        };
        seqs.clear();
        while i < ids.len() && ids[i].stream == row.stream && ids[i].seq <= row.last_seq {
            seqs.push(ids[i].seq);
            i += 1;
        }
        f(&mut row, &seqs)?;
    }
    Ok(())
}
