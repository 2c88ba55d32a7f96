//! Segments as rows: the `segments` row of each (where it sits in its
//! stream, what of it is still pending) and its blob in `segment_data`,
//! written once and never changed. What every operation on pending records
//! shares: finding the segments of a range, decoding them (through a small
//! cache: the uplink reads a segment in several messages and acks it
//! right after), and taking records out of them.
//!
//! A segment whose last pending record goes is deleted, or, with
//! `buffer.retain_delivered`, *kept*: `pending = 0`, `delivered_ms` set,
//! `kept` records of it replayable (all but those in `lost`). Pending
//! work finds pending segments through the partial index
//! `segments_pending`, so kept history costs the live path nothing.

use std::sync::Arc;

use rusqlite::{params, OptionalExtension, Row};

use super::segment::{Entry, Segment};
use super::seqset::SeqSet;
use super::tx::{Counters, Tx};
use crate::buffer::BufferError;

/// Accounted cost of a segment on top of its blob: two rows, their headers
/// and the `(stream, last_seq)` index entry.
pub const SEGMENT_OVERHEAD_BYTES: i64 = 64;

const COLUMNS: &str = "id, stream, first_seq, last_seq, count, pending, head_seq, head_ts, \
     size, gone, delivered_ms, lost, kept";

/// Why records leave the pending ones ([`Tx::take_from`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Taking {
    /// The broker has them: they may be kept for replay.
    Delivered,
    /// Evicted or moved to the dead letters: the blob's copy must never be
    /// replayed (the dead-letter row, while it exists, is the copy).
    Lost,
}

/// A row as read, with its `gone` and `lost` sets still encoded.
type Found = (SegRow, Option<Vec<u8>>, Option<Vec<u8>>);

/// A `segments` row.
#[derive(Clone, Debug)]
pub(super) struct SegRow {
    pub id: i64,
    pub stream: i64,
    /// Lowest and highest seq stored in the blob.
    pub first_seq: i64,
    pub last_seq: i64,
    /// Records in the blob; fewer than the span when seqs in between were
    /// dead letters when the segment was written (an upgraded buffer, a
    /// re-queue).
    pub count: i64,
    /// Records of the blob still pending: not in `gone`.
    pub pending: i64,
    /// The first pending record's seq and `ts_ms`.
    pub head_seq: i64,
    pub head_ts: i64,
    /// Accounted bytes: the blob plus [`SEGMENT_OVERHEAD_BYTES`].
    pub size: i64,
    /// Seqs of the blob no longer pending (empty, and meaningless, once
    /// `pending` is 0).
    pub gone: SeqSet,
    /// When the last pending record was delivered, for a kept segment.
    pub delivered_ms: Option<i64>,
    /// Seqs of the blob that left undelivered ([`Taking::Lost`]).
    pub lost: SeqSet,
    /// Records of a kept segment that can be replayed (`count` minus
    /// `lost`); 0 while records are pending.
    pub kept: i64,
}

impl SegRow {
    /// Every seq of the span is in the blob: no decoding needed to know
    /// which seqs exist.
    pub fn dense(&self) -> bool {
        self.count == self.last_seq - self.first_seq + 1
    }

    /// Kept for replay: nothing pending, delivered records in it.
    pub fn is_kept(&self) -> bool {
        self.pending == 0 && self.delivered_ms.is_some()
    }

    fn from_sql(row: &Row<'_>) -> rusqlite::Result<Found> {
        Ok((
            SegRow {
                id: row.get(0)?,
                stream: row.get(1)?,
                first_seq: row.get(2)?,
                last_seq: row.get(3)?,
                count: row.get(4)?,
                pending: row.get(5)?,
                head_seq: row.get(6)?,
                head_ts: row.get(7)?,
                size: row.get(8)?,
                gone: SeqSet::default(),
                delivered_ms: row.get(10)?,
                lost: SeqSet::default(),
                kept: row.get(12)?,
            },
            row.get(9)?,
            row.get(11)?,
        ))
    }
}

