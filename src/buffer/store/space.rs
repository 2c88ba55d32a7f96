//! How much disk the buffer may take (invariants 9 and 10): `max_size` as
//! SQLite pragmas, the disk reserve, and telling the size cap from a full
//! filesystem when SQLite answers `SQLITE_FULL`.

use super::insert::Prepared;
use super::{agent_event, sidecar, Store};
use crate::buffer::{BufferError, EvictionReason, Limits};
use crate::record::{now_ms, EventType};

/// `max_page_count` accepted by SQLite as "no limit".
const UNLIMITED_PAGES: u64 = 4_294_967_294;
/// Fewest pages the main file is allowed: the schema alone takes about ten.
const MIN_DB_PAGES: u64 = 24;

impl Store {
    /// Changes the limits of this connection. A smaller `max_size` takes
    /// effect through eviction at the next append; the file itself does not
    /// shrink (free pages are reused).
    pub fn set_limits(&mut self, limits: Limits) -> Result<(), BufferError> {
        self.limits = limits;
        self.disk_cap_pages = None;
        self.apply_limits()
    }

    /// Translates `limits.max_size` into pragmas (invariant 9): a quarter of
    /// the budget (at most 64 MiB) for the WAL, the disk reserve (service
    /// only), the rest for the main file. The reserve is part of the budget:
    /// `max_size` bounds everything the buffer takes on disk.
    pub(super) fn apply_limits(&mut self) -> Result<(), BufferError> {
        let ps = self.page_size;
        // Room for one checkpoint of a full WAL share plus an eviction
        // transaction: what it takes to get out of a full disk.
        let reserve_pages = |autocheckpoint: u64| 2 * autocheckpoint + (256 * 1024) / ps;
        let (cap, autocheckpoint, journal_limit) = if self.limits.max_size == u64::MAX {
            self.reserve_bytes = reserve_pages(1000) * ps;
            (None, 1000, 64 * 1024 * 1024)
        } else {
            let total = self.limits.max_size / ps;
            let wal = (total / 4).clamp(16, 16_384);
            // Checkpoint early and truncate the WAL to half its share, so
            // the frames since the last reset plus one transaction fit.
            let autocheckpoint = (wal / 4).max(2);
            // A small buffer gets a smaller reserve rather than no room;
            // a tiny one (the main file at its minimum) none.
            let reserve = if self.keep_reserve {
                reserve_pages(autocheckpoint)
                    .min(total / 8)
                    .min(total.saturating_sub(wal + MIN_DB_PAGES))
            } else {
                0
            };
            self.reserve_bytes = reserve * ps;
            let db = total.saturating_sub(wal + reserve).max(MIN_DB_PAGES);
            (Some(db), autocheckpoint, (wal / 2) * ps)
        };
        self.size_cap_pages = cap;
        self.set_page_cap(self.cap_pages())?;
        let e = self.err("apply limits");
        self.conn
            .query_row(
                &format!("PRAGMA wal_autocheckpoint = {autocheckpoint}"),
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&e)?;
        self.conn
            .query_row(
                &format!("PRAGMA journal_size_limit = {journal_limit}"),
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&e)?;
        Ok(())
    }

