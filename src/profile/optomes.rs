//! OptoMES profile (docs/profiles.md): per work center, one `oee` record per
//! wall-clock-aligned window and one `downtime` record each time STATE leaves
//! DOWN.
//!
//! # OEE windows
//!
//! Windows are `[start, start + oee_window)` with `start` a multiple of the
//! window length since the epoch (so 60 s windows start on the minute, 15 min
//! windows on the quarter hour, UTC). All durations come from source
//! timestamps. Because the values of a window may still be on their way when
//! the wall clock passes its end, a window closes on the first
//! [`OptoMes::on_tick`] at or after `end + grace`, with `grace` = max(2 s,
//! 2 × publishing_interval). Until then values are queued; at close the queue
//! is applied in source-timestamp order up to the window end, so the state,
//! work order and product "in force at the window's end" are exact even when
//! the next window's first values have already arrived. A value that arrives
//! after its window closed is late: it takes effect at the start of the open
//! window (a late STATE change shifts no already reported time; late counts
//! are counted in the open window).
//!
//! Observation: the agent observes a work center while it is connected and
//! knows STATE. `on_connected(at)`/`on_disconnected(at)` are queued with the
//! values, ordered by time, so re-delivered values after a reconnect fall
//! where their source timestamps put them: counts that changed during the
//! outage only move the baseline (the parts were made while unobserved, they
//! are not put into any window), while a value older than the outage start
//! (published but lost with the session) still counts. Time in a state is
//! attributed only while observed. A window is `complete` iff it was observed
//! for its whole length; so it is false for the first window after the start
//! or a restart (observation begins at the connect), for a window that
//! overlaps an OPC UA outage, and while STATE is unknown. Its figures then
//! cover only the time observed: planned time = observed time − PLANNED_STOP
//! time (see [`super::oee`]). A window never observed at all (agent down or
//! disconnected throughout) produces no record; a window with no samples
//! while connected (an idle window) does, with the state carried over.
//!
//! Counts: GOOD_COUNT/REJECT_COUNT are cumulative; the increase is counted in
//! the window holding the new value's source timestamp; a decrease is a
//! counter reset (the increase is the new value). The first value after a
//! start is a baseline. IDEAL_CYCLE_TIME is the value in force at window end.
//!
//! # Downtime
//!
//! Tracked immediately in `on_values` (not at window close, so the record is
//! not held back for a window): DOWN starts at the source timestamp of the
//! STATE=DOWN value and ends at the one of the next STATE that is not DOWN;
//! the record has that end as `ts`. `reason` is the DOWNTIME_REASON in force
//! while down: the (non-empty) reason in force at entry, replaced by any
//! non-empty reason written before the state leaves DOWN (operators often
//! classify a stop after it began; a reason cleared at the exit is not
//! taken). Null if none. A null/Bad STATE is unknown, not an exit.
//!
//! # Persisted state
//!
//! Per work center (by name): the open downtime (start and reason), so a stop
//! that spans an agent restart is reported with its true start, and the end
//! of the last window emitted, so no window is ever emitted twice (even if
//! the clock steps back). The window in progress at a restart is not
//! continued: the window after the restart is partial (`complete: false`)
//! and covers the time observed after it.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::oee::{count_increase, figures, window_start, Observed};
use super::template::{expand, OPTOMES_DEFAULT};
use super::{
    as_f64, as_int, as_text, check_envelope, NodeKey, NodeSpec, Output, Sample, SnapshotError,
    WcParam, SNAPSHOT_VERSION,
};
use crate::config::{ConnectionConfig, ConnectionKind, OptomesConfig};
use crate::record::{format_ts, Kind, NewRecord};

/// Values queued per work center while waiting for their window to close.
/// Only reached if ticks stop coming; then the oldest are applied early and
/// the window is marked incomplete.
const MAX_PENDING: usize = 100_000;

