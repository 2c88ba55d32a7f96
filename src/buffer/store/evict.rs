//! Eviction, the only way records are lost (invariants 6 to 8). Two paths
//! share the same announcement ([`delete_and_announce`]):
//!
//! - **size pressure** ([`Store::evict`]): oldest first along the priority
//!   lanes, dead letters before pending records within a lane, whole head
//!   segments, in transactions of at most [`CHUNK_MAX_SEGMENTS`] segments
//!   or [`CHUNK_MAX_ROWS`] dead letters. Appends call it proactively near
//!   the cap (tags only) and again when SQLite refuses to grow the file
//!   (every kind, tags first);
//! - **expiry** ([`Store::evict_expired`]): each stream's head while it is
//!   older than `max_age`, pending records and dead letters alike.
//!
//! Kept history (delivered records kept for replay) goes before either, and
//! silently: it was delivered, so letting it go loses nothing
//! ([`release_kept`]; counted per stream as `released_total`).

use rusqlite::params;

use super::insert::insert_records;
use super::segrow::{pending_after, SegRow, Taking};
use super::tx::{Counters, OnFull, StreamRow, Tx};
use super::{accounted, agent_event, connection_value, is_sqlite_full, Store};
use crate::buffer::{BufferError, Eviction, EvictionReason};
use crate::record::{now_ms, EventType, Kind, NewRecord};

/// One eviction transaction takes at most this many dead letters (or,
/// expiring, records)...
const CHUNK_MAX_ROWS: usize = 4096;
/// ...and at most this many segments: bounded WAL growth and bounded
/// write-lock time, whatever the backlog.
const CHUNK_MAX_SEGMENTS: usize = 64;
/// Smallest amount an eviction aims to free: below that, the event records
/// it writes would eat a noticeable part of what it frees.
pub(super) const CHUNK_MIN_BYTES: u64 = 16 * 1024;
/// Proactive eviction starts when the pages in use (plus the estimate for
/// the incoming append) pass this share of the page cap...
const SOFT_HIGH_PERCENT: u64 = 90;
/// ...and goes down to this share, so that it runs once per burst rather
/// than on every append.
const SOFT_LOW_PERCENT: u64 = 80;
/// Rounds of proactive eviction per append (each is one transaction).
const MAX_RELIEF_ROUNDS: usize = 64;
/// Extra pages an expiry transaction may take at the cap (see
/// `Store::expire_head`); the WAL's share of max_size (at least 16 pages,
/// truncated to half at checkpoints) leaves that much room.
const EXPIRY_HEADROOM_PAGES: u64 = 8;

/// Where rows of a stream live: waiting for delivery, or refused by the
/// broker and parked. Both take space in the same file, so both are
/// bounded by the same limits (docs/guarantees.md, dead letters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    /// Pending records, in segments.
    Segments,
    DeadLetters,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Tag rows only (proactive eviction).
    Tags,
    /// Tag rows, then, once none is left, every other kind.
    Any,
}

/// A head range chosen for eviction, before it is deleted: every record
/// of `table` of the stream with `first_seq <= seq <= last_seq`.
struct Range {
    table: Table,
    stream: StreamRow,
    first_seq: i64,
    last_seq: i64,
    count: i64,
    bytes: i64,
    /// Pending records: the segments that hold them, each whole (`None`)
    /// or only these seqs of it (expiry stops inside a segment).
    segments: Vec<(SegRow, Option<Vec<i64>>)>,
}

impl Range {
    /// Extends `range` by the next head row, or starts it.
    fn take(range: &mut Option<Range>, table: Table, stream: &StreamRow, seq: i64, size: i64) {
        match range {
            Some(r) => {
                r.last_seq = seq;
                r.count += 1;
                r.bytes += size;
            }
            None => {
                *range = Some(Range {
                    table,
                    stream: stream.clone(),
                    first_seq: seq,
                    last_seq: seq,
                    count: 1,
                    bytes: size,
                    segments: Vec::new(),
                })
            }
        }
    }

