//! Writing rows: every record, appended or written by the buffer itself
//! (eviction and dead-letter events), gets its stream's next seq and counts
//! in the stream's counters here, so both follow the same rules.

use rusqlite::{params, OptionalExtension};

use super::accounted;
use super::tx::{Counters, Tx};
use crate::buffer::BufferError;
use crate::record::{Kind, NewRecord};

/// Inserts records inside `tx`, assigning seqs and updating the stream
/// counters (invariants 1 and 4). Shared by appends and by the events the
/// buffer writes itself, so both follow the same rules.
pub(super) fn insert_records(tx: &Tx<'_>, records: &[NewRecord]) -> Result<Vec<u64>, BufferError> {
    let mut seqs = Vec::with_capacity(records.len());
    let mut counters = Counters::default();
    // Where each stream of the batch stands; a batch touches few streams,
    // so a linear scan beats hashing owned keys.
    let mut cursors: Vec<SeqCursor> = Vec::new();
    let mut insert = tx
        .stmt("INSERT INTO records (stream, seq, ts_ms, data, size) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for record in records {
        let slot = match cursors
            .iter()
            .position(|c| c.kind == record.kind && c.connection == record.connection)
        {
            Some(slot) => slot,
            None => {
                cursors.push(SeqCursor::find_or_create(
                    tx,
                    &record.connection,
                    record.kind,
                )?);
                cursors.len() - 1
            }
        };
        let cursor = &mut cursors[slot];
        let seq = cursor.next_seq;
        cursor.next_seq += 1;
        let size = accounted(&record.data);
        insert
            .execute(params![cursor.stream, seq, record.ts_ms, record.data, size])
            .map_err(tx.err())?;
        counters.stream(cursor.stream).appended(seq, size);
        seqs.push(seq as u64);
    }
    counters.write(tx)?;
    Ok(seqs)
}

/// The next seq of one stream while a batch is inserted.
struct SeqCursor<'a> {
    connection: &'a str,
    kind: Kind,
    stream: i64,
    next_seq: i64,
}

impl<'a> SeqCursor<'a> {
    /// Reads the stream's `next_seq`, creating the stream (at seq 1) on its
    /// first record.
    fn find_or_create(
        tx: &Tx<'_>,
        connection: &'a str,
        kind: Kind,
    ) -> Result<SeqCursor<'a>, BufferError> {
        let found: Option<(i64, i64)> = tx
            .stmt("SELECT id, next_seq FROM streams WHERE connection = ?1 AND kind = ?2")?
            .query_row(params![connection, kind.as_str()], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .map_err(tx.err())?;
        let (stream, next_seq) = match found {
            Some(found) => found,
            None => (
                tx.stmt(
                    "INSERT INTO streams (connection, kind, next_seq) VALUES (?1, ?2, 1) \
                     RETURNING id",
                )?
                .query_row(params![connection, kind.as_str()], |row| row.get(0))
                .map_err(tx.err())?,
                1,
            ),
        };
        Ok(SeqCursor {
            connection,
            kind,
            stream,
            next_seq,
        })
    }
}
