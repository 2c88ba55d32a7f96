//! The connection's driver: one task that hands tag records to the buffer's
//! outlet (through the reporter) and runs the profile (publishes, ticks, connection changes, answers to
//! its reads). One task owns the profile, so its inputs are applied in the
//! order the session produced them. Records and the snapshot after them go
//! out together, so they commit in one transaction.
//!
//! The driver performs no OPC UA call itself: the profile's reads go to the
//! live session as [`ReadRequest`]s and come back as [`Feed::ReadDone`],
//! in order with the values around them.

use tokio::sync::mpsc;

use super::backfill::Backfill;
use super::feed::{Feed, FeedRx};
use super::reporter::ConnectionReporter;
use crate::config::ConnectionConfig;
use crate::profile::{Output, Profile, ReadRequest};
use crate::record::{now_ms, NewRecord};

/// How often the profile gets a clock tick (OEE windows close on ticks).
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Builds the connection's profile (None for a generic connection: tags
/// only, nothing to derive or persist) and restores its saved snapshot. A
/// snapshot that cannot be used is logged and ignored: the profile starts
/// fresh, which at worst repeats an event already reported (at-least-once).
pub(super) fn restored_profile(conn: &ConnectionConfig, saved: Option<&str>) -> Option<Profile> {
    let mut profile = Profile::new(conn)?;
    if let Some(text) = saved {
        let result = serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| crate::profile::SnapshotError::Malformed(e.to_string()))
            .and_then(|snapshot| profile.restore(&snapshot));
        if let Err(e) = result {
            tracing::warn!(connection = %conn.id, error = %e, "saved profile state not usable; starting fresh");
            return Profile::new(conn);
        }
    }
    Some(profile)
}

struct Driver {
    reporter: ConnectionReporter,
    profile: Option<Profile>,
    /// To the live session, which performs the reads.
    reads: mpsc::UnboundedSender<ReadRequest>,
    /// Whether a session is up: reads asked for without one are dropped
    /// (the profile asks again after the next `on_connected`).
    connected: bool,
    pending: Vec<NewRecord>,
    /// Whether the profile produced something since the last hand-over.
    dirty: bool,
    /// With `backfill = "history"`: the tags' marks, committed with the
    /// records they describe, and the gaps read back.
    backfill: Option<Backfill>,
    /// Rounds read back in the pending records: their readers wait until
    /// they are handed over.
    acks: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// Runs until the connection stops ([`Feed::Stop`] or every sender gone).
pub(super) async fn drive(
    mut rx: FeedRx,
    reads: mpsc::UnboundedSender<ReadRequest>,
    reporter: ConnectionReporter,
    profile: Option<Profile>,
    backfill: Option<Backfill>,
) {
    let mut d = Driver {
        reporter,
        profile,
        reads,
        connected: false,
        pending: Vec::new(),
        dirty: false,
        backfill,
        acks: Vec::new(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = false;
    while !stop {
        // One feed at a time, handed over at once: the buffer worker
        // gathers what queues up into its transactions.
        tokio::select! {
            feed = rx.recv() => match feed {
                None | Some(Feed::Stop) => stop = true,
                Some(feed) => d.apply(feed),
            },
            _ = tick.tick(), if d.profile.is_some() => {
                if let Some(out) = d.profile.as_mut().map(|p| p.on_tick(now_ms())) {
                    d.output(out);
                }
            }
        }
        // At the stop, the snapshot goes out even when nothing changed: a
        // restart continues exactly where this run stopped.
        d.hand_over(stop).await;
    }
}

impl Driver {
    fn apply(&mut self, feed: Feed) {
        let out = match (feed, self.profile.as_mut()) {
            (
                Feed::Publish {
                    records,
                    samples,
                    tags,
                },
                p,
            ) => {
                match self.backfill.as_mut() {
                    Some(b) => self.pending.extend(b.live(records, &tags)),
                    None => self.pending.extend(records),
                }
                match p {
                    Some(p) if !samples.is_empty() => p.on_values(&samples),
                    _ => return,
                }
            }
            (Feed::Connected { at_ms, backfill }, p) => {
                self.connected = true;
                if let Some(b) = self.backfill.as_mut() {
                    b.connected(backfill);
                }
                match p {
                    Some(p) => p.on_connected(at_ms),
                    None => return,
                }
            }
            (Feed::Disconnected { at_ms }, p) => {
                self.connected = false;
                if let Some(b) = self.backfill.as_mut() {
                    b.disconnected();
                }
                match p {
                    Some(p) => p.on_disconnected(at_ms),
                    None => return,
                }
            }
            (Feed::ReadDone { id, results }, Some(p)) => p.on_read(id, &results),
            (Feed::Backfill(round), _) => {
                match self.backfill.as_mut() {
                    Some(b) => {
                        let (records, ack) = b.round(round);
                        self.pending.extend(records);
                        self.acks.push(ack);
                    }
                    // No reader exists without backfill; answer anyway.
                    None => {
                        let _ = round.ack.send(());
                    }
                }
                return;
            }
            // Handled by `drive`, which ends on it; answers without a
            // profile cannot happen.
            (Feed::Stop | Feed::ReadDone { .. }, _) => return,
        };
        self.output(out);
    }

    /// Takes an output's records and passes its reads to the session.
    fn output(&mut self, out: Output) {
        if out.is_empty() {
            return;
        }
        self.dirty = true;
        self.pending.extend(out.records);
        for request in out.reads {
            let id = request.id;
            if !self.connected || self.reads.send(request).is_err() {
                tracing::debug!(
                    connection = self.reporter.id(),
                    request = id,
                    "profile read dropped: no session"
                );
            }
        }
    }

    /// Sends the pending records, with the profile's snapshot when the
    /// profile changed (or at the stop) and the tags' marks that changed:
    /// one submission, one transaction.
    async fn hand_over(&mut self, stop: bool) {
        let records = std::mem::take(&mut self.pending);
        let with_state = std::mem::take(&mut self.dirty) || stop;
        let state = match &self.profile {
            Some(p) if with_state => Some(p.snapshot().to_string()),
            _ => None,
        };
        let marks = self
            .backfill
            .as_mut()
            .map(Backfill::take_marks)
            .unwrap_or_default();
        self.reporter.submit(records, state, marks).await;
        for ack in self.acks.drain(..) {
            let _ = ack.send(());
        }
    }
}