    /// Extends `range` by records `first..=last` (`count` of them, `bytes`
    /// freed) of `seg`, or starts it.
    fn take_segment(
        range: &mut Option<Range>,
        stream: &StreamRow,
        span: (i64, i64, i64, i64),
        seg: (SegRow, Option<Vec<i64>>),
    ) {
        let (first, last, count, bytes) = span;
        let r = range.get_or_insert_with(|| Range {
            table: Table::Segments,
            stream: stream.clone(),
            first_seq: first,
            last_seq: last,
            count: 0,
            bytes: 0,
            segments: Vec::new(),
        });
        r.last_seq = last;
        r.count += count;
        r.bytes += bytes;
        r.segments.push(seg);
    }

    fn eviction(&self, reason: EvictionReason) -> Eviction {
        Eviction {
            connection: self.stream.key.connection.clone(),
            kind: self.stream.key.kind,
            first_seq: self.first_seq as u64,
            last_seq: self.last_seq as u64,
            count: self.count as u64,
            bytes: self.bytes as u64,
            reason,
            dead_letters: self.table == Table::DeadLetters,
        }
    }
}

/// The rows of one stream in one table, for expiry.
struct Head {
    table: Table,
    stream: StreamRow,
}

impl Store {
    /// Proactive, tags-only eviction when the pages in use approach the cap
    /// (invariant 9). Other kinds are left to the hard wall, so they are
    /// kept as long as the file can physically hold them.
    pub(super) fn relieve_pressure(
        &mut self,
        incoming: u64,
        out: &mut Vec<Eviction>,
    ) -> Result<(), BufferError> {
        let Some(cap) = self.cap_pages() else {
            return Ok(());
        };
        let ps = self.page_size;
        let incoming_pages = self.pages_for(incoming);
        let (pages, free) = self.page_usage()?;
        let mut used = pages.saturating_sub(free) + incoming_pages;
        if used * 100 <= cap * SOFT_HIGH_PERCENT {
            return Ok(());
        }
        let target = cap * SOFT_LOW_PERCENT / 100;
        let reason = self.cap_reason();
        for _ in 0..MAX_RELIEF_ROUNDS {
            if used <= target {
                break;
            }
            let want = ((used - target) * ps).max(CHUNK_MIN_BYTES);
            if self.evict(Lane::Tags, want, reason, out)? == 0 {
                break;
            }
            let (pages, free) = self.page_usage()?;
            used = pages.saturating_sub(free) + incoming_pages;
        }
        Ok(())
    }

    /// Evicts along `lane` until `want` accounted bytes are freed or nothing
    /// is left, in transactions of bounded size. Returns
    /// the bytes freed.
    pub(super) fn evict(
        &mut self,
        lane: Lane,
        want: u64,
        reason: EvictionReason,
        out: &mut Vec<Eviction>,
    ) -> Result<u64, BufferError> {
        let mut freed = 0u64;
        while freed < want {
            let released = self.write("release kept", OnFull::Pass, |tx| {
                release_kept(tx, want - freed, None)
            })?;
            if released > 0 {
                freed = freed.saturating_add(released);
                continue;
            }
            let chunk = self.evict_chunk(lane, want - freed, reason)?;
            if chunk.is_empty() {
                break;
            }
            for e in &chunk {
                tracing::warn!(connection = %e.connection, kind = %e.kind,
                    first_seq = e.first_seq, last_seq = e.last_seq, count = e.count,
                    reason = %e.reason, "buffer evicted records");
                freed = freed.saturating_add(e.bytes);
            }
            out.extend(chunk);
        }
        Ok(freed)
    }

