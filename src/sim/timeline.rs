//! Shared machinery of the plant-object simulators (DeltaV batch units,
//! OptoMES work centers): a timeline of planned writes in simulated time that
//! a task plays back in real time, and per-object slots that tests can take
//! over to drive an object through an exact script.
//!
//! Design choices:
//! - The cycle logic is pure: a [`Timeline`] hands out [`Planned`] writes in
//!   simulated seconds, so the plant behaviour is unit-tested without a server
//!   and is deterministic for a seed regardless of scheduling jitter.
//! - Every write carries the source timestamp of the simulated event (real
//!   start time + simulated time / speed), not the moment the task got to it:
//!   durations a profile derives from source timestamps are exact.
//! - A slot that a test has scripted is never written by the cycle again, so
//!   the values a client sees are exactly the script's.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::server::{SimNamespace, SimValue};
use super::SimError;

/// One write (one `set_many_at`, one source timestamp): `(param, value)`.
pub type Write = Vec<(String, SimValue)>;

/// A write planned at a simulated time for one object (`target` = its index).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// Simulated seconds since the simulator started.
    pub at_s: f64,
    pub target: usize,
    pub write: Write,
}

/// An endless, time-ordered source of planned writes.
pub trait Timeline: Send + 'static {
    /// The next write (non-decreasing `at_s`); None ends the playback.
    fn next_write(&mut self) -> Option<Planned>;
}

/// The values of one object, kept up to date with every write so scripted
/// steps can build on them (add counts, end the batch in its last state).
pub trait ObjectValues: Clone + Send + 'static {
    fn apply(&mut self, param: &str, value: &SimValue);
}

struct Slot<V> {
    values: V,
    /// Taken over by a script: the cycle leaves it alone from now on.
    scripted: bool,
    /// Last source timestamp written, to keep a scripted object's writes
    /// strictly ordered in time.
    last_ts_ms: i64,
}

/// The simulated objects of one simulator (units or work centers) and the
/// namespace their variables live in.
pub(crate) struct Objects<V> {
    ns: SimNamespace,
    /// Node ids a test pinned through `SimServer::set_value`.
    pinned: Arc<Mutex<HashSet<String>>>,
    names: Vec<String>,
    slots: Vec<Mutex<Slot<V>>>,
    node_id: fn(&str, &str) -> String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the simulator down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<V: ObjectValues> Objects<V> {
    pub(crate) fn new(
        ns: SimNamespace,
        pinned: Arc<Mutex<HashSet<String>>>,
        objects: Vec<(String, V)>,
        node_id: fn(&str, &str) -> String,
    ) -> Self {
        let (names, slots) = objects
            .into_iter()
            .map(|(name, values)| {
                let slot = Slot {
                    values,
                    scripted: false,
                    last_ts_ms: i64::MIN,
                };
                (name, Mutex::new(slot))
            })
            .unzip();
        Objects {
            ns,
            pinned,
            names,
            slots,
            node_id,
        }
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn index(&self, name: &str) -> Result<usize, SimError> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| SimError::UnknownObject(name.to_string()))
    }

    pub(crate) fn current(&self, name: &str) -> Result<V, SimError> {
        let i = self.index(name)?;
        Ok(lock(&self.slots[i]).values.clone())
    }

    pub(crate) fn is_scripted(&self, name: &str) -> Result<bool, SimError> {
        let i = self.index(name)?;
        Ok(lock(&self.slots[i]).scripted)
    }

    /// Takes the object out of the automatic cycle for good.
    pub(crate) fn take_over(&self, name: &str) -> Result<(), SimError> {
        let i = self.index(name)?;
        lock(&self.slots[i]).scripted = true;
        Ok(())
    }

    /// A scripted step: takes the object over, then performs the writes that
    /// `plan` derives from its current values, in order, the first at
    /// `ts_ms` (None: now) and each next one 1 ms later so their order is
    /// visible in the source timestamps. The slot stays locked throughout, so
    /// the step is atomic with respect to other steps.
    pub(crate) fn script(
        &self,
        name: &str,
        ts_ms: Option<i64>,
        plan: impl FnOnce(&V) -> Result<Vec<Write>, SimError>,
    ) -> Result<(), SimError> {
        let i = self.index(name)?;
        let mut slot = lock(&self.slots[i]);
        slot.scripted = true;
        let writes = plan(&slot.values)?;
        let mut ts = ts_ms.unwrap_or_else(|| {
            // Without an explicit time, "now" but never before the previous
            // scripted write: same-millisecond steps keep their order.
            crate::record::now_ms().max(slot.last_ts_ms.saturating_add(1))
        });
        for write in writes {
            if write.is_empty() {
                continue;
            }
            let ids = write
                .iter()
                .map(|(p, v)| ((self.node_id)(name, p), v.clone()))
                .collect();
            self.ns.set_many_at(ids, ts)?;
            for (p, v) in &write {
                slot.values.apply(p, v);
            }
            slot.last_ts_ms = ts;
            ts = ts.saturating_add(1);
        }
        Ok(())
    }