/// If more windows than this are overdue at once (a wall clock step, a
/// stalled agent), they are skipped rather than emitted one by one.
const MAX_CATCH_UP_WINDOWS: i64 = 1_000;

const MIN_GRACE_MS: i64 = 2_000;

#[derive(Debug)]
pub struct OptoMes {
    connection: String,
    names: Vec<String>,
    nodes: Vec<NodeSpec>,
    window_ms: i64,
    grace_ms: i64,
    wcs: Vec<WorkCenter>,
    /// Arrival order of queued inputs (ties of equal time keep it).
    seq: u64,
}

#[derive(Debug, Default)]
struct WorkCenter {
    downtime: Downtime,
    oee: Windows,
}

#[derive(Debug, Default)]
struct Downtime {
    /// The DOWNTIME_REASON in force (non-empty), whatever the state.
    reason: Option<String>,
    down: Option<Down>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Down {
    since_ms: i64,
    reason: Option<String>,
}

#[derive(Debug, Default)]
struct Windows {
    /// Start of the window accumulating; set on the first tick or connect.
    open: Option<i64>,
    acc: Observed,
    /// Inputs were applied early (queue overflow): figures unreliable.
    lossy: bool,
    /// Never emit a window ending at or before this (persisted).
    last_closed_end: Option<i64>,
    connected: bool,
    /// Time attributed so far; Some iff observing (connected, STATE known).
    cursor: Option<i64>,
    state: Option<String>,
    work_order: Option<String>,
    product: Option<String>,
    ideal_cycle_time: Option<f64>,
    last_good: Option<u64>,
    last_reject: Option<u64>,
    pending: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    t: i64,
    rank: u8,
    seq: u64,
    input: Input,
}

#[derive(Debug)]
enum Input {
    Connected,
    Disconnected,
    Value(WcParam, Value),
}

impl Input {
    /// At equal times: a connect before the values, a disconnect after them.
    fn rank(&self) -> u8 {
        match self {
            Input::Connected => 0,
            Input::Value(..) => 1,
            Input::Disconnected => 2,
        }
    }
}

/// A closed window, ready to become a record.
struct Closed {
    start: i64,
    end: i64,
    observed: Observed,
    complete: bool,
    state: Option<String>,
    work_order: Option<String>,
    product: Option<String>,
    ideal_cycle_time: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    v: u64,
    kind: String,
    work_centers: BTreeMap<String, WcSnapshot>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct WcSnapshot {
    down: Option<Down>,
    last_closed_end: Option<i64>,
}

impl OptoMes {
    pub fn new(conn: &ConnectionConfig, cfg: &OptomesConfig) -> OptoMes {
        let template = cfg.node_template.as_deref().unwrap_or(OPTOMES_DEFAULT);
        let mut nodes = Vec::new();
        for (w, wc) in cfg.work_centers.iter().enumerate() {
            for param in WcParam::ALL {
                nodes.push(NodeSpec {
                    key: NodeKey::WorkCenter {
                        work_center: w,
                        param,
                    },
                    node: expand(template, "work_center", &wc.name, param.name()),
                    subscribe: true,
                });
            }
        }
        let publishing_ms =
            i64::try_from(conn.publishing_interval.as_millis()).unwrap_or(i64::MAX / 4);
        OptoMes {
            connection: conn.id.clone(),
            names: cfg.work_centers.iter().map(|w| w.name.clone()).collect(),
            nodes,
            window_ms: i64::try_from(cfg.oee_window.as_millis())
                .unwrap_or(i64::MAX / 4)
                .max(1),
            grace_ms: MIN_GRACE_MS.max(publishing_ms.saturating_mul(2)),
            wcs: cfg
                .work_centers
                .iter()
                .map(|_| WorkCenter::default())
                .collect(),
            seq: 0,
        }
    }

    pub fn nodes(&self) -> Vec<NodeSpec> {
        self.nodes.clone()
    }

    /// Grace after a window's end before it closes (see module doc).
    pub fn grace_ms(&self) -> i64 {
        self.grace_ms
    }