    /// One eviction transaction (invariants 6-8). Empty when nothing (useful)
    /// is evictable.
    fn evict_chunk(
        &mut self,
        lane: Lane,
        want: u64,
        reason: EvictionReason,
    ) -> Result<Vec<Eviction>, BufferError> {
        self.write("evict", OnFull::Pass, |tx| {
            let (ranges, bytes, rows) = pick_along(tx, lane, want)?;
            if rows == 0 || bytes == 0 {
                return Ok(Vec::new());
            }
            Ok(delete_and_announce(tx, ranges, reason, now_ms(), true)?.unwrap_or_default())
        })
    }

    /// Evicts every stream's head rows whose `ts_ms` is older than
    /// `now_ms - max_age` (all kinds; see the module doc of `buffer` on why
    /// `ts_ms` and why heads), announcing each range with a `buffer.evicted`
    /// event dated `now_ms`. Also lifts a disk-full cap (invariant 10) so
    /// that space the disk got back is used again. Call it periodically
    /// (e.g. every minute).
    pub fn evict_expired(&mut self, now_ms: i64) -> Result<Vec<Eviction>, BufferError> {
        self.repairing(|s| s.expire_once(now_ms))
    }

    fn expire_once(&mut self, now_ms: i64) -> Result<Vec<Eviction>, BufferError> {
        self.lift_disk_cap()?;
        let mut out = Vec::new();
        let cutoff = self
            .limits
            .max_age_ms()
            .map_or(i64::MIN, |age| now_ms.saturating_sub(age));
        // Kept history past `retain_delivered` (or whose records passed
        // `max_age`), a chunk per transaction.
        let expiry = KeptExpiry {
            delivered_before: now_ms.saturating_sub(self.limits.retain_ms()),
            ts_before: cutoff,
        };
        while self.write("release kept", OnFull::Pass, |tx| {
            release_kept(tx, u64::MAX, Some(expiry))
        })? > 0
        {}
        if self.limits.max_age_ms().is_none() {
            return Ok(out);
        }
        // Pending rows first, then dead letters, each in stream order.
        let heads = self.snapshot("evict expired", |tx| {
            let mut heads = Vec::new();
            for table in [Table::Segments, Table::DeadLetters] {
                for stream in streams_in(tx, table, None)? {
                    heads.push(Head { table, stream });
                }
            }
            Ok(heads)
        })?;
        for head in &heads {
            self.expire_head(head, cutoff, now_ms, &mut out)?;
        }
        Ok(out)
    }

    /// Expires one stream's head in one table, a chunk per transaction.
    fn expire_head(
        &mut self,
        head: &Head,
        cutoff: i64,
        now_ms: i64,
        out: &mut Vec<Eviction>,
    ) -> Result<(), BufferError> {
        loop {
            let chunk = match self.expire_chunk(head, cutoff, now_ms, OnFull::Pass) {
                Err(e) if is_sqlite_full(&e) => {
                    // At the cap, deleting rows need not free a whole page
                    // for the announcement; expired rows must go anyway, so
                    // this one transaction may use a few pages of the WAL's
                    // share of max_size.
                    self.set_page_cap(self.cap_pages().map(|c| c + EXPIRY_HEADROOM_PAGES))?;
                    let retry =
                        self.expire_chunk(head, cutoff, now_ms, OnFull::Refuse { records: 0 });
                    self.set_page_cap(self.cap_pages())?;
                    retry?
                }
                other => other?,
            };
            let Some((evictions, full_chunk)) = chunk else {
                return Ok(());
            };
            for e in &evictions {
                tracing::warn!(connection = %e.connection, kind = %e.kind,
                    first_seq = e.first_seq, last_seq = e.last_seq, count = e.count,
                    "buffer evicted expired records");
            }
            out.extend(evictions);
            if !full_chunk {
                return Ok(());
            }
        }
    }