    /// Makes sure `buffer.db.reserve` exists with `reserve_bytes` of real
    /// (not sparse) blocks. In WAL mode a full disk is a trap: the
    /// checkpoint cannot grow the main file, so the WAL cannot restart, so
    /// not even a DELETE can commit. Releasing the reserve on the first
    /// `SQLITE_FULL` gives the checkpoint and the eviction the room they
    /// need. Best effort: a disk too full to hold it simply has none.
    pub(super) fn ensure_reserve(&self) {
        if !self.keep_reserve {
            return;
        }
        let path = sidecar(&self.path, ".reserve");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= self.reserve_bytes) {
            return;
        }
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&path)?;
            let zeros = vec![0u8; 64 * 1024];
            let mut left = self.reserve_bytes;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        })();
        if let Err(e) = written {
            // A partial reserve would compete with the database for the
            // last free blocks.
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), error = %e, "cannot create the buffer's disk reserve");
        }
    }

    /// Deletes the reserve file; true if there was one.
    fn release_reserve(&self) -> bool {
        let path = sidecar(&self.path, ".reserve");
        let released = std::fs::remove_file(&path).is_ok();
        if released {
            tracing::warn!(path = %path.display(), "disk full: released the buffer's disk reserve");
        }
        released
    }

    /// The binding page cap: the configured size or, after the disk filled,
    /// the size the file had then.
    pub(super) fn cap_pages(&self) -> Option<u64> {
        match (self.size_cap_pages, self.disk_cap_pages) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Reason to give for evictions forced by the current cap.
    pub(super) fn cap_reason(&self) -> EvictionReason {
        match (self.size_cap_pages, self.disk_cap_pages) {
            (Some(size), Some(disk)) if disk < size => EvictionReason::DiskFull,
            (None, Some(_)) => EvictionReason::DiskFull,
            _ => EvictionReason::MaxSize,
        }
    }

    /// Sets SQLite's `max_page_count` (`None` = unlimited).
    pub(super) fn set_page_cap(&self, pages: Option<u64>) -> Result<(), BufferError> {
        let pages = pages.unwrap_or(UNLIMITED_PAGES);
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(self.err("apply limits"))?;
        Ok(())
    }

    /// Forgets a disk-full cap (invariant 10) so that space the disk got
    /// back is used again; the next `SQLITE_FULL` sets it anew.
    pub(super) fn lift_disk_cap(&mut self) -> Result<(), BufferError> {
        if self.disk_cap_pages.take().is_some() {
            tracing::info!(path = %self.path.display(), "retrying to grow the buffer after a full disk");
            self.apply_limits()?;
            self.ensure_reserve();
        }
        Ok(())
    }

    /// Pages an append of `bytes` accounted bytes may need. Rows cost more
    /// than their accounted size on pages (fill factor, index, interior
    /// pages, overflow chains): assume half again, plus two.
    pub(super) fn pages_for(&self, bytes: u64) -> u64 {
        bytes.saturating_mul(3) / 2 / self.page_size + 2
    }

    /// (page_count, freelist_count): pages of the database and how many of
    /// them are free for reuse. Both read page 1 only.
    pub(super) fn page_usage(&self) -> Result<(u64, u64), BufferError> {
        let e = self.err("page usage");
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(&e)?;
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .map_err(&e)?;
        Ok((pages.max(0) as u64, free.max(0) as u64))
    }

    /// An insert hit `SQLITE_FULL`: decides whether that was
    /// `max_page_count` or the filesystem, and in the latter case holds the
    /// file at its current size so freed pages get reused (invariant 10).
    pub(super) fn on_full(&mut self, incoming: u64) -> Result<EvictionReason, BufferError> {
        let (pages, _) = self.page_usage()?;
        if let Some(cap) = self.cap_pages() {
            // The failed transaction was rolled back, so the count is what
            // it was before: if the append could have needed the pages up to
            // the cap, the cap refused it. (Counted generously: calling a
            // full disk "max_size" only mislabels the eviction, while the
            // other way round would freeze the file below its limit.)
            if pages + self.pages_for(incoming) >= cap {
                return Ok(self.cap_reason());
            }
        }
        tracing::warn!(path = %self.path.display(), pages,
            "filesystem full below buffer.max_size; holding the buffer at its current size");
        if self.disk_cap_pages.is_none() {
            let max_size = self.limits.max_size;
            self.pending_disk_error = Some(agent_event(
                EventType::SystemError,
                now_ms(),
                serde_json::json!({
                    "message": "disk full: the buffer is held at its current size and evicts per the priority lanes",
                    "path": self.path.display().to_string(),
                    "buffer_bytes": pages.saturating_mul(self.page_size),
                    "max_size": max_size,
                }),
            ));
        }
        self.release_reserve();
        self.disk_cap_pages = Some(pages.max(MIN_DB_PAGES));
        self.apply_limits()?;
        // Let the WAL restart from its beginning, reusing the space it has.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
        Ok(EvictionReason::DiskFull)
    }

    /// Stores the pending disk-full `system.error`, if any; keeps it pending
    /// while even that small insert does not fit.
    pub(super) fn flush_disk_error(&mut self) {
        if let Some(ev) = self.pending_disk_error.take() {
            let records = std::slice::from_ref(&ev);
            let prepared = Prepared::new(&mut self.segments.borrow_mut().codec, records);
            let stored = match prepared {
                Ok(prepared) => self.insert(&prepared, &[], &[]).is_ok(),
                Err(_) => false,
            };
            if !stored {
                self.pending_disk_error = Some(ev);
            }
        }
    }
}
