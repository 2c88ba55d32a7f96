//! Accepting records: seqs assigned in the transaction that inserts the rows
//! (invariant 1), profile snapshots and tag marks committed with the records
//! they go with, and eviction along the lanes when the rows do not fit.

use rusqlite::{params, OptionalExtension};

use super::evict::{Lane, CHUNK_MIN_BYTES};
use super::insert::Prepared;
use super::tx::{OnFull, Tx};
use super::{is_sqlite_full, Store};
use crate::buffer::{Append, AppendReport, BufferError, EvictionReason, ProfileState, TagMark};
use crate::record::now_ms;

/// Evict-and-retry rounds for one append that hits the hard wall. Each
/// round frees at least twice what the append needs; more rounds than this
/// means something other than space is wrong.
const MAX_FULL_RETRIES: usize = 8;

impl Store {
    /// Accepts `input.records` and stores `input.states` and `input.marks`
    /// in one transaction: all of it is committed or none. A profile's
    /// records and the snapshot saying it produced them therefore commit
    /// together, so a restart neither repeats nor loses a derived record;
    /// likewise a tag's values and the mark saying how far they reach, so
    /// backfill after a restart never emits a value twice. With no records
    /// only the states and marks are written (the shutdown snapshot).
    ///
    /// The report holds the seqs in input order and the evictions made to
    /// fit the records, in commit order. Those evictions are committed (each
    /// with its `buffer.evicted` event) even when the append itself then
    /// fails with [`BufferError::Full`], which means nothing was accepted
    /// and nothing was left to evict.
    pub fn append(&mut self, input: Append<'_>) -> Result<AppendReport, BufferError> {
        self.repairing(|s| s.append_once(input))
    }

