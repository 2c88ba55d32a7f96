//! Bringing the records of older buffers up to date at open, before
//! anything else touches them: `Store::mark_dead_letters_lost` for schema
//! 4 (segments, but no record of what left them undelivered), and moving
//! the records of a buffer written before segments (schema 3 and older: one
//! row per record in `records`) into segments. Nothing is lost and every record keeps its
//! stream, seq, timestamp and text; dead letters and the counters stay.
//!
//! In chunks, one transaction each, oldest first per stream: the WAL stays
//! bounded and a crash in between leaves segments for the lower seqs and
//! rows for the higher ones, which the next open simply goes on with. Each
//! chunk deletes its rows before it writes their segments, so the pages it
//! needs are those it has just freed: an upgrade on a full disk still goes
//! through.

use std::time::Instant;

use rusqlite::{params, OptionalExtension};

use super::read::for_each_segment;
use super::segment::{self, Entry};
use super::segrow::NewSegment;
use super::seqset::SeqSet;
use super::tx::{Counters, OnFull};
use super::Store;
use crate::buffer::BufferError;
use crate::record::RecordId;

/// Rows converted per transaction.
const CHUNK_ROWS: i64 = 20_000;

/// One legacy row: stream, seq, ts_ms, data, accounted size.
type LegacyRow = (i64, i64, i64, String, i64);

impl Store {
    /// Converts what `records` still holds; drops the table once empty.
    /// Does nothing on a file without it.
    /// A schema-4 segment marks its dead-lettered records gone like the
    /// delivered ones: mark them lost too, so the blob's copy is never
    /// replayed beside (or after) the dead letter. The schema upgrade
    /// leaves the `mark_lost` flag in `meta`; this clears it in the same
    /// transaction, so a crash in between only repeats the work. Records
    /// such a version expired inside a segment cannot be told from
    /// delivered ones and stay replayable while the segment is kept.
    /// Dead letters are few: one transaction.
    pub(super) fn mark_dead_letters_lost(&mut self) -> Result<(), BufferError> {
        let flagged: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'mark_lost'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err("upgrade"))?;
        if flagged.is_none() {
            return Ok(());
        }
        self.write("upgrade", OnFull::Pass, |tx| {
            let letters: Vec<RecordId> = tx
                .stmt("SELECT stream, seq FROM dead_letters ORDER BY stream, seq")?
                .query_map([], |r| {
                    Ok(RecordId {
                        stream: r.get(0)?,
                        seq: r.get(1)?,
                    })
                })
                .map_err(tx.err())?
                .collect::<Result<_, _>>()
                .map_err(tx.err())?;
            for_each_segment(tx, &letters, |row, seqs| {
                let before = row.lost.clone();
                for &seq in seqs {
                    row.lost.insert(seq);
                }
                if row.lost != before {
                    tx.save(row)?;
                }
                Ok(())
            })?;
            tx.execute("DELETE FROM meta WHERE key = 'mark_lost'", [])?;
            Ok(())
        })
    }

    pub(super) fn convert_legacy(&mut self) -> Result<(), BufferError> {
        let legacy: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'records'",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("upgrade"))?;
        if legacy == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let mut converted = 0u64;
        loop {
            let n =
                self.write("upgrade", OnFull::Pass, |tx| {
                    let rows = {
                        let mut stmt = tx.stmt(
                            "SELECT stream, seq, ts_ms, data, size FROM records \
                         ORDER BY stream, seq LIMIT ?1",
                        )?;
                        let found = stmt
                            .query_map(params![CHUNK_ROWS], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                            })
                            .map_err(tx.err())?;
                        found
                            .collect::<Result<Vec<LegacyRow>, _>>()
                            .map_err(tx.err())?
                    };
                    if rows.is_empty() {
                        tx.execute("DROP TABLE records", [])?;
                        return Ok(0);
                    }
                    let mut counters = Counters::default();
                    for group in rows.chunk_by(|a, b| a.0 == b.0) {
                        let stream = group[0].0;
                        let (first, last) = (group[0].1, group[group.len() - 1].1);
                        tx.stmt("DELETE FROM records WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3")?
                            .execute(params![stream, first, last])
                            .map_err(tx.err())?;
                        let entries: Vec<Entry<'_>> = group
                            .iter()
                            .map(|r| Entry {
                                seq: r.1,
                                ts_ms: r.2,
                                data: &r.3,
                            })
                            .collect();
                        let mut bytes: i64 = -group.iter().map(|r| r.4).sum::<i64>();
                        for run in segment::runs(&entries, |e| e.data.len()) {
                            let blob =
                                tx.segments.borrow_mut().codec.encode(run).map_err(|e| {
                                    tx.corrupt(format!("cannot encode records: {e}"))
                                })?;
                            let row = tx.insert_segment(
                                stream,
                                NewSegment::of(&blob, run, SeqSet::default()),
                            )?;
                            bytes += row.size;
                        }
                        counters.stream(stream).grew(0, bytes);
                    }
                    counters.write(tx)?;
                    Ok(rows.len() as u64)
                })?;
            if n == 0 {
                break;
            }
            converted += n;
        }
        tracing::info!(path = %self.path.display(), records = converted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "buffer upgraded: records moved into segments");
        Ok(())
    }
}
