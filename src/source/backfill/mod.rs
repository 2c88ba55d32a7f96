//! Backfill (docs/backfill.md): after a gap, a connection with `backfill =
//! "history"` reads what it missed from the server's history.
//!
//! - `marks`: what was accepted per tag and which gaps are owed (pure);
//! - `reader`: the session's task that reads gaps with HistoryRead;
//! - `round`: what the two pass each other through the feed;
//! - this file: the driver's side. [`Backfill`] sees every value the driver
//!   hands to the buffer: a tag's first live value of a session opens its
//!   gap and sends it to the session's reader; the values read back are
//!   checked against the marks, so none is emitted twice. A run (the gaps
//!   asked for since the reader was last idle) ends with a
//!   `backfill.completed` event, and `/status` and `/metrics` follow it.

pub(crate) mod marks;
pub(crate) mod reader;
pub(crate) mod round;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use crate::buffer::TagMark;
use crate::config::{Backfill as Mode, ConnectionConfig};
use crate::record::{format_ts, now_ms, EventType, NewRecord};
use crate::source::reporter::ConnectionReporter;
use crate::source::value::TagMeta;

use marks::{Gap, Marks, Taken};
use round::{End, Round, Work, WorkTx};

/// The driver's backfill state for one connection.
pub(crate) struct Backfill {
    marks: Marks,
    /// The current session's reader (None between sessions).
    work: Option<WorkTx>,
    run: Option<Run>,
    reporter: ConnectionReporter,
}

/// The gaps asked for since the reader was last idle.
struct Run {
    started: Instant,
    from_ms: i64,
    to_ms: i64,
    records: u64,
    skipped: u64,
    not_read_ms: u64,
    without_history: BTreeSet<String>,
    /// Gaps asked for and not finished: (tag, gap end).
    outstanding: HashSet<(String, i64)>,
}

impl Backfill {
    /// None for a connection with `backfill = "off"`. `stored` are the
    /// marks the buffer holds for the connection (`Store::tag_marks`).
    pub(crate) fn new(
        conn: &ConnectionConfig,
        stored: Vec<TagMark>,
        reporter: ConnectionReporter,
    ) -> Option<Backfill> {
        if conn.backfill == Mode::Off {
            return None;
        }
        let tags: HashSet<String> = conn.tags.iter().map(|t| t.name.clone()).collect();
        let marks = Marks::load(&conn.id, conn.backfill_max, stored, &tags);
        let b = Backfill {
            marks,
            work: None,
            run: None,
            reporter,
        };
        b.publish_status();
        Some(b)
    }

    /// A session is up with this reader: every tag's next value opens its gap.
    pub(crate) fn connected(&mut self, work: Option<WorkTx>) {
        self.marks.session_started();
        self.work = work;
    }

    pub(crate) fn disconnected(&mut self) {
        self.work = None;
    }

    /// Live tag records and their tags (same order): the value accepted last
    /// already is left out, a tag's first value of the session opens its
    /// gap. Returns the records to hand over.
    pub(crate) fn live(
        &mut self,
        records: Vec<NewRecord>,
        tags: &[Arc<TagMeta>],
    ) -> Vec<NewRecord> {
        if tags.len() != records.len() {
            // Not values of the server's (bad-tag records): no marks.
            return records;
        }
        let mut out = Vec::with_capacity(records.len());
        for (record, tag) in records.into_iter().zip(tags) {
            let live = self.marks.live(&tag.name, record.ts_ms);
            if live.not_read_ms > 0 {
                tracing::warn!(connection = self.reporter.id(), tag = %tag.name,
                    not_read_s = live.not_read_ms / 1000, "gap longer than backfill_max: its older part is not read back");
                self.run_mut().not_read_ms += live.not_read_ms;
                let n = live.not_read_ms;
                self.reporter.backfill_status(|b| b.not_read_ms_total += n);
            }
            for gap in live.read {
                self.ask(tag, gap);
            }
            if !live.duplicate {
                out.push(record);
            }
        }
        out
    }

    /// Sends a gap to the session's reader; without one (or if it is gone)
    /// the gap waits for the tag's first value on the next session.
    fn ask(&mut self, tag: &Arc<TagMeta>, gap: Gap) {
        let Some(work) = &self.work else {
            return;
        };
        let sent = work.send(Work {
            tag: tag.clone(),
            gap,
        });
        if sent.is_err() {
            self.work = None;
            return;
        }
        let run = self.run_mut();
        run.from_ms = run.from_ms.min(gap.from_ms);
        run.to_ms = run.to_ms.max(gap.to_ms);
        run.outstanding.insert((tag.name.clone(), gap.to_ms));
        self.publish_status();
    }