    /// A write of the automatic cycle; skipped for scripted objects, and
    /// pinned nodes are left out.
    pub(crate) fn auto_write(&self, target: usize, write: Write, ts_ms: i64) {
        let (Some(name), Some(slot)) = (self.names.get(target), self.slots.get(target)) else {
            return;
        };
        let mut slot = lock(slot);
        if slot.scripted {
            return;
        }
        let write: Write = {
            let pinned = lock(&self.pinned);
            write
                .into_iter()
                .filter(|(p, _)| !pinned.contains(&(self.node_id)(name, p)))
                .collect()
        };
        if write.is_empty() {
            return;
        }
        let ids = write
            .iter()
            .map(|(p, v)| ((self.node_id)(name, p), v.clone()))
            .collect();
        if let Err(e) = self.ns.set_many_at(ids, ts_ms) {
            tracing::warn!(object = %name, error = %e, "simulator update failed");
            return;
        }
        for (p, v) in &write {
            slot.values.apply(p, v);
        }
        slot.last_ts_ms = ts_ms;
    }
}

/// Plays `timeline` in real time at `speed` (> 0) until `cancel`: each write
/// happens when its simulated time comes and carries that time as its source
/// timestamp.
pub(crate) async fn play<T: Timeline, V: ObjectValues>(
    mut timeline: T,
    speed: f64,
    objects: Arc<Objects<V>>,
    cancel: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    let wall_start_ms = crate::record::now_ms();
    while let Some(planned) = timeline.next_write() {
        let real_s = planned.at_s / speed;
        if !real_s.is_finite() || real_s < 0.0 {
            return;
        }
        // Far beyond any run time: also keeps Duration::from_secs_f64 happy.
        let Some(due) = start.checked_add(Duration::from_secs_f64(real_s.min(1e9))) else {
            return;
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        let ts_ms = wall_start_ms.saturating_add((real_s * 1000.0).round() as i64);
        objects.auto_write(planned.target, planned.write, ts_ms);
    }
}

/// Merges per-object plans into one time-ordered timeline: each object
/// plans its next stretch when its queue runs dry.
pub(crate) trait ObjectCycle: Send + 'static {
    /// Appends the next stretch of writes (at least one, non-decreasing
    /// times, none before the previous stretch's last).
    fn plan_more(&mut self, out: &mut std::collections::VecDeque<(f64, Write)>);
}

pub(crate) struct Merged<C> {
    cycles: Vec<(C, std::collections::VecDeque<(f64, Write)>)>,
}

impl<C: ObjectCycle> Merged<C> {
    pub(crate) fn new(cycles: Vec<C>) -> Self {
        Merged {
            cycles: cycles
                .into_iter()
                .map(|c| (c, std::collections::VecDeque::new()))
                .collect(),
        }
    }

    /// Mutable access to one cycle (tests).
    #[cfg(test)]
    pub(crate) fn cycle(&mut self, i: usize) -> &mut C {
        &mut self.cycles[i].0
    }
}

impl<C: ObjectCycle> Timeline for Merged<C> {
    fn next_write(&mut self) -> Option<Planned> {
        let mut best: Option<(usize, f64)> = None;
        for (i, (cycle, queue)) in self.cycles.iter_mut().enumerate() {
            if queue.is_empty() {
                cycle.plan_more(queue);
            }
            if let Some((at, _)) = queue.front() {
                // Ties go to the lower index: deterministic order.
                if best.map_or(true, |(_, b)| *at < b) {
                    best = Some((i, *at));
                }
            }
        }
        let (i, _) = best?;
        let (at_s, write) = self.cycles[i].1.pop_front()?;
        Some(Planned {
            at_s,
            target: i,
            write,
        })
    }
}

/// `(param, value)` pair with an owned param name.
pub(crate) fn pv(param: &str, value: impl Into<SimValue>) -> (String, SimValue) {
    (param.to_string(), value.into())
}