impl Tx<'_> {
    fn seg_row(&self, found: Found) -> Result<SegRow, BufferError> {
        let (mut row, gone, lost) = found;
        let set = |bytes: Option<Vec<u8>>| match bytes {
            Some(bytes) => SeqSet::decode(&bytes, row.first_seq)
                .map_err(|e| self.corrupt(format!("segment {}: {e}", row.id))),
            None => Ok(SeqSet::default()),
        };
        row.gone = set(gone)?;
        row.lost = set(lost)?;
        Ok(row)
    }

    /// The segments of `stream` with pending records above `after`, in seq
    /// order.
    pub fn segments_after(&self, stream: i64, after: i64) -> Result<SegCursor<'_>, BufferError> {
        self.cursor(
            "INDEXED BY segments_pending WHERE stream = ?1 AND last_seq > ?2 AND pending > 0",
            stream,
            after,
        )
    }

    /// Every segment of `stream` (pending or kept) holding seqs above
    /// `after`, in seq order.
    pub fn all_segments_after(
        &self,
        stream: i64,
        after: i64,
    ) -> Result<SegCursor<'_>, BufferError> {
        self.cursor("WHERE stream = ?1 AND last_seq > ?2", stream, after)
    }

    fn cursor(&self, filter: &str, stream: i64, after: i64) -> Result<SegCursor<'_>, BufferError> {
        let stmt = self.stmt(&format!(
            "SELECT {COLUMNS} FROM segments {filter} ORDER BY last_seq"
        ))?;
        Ok(SegCursor {
            tx: self,
            stmt,
            stream,
            after,
            rows: Vec::new(),
        })
    }

    /// The segment of `stream` whose span holds `seq`, if any.
    pub fn segment_holding(&self, stream: i64, seq: i64) -> Result<Option<SegRow>, BufferError> {
        let found = self
            .stmt(&format!(
                "SELECT {COLUMNS} FROM segments WHERE stream = ?1 AND last_seq >= ?2 \
                 ORDER BY last_seq LIMIT 1"
            ))?
            .query_row(params![stream, seq], SegRow::from_sql)
            .optional()
            .map_err(self.err())?;
        match found {
            Some(found) if found.0.first_seq <= seq => Ok(Some(self.seg_row(found)?)),
            _ => Ok(None),
        }
    }

    /// The segment with this id, if it still exists.
    pub fn segment_by_id(&self, id: i64) -> Result<Option<SegRow>, BufferError> {
        let found = self
            .stmt(&format!("SELECT {COLUMNS} FROM segments WHERE id = ?1"))?
            .query_row(params![id], SegRow::from_sql)
            .optional()
            .map_err(self.err())?;
        found.map(|f| self.seg_row(f)).transpose()
    }

    /// The segment of `stream` with the highest pending seqs.
    pub fn tail_segment(&self, stream: i64) -> Result<Option<SegRow>, BufferError> {
        let found = self
            .stmt(&format!(
                "SELECT {COLUMNS} FROM segments INDEXED BY segments_pending \
                 WHERE stream = ?1 AND pending > 0 ORDER BY last_seq DESC LIMIT 1"
            ))?
            .query_row(params![stream], SegRow::from_sql)
            .optional()
            .map_err(self.err())?;
        found.map(|f| self.seg_row(f)).transpose()
    }

    /// The highest pending seq of a segment.
    pub fn last_pending(&self, row: &SegRow) -> Result<i64, BufferError> {
        if !row.gone.contains(row.last_seq) {
            return Ok(row.last_seq);
        }
        let seg = self.decode(row)?;
        Ok(seg
            .seqs()
            .iter()
            .rev()
            .find(|seq| !row.gone.contains(**seq))
            .map_or(row.head_seq, |seq| *seq))
    }

    /// The decoded blob of `row`.
    pub fn decode(&self, row: &SegRow) -> Result<Arc<Segment>, BufferError> {
        let mut segs = self.segments.borrow_mut();
        if let Some(seg) = segs.cached(row.id) {
            return Ok(seg);
        }
        let blob: Vec<u8> = self
            .stmt("SELECT blob FROM segment_data WHERE id = ?1")?
            .query_row(params![row.id], |r| r.get(0))
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| self.damaged(row.id, "its data is missing".into()))?;
        let seg = segs
            .codec
            .decode(&blob, row.first_seq)
            .map_err(|e| self.damaged(row.id, e))?;
        let last = seg.seqs().last().copied();
        if seg.len() as i64 != row.count || last != Some(row.last_seq) {
            return Err(self.damaged(
                row.id,
                format!(
                    "it holds {} records up to seq {last:?}, its row says {} up to {}",
                    seg.len(),
                    row.count,
                    row.last_seq
                ),
            ));
        }
        let seg = Arc::new(seg);
        segs.keep(row.id, seg.clone());
        Ok(seg)
    }

    /// Stores a new segment of `stream`: the row and its blob.
    pub fn insert_segment(&self, stream: i64, new: NewSegment<'_>) -> Result<SegRow, BufferError> {
        let mut row = SegRow {
            id: 0,
            stream,
            first_seq: new.first_seq,
            last_seq: new.last_seq,
            count: new.count,
            pending: new.pending,
            head_seq: new.head_seq,
            head_ts: new.head_ts,
            size: new.blob.len() as i64 + SEGMENT_OVERHEAD_BYTES,
            gone: new.gone,
            delivered_ms: None,
            lost: new.lost,
            kept: 0,
        };
        row.id = self
            .stmt(
                "INSERT INTO segments (stream, first_seq, last_seq, count, pending, head_seq, \
                 head_ts, size, gone, lost) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 RETURNING id",
            )?
            .query_row(
                params![
                    row.stream,
                    row.first_seq,
                    row.last_seq,
                    row.count,
                    row.pending,
                    row.head_seq,
                    row.head_ts,
                    row.size,
                    set_blob(&row.gone, row.first_seq),
                    set_blob(&row.lost, row.first_seq),
                ],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        self.stmt("INSERT INTO segment_data (id, blob) VALUES (?1, ?2)")?
            .execute(params![row.id, new.blob])
            .map_err(self.err())?;
        Ok(row)
    }

    /// Deletes a segment, row and blob.
    pub fn delete_segment(&self, id: i64) -> Result<(), BufferError> {
        self.stmt("DELETE FROM segments WHERE id = ?1")?
            .execute(params![id])
            .map_err(self.err())?;
        self.stmt("DELETE FROM segment_data WHERE id = ?1")?
            .execute(params![id])
            .map_err(self.err())?;
        self.segments.borrow_mut().forget(id);
        Ok(())
    }

    /// Takes the pending records among `seqs` (sorted, within the span of
    /// `row`) out of it: marks them gone (and, [`Taking::Lost`], lost),
    /// and when none is left deletes the segment or keeps it
    /// ([`Tx::retain`]); counts them in `counters` as removed. Returns the
    /// indexes of the records taken (into the decoded segment).
    pub fn take_from(
        &self,
        row: &mut SegRow,
        seqs: &[i64],
        why: Taking,
        counters: &mut Counters,
    ) -> Result<Taken, BufferError> {
        let mut taken = Taken {
            first_seq: 0,
            last_seq: 0,
            indexes: Vec::new(),
        };
        if row.pending == 0 {
            // Kept history: a duplicate acknowledgement after a reconnect.
            return Ok(taken);
        }
        let whole = row.dense()
            && row.gone.is_empty()
            && seqs.len() as i64 == row.count
            && seqs.first() == Some(&row.first_seq)
            && seqs.last() == Some(&row.last_seq);
        if whole && (why == Taking::Lost || !self.retain) {
            // The common ack: every record of an untouched segment.
            self.delete_segment(row.id)?;
            counters
                .stream(row.stream)
                .removed(row.first_seq, row.last_seq, row.count, row.size);
            row.pending = 0;
            return Ok(Taken {
                first_seq: row.first_seq,
                last_seq: row.last_seq,
                indexes: (0..row.count as usize).collect(),
            });
        }
        if whole {
            // The same, kept: no decoding, `head_ts` is the first record's.
            row.kept = row.count;
            self.keep(row, row.head_ts)?;
            let d = counters.stream(row.stream);
            d.removed(row.first_seq, row.last_seq, row.count, row.size);
            d.kept(row.kept, row.size);
            return Ok(Taken {
                first_seq: row.first_seq,
                last_seq: row.last_seq,
                indexes: (0..row.count as usize).collect(),
            });
        }
        let seg = self.decode(row)?;
        for &seq in seqs {
            if let Ok(i) = seg.position(seq) {
                if row.gone.insert(seq) {
                    if why == Taking::Lost {
                        row.lost.insert(seq);
                    }
                    taken.indexes.push(i);
                }
            }
        }
        let (Some(&first), Some(&last)) = (taken.indexes.first(), taken.indexes.last()) else {
            return Ok(taken);
        };
        taken.first_seq = seg.get(first).seq;
        taken.last_seq = seg.get(last).seq;
        let n = taken.indexes.len() as i64;
        if n < row.pending {
            set_head(row, &seg);
            self.save(row)?;
            counters
                .stream(row.stream)
                .removed(taken.first_seq, taken.last_seq, n, 0);
            return Ok(taken);
        }
        let kept = seg.iter().filter(|e| !row.lost.contains(e.seq)).count() as i64;
        let d = counters.stream(row.stream);
        d.removed(taken.first_seq, taken.last_seq, n, row.size);
        if self.retain && kept > 0 {
            let first_ts = seg
                .iter()
                .find(|e| !row.lost.contains(e.seq))
                .map_or(0, |e| e.ts_ms);
            row.kept = kept;
            self.keep(row, first_ts)?;
            d.kept(kept, row.size);
        } else {
            self.delete_segment(row.id)?;
            row.pending = 0;
        }
        Ok(taken)
    }

    /// Keeps a segment whose last pending record was just delivered:
    /// `head_ts` becomes the first replayable record's `ts_ms` (where the
    /// kept history of the stream starts).
    pub fn keep(&self, row: &mut SegRow, first_ts: i64) -> Result<(), BufferError> {
        row.pending = 0;
        row.gone = SeqSet::default();
        row.head_seq = row.first_seq;
        row.head_ts = first_ts;
        row.delivered_ms = Some(crate::record::now_ms());
        self.stmt(
            "UPDATE segments SET pending = 0, head_seq = ?2, head_ts = ?3, gone = NULL, \
             delivered_ms = ?4, lost = ?5, kept = ?6 WHERE id = ?1",
        )?
        .execute(params![
            row.id,
            row.head_seq,
            row.head_ts,
            row.delivered_ms,
            set_blob(&row.lost, row.first_seq),
            row.kept
        ])
        .map_err(self.err())?;
        Ok(())
    }

    /// Writes the mutable columns of `row` back.
    pub fn save(&self, row: &SegRow) -> Result<(), BufferError> {
        self.stmt(
            "UPDATE segments SET pending = ?2, head_seq = ?3, head_ts = ?4, gone = ?5, lost = ?6 \
             WHERE id = ?1",
        )?
        .execute(params![
            row.id,
            row.pending,
            row.head_seq,
            row.head_ts,
            set_blob(&row.gone, row.first_seq),
            set_blob(&row.lost, row.first_seq)
        ])
        .map_err(self.err())?;
        Ok(())
    }
}