    pub fn on_values(&mut self, values: &[Sample]) -> Output {
        let mut samples: Vec<(usize, WcParam, &Sample)> = values
            .iter()
            .filter_map(|s| match s.key {
                NodeKey::WorkCenter { work_center, param }
                    if work_center < self.wcs.len() && s.good =>
                {
                    Some((work_center, param, s))
                }
                _ => None,
            })
            .collect();
        // At equal timestamps the reason first: written with (or before) the
        // state it explains.
        samples.sort_by_key(|(_, param, s)| (s.ts_ms, *param == WcParam::State));
        let mut out = Output::default();
        for (w, param, s) in samples {
            match param {
                WcParam::State | WcParam::DowntimeReason => {
                    if let Some(r) = self.wcs[w].downtime.apply(param, &s.value, s.ts_ms) {
                        out.records.push(self.downtime_record(w, &r, s.ts_ms));
                    }
                }
                _ => {}
            }
            if param != WcParam::DowntimeReason {
                self.seq += 1;
                let input = Input::Value(param, s.value.clone());
                let lossy = self.wcs[w].oee.push(Pending {
                    t: s.ts_ms,
                    rank: input.rank(),
                    seq: self.seq,
                    input,
                });
                if lossy {
                    tracing::warn!(connection = %self.connection, work_center = %self.names[w],
                        "OEE input queue full (no ticks?); applying the oldest values early");
                }
            }
        }
        out
    }

    pub fn on_tick(&mut self, now_ms: i64) -> Output {
        let mut out = Output::default();
        for w in 0..self.wcs.len() {
            let (closed, skipped) =
                self.wcs[w]
                    .oee
                    .close_due(now_ms, self.window_ms, self.grace_ms);
            if skipped > 0 {
                tracing::warn!(connection = %self.connection, work_center = %self.names[w], skipped,
                    "clock step or stall: OEE windows skipped");
            }
            for c in closed {
                out.records.push(self.oee_record(w, &c));
            }
        }
        out
    }

    pub fn on_read(&mut self, _request_id: u64, _results: &[(NodeKey, Value, bool)]) -> Output {
        Output::default()
    }

    pub fn on_disconnected(&mut self, at_ms: i64) -> Output {
        self.push_all(at_ms, false);
        Output::default()
    }

    pub fn on_connected(&mut self, at_ms: i64) -> Output {
        let window_ms = self.window_ms;
        for wc in &mut self.wcs {
            wc.oee.open_at(at_ms, window_ms);
        }
        self.push_all(at_ms, true);
        Output::default()
    }

    /// Queues a connection change for every work center.
    fn push_all(&mut self, t: i64, connected: bool) {
        for w in 0..self.wcs.len() {
            self.seq += 1;
            let input = if connected {
                Input::Connected
            } else {
                Input::Disconnected
            };
            let rank = input.rank();
            self.wcs[w].oee.push(Pending {
                t,
                rank,
                seq: self.seq,
                input,
            });
        }
    }

    fn downtime_record(&self, w: usize, down: &Down, ended_ms: i64) -> NewRecord {
        let duration_ms = ended_ms.saturating_sub(down.since_ms).max(0);
        NewRecord {
            connection: self.connection.clone(),
            kind: Kind::Downtime,
            ts_ms: ended_ms,
            data: json!({
                "work_center": self.names[w],
                "reason": down.reason,
                "started": format_ts(down.since_ms),
                "ended": format_ts(ended_ms),
                "duration_s": duration_ms as f64 / 1000.0,
            })
            .to_string(),
        }
    }