    fn append_once(&mut self, input: Append<'_>) -> Result<AppendReport, BufferError> {
        let mut report = AppendReport::default();
        if input.records.is_empty() && input.states.is_empty() && input.marks.is_empty() {
            return Ok(report);
        }
        let marks = encode_marks(input.marks).map_err(|e| self.corrupt(e))?;
        // Encoded once, before the write lock is taken, for every round below.
        let prepared = {
            let mut segs = self.segments.borrow_mut();
            Prepared::new(&mut segs.codec, input.records)
                .map_err(|e| self.corrupt(format!("cannot encode records: {e}")))?
        };
        let incoming = prepared.bytes();
        if let Err(e) = self.relieve_pressure(incoming, &mut report.evicted) {
            if !e.is_disk_full() {
                return Err(e);
            }
            // The hard wall below still holds; relief is only an early start.
            tracing::debug!(error = %e, "proactive eviction hit the wall");
        }
        let mut want = incoming.saturating_mul(2).max(CHUNK_MIN_BYTES);
        let mut last_reason = EvictionReason::MaxSize;
        for _ in 0..=MAX_FULL_RETRIES {
            match self.insert(&prepared, input.states, &marks) {
                Ok(seqs) => {
                    report.seqs = seqs;
                    report.stored_bytes = incoming;
                    self.flush_disk_error();
                    return Ok(report);
                }
                Err(e) if is_sqlite_full(&e) => {
                    let reason = self.on_full(incoming)?;
                    last_reason = reason;
                    let freed = match self.evict(Lane::Any, want, reason, &mut report.evicted) {
                        Ok(freed) => freed,
                        Err(e) if e.is_disk_full() => 0,
                        Err(e) => return Err(e),
                    };
                    if freed == 0 {
                        break;
                    }
                    want = want.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
        Err(BufferError::Full {
            path: self.path.clone(),
            reason: last_reason,
            records: input.records.len(),
        })
    }

    /// The last stored profile snapshot of `connection`, if any.
    pub fn profile_state(&self, connection: &str) -> Result<Option<String>, BufferError> {
        self.conn
            .prepare_cached("SELECT snapshot FROM profile_state WHERE connection = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![connection], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("profile state"))
    }

    /// Every stored mark of `connection`, ordered by tag. A mark whose gaps
    /// no longer parse comes back with none (and a warning) rather than
    /// failing the load: losing a gap costs a hole in the history, failing
    /// here would stop the connection altogether.
    pub fn tag_marks(&self, connection: &str) -> Result<Vec<TagMark>, BufferError> {
        let e = self.err("tag marks");
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT tag, last_ms, gaps FROM tag_marks WHERE connection = ?1 ORDER BY tag",
            )
            .map_err(&e)?;
        let rows = stmt
            .query_map(params![connection], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .map_err(&e)?;
        let mut marks = Vec::new();
        for row in rows {
            let (tag, last_ms, text) = row.map_err(&e)?;
            let gaps = serde_json::from_str(&text).unwrap_or_else(|error| {
                tracing::warn!(%connection, %tag, %error, gaps = %text,
                    "stored backfill gaps do not parse; the tag's gaps are forgotten");
                Vec::new()
            });
            marks.push(TagMark {
                connection: connection.to_string(),
                tag,
                last_ms,
                gaps,
            });
        }
        Ok(marks)
    }

    /// The Sparkplug `bdSeq` of the next MQTT session (docs/sparkplug.md):
    /// 0 the first time, then one more than the last one handed out,
    /// modulo 256. Kept in the file, so a restarted agent goes on from the
    /// last session's value as the specification asks.
    pub fn next_bd_seq(&mut self) -> Result<u8, BufferError> {
        let v: i64 = self
            .conn
            .query_row(
                "INSERT INTO meta (key, value) VALUES ('sparkplug_bd_seq', '0') \
                 ON CONFLICT (key) DO UPDATE SET value = (CAST(value AS INTEGER) + 1) % 256 \
                 RETURNING CAST(value AS INTEGER)",
                [],
                |row| row.get(0),
            )
            .map_err(self.err("sparkplug bdSeq"))?;
        Ok(u8::try_from(v.rem_euclid(256)).unwrap_or(0))
    }

    /// One attempt, no eviction: `SQLITE_FULL` comes back as it is.
    pub(super) fn insert(
        &mut self,
        prepared: &Prepared<'_>,
        states: &[ProfileState],
        marks: &[EncodedMark<'_>],
    ) -> Result<Vec<u64>, BufferError> {
        self.write("append", OnFull::Pass, |tx| {
            let seqs = prepared.insert(tx)?;
            upsert_states(tx, states)?;
            upsert_marks(tx, marks)?;
            Ok(seqs)
        })
    }
}

/// A mark with its gaps as the JSON text stored, encoded once before the
/// write lock is taken (an append may be retried several times).
pub(super) struct EncodedMark<'a> {
    mark: &'a TagMark,
    gaps: String,
}

fn encode_marks(marks: &[TagMark]) -> Result<Vec<EncodedMark<'_>>, String> {
    marks
        .iter()
        .map(|mark| {
            serde_json::to_string(&mark.gaps)
                .map(|gaps| EncodedMark { mark, gaps })
                .map_err(|e| format!("cannot encode the gaps of tag {:?}: {e}", mark.tag))
        })
        .collect()
}

/// In input order, so the last mark of a (connection, tag) is the one kept.
fn upsert_marks(tx: &Tx<'_>, marks: &[EncodedMark<'_>]) -> Result<(), BufferError> {
    if marks.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut upsert = tx.stmt(
        "INSERT INTO tag_marks (connection, tag, last_ms, gaps, updated_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (connection, tag) DO UPDATE SET last_ms = excluded.last_ms, \
         gaps = excluded.gaps, updated_ms = excluded.updated_ms",
    )?;
    for EncodedMark { mark, gaps } in marks {
        upsert
            .execute(params![mark.connection, mark.tag, mark.last_ms, gaps, now])
            .map_err(tx.err())?;
    }
    Ok(())
}

fn upsert_states(tx: &Tx<'_>, states: &[ProfileState]) -> Result<(), BufferError> {
    if states.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut upsert = tx.stmt(
        "INSERT INTO profile_state (connection, snapshot, updated_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (connection) DO UPDATE SET snapshot = excluded.snapshot, \
         updated_ms = excluded.updated_ms",
    )?;
    for state in states {
        upsert
            .execute(params![state.connection, state.snapshot, now])
            .map_err(tx.err())?;
    }
    Ok(())
}