/// A segment about to be stored: its blob and what its row says of it.
pub(super) struct NewSegment<'b> {
    pub blob: &'b [u8],
    pub first_seq: i64,
    pub last_seq: i64,
    pub count: i64,
    pub pending: i64,
    pub head_seq: i64,
    pub head_ts: i64,
    pub gone: SeqSet,
    /// Seqs of `gone` that left undelivered (a re-queued segment).
    pub lost: SeqSet,
}

impl<'b> NewSegment<'b> {
    /// A segment of `entries` (what `blob` encodes, seqs as stored) with
    /// the seqs in `gone` not pending.
    pub fn of(blob: &'b [u8], entries: &[Entry<'_>], gone: SeqSet) -> NewSegment<'b> {
        let mut new = NewSegment {
            blob,
            first_seq: entries.first().map_or(0, |e| e.seq),
            last_seq: entries.last().map_or(0, |e| e.seq),
            count: entries.len() as i64,
            pending: 0,
            head_seq: 0,
            head_ts: 0,
            gone,
            lost: SeqSet::default(),
        };
        let mut head = None;
        for e in entries {
            if !new.gone.contains(e.seq) {
                new.pending += 1;
                head.get_or_insert((e.seq, e.ts_ms));
            }
        }
        (new.head_seq, new.head_ts) = head.unwrap_or((new.last_seq, 0));
        new
    }
}

