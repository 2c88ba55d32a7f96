//! What the uplink needs: the streams with pending rows, bounded reads in
//! seq order, and acks that delete exactly the acknowledged rows.

use rusqlite::{params, OptionalExtension};

use super::tx::{Counters, OnFull};
use super::Store;
use crate::buffer::BufferError;
use crate::record::{StoredRecord, StreamKey};

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
        let e = self.err("read");
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, seq, ts_ms, data FROM records \
                 WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(&e)?;
        let mut rows = stmt.query(params![stream_id, after, limit]).map_err(&e)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(&e)? {
            let data: String = row.get(3).map_err(&e)?;
            if !out.is_empty() && bytes.saturating_add(data.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(data.len());
            let seq: i64 = row.get(1).map_err(&e)?;
            out.push(StoredRecord {
                id: row.get(0).map_err(&e)?,
                connection: stream.connection.clone(),
                kind: stream.kind,
                seq: seq as u64,
                ts_ms: row.get(2).map_err(&e)?,
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
        self.write("ack", OnFull::Pass, |tx| {
            let mut deleted = 0usize;
            let mut counters = Counters::default();
            let mut delete =
                tx.stmt("DELETE FROM records WHERE id = ?1 RETURNING stream, seq, size")?;
            for id in ids {
                let gone: Option<(i64, i64, i64)> = delete
                    .query_row(params![id], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .optional()
                    .map_err(tx.err())?;
                if let Some((stream, seq, size)) = gone {
                    deleted += 1;
                    counters.stream(stream).removed(seq, size);
                }
            }
            counters.write(tx)?;
            Ok(deleted)
        })
    }
}
