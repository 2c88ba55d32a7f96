//! Segments whose data no longer decodes (a flipped bit on the disk, a
//! torn write the filesystem did not own up to): SQLite's own checks do
//! not read blob contents, the segment's zstd checksum does. The service
//! drops such a segment and announces its pending records as evicted
//! (reason `damaged`, exact stream and seq range, counted like any
//! eviction), so one bad segment costs its own records and never wedges
//! its stream or the uplink. A tool (`plantgate buffer ...`) only reports
//! it: the file belongs to the service.

use super::evict::eviction_event;
use super::insert::insert_records;
use super::tx::Counters;
use super::Store;
use crate::buffer::{BufferError, Eviction, EvictionReason};
use crate::record::now_ms;

/// Damaged segments one operation gets past before it gives up: more than
/// this many at once is a dying disk, reported as the error it is.
const MAX_REPAIRS: usize = 16;

impl Store {
    /// Runs `op`, dropping each damaged segment it runs into and trying
    /// again (the service only).
    pub(super) fn repairing<T>(
        &mut self,
        mut op: impl FnMut(&mut Store) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        let mut repairs = 0;
        loop {
            let result = op(self);
            if !self.repaired(&result, &mut repairs)? {
                return result;
            }
        }
    }

    /// [`Store::repairing`] for the operations that only read.
    pub(super) fn repairing_ref<T>(
        &self,
        mut op: impl FnMut(&Store) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        let mut repairs = 0;
        loop {
            let result = op(self);
            if !self.repaired(&result, &mut repairs)? {
                return result;
            }
        }
    }

    /// Drops the damaged segment `result` names, if it names one and the
    /// store may; true when the operation should run again.
    fn repaired<T>(
        &self,
        result: &Result<T, BufferError>,
        repairs: &mut usize,
    ) -> Result<bool, BufferError> {
        match result {
            Err(BufferError::Damaged {
                segment, detail, ..
            }) if self.repairs && *repairs < MAX_REPAIRS => {
                self.drop_damaged(*segment, detail)?;
                *repairs += 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Deletes the segment and, in the same transaction, counts its pending
    /// records as evicted and appends their `buffer.evicted` event.
    fn drop_damaged(&self, segment: i64, detail: &str) -> Result<(), BufferError> {
        let dropped = self.commit_with("drop damaged segment", |tx| {
            let Some(row) = tx.segment_by_id(segment)? else {
                return Ok(None);
            };
            let Some(stream) = tx.streams(false)?.into_iter().find(|s| s.id == row.stream) else {
                return Err(tx.corrupt(format!(
                    "segment {segment} of unknown stream {}",
                    row.stream
                )));
            };
            tx.delete_segment(segment)?;
            let mut counters = Counters::default();
            if row.pending == 0 {
                // Kept history, all delivered: nothing to announce.
                counters.stream(row.stream).unkept(row.kept, row.size, true);
                counters.write(tx)?;
                return Ok(None);
            }
            counters
                .stream(row.stream)
                .evicted(row.pending, row.size, true);
            counters.write(tx)?;
            // The last pending seq is in the data that cannot be read: the
            // range runs to the end of the segment (records of it already
            // delivered are not pending, so the range still names exactly
            // what is lost).
            let eviction = Eviction {
                connection: stream.key.connection,
                kind: stream.key.kind,
                first_seq: row.head_seq as u64,
                last_seq: row.last_seq as u64,
                count: row.pending as u64,
                bytes: row.size as u64,
                reason: EvictionReason::Damaged,
                dead_letters: false,
            };
            insert_records(tx, &[eviction_event(&eviction, now_ms())])?;
            Ok(Some(eviction))
        })?;
        if let Some(e) = dropped {
            tracing::error!(path = %self.path.display(), segment, %detail,
                connection = %e.connection, kind = %e.kind, first_seq = e.first_seq,
                last_seq = e.last_seq, count = e.count,
                "buffer segment damaged on disk: its records are dropped and announced");
        }
        Ok(())
    }
}