/// What [`Tx::take_from`] took.
pub(super) struct Taken {
    /// Seqs of the first and last record taken (meaningless when none).
    pub first_seq: i64,
    pub last_seq: i64,
    pub indexes: Vec<usize>,
}

/// Sets `pending`, `head_seq` and `head_ts` from the decoded segment and
/// `row.gone`.
fn set_head(row: &mut SegRow, seg: &Segment) {
    row.pending = 0;
    let mut head = None;
    for e in seg.iter() {
        if !row.gone.contains(e.seq) {
            row.pending += 1;
            head.get_or_insert((e.seq, e.ts_ms));
        }
    }
    let (seq, ts) = head.unwrap_or((row.last_seq, 0));
    row.head_seq = seq;
    row.head_ts = ts;
}

fn set_blob(set: &SeqSet, base: i64) -> Option<Vec<u8>> {
    (!set.is_empty()).then(|| set.encode(base))
}

/// Segments of one stream in seq order, read in pages so that any number
/// of them costs bounded memory and no statement stays open across writes.
pub(super) struct SegCursor<'t> {
    tx: &'t Tx<'t>,
    stmt: rusqlite::CachedStatement<'t>,
    stream: i64,
    after: i64,
    rows: Vec<SegRow>,
}

impl SegCursor<'_> {
    pub fn next(&mut self) -> Result<Option<SegRow>, BufferError> {
        if self.rows.is_empty() {
            let found = self
                .stmt
                .query_map(params![self.stream, self.after], SegRow::from_sql)
                .map_err(self.tx.err())?
                .take(16)
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.tx.err())?;
            let Some(last) = found.last() else {
                return Ok(None);
            };
            self.after = last.0.last_seq;
            for f in found.into_iter().rev() {
                self.rows.push(self.tx.seg_row(f)?);
            }
        }
        Ok(self.rows.pop())
    }
}

/// The pending entries of `seg` above `after` (gone ones skipped).
pub(super) fn pending_after<'s>(
    seg: &'s Segment,
    row: &'s SegRow,
    after: i64,
) -> impl Iterator<Item = super::segment::Entry<'s>> + 's {
    (seg.after(after)..seg.len())
        .map(move |i| seg.get(i))
        .filter(move |e| !row.gone.contains(e.seq))
}

/// Reads `stream`'s pending records after `after` through `visit` until it
/// returns false; for callers holding a `Tx`.
pub(super) fn visit_pending(
    tx: &Tx<'_>,
    stream: i64,
    after: i64,
    mut visit: impl FnMut(&SegRow, super::segment::Entry<'_>) -> bool,
) -> Result<(), BufferError> {
    let mut cursor = tx.segments_after(stream, after)?;
    while let Some(row) = cursor.next()? {
        let seg = tx.decode(&row)?;
        for e in pending_after(&seg, &row, after) {
            if !visit(&row, e) {
                return Ok(());
            }
        }
    }
    Ok(())
}
