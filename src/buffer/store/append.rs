//! Accepting records: seqs assigned in the transaction that inserts the rows
//! (invariant 1), profile snapshots committed with the records they go with,
//! and eviction along the lanes when the rows do not fit.

use rusqlite::{params, OptionalExtension};

use super::evict::{Lane, CHUNK_MIN_BYTES};
use super::insert::Prepared;
use super::tx::{OnFull, Tx};
use super::{is_sqlite_full, Store};
use crate::buffer::{Append, AppendReport, BufferError, EvictionReason, ProfileState};
use crate::record::now_ms;

/// Evict-and-retry rounds for one append that hits the hard wall. Each
/// round frees at least twice what the append needs; more rounds than this
/// means something other than space is wrong.
const MAX_FULL_RETRIES: usize = 8;

impl Store {
    /// Accepts `input.records` and stores `input.states` in one transaction:
    /// all of it is committed or none. A profile's records and the snapshot
    /// saying it produced them therefore commit together, so a restart
    /// neither repeats nor loses a derived record; with no records only the
    /// states are written (the shutdown snapshot).
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
        if input.records.is_empty() && input.states.is_empty() {
            return Ok(report);
        }
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
            match self.insert(&prepared, input.states) {
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
    ) -> Result<Vec<u64>, BufferError> {
        self.write("append", OnFull::Pass, |tx| {
            let seqs = prepared.insert(tx)?;
            upsert_states(tx, states)?;
            Ok(seqs)
        })
    }
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
