//! Rows the broker refused for good: moved out of the pending rows with
//! their id, seq and data (nothing is lost), listed for operators, and
//! re-queued on request. They count against the same limits as pending rows
//! and are evicted by the same lanes (see `evict`).

use rusqlite::params;

use super::insert::insert_records;
use super::read::for_each_segment;
use super::segment::{self, Entry};
use super::segrow::{NewSegment, SegRow, Taking};
use super::seqset::SeqSet;
use super::tx::{Counters, OnFull, StreamDelta, Tx};
use super::{accounted, agent_event, connection_value, Store};
use crate::buffer::{BufferError, DeadLetter};
use crate::record::{now_ms, EventType, Kind, NewRecord, RecordId, StreamKey};

impl Store {
    /// Moves the rows with these ids (the records of a message the broker
    /// rejected repeatedly) into the dead-letter table, keeping stream, seq,
    /// timestamp, data and row id, and in the same transaction appends one
    /// agent-level `system.error` event per affected stream naming them.
    /// Rows of the agent's own event stream are moved without such an event:
    /// announcing a rejected event with another event the broker may reject
    /// the same way could go on forever; they still show in
    /// [`Stats::dead_letters`](crate::buffer::Stats) and
    /// [`Store::dead_letters`]. Unknown ids are ignored. Returns the number
    /// of rows moved. At the size cap or on a full disk this fails with
    /// [`BufferError::Full`] and moves nothing (the rows stay pending; the
    /// next append's eviction makes room).
    pub fn dead_letter(&mut self, ids: &[RecordId], reason: &str) -> Result<usize, BufferError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let records = ids.len();
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        self.repairing(|s| {
            s.write("dead letter", OnFull::Refuse { records }, |tx| {
                let moved = move_rows(tx, &ids, reason, now)?;
                let events = announcements(tx, &moved, reason, now)?;
                insert_records(tx, &events)?;
                Ok(moved
                    .iter()
                    .map(|d| d.records.unsigned_abs() as usize)
                    .sum())
            })
        })
    }

    /// The dead-letter table as runs (rows of one stream moved together for
    /// the same reason), ordered by stream and seq. Holds one entry per run,
    /// not per row.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, BufferError> {
        let mut out = self.snapshot("dead letters", |tx| {
            let names = tx.streams(false)?;
            let mut out: Vec<DeadLetter> = Vec::new();
            let mut last_stream = None;
            let mut stmt = tx.stmt(
                "SELECT stream, seq, size, reason, dead_ms FROM dead_letters \
                 ORDER BY stream, seq",
            )?;
            let e = tx.err();
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let stream: i64 = row.get(0).map_err(&e)?;
                let seq = row.get::<_, i64>(1).map_err(&e)? as u64;
                let size = row.get::<_, i64>(2).map_err(&e)?.max(0) as u64;
                let reason: String = row.get(3).map_err(&e)?;
                let dead_ms: i64 = row.get(4).map_err(&e)?;
                if let Some(run) = out.last_mut().filter(|run| {
                    last_stream == Some(stream) && run.reason == reason && run.dead_at_ms == dead_ms
                }) {
                    run.last_seq = seq;
                    run.count += 1;
                    run.bytes += size;
                    continue;
                }
                let Some(name) = names.iter().find(|n| n.id == stream) else {
                    return Err(tx.corrupt(format!("dead letter of unknown stream {stream}")));
                };
                last_stream = Some(stream);
                out.push(DeadLetter {
                    connection: name.key.connection.clone(),
                    kind: name.key.kind,
                    first_seq: seq,
                    last_seq: seq,
                    count: 1,
                    bytes: size,
                    reason,
                    dead_at_ms: dead_ms,
                });
            }
            Ok(out)
        })?;
        out.sort_by(|a, b| {
            (&a.connection, a.kind, a.first_seq).cmp(&(&b.connection, b.kind, b.first_seq))
        });
        Ok(out)
    }

    /// Moves every dead letter back into the pending records with its
    /// original seq (and so its id): they will be published again, and
    /// consumers drop duplicates by seq. One transaction; one stream's
    /// letters are in memory at a time. Returns the number re-queued. A
    /// running uplink has already passed those seqs: it must restart its
    /// cursors for the streams whose `first_seq` went down. Re-queueing
    /// never evicts: with no room (size cap or full disk) it fails with
    /// [`BufferError::Full`] and moves nothing; retry once the backlog has
    /// drained.
    pub fn retry_dead_letters(&mut self) -> Result<usize, BufferError> {
        let moved = self.repairing(|s| s.requeue_all())?;
        if moved > 0 {
            tracing::info!(records = moved, "dead letters re-queued");
        }
        Ok(moved)
    }

    fn requeue_all(&mut self) -> Result<usize, BufferError> {
        self.write("retry dead letters", OnFull::Refuse { records: 0 }, |tx| {
            let mut counters = Counters::default();
            let mut moved = 0usize;
            for stream in tx.streams(false)? {
                moved += requeue_stream(tx, stream.id, &mut counters)?;
            }
            if moved == 0 {
                return Ok(0);
            }
            tx.execute("DELETE FROM dead_letters", [])?;
            counters.write(tx)?;
            // Counted in the file, not in memory: the agent's uplink notices
            // a retry run by another process and reads its streams again.
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('requeues', '1') \
                 ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                [],
            )?;
            Ok(moved)
        })
    }
}

