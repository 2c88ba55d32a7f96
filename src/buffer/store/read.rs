//! What the uplink needs: the streams with pending records, bounded reads
//! in seq order, and acks that remove exactly the acknowledged records.

use rusqlite::{params, OptionalExtension};

use super::segrow::{visit_pending, SegRow};
use super::tx::{Counters, OnFull, Tx};
use super::Store;
use crate::buffer::BufferError;
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
                removed += tx.take_from(row, seqs, &mut counters)?.indexes.len();
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