    /// One expiry transaction: the head rows older than `cutoff` (at most a
    /// chunk) deleted and announced. None when the head is not expired;
    /// else the evictions and whether the chunk was full (more may be
    /// expired).
    fn expire_chunk(
        &mut self,
        head: &Head,
        cutoff: i64,
        now_ms: i64,
        on_full: OnFull,
    ) -> Result<Option<(Vec<Eviction>, bool)>, BufferError> {
        self.write("evict expired", on_full, |tx| {
            let Some(range) = expired_range(tx, head, cutoff)? else {
                return Ok(None);
            };
            let full_chunk = range.count as usize >= CHUNK_MAX_ROWS
                || range.segments.len() >= CHUNK_MAX_SEGMENTS;
            // Age eviction must happen whatever it costs: the cost check of
            // size eviction does not apply (an expired row is gone even if
            // its announcement is larger than it was).
            let evictions =
                delete_and_announce(tx, vec![range], EvictionReason::MaxAge, now_ms, false)?
                    .unwrap_or_default();
            Ok(Some((evictions, full_chunk)))
        })
    }
}

/// When kept history expires: delivered before `delivered_before`, or
/// records older than `ts_before` (`max_age` holds for kept records too).
#[derive(Clone, Copy)]
struct KeptExpiry {
    delivered_before: i64,
    ts_before: i64,
}