    fn oee_record(&self, w: usize, c: &Closed) -> NewRecord {
        let end = c.end;
        let f = figures(&c.observed, c.ideal_cycle_time);
        NewRecord {
            connection: self.connection.clone(),
            kind: Kind::Oee,
            // Derived record: agent time, the window end.
            ts_ms: end,
            data: json!({
                "work_center": self.names[w],
                "window_start": format_ts(c.start),
                "window_end": format_ts(end),
                "state": c.state,
                "work_order": c.work_order,
                "product": c.product,
                "good_count": f.good_count,
                "reject_count": f.reject_count,
                "total_count": f.total_count,
                "run_time_s": f.run_time_s,
                "planned_time_s": f.planned_time_s,
                "downtime_s": f.downtime_s,
                "availability": f.availability,
                "performance": f.performance,
                "quality": f.quality,
                "oee": f.oee,
                "complete": c.complete,
            })
            .to_string(),
        }
    }

    pub fn snapshot(&self) -> Value {
        let snap = Snapshot {
            v: SNAPSHOT_VERSION,
            kind: ConnectionKind::Optomes.as_str().to_string(),
            work_centers: self
                .names
                .iter()
                .zip(&self.wcs)
                .map(|(name, wc)| {
                    (
                        name.clone(),
                        WcSnapshot {
                            down: wc.downtime.down.clone(),
                            last_closed_end: wc.oee.last_closed_end,
                        },
                    )
                })
                .collect(),
        };
        serde_json::to_value(snap).unwrap_or(Value::Null)
    }

    pub fn restore(&mut self, snapshot: &Value) -> Result<(), SnapshotError> {
        if !check_envelope(snapshot, ConnectionKind::Optomes)? {
            return Ok(());
        }
        let snap: Snapshot = serde_json::from_value(snapshot.clone())
            .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        let mut saved = snap.work_centers;
        for (name, wc) in self.names.iter().zip(self.wcs.iter_mut()) {
            let s = saved.remove(name).unwrap_or_default();
            *wc = WorkCenter::default();
            wc.downtime.down = s.down;
            wc.oee.last_closed_end = s.last_closed_end;
        }
        Ok(())
    }
}

impl Downtime {
    /// Applies a STATE or DOWNTIME_REASON value; returns the finished
    /// downtime when STATE leaves DOWN.
    fn apply(&mut self, param: WcParam, value: &Value, ts: i64) -> Option<Down> {
        let text = as_text(value).filter(|t| !t.trim().is_empty());
        match param {
            WcParam::DowntimeReason => {
                if let (Some(down), Some(r)) = (&mut self.down, &text) {
                    down.reason = Some(r.clone());
                }
                self.reason = text;
                None
            }
            WcParam::State => match text.as_deref() {
                // Unknown is not an exit.
                None => None,
                Some("DOWN") => {
                    if self.down.is_none() {
                        self.down = Some(Down {
                            since_ms: ts,
                            reason: self.reason.clone(),
                        });
                    }
                    None
                }
                Some(_) => self.down.take(),
            },
            _ => None,
        }
    }
}

impl Windows {
    /// Starts the window clock if it is not running yet.
    fn open_at(&mut self, t: i64, window_ms: i64) {
        if self.open.is_none() {
            let start = window_start(t, window_ms);
            self.open = Some(match self.last_closed_end {
                Some(end) if end > start => end,
                _ => start,
            });
        }
    }

    /// Queues an input in time order; true if the queue overflowed.
    fn push(&mut self, p: Pending) -> bool {
        let at = self
            .pending
            .partition_point(|q| (q.t, q.rank, q.seq) <= (p.t, p.rank, p.seq));
        self.pending.insert(at, p);
        if self.pending.len() > MAX_PENDING {
            if let Some(oldest) = self.pending.pop_front() {
                self.apply(oldest);
            }
            self.lossy = true;
            return true;
        }
        false
    }

