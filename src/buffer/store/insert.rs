//! Writing records: every record, appended or written by the buffer itself
//! (eviction and dead-letter events), gets its stream's next seq and counts
//! in the stream's counters here, so both follow the same rules. Records
//! are encoded into segments first ([`Prepared`], no database involved),
//! then stored with their seqs in the transaction.

use rusqlite::{params, OptionalExtension};

use super::segment::{self, Codec, Entry};
use super::segrow::{NewSegment, SEGMENT_OVERHEAD_BYTES};
use super::seqset::SeqSet;
use super::tx::{Counters, Tx};
use crate::buffer::BufferError;
use crate::record::{Kind, NewRecord};

/// Records encoded into segments, per stream, before their seqs are known:
/// a segment stores seqs relative to its first (see `segment`), so the
/// expensive part runs once, outside the write lock, and survives the
/// evict-and-retry rounds of an append.
pub(super) struct Prepared<'r> {
    streams: Vec<PreparedStream<'r>>,
    /// For each input record: its stream (index into `streams`) and its
    /// offset from that stream's first seq in this batch.
    order: Vec<(usize, i64)>,
}

/// A segment's blob and what its row needs, seqs as offsets from the
/// stream's first seq in the batch.
struct PreparedSegment {
    blob: Vec<u8>,
    first: i64,
    last: i64,
    first_ts: i64,
}

struct PreparedStream<'r> {
    connection: &'r str,
    kind: Kind,
    /// Records of the stream in this batch.
    count: i64,
    segments: Vec<PreparedSegment>,
}

impl<'r> Prepared<'r> {
    /// Encodes `records` into one or more segments per stream, in input
    /// order within each stream.
    pub fn new(codec: &mut Codec, records: &'r [NewRecord]) -> Result<Prepared<'r>, String> {
        let mut streams: Vec<(PreparedStream<'r>, Vec<Entry<'r>>)> = Vec::new();
        let mut order = Vec::with_capacity(records.len());
        for r in records {
            // A batch touches few streams: a scan beats hashing owned keys.
            let slot = match streams
                .iter()
                .position(|(s, _)| s.kind == r.kind && s.connection == r.connection)
            {
                Some(slot) => slot,
                None => {
                    streams.push((
                        PreparedStream {
                            connection: &r.connection,
                            kind: r.kind,
                            count: 0,
                            segments: Vec::new(),
                        },
                        Vec::new(),
                    ));
                    streams.len() - 1
                }
            };
            let (stream, entries) = &mut streams[slot];
            order.push((slot, stream.count));
            entries.push(Entry {
                seq: stream.count,
                ts_ms: r.ts_ms,
                data: &r.data,
            });
            stream.count += 1;
        }
        let mut out = Vec::with_capacity(streams.len());
        for (mut stream, entries) in streams {
            for run in segment::runs(&entries, |e| e.data.len()) {
                let blob = codec.encode(run).map_err(|e| e.to_string())?;
                stream.segments.push(PreparedSegment {
                    blob,
                    first: run[0].seq,
                    last: run[run.len() - 1].seq,
                    first_ts: run[0].ts_ms,
                });
            }
            out.push(stream);
        }
        Ok(Prepared {
            streams: out,
            order,
        })
    }

    /// Accounted bytes the segments will take.
    pub fn bytes(&self) -> u64 {
        self.streams
            .iter()
            .flat_map(|s| &s.segments)
            .map(|p| p.blob.len() as u64 + SEGMENT_OVERHEAD_BYTES as u64)
            .sum()
    }

    /// Stores the segments inside `tx` with their streams' next seqs and
    /// updates the stream counters (invariants 1 and 4). Returns the seqs in
    /// input order.
    pub fn insert(&self, tx: &Tx<'_>) -> Result<Vec<u64>, BufferError> {
        let mut counters = Counters::default();
        let mut bases = Vec::with_capacity(self.streams.len());
        for s in &self.streams {
            let (stream, next_seq) = find_or_create(tx, s.connection, s.kind)?;
            for p in &s.segments {
                let count = p.last - p.first + 1;
                let row = tx.insert_segment(
                    stream,
                    NewSegment {
                        blob: &p.blob,
                        first_seq: next_seq + p.first,
                        last_seq: next_seq + p.last,
                        count,
                        pending: count,
                        head_seq: next_seq + p.first,
                        head_ts: p.first_ts,
                        gone: SeqSet::default(),
                        lost: SeqSet::default(),
                    },
                )?;
                counters
                    .stream(stream)
                    .appended(row.first_seq, row.last_seq, row.count, row.size);
            }
            bases.push(next_seq);
        }
        counters.write(tx)?;
        Ok(self
            .order
            .iter()
            .map(|&(slot, offset)| (bases[slot] + offset) as u64)
            .collect())
    }
}

/// Encodes and inserts records inside `tx` (the events the buffer writes
/// itself): see [`Prepared::insert`].
pub(super) fn insert_records(tx: &Tx<'_>, records: &[NewRecord]) -> Result<Vec<u64>, BufferError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let prepared = {
        let mut segs = tx.segments.borrow_mut();
        Prepared::new(&mut segs.codec, records)
            .map_err(|e| tx.corrupt(format!("cannot encode records: {e}")))?
    };
    prepared.insert(tx)
}

/// The stream's row id and `next_seq`, creating the stream (at seq 1) on
/// its first record.
fn find_or_create(tx: &Tx<'_>, connection: &str, kind: Kind) -> Result<(i64, i64), BufferError> {
    let found: Option<(i64, i64)> = tx
        .stmt("SELECT id, next_seq FROM streams WHERE connection = ?1 AND kind = ?2")?
        .query_row(params![connection, kind.as_str()], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()
        .map_err(tx.err())?;
    match found {
        Some(found) => Ok(found),
        None => Ok((
            tx.stmt(
                "INSERT INTO streams (connection, kind, next_seq) VALUES (?1, ?2, 1) RETURNING id",
            )?
            .query_row(params![connection, kind.as_str()], |row| row.get(0))
            .map_err(tx.err())?,
            1,
        )),
    }
}