/// Deletes kept segments, those delivered longest ago first, until `want`
/// bytes are freed or [`CHUNK_MAX_SEGMENTS`] are gone; with `expiry`, only
/// expired ones. No announcement: their records were delivered. Returns
/// the bytes freed.
fn release_kept(tx: &Tx<'_>, want: u64, expiry: Option<KeptExpiry>) -> Result<u64, BufferError> {
    let (filter, cutoffs) = match expiry {
        Some(x) => (
            "AND (delivered_ms IS NULL OR delivered_ms < ?2 OR head_ts < ?3)",
            (x.delivered_before, x.ts_before),
        ),
        None => ("AND ?2 = ?2 AND ?3 = ?3", (0, 0)),
    };
    let picked: Vec<(i64, i64, i64, i64)> = tx
        .stmt(&format!(
            "SELECT id, stream, kept, size FROM segments INDEXED BY segments_retained \
             WHERE pending = 0 {filter} ORDER BY delivered_ms LIMIT ?1"
        ))?
        .query_map(
            params![CHUNK_MAX_SEGMENTS as i64, cutoffs.0, cutoffs.1],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .map_err(tx.err())?
        .collect::<Result<_, _>>()
        .map_err(tx.err())?;
    let mut counters = Counters::default();
    let mut freed = 0u64;
    for (id, stream, kept, size) in picked {
        if freed >= want {
            break;
        }
        tx.delete_segment(id)?;
        counters.stream(stream).unkept(kept, size, true);
        freed = freed.saturating_add(size.max(0) as u64);
    }
    counters.write(tx)?;
    Ok(freed)
}

/// The head records of `head` older than `cutoff`, at most a chunk; a
/// young record ends the range even if older ones follow it (invariant 6:
/// every eviction is a head).
fn expired_range(tx: &Tx<'_>, head: &Head, cutoff: i64) -> Result<Option<Range>, BufferError> {
    match head.table {
        Table::DeadLetters => expired_dead_letters(tx, head, cutoff),
        Table::Segments => expired_segments(tx, &head.stream, cutoff),
    }
}

fn expired_dead_letters(
    tx: &Tx<'_>,
    head: &Head,
    cutoff: i64,
) -> Result<Option<Range>, BufferError> {
    let mut range: Option<Range> = None;
    let mut stmt =
        tx.stmt("SELECT seq, size, ts_ms FROM dead_letters WHERE stream = ?1 ORDER BY seq")?;
    let mut rows = stmt.query(params![head.stream.id]).map_err(tx.err())?;
    let mut n = 0;
    while n < CHUNK_MAX_ROWS {
        let Some(row) = rows.next().map_err(tx.err())? else {
            break;
        };
        let ts: i64 = row.get(2).map_err(tx.err())?;
        if ts >= cutoff {
            break;
        }
        let seq: i64 = row.get(0).map_err(tx.err())?;
        let size: i64 = row.get(1).map_err(tx.err())?;
        Range::take(&mut range, head.table, &head.stream, seq, size);
        n += 1;
    }
    Ok(range)
}

/// The expired head of a stream's pending records: whole segments while
/// every pending record in them is older than `cutoff`, then the expired
/// records at the front of the next one.
fn expired_segments(
    tx: &Tx<'_>,
    stream: &StreamRow,
    cutoff: i64,
) -> Result<Option<Range>, BufferError> {
    let mut range: Option<Range> = None;
    let mut cursor = tx.segments_after(stream.id, 0)?;
    let mut taken = 0usize;
    while let Some(row) = cursor.next()? {
        if row.head_ts >= cutoff || taken >= CHUNK_MAX_SEGMENTS {
            break;
        }
        let seg = tx.decode(&row)?;
        let expired: Vec<(i64, i64)> = pending_after(&seg, &row, 0)
            .take_while(|e| e.ts_ms < cutoff)
            .map(|e| (e.seq, e.ts_ms))
            .collect();
        let (Some(&(first, _)), Some(&(last, _))) = (expired.first(), expired.last()) else {
            break;
        };
        let n = expired.len() as i64;
        let whole = n == row.pending;
        let bytes = if whole { row.size } else { 0 };
        let seqs = (!whole).then(|| expired.iter().map(|(seq, _)| *seq).collect());
        Range::take_segment(&mut range, stream, (first, last, n, bytes), (row, seqs));
        taken += 1;
        if !whole {
            break;
        }
    }
    Ok(range)
}

/// Chooses what one size-eviction transaction takes along `lane`: the
/// ranges, their accounted bytes and their row count.
fn pick_along(tx: &Tx<'_>, lane: Lane, want: u64) -> Result<(Vec<Range>, u64, usize), BufferError> {
    let mut ranges = Vec::new();
    let (mut bytes, mut rows) = (0u64, 0usize);
    // Within a lane, rows the broker refused (dead letters) go before rows
    // still waiting for delivery: they are the least likely to be
    // delivered. Other kinds only in a transaction that has taken every tag
    // row: the tag walks stopped short of `want` and of the row cap only
    // because they ran out of rows.
    let order = [
        (true, Table::DeadLetters),
        (true, Table::Segments),
        (false, Table::DeadLetters),
        (false, Table::Segments),
    ];
    for (tags, table) in order {
        if bytes >= want || rows >= CHUNK_MAX_ROWS || (!tags && lane == Lane::Tags) {
            break;
        }
        let streams = streams_in(tx, table, Some(tags))?;
        let (b, r, full) = match table {
            Table::DeadLetters => {
                let (b, r) = pick_oldest(
                    tx,
                    &streams,
                    want - bytes,
                    CHUNK_MAX_ROWS - rows,
                    &mut ranges,
                )?;
                (b, r, false)
            }
            Table::Segments => pick_segments(tx, &streams, want - bytes, &mut ranges)?,
        };
        bytes += b;
        rows += r;
        if full {
            break;
        }
    }
    Ok((ranges, bytes, rows))
}

/// Deletes the chosen head ranges, counts them as evicted and announces them,
/// all inside `tx` (invariant 6). Returns `None`, having written nothing,
/// when `check_cost` is set and the events would take more than the rows
/// free (invariant 8).
fn delete_and_announce(
    tx: &Tx<'_>,
    ranges: Vec<Range>,
    reason: EvictionReason,
    ts_ms: i64,
    check_cost: bool,
) -> Result<Option<Vec<Eviction>>, BufferError> {
    let evictions: Vec<Eviction> = ranges.iter().map(|r| r.eviction(reason)).collect();
    // Whole segments only count what they free; records expired inside a
    // segment free nothing until it goes.
    let events: Vec<NewRecord> = evictions.iter().map(|e| eviction_event(e, ts_ms)).collect();
    let freed: i64 = ranges.iter().map(|r| r.bytes).sum();
    let cost: i64 = events.iter().map(|e| accounted(&e.data)).sum();
    if check_cost && freed <= cost {
        return Ok(None);
    }
    let mut counters = Counters::default();
    for r in ranges {
        if r.table == Table::Segments {
            delete_segments(tx, r, &mut counters)?;
            continue;
        }
        let n = tx
            .stmt("DELETE FROM dead_letters WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3")?
            .execute(params![r.stream.id, r.first_seq, r.last_seq])
            .map_err(tx.err())?;
        if n as i64 != r.count {
            // The range was read in this same transaction; a mismatch
            // means the index and the table disagree.
            return Err(tx.corrupt(format!(
                "evicting seq {}..={} of {}/{}: expected {} rows, deleted {n}",
                r.first_seq, r.last_seq, r.stream.key.connection, r.stream.key.kind, r.count
            )));
        }
        counters
            .stream(r.stream.id)
            .evicted(r.count, r.bytes, false);
    }
    counters.write(tx)?;
    // After the deletes, so the events can reuse the pages just freed even
    // when the file is at its cap.
    insert_records(tx, &events)?;
    Ok(Some(evictions))
}

/// Streams with rows in `table`, optionally only tag streams or only the
/// others, in `StreamKey` order.
fn streams_in(
    tx: &Tx<'_>,
    table: Table,
    tags: Option<bool>,
) -> Result<Vec<StreamRow>, BufferError> {
    let mut out = match table {
        Table::Segments => tx.streams(true)?,
        Table::DeadLetters => {
            let ids = tx
                .stmt("SELECT DISTINCT stream FROM dead_letters")?
                .query_map([], |row| row.get::<_, i64>(0))
                .map_err(tx.err())?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(tx.err())?;
            let mut all = tx.streams(false)?;
            all.retain(|s| ids.contains(&s.id));
            all
        }
    };
    out.retain(|s| tags.map_or(true, |t| t == (s.key.kind == Kind::Tag)));
    out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Picks head rows oldest-first (lowest row id) across `streams` until
/// `want` accounted bytes or `max_rows` rows are reached, walking each
/// stream's `(stream, seq)` index lazily: memory is O(streams), not O(rows).
/// Adds the picks to `ranges`; returns (bytes, rows) picked.
fn pick_oldest(
    tx: &Tx<'_>,
    streams: &[StreamRow],
    want: u64,
    max_rows: usize,
    ranges: &mut Vec<Range>,
) -> Result<(u64, usize), BufferError> {
    let sql = "SELECT id, seq, size FROM dead_letters WHERE stream = ?1 ORDER BY seq";
    // One statement per stream: their cursors are open at the same time.
    let mut stmts = Vec::with_capacity(streams.len());
    for _ in streams {
        stmts.push(tx.conn().prepare(sql).map_err(tx.err())?);
    }
    let mut cursors = Vec::with_capacity(streams.len());
    for (stmt, s) in stmts.iter_mut().zip(streams) {
        cursors.push(stmt.query(params![s.id]).map_err(tx.err())?);
    }
    let mut heads = Vec::with_capacity(cursors.len());
    for c in cursors.iter_mut() {
        heads.push(next_row(tx, c)?);
    }
    let mut picked: Vec<Option<Range>> = streams.iter().map(|_| None).collect();
    let (mut bytes, mut rows) = (0u64, 0usize);
    while bytes < want && rows < max_rows {
        let oldest = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|row| (row.id, i)))
            .min();
        let Some((_, i)) = oldest else {
            break;
        };
        let Some(row) = heads[i] else {
            break;
        };
        Range::take(
            &mut picked[i],
            Table::DeadLetters,
            &streams[i],
            row.seq,
            row.size,
        );
        bytes = bytes.saturating_add(row.size.max(0) as u64);
        rows += 1;
        heads[i] = next_row(tx, &mut cursors[i])?;
    }
    ranges.extend(picked.into_iter().flatten());
    Ok((bytes, rows))
}