/// Moves the pending records with these ids (sorted) from their segments
/// to `dead_letters` and updates the stream counters; returns what was
/// moved, per stream.
fn move_rows(
    tx: &Tx<'_>,
    ids: &[RecordId],
    reason: &str,
    now: i64,
) -> Result<Counters, BufferError> {
    let mut moved = Counters::default();
    let mut keep = tx.stmt(
        "INSERT INTO dead_letters (stream, seq, ts_ms, data, size, reason, dead_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for_each_segment(tx, ids, |row, seqs| {
        // Decoded first: a segment taken whole is deleted at once.
        let seg = tx.decode(row)?;
        let taken = tx.take_from(row, seqs, Taking::Lost, &mut moved)?;
        for &i in &taken.indexes {
            let e = seg.get(i);
            keep.execute(params![
                row.stream,
                e.seq,
                e.ts_ms,
                e.data,
                accounted(e.data),
                reason,
                now
            ])
            .map_err(tx.err())?;
        }
        Ok(())
    })?;
    moved.write(tx)?;
    Ok(moved)
}

/// Puts a stream's dead letters back among its pending records with the
/// seqs they had: into the segment whose span holds them (rewritten under
/// a new id, so no decoded copy anywhere is stale) or, where no segment is
/// left, into new segments in the gaps. Segment spans stay disjoint.
fn requeue_stream(tx: &Tx<'_>, stream: i64, counters: &mut Counters) -> Result<usize, BufferError> {
    let mut letters: Vec<(i64, i64, String)> = Vec::new();
    {
        let mut stmt =
            tx.stmt("SELECT seq, ts_ms, data FROM dead_letters WHERE stream = ?1 ORDER BY seq")?;
        let rows = stmt
            .query_map(params![stream], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(tx.err())?;
        for row in rows {
            letters.push(row.map_err(tx.err())?);
        }
    }
    letters.dedup_by_key(|l| l.0);
    let mut i = 0;
    while i < letters.len() {
        let holder = tx.segment_holding(stream, letters[i].0)?;
        // The letters that go together: those in the holder's span, or
        // those before the next segment's span.
        let end = match &holder {
            Some(row) => letters[i..].partition_point(|l| l.0 <= row.last_seq),
            None => {
                let next = tx
                    .all_segments_after(stream, letters[i].0)?
                    .next()?
                    .map_or(i64::MAX, |row| row.first_seq);
                letters[i..].partition_point(|l| l.0 < next)
            }
        } + i;
        let group = &letters[i..end];
        requeue_into(tx, stream, holder, group, counters)?;
        i = end;
    }
    Ok(letters.len())
}

/// Writes `holder` (if any) again with `letters` pending in it.
fn requeue_into(
    tx: &Tx<'_>,
    stream: i64,
    holder: Option<SegRow>,
    letters: &[(i64, i64, String)],
    counters: &mut Counters,
) -> Result<(), BufferError> {
    let seg;
    let mut entries: Vec<Entry<'_>> = letters
        .iter()
        .map(|(seq, ts_ms, data)| Entry {
            seq: *seq,
            ts_ms: *ts_ms,
            data,
        })
        .collect();
    let mut gone = SeqSet::default();
    let mut lost = SeqSet::default();
    let mut old_size = 0;
    if let Some(row) = &holder {
        seg = tx.decode(row)?;
        gone = row.gone.clone();
        if row.pending == 0 {
            // A kept segment: every record of it is gone.
            for e in seg.iter() {
                gone.insert(e.seq);
            }
        }
        lost = row.lost.clone();
        for e in &entries {
            gone.remove(e.seq);
            lost.remove(e.seq);
        }
        // A letter still in the blob (moved there from this segment)
        // keeps the blob's copy.
        entries.retain(|e| seg.position(e.seq).is_err());
        entries.extend(seg.iter());
        entries.sort_unstable_by_key(|e| e.seq);
        if row.is_kept() {
            counters.stream(stream).unkept(row.kept, row.size, false);
        } else {
            old_size = row.size;
        }
        tx.delete_segment(row.id)?;
    }
    let pending_before = holder.as_ref().map_or(0, |row| row.pending);
    for run in segment::runs(&entries, |e| e.data.len()) {
        let blob = tx
            .segments
            .borrow_mut()
            .codec
            .encode(run)
            .map_err(|e| tx.corrupt(format!("cannot encode records: {e}")))?;
        let (mut run_gone, mut run_lost) = (SeqSet::default(), SeqSet::default());
        for e in run.iter().filter(|e| gone.contains(e.seq)) {
            run_gone.insert(e.seq);
            if lost.contains(e.seq) {
                run_lost.insert(e.seq);
            }
        }
        let new = NewSegment {
            lost: run_lost,
            ..NewSegment::of(&blob, run, run_gone)
        };
        if new.pending == 0 {
            // A run of the holder with no letter in it: nothing to send.
            // Kept, if it has delivered records and the buffer keeps them.
            let mut replayable = run.iter().filter(|e| !new.lost.contains(e.seq));
            let first_ts = replayable.next().map_or(0, |e| e.ts_ms);
            let kept = run.iter().filter(|e| !new.lost.contains(e.seq)).count() as i64;
            if tx.retain && kept > 0 {
                let mut row = tx.insert_segment(stream, new)?;
                row.kept = kept;
                tx.keep(&mut row, first_ts)?;
                counters.stream(stream).kept(kept, row.size);
            }
            continue;
        }
        let row = tx.insert_segment(stream, new)?;
        counters.stream(stream).grew(row.pending, row.size);
    }
    counters.stream(stream).grew(-pending_before, -old_size);
    Ok(())
}

/// One `system.error` per stream whose rows were moved, in stream order;
/// none for the agent's own event stream (see [`Store::dead_letter`]).
fn announcements(
    tx: &Tx<'_>,
    moved: &Counters,
    reason: &str,
    now: i64,
) -> Result<Vec<NewRecord>, BufferError> {
    let names = tx.streams(false)?;
    let mut keyed: Vec<(&StreamKey, &StreamDelta)> = Vec::new();
    for d in moved.iter() {
        let Some(name) = names.iter().find(|n| n.id == d.stream) else {
            return Err(tx.corrupt(format!("dead letter of unknown stream {}", d.stream)));
        };
        keyed.push((&name.key, d));
    }
    keyed.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut events = Vec::new();
    for (key, d) in keyed {
        let Some((first, last)) = d.seqs else {
            continue;
        };
        let rows = d.records.unsigned_abs();
        tracing::error!(connection = %key.connection, kind = %key.kind, first_seq = first,
            last_seq = last, count = rows, %reason, "records moved to dead letters");
        if key.connection.is_empty() && key.kind == Kind::Event {
            continue;
        }
        events.push(dead_letter_event(
            &key.connection,
            key.kind,
            first as u64,
            last as u64,
            rows,
            reason,
            now,
        ));
    }
    Ok(events)
}

/// The `system.error` event naming rows moved to dead letters.
fn dead_letter_event(
    connection: &str,
    kind: Kind,
    first_seq: u64,
    last_seq: u64,
    count: u64,
    reason: &str,
    ts_ms: i64,
) -> NewRecord {
    agent_event(
        EventType::SystemError,
        ts_ms,
        serde_json::json!({
            "message": "records moved to dead letters",
            "connection": connection_value(connection),
            "kind": kind.as_str(),
            "first_seq": first_seq,
            "last_seq": last_seq,
            "count": count,
            "reason": reason,
        }),
    )
}