    fn run_mut(&mut self) -> &mut Run {
        self.run.get_or_insert_with(|| Run {
            started: Instant::now(),
            from_ms: i64::MAX,
            to_ms: i64::MIN,
            records: 0,
            skipped: 0,
            not_read_ms: 0,
            without_history: BTreeSet::new(),
            outstanding: HashSet::new(),
        })
    }

    /// A round read back: the records to hand over (values the marks do not
    /// take are counted, never emitted) and, when the run is complete, its
    /// `backfill.completed` event. The round's `ack` goes back to the
    /// reader once they are handed over ([`Round::ack`]).
    pub(crate) fn round(
        &mut self,
        round: Round,
    ) -> (Vec<NewRecord>, tokio::sync::oneshot::Sender<()>) {
        let Round { chunks, ack } = round;
        let mut out = Vec::new();
        let (mut skipped, mut restarts, mut without) = (0u64, 0u64, 0u64);
        for chunk in chunks {
            skipped += chunk.skipped;
            restarts += u64::from(chunk.restarted);
            for record in chunk.records {
                match self
                    .marks
                    .backfilled(&chunk.tag.name, chunk.to_ms, record.ts_ms)
                {
                    Taken::Yes => out.push(record),
                    Taken::No => skipped += 1,
                }
            }
            let finished = match &chunk.end {
                End::More => false,
                End::Done => true,
                End::NoHistory(why) => {
                    tracing::warn!(connection = self.reporter.id(), tag = %chunk.tag.name, reason = %why,
                        "no history to read back for this tag; its gap stays a gap");
                    without += 1;
                    self.run_mut()
                        .without_history
                        .insert(chunk.tag.name.clone());
                    true
                }
            };
            if finished {
                self.marks.gap_done(&chunk.tag.name, chunk.to_ms);
                self.run_mut()
                    .outstanding
                    .remove(&(chunk.tag.name.to_string(), chunk.to_ms));
            }
        }
        let records = out.len() as u64;
        {
            let run = self.run_mut();
            run.records += records;
            run.skipped += skipped;
        }
        self.reporter.backfill_status(|b| {
            b.records_total += records;
            b.values_skipped_total += skipped;
            b.continuation_restarts_total += restarts;
            b.tags_without_history_total += without;
        });
        if let Some(event) = self.completed() {
            out.push(event);
        }
        self.publish_status();
        (out, ack)
    }

    /// The run's event, if it is complete now.
    fn completed(&mut self) -> Option<NewRecord> {
        if !self.run.as_ref()?.outstanding.is_empty() {
            return None;
        }
        let run = self.run.take()?;
        let duration_ms = run.started.elapsed().as_millis() as u64;
        tracing::info!(
            connection = self.reporter.id(),
            records = run.records,
            tags_without_history = run.without_history.len(),
            duration_ms,
            "backfill completed"
        );
        self.reporter.backfill_status(|b| b.runs_total += 1);
        if !self.reporter.wants_event(EventType::BackfillCompleted) {
            return None;
        }
        let ts = |ms: i64| (ms != i64::MAX && ms != i64::MIN).then(|| format_ts(ms));
        Some(NewRecord::event(
            self.reporter.id(),
            EventType::BackfillCompleted,
            json!({
                "connection": self.reporter.id(),
                "from": ts(run.from_ms),
                "to": ts(run.to_ms),
                "records": run.records,
                "tags_without_history": run.without_history,
                "values_skipped": run.skipped,
                "not_read_ms": run.not_read_ms,
                "duration_ms": duration_ms,
            }),
        ))
    }

    /// The marks changed since the last hand-over, to commit with it.
    pub(crate) fn take_marks(&mut self) -> Vec<TagMark> {
        self.marks.take_changed()
    }

    fn publish_status(&self) {
        let (gaps, oldest) = self.marks.pending();
        let running = self.run.is_some();
        let behind = match (running, oldest) {
            (true, Some(from)) => u64::try_from(now_ms() - from).unwrap_or(0),
            _ => 0,
        };
        self.reporter.backfill_status(|b| {
            b.running = running;
            b.behind_ms = behind;
            b.gaps_pending = gaps;
        });
    }
}