/// Picks whole head segments oldest-first (lowest segment id, i.e.
/// arrival order) across `streams` until `want` accounted bytes or
/// [`CHUNK_MAX_SEGMENTS`] segments are reached. Memory is O(streams): one
/// cursor per stream. Returns (bytes, records, whether the segment cap
/// stopped it: the streams may hold more).
fn pick_segments(
    tx: &Tx<'_>,
    streams: &[StreamRow],
    want: u64,
    ranges: &mut Vec<Range>,
) -> Result<(u64, usize, bool), BufferError> {
    let mut cursors = Vec::with_capacity(streams.len());
    let mut heads = Vec::with_capacity(streams.len());
    for s in streams {
        let mut c = tx.segments_after(s.id, 0)?;
        heads.push(c.next()?);
        cursors.push(c);
    }
    let mut picked: Vec<Option<Range>> = streams.iter().map(|_| None).collect();
    let (mut bytes, mut rows, mut segments) = (0u64, 0usize, 0usize);
    while bytes < want && segments < CHUNK_MAX_SEGMENTS {
        let oldest = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|row| (row.id, i)))
            .min();
        let Some((_, i)) = oldest else {
            break;
        };
        let Some(row) = heads[i].take() else {
            break;
        };
        let last = tx.last_pending(&row)?;
        let span = (row.head_seq, last, row.pending, row.size);
        bytes = bytes.saturating_add(row.size.max(0) as u64);
        rows += row.pending.max(0) as usize;
        segments += 1;
        Range::take_segment(&mut picked[i], &streams[i], span, (row, None));
        heads[i] = cursors[i].next()?;
    }
    ranges.extend(picked.into_iter().flatten());
    Ok((bytes, rows, segments >= CHUNK_MAX_SEGMENTS))
}