    /// Closes every window due at `now`; also returns how many were skipped.
    fn close_due(&mut self, now: i64, window_ms: i64, grace_ms: i64) -> (Vec<Closed>, i64) {
        self.open_at(now, window_ms);
        let mut closed = Vec::new();
        let mut skipped = 0;
        while let Some(start) = self.open {
            let end = start.saturating_add(window_ms);
            if now < end.saturating_add(grace_ms) {
                break;
            }
            let overdue = now.saturating_sub(end) / window_ms;
            if overdue > MAX_CATCH_UP_WINDOWS {
                // Jump to the newest window not yet due; what lies between
                // is applied (states, baselines) but reported nowhere.
                let target = window_start(now.saturating_sub(grace_ms), window_ms);
                self.apply_until(target);
                self.cursor = self.cursor.map(|c| c.max(target));
                self.acc = Observed::default();
                skipped += (target - start) / window_ms;
                self.open = Some(target);
                continue;
            }
            self.apply_until(end);
            self.advance_to(end);
            let observed = std::mem::take(&mut self.acc);
            let complete = observed.observed_ms == window_ms && !self.lossy;
            self.lossy = false;
            self.open = Some(end);
            if self.last_closed_end.is_some_and(|last| end <= last) {
                continue;
            }
            self.last_closed_end = Some(end);
            if observed.observed_ms > 0 {
                closed.push(Closed {
                    start,
                    end,
                    observed,
                    complete,
                    state: self.state.clone(),
                    work_order: self.work_order.clone(),
                    product: self.product.clone(),
                    ideal_cycle_time: self.ideal_cycle_time,
                });
            }
        }
        (closed, skipped)
    }

    /// Applies the queued inputs older than `t`, in time order.
    fn apply_until(&mut self, t: i64) {
        while self.pending.front().is_some_and(|p| p.t < t) {
            if let Some(p) = self.pending.pop_front() {
                self.apply(p);
            }
        }
    }

    /// Attributes the time since the cursor to the state in force.
    fn advance_to(&mut self, t: i64) {
        let Some(c) = self.cursor else {
            return;
        };
        if t <= c {
            return;
        }
        let d = t - c;
        self.acc.observed_ms += d;
        match self.state.as_deref() {
            Some("RUNNING") => self.acc.run_ms += d,
            Some("DOWN") => self.acc.down_ms += d,
            Some("PLANNED_STOP") => self.acc.planned_stop_ms += d,
            _ => {}
        }
        self.cursor = Some(t);
    }

    fn apply(&mut self, p: Pending) {
        // A late input (its window already closed) takes effect at the start
        // of the open window.
        let t = match self.open {
            Some(start) => p.t.max(start),
            None => p.t,
        };
        match p.input {
            Input::Connected => {
                self.connected = true;
                if self.state.is_some() && self.cursor.is_none() {
                    self.cursor = Some(t);
                }
            }
            Input::Disconnected => {
                self.advance_to(t);
                self.cursor = None;
                self.connected = false;
            }
            Input::Value(WcParam::State, v) => {
                self.advance_to(t);
                self.state = as_text(&v).filter(|s| !s.trim().is_empty());
                self.cursor = match (&self.state, self.connected) {
                    (Some(_), true) => Some(self.cursor.map_or(t, |c| c.max(t))),
                    _ => None,
                };
            }
            Input::Value(WcParam::GoodCount, v) => {
                if let Some(n) = as_count(&v) {
                    if self.connected {
                        self.acc.good += count_increase(self.last_good, n);
                    }
                    self.last_good = Some(n);
                }
            }
            Input::Value(WcParam::RejectCount, v) => {
                if let Some(n) = as_count(&v) {
                    if self.connected {
                        self.acc.reject += count_increase(self.last_reject, n);
                    }
                    self.last_reject = Some(n);
                }
            }
            Input::Value(WcParam::WorkOrder, v) => self.work_order = as_text(&v),
            Input::Value(WcParam::Product, v) => self.product = as_text(&v),
            Input::Value(WcParam::IdealCycleTime, v) => self.ideal_cycle_time = as_f64(&v),
            Input::Value(WcParam::DowntimeReason, _) => {}
        }
    }
}

fn as_count(v: &Value) -> Option<u64> {
    as_int(v).and_then(|n| u64::try_from(n).ok())
}

#[cfg(test)]
mod tests;