/// Removes the records of a chosen segment range and counts them as
/// evicted.
fn delete_segments(tx: &Tx<'_>, r: Range, counters: &mut Counters) -> Result<(), BufferError> {
    let mut taken = 0i64;
    for (mut row, seqs) in r.segments {
        match seqs {
            None => {
                tx.delete_segment(row.id)?;
                counters
                    .stream(row.stream)
                    .evicted(row.pending, row.size, true);
                taken += row.pending;
            }
            Some(seqs) => {
                let n = tx
                    .take_from(&mut row, &seqs, Taking::Lost, counters)?
                    .indexes
                    .len() as i64;
                // `take_from` took them off the pending counters.
                counters.stream(row.stream).evicted(n, 0, false);
                taken += n;
            }
        }
    }
    if taken != r.count {
        return Err(tx.corrupt(format!(
            "evicting seq {}..={} of {}/{}: expected {} records, took {taken}",
            r.first_seq, r.last_seq, r.stream.key.connection, r.stream.key.kind, r.count
        )));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct HeadRow {
    id: i64,
    seq: i64,
    size: i64,
}

fn next_row(tx: &Tx<'_>, rows: &mut rusqlite::Rows) -> Result<Option<HeadRow>, BufferError> {
    let e = tx.err();
    match rows.next().map_err(&e)? {
        Some(row) => Ok(Some(HeadRow {
            id: row.get(0).map_err(&e)?,
            seq: row.get(1).map_err(&e)?,
            size: row.get(2).map_err(&e)?,
        })),
        None => Ok(None),
    }
}

/// The `buffer.evicted` event announcing `e`. Dead letters evicted say so
/// in `reason` and name the limit that took them in `limit`.
pub(super) fn eviction_event(e: &Eviction, ts_ms: i64) -> NewRecord {
    let mut details = serde_json::json!({
        "connection": connection_value(&e.connection),
        "kind": e.kind.as_str(),
        "first_seq": e.first_seq,
        "last_seq": e.last_seq,
        "count": e.count,
        "reason": e.reason.as_str(),
    });
    if e.dead_letters {
        details["reason"] = "dead_letter".into();
        details["limit"] = e.reason.as_str().into();
    }
    agent_event(EventType::BufferEvicted, ts_ms, details)
}
