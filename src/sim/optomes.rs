//! OptoMES simulator: work centers `LINE_A_FILLER` and `LINE_A_CAPPER` in
//! namespace `urn:plantgate:sim:optomes`, node ids `{work_center}.{param}`:
//! `STATE`, `WORK_ORDER`, `PRODUCT`, `DOWNTIME_REASON` (String),
//! `GOOD_COUNT`, `REJECT_COUNT` (UInt32, cumulative), `IDEAL_CYCLE_TIME`
//! (Double, seconds per unit). Plus `LOAD/TAGnnnnn.CV` load tags (`--tags`).
//!
//! Behaviour: while RUNNING a line makes about 1/ideal_cycle_time x a
//! performance factor (0.8-0.98) units per second, 1-3 % of them rejects;
//! between runs it goes DOWN (with a reason), IDLE (starved), PLANNED_STOP
//! (breaks) or CHANGEOVER (new work order and product, sometimes counters
//! reset to 0). Deterministic for a seed; `speed` scales time.
//!
//! Conventions: DOWNTIME_REASON is written in the same write as STATE = DOWN
//! and kept until the next DOWN (so the reason in force when STATE leaves
//! DOWN is the episode's); a new work order, product and ideal cycle time
//! arrive in the same write as STATE = CHANGEOVER.
//!
//! Tests drive a work center through an exact script with
//! [`OptomesWorkCenters`] (`server.optomes_work_centers()`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::server::{SimBuilder, SimServer, SimSpec, SimValue};
use super::timeline::{self, pv, Merged, ObjectCycle, ObjectValues, Objects, Write};
use super::{deltav, SimError, SimExtras, SimOptions};

pub const NAMESPACE_URI: &str = "urn:plantgate:sim:optomes";

/// The simulated work centers.
pub const WORK_CENTERS: [&str; 2] = ["LINE_A_FILLER", "LINE_A_CAPPER"];

pub const STATE: &str = "STATE";
pub const WORK_ORDER: &str = "WORK_ORDER";
pub const PRODUCT: &str = "PRODUCT";
pub const GOOD_COUNT: &str = "GOOD_COUNT";
pub const REJECT_COUNT: &str = "REJECT_COUNT";
pub const IDEAL_CYCLE_TIME: &str = "IDEAL_CYCLE_TIME";
pub const DOWNTIME_REASON: &str = "DOWNTIME_REASON";

pub const RUNNING: &str = "RUNNING";
pub const IDLE: &str = "IDLE";
pub const DOWN: &str = "DOWN";
pub const PLANNED_STOP: &str = "PLANNED_STOP";
pub const CHANGEOVER: &str = "CHANGEOVER";
pub const STATES: [&str; 5] = [RUNNING, IDLE, DOWN, PLANNED_STOP, CHANGEOVER];

/// Reasons of DOWN episodes.
pub const DOWNTIME_REASONS: [&str; 5] = ["JAM", "STARVED", "MATERIAL", "BLOCKED", "ELECTRICAL"];

/// Node id (string identifier) of a work center parameter: the default
/// OptoMES template `{work_center}.{param}`.
pub fn node_id(work_center: &str, param: &str) -> String {
    format!("{work_center}.{param}")
}

/// The values a work center currently shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkCenterValues {
    pub state: String,
    pub work_order: String,
    pub product: String,
    pub good_count: u32,
    pub reject_count: u32,
    pub ideal_cycle_time: f64,
    pub downtime_reason: String,
}

impl WorkCenterValues {
    /// Every variable with its value (initial address space).
    pub fn variables(&self) -> Vec<(String, SimValue)> {
        vec![
            pv(STATE, self.state.as_str()),
            pv(WORK_ORDER, self.work_order.as_str()),
            pv(PRODUCT, self.product.as_str()),
            pv(GOOD_COUNT, self.good_count),
            pv(REJECT_COUNT, self.reject_count),
            pv(IDEAL_CYCLE_TIME, self.ideal_cycle_time),
            pv(DOWNTIME_REASON, self.downtime_reason.as_str()),
        ]
    }
}

impl ObjectValues for WorkCenterValues {
    fn apply(&mut self, param: &str, value: &SimValue) {
        let text = |v: &SimValue| match v {
            SimValue::String(s) => s.clone(),
            _ => String::new(),
        };
        let count = |v: &SimValue, old: u32| match v {
            SimValue::UInt32(c) => *c,
            _ => old,
        };
        match param {
            STATE => self.state = text(value),
            WORK_ORDER => self.work_order = text(value),
            PRODUCT => self.product = text(value),
            DOWNTIME_REASON => self.downtime_reason = text(value),
            GOOD_COUNT => self.good_count = count(value, self.good_count),
            REJECT_COUNT => self.reject_count = count(value, self.reject_count),
            IDEAL_CYCLE_TIME => {
                if let SimValue::Double(v) = value {
                    self.ideal_cycle_time = *v;
                }
            }
            _ => {}
        }
    }
}

/// Checks a scripted state name (a typo would make a state no profile knows).
pub fn check_state(state: &str) -> Result<(), SimError> {
    if STATES.contains(&state) {
        Ok(())
    } else {
        Err(SimError::Script(format!(
            "unknown OptoMES state {state:?} (expected one of {STATES:?})"
        )))
    }
}

/// Products and their ideal cycle time on the filler (s/unit); the capper
/// is faster by `CAPPER_FACTOR`.
const PRODUCTS: [(&str, f64); 4] = [
    ("WATER-500ML", 0.40),
    ("WATER-1L", 0.60),
    ("JUICE-330ML", 0.35),
    ("JUICE-1L", 0.65),
];
const CAPPER_FACTOR: f64 = 0.8;

/// Simulated seconds between count updates while RUNNING.
const COUNT_PERIOD_S: f64 = 2.0;
/// Chance of a counter reset at a work-order change.
const P_RESET: f64 = 0.3;

fn ideal_cycle_time(index: usize, product: usize) -> f64 {
    let base = PRODUCTS[product % PRODUCTS.len()].1;
    if index == 0 {
        base
    } else {
        (base * CAPPER_FACTOR * 1000.0).round() / 1000.0
    }
}

/// `WO-004711`.
pub fn work_order(seq: u64) -> String {
    format!("WO-{seq:06}")
}

/// The automatic cycle of one work center: RUNNING stretches with counts,
/// separated by DOWN, IDLE, PLANNED_STOP and CHANGEOVER.
pub struct WorkCenterCycle {
    index: usize,
    rng: StdRng,
    /// Simulated time the planning has reached.
    t: f64,
    /// Values as planned up to `t`.
    values: WorkCenterValues,
    /// Fraction of a unit made but not yet counted.
    made: f64,
    reject_ratio: f64,
    /// Work-order numbers, shared by the work centers.
    seq: Arc<AtomicU64>,
}

/// The initial values and cycles of all work centers.
pub fn work_center_cycles(seed: u64) -> Vec<WorkCenterCycle> {
    let mut base = StdRng::seed_from_u64(seed ^ 0x0E7_0E5);
    let seq = Arc::new(AtomicU64::new(base.gen_range(1000..9000)));
    (0..WORK_CENTERS.len())
        .map(|index| {
            let mut rng = StdRng::seed_from_u64(
                seed ^ (index as u64 + 101).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let product = rng.gen_range(0..PRODUCTS.len());
            // Cumulative counters of a line that has been running for a while.
            let good = rng.gen_range(0..20_000u32);
            let values = WorkCenterValues {
                state: RUNNING.into(),
                work_order: work_order(seq.fetch_add(1, Ordering::Relaxed)),
                product: PRODUCTS[product].0.into(),
                good_count: good,
                reject_count: good / 50,
                ideal_cycle_time: ideal_cycle_time(index, product),
                downtime_reason: String::new(),
            };
            WorkCenterCycle {
                index,
                reject_ratio: rng.gen_range(0.01..0.03),
                rng,
                t: 0.0,
                values,
                made: 0.0,
                seq: seq.clone(),
            }
        })
        .collect()
}

impl WorkCenterCycle {
    pub fn index(&self) -> usize {
        self.index
    }

    /// The values the work center starts with.
    pub fn initial_values(&self) -> WorkCenterValues {
        self.values.clone()
    }

    fn push(&mut self, out: &mut VecDeque<(f64, Write)>, at: f64, write: Write) {
        for (p, v) in &write {
            self.values.apply(p, v);
        }
        out.push_back((at, write));
    }

    /// Plans a RUNNING stretch from `self.t`: count updates every
    /// `COUNT_PERIOD_S` and at the end.
    fn plan_running(&mut self, out: &mut VecDeque<(f64, Write)>) {
        if self.values.state != RUNNING {
            self.push(out, self.t, vec![pv(STATE, RUNNING)]);
        }
        let duration = self.rng.gen_range(40.0..240.0);
        let performance = self.rng.gen_range(0.80..0.98);
        let end = self.t + duration;
        let mut t = self.t;
        while t < end {
            let dt = COUNT_PERIOD_S.min(end - t);
            t += dt;
            self.made += dt / self.values.ideal_cycle_time.max(0.01) * performance;
            let n = self.made.floor();
            self.made -= n;
            let n = n as u32;
            let rejects = (0..n)
                .filter(|_| self.rng.gen_bool(self.reject_ratio))
                .count() as u32;
            let mut write = Vec::new();
            if n > rejects {
                write.push(pv(
                    GOOD_COUNT,
                    self.values.good_count.wrapping_add(n - rejects),
                ));
            }
            if rejects > 0 {
                write.push(pv(
                    REJECT_COUNT,
                    self.values.reject_count.wrapping_add(rejects),
                ));
            }
            if !write.is_empty() {
                self.push(out, t, write);
            }
        }
        self.t = end;
    }

    /// Plans one stop (DOWN, IDLE, PLANNED_STOP or CHANGEOVER) from `self.t`.
    fn plan_stop(&mut self, out: &mut VecDeque<(f64, Write)>, state: &str) {
        let at = self.t;
        let duration = match state {
            DOWN => {
                let reason = DOWNTIME_REASONS[self.rng.gen_range(0..DOWNTIME_REASONS.len())];
                // Reason first, in the same write: it is in force for the
                // whole episode.
                self.push(out, at, vec![pv(DOWNTIME_REASON, reason), pv(STATE, DOWN)]);
                self.rng.gen_range(15.0..120.0)
            }
            CHANGEOVER => {
                let product = self.rng.gen_range(0..PRODUCTS.len());
                let wo = work_order(self.seq.fetch_add(1, Ordering::Relaxed));
                let mut write = vec![
                    pv(STATE, CHANGEOVER),
                    pv(WORK_ORDER, wo),
                    pv(PRODUCT, PRODUCTS[product].0),
                    pv(IDEAL_CYCLE_TIME, ideal_cycle_time(self.index, product)),
                ];
                if self.rng.gen_bool(P_RESET) {
                    write.push(pv(GOOD_COUNT, 0u32));
                    write.push(pv(REJECT_COUNT, 0u32));
                }
                self.reject_ratio = self.rng.gen_range(0.01..0.03);
                self.made = 0.0;
                self.push(out, at, write);
                self.rng.gen_range(30.0..120.0)
            }
            PLANNED_STOP => {
                self.push(out, at, vec![pv(STATE, PLANNED_STOP)]);
                self.rng.gen_range(60.0..240.0)
            }
            _ => {
                self.push(out, at, vec![pv(STATE, IDLE)]);
                self.rng.gen_range(10.0..60.0)
            }
        };
        self.t = at + duration;
    }
}

impl ObjectCycle for WorkCenterCycle {
    fn plan_more(&mut self, out: &mut VecDeque<(f64, Write)>) {
        let before = out.len();
        if self.values.state != RUNNING {
            self.plan_running(out);
        } else {
            let roll: f64 = self.rng.gen();
            match roll {
                r if r < 0.40 => self.plan_stop(out, DOWN),
                r if r < 0.55 => self.plan_stop(out, IDLE),
                r if r < 0.65 => self.plan_stop(out, PLANNED_STOP),
                r if r < 0.80 => self.plan_stop(out, CHANGEOVER),
                // Keep running (a new stretch with another performance).
                _ => self.plan_running(out),
            }
        }
        if out.len() == before {
            // A stretch without any write (e.g. too short to count a unit):
            // the timeline needs one to move on, and a repeated value is
            // not reported to subscribers.
            let state = self.values.state.clone();
            self.push(out, self.t, vec![pv(STATE, state)]);
        }
    }
}

/// Starts the OptoMES simulator (see module doc).
pub async fn start_optomes(opts: SimOptions, extras: SimExtras) -> Result<SimServer, SimError> {
    let builder = SimBuilder::new(
        &opts,
        &extras,
        SimSpec {
            name: "optomes".into(),
            namespace_uri: NAMESPACE_URI.into(),
        },
    )
    .await?;
    let ns = builder.namespace().clone();
    let cycles = work_center_cycles(opts.seed);
    ns.add_folder("OptoMES", "OptoMES", None);
    let mut initial = Vec::new();
    for (wc, cycle) in WORK_CENTERS.iter().zip(&cycles) {
        ns.add_folder(wc, wc, Some("OptoMES"));
        let values = cycle.initial_values();
        let vars = values
            .variables()
            .into_iter()
            .map(|(param, v)| {
                let id = node_id(wc, &param);
                (id.clone(), id, v)
            })
            .collect();
        ns.add_variables(wc, vars);
        initial.push((wc.to_string(), values));
    }
    deltav::add_load_tags(&ns, opts.tags);
    let token = builder.token();
    let mut server = builder.start();
    let pinned = server.pinned();
    let work_centers = OptomesWorkCenters {
        objects: Arc::new(Objects::new(ns.clone(), pinned.clone(), initial, node_id)),
    };
    server.add_extension(work_centers.clone());
    if opts.speed > 0.0 && opts.speed.is_finite() {
        tokio::spawn(timeline::play(
            Merged::new(cycles),
            opts.speed,
            work_centers.objects.clone(),
            token.clone(),
        ));
    }
    deltav::start_load(&mut server, &opts, &extras, ns, token);
    Ok(server)
}

impl SimServer {
    /// The scripted-mode controls of the OptoMES work centers; None for
    /// other simulators.
    pub fn optomes_work_centers(&self) -> Option<OptomesWorkCenters> {
        self.extension::<OptomesWorkCenters>()
    }
}

/// Drives the OptoMES work centers by hand (tests). Every step is one write
/// with source timestamp `ts_ms` (ms since the epoch; None = now). The
/// first step on a work center takes it out of the automatic cycle for good
/// (as does [`OptomesWorkCenters::take_over`]).
///
/// Source timestamps matter to the server (async-opcua samples by them):
/// a change of a node stamped less than the subscriber's sampling interval
/// after that node's previous value - or before it - is held back and
/// delivered re-stamped, and only the latest such change survives. So give
/// each node increasing timestamps at least a sampling interval apart, later
/// than the server's start (the initial values carry that time). Changes of
/// different nodes never affect each other; within one publish they come in
/// monitored-item order, not write order.
#[derive(Clone)]
pub struct OptomesWorkCenters {
    objects: Arc<Objects<WorkCenterValues>>,
}

impl OptomesWorkCenters {
    /// `LINE_A_FILLER`, `LINE_A_CAPPER`.
    pub fn work_centers(&self) -> Vec<String> {
        self.objects.names()
    }

    /// What the work center shows now.
    pub fn current(&self, work_center: &str) -> Result<WorkCenterValues, SimError> {
        self.objects.current(work_center)
    }

    /// Whether a script owns the work center.
    pub fn is_scripted(&self, work_center: &str) -> Result<bool, SimError> {
        self.objects.is_scripted(work_center)
    }

    /// Stops the automatic cycle for this work center without writing.
    pub fn take_over(&self, work_center: &str) -> Result<(), SimError> {
        self.objects.take_over(work_center)
    }

    /// Sets STATE (one write). For DOWN with a reason use [`Self::set_down`].
    pub fn set_state(
        &self,
        work_center: &str,
        state: &str,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        check_state(state)?;
        self.objects
            .script(work_center, ts_ms, |_| Ok(vec![vec![pv(STATE, state)]]))
    }

    /// DOWNTIME_REASON and STATE = DOWN in one write.
    pub fn set_down(
        &self,
        work_center: &str,
        reason: &str,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        self.objects.script(work_center, ts_ms, |_| {
            Ok(vec![vec![pv(DOWNTIME_REASON, reason), pv(STATE, DOWN)]])
        })
    }

    /// Adds to the cumulative counters (one write; a counter wraps at
    /// u32::MAX like a real one, which a profile sees as a reset).
    pub fn add_counts(
        &self,
        work_center: &str,
        good: u32,
        reject: u32,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        self.objects.script(work_center, ts_ms, |v| {
            Ok(vec![vec![
                pv(GOOD_COUNT, v.good_count.wrapping_add(good)),
                pv(REJECT_COUNT, v.reject_count.wrapping_add(reject)),
            ]])
        })
    }

    /// Sets both counters to exact values (one write).
    pub fn set_counts(
        &self,
        work_center: &str,
        good: u32,
        reject: u32,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        self.objects.script(work_center, ts_ms, |_| {
            Ok(vec![vec![pv(GOOD_COUNT, good), pv(REJECT_COUNT, reject)]])
        })
    }

    /// Both counters back to 0 (one write).
    pub fn reset_counters(&self, work_center: &str, ts_ms: Option<i64>) -> Result<(), SimError> {
        self.set_counts(work_center, 0, 0, ts_ms)
    }

    /// A new work order: WORK_ORDER, PRODUCT, IDEAL_CYCLE_TIME and, with
    /// `reset_counters`, both counters at 0, in one write (STATE unchanged;
    /// pair it with `set_state(.., "CHANGEOVER", ..)` as the plant does).
    pub fn change_work_order(
        &self,
        work_center: &str,
        work_order: &str,
        product: &str,
        ideal_cycle_time: f64,
        reset_counters: bool,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        self.objects.script(work_center, ts_ms, |_| {
            let mut write = vec![
                pv(WORK_ORDER, work_order),
                pv(PRODUCT, product),
                pv(IDEAL_CYCLE_TIME, ideal_cycle_time),
            ];
            if reset_counters {
                write.push(pv(GOOD_COUNT, 0u32));
                write.push(pv(REJECT_COUNT, 0u32));
            }
            Ok(vec![write])
        })
    }

    /// Any values of the work center in ONE write with one source timestamp
    /// (one publish, no guaranteed order).
    pub fn write(
        &self,
        work_center: &str,
        values: &[(&str, SimValue)],
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        let write = values
            .iter()
            .map(|(p, v)| (p.to_string(), v.clone()))
            .collect();
        self.objects.script(work_center, ts_ms, |_| Ok(vec![write]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::timeline::Timeline;

    /// Replays `n` writes of the automatic cycle per work center.
    fn replay(seed: u64, n: usize) -> (Vec<crate::sim::timeline::Planned>, Vec<WorkCenterValues>) {
        let cycles = work_center_cycles(seed);
        let values: Vec<WorkCenterValues> = cycles.iter().map(|c| c.initial_values()).collect();
        let mut t = Merged::new(cycles);
        let planned = (0..n).map(|_| t.next_write().expect("endless")).collect();
        (planned, values)
    }

    #[test]
    fn cycle_is_deterministic_and_time_ordered() {
        let (a, _) = replay(3, 3000);
        assert_eq!(a, replay(3, 3000).0);
        assert_ne!(a, replay(4, 3000).0);
        assert!(a.windows(2).all(|w| w[0].at_s <= w[1].at_s));
    }

    #[test]
    fn counts_rates_states_and_reasons_are_realistic() {
        let (planned, mut values) = replay(9, 20_000);
        let mut seen_states = std::collections::HashSet::new();
        let mut resets = 0;
        let mut run_time = [0.0f64; 2];
        let mut made = [0u64; 2];
        let mut rejects = [0u64; 2];
        let mut ideal = [0.0f64; 2];
        let mut since = [0.0f64; 2];
        for p in &planned {
            let i = p.target;
            let before = values[i].clone();
            let mut after = before.clone();
            for (k, v) in &p.write {
                after.apply(k, v);
            }
            let reset = p.write.iter().any(|(k, _)| k == WORK_ORDER)
                && after.good_count == 0
                && after.reject_count == 0;
            if reset {
                resets += 1;
                assert_eq!(
                    after.state, CHANGEOVER,
                    "resets only at a work-order change"
                );
            } else {
                assert!(
                    after.good_count >= before.good_count,
                    "GOOD_COUNT monotonic"
                );
                assert!(
                    after.reject_count >= before.reject_count,
                    "REJECT_COUNT monotonic"
                );
            }
            let counted = p
                .write
                .iter()
                .any(|(k, _)| k == GOOD_COUNT || k == REJECT_COUNT);
            if counted && !reset {
                assert_eq!(before.state, RUNNING, "counts only while RUNNING");
                made[i] += u64::from(after.good_count - before.good_count)
                    + u64::from(after.reject_count - before.reject_count);
                rejects[i] += u64::from(after.reject_count - before.reject_count);
                ideal[i] += (after.good_count - before.good_count + after.reject_count
                    - before.reject_count) as f64
                    * before.ideal_cycle_time;
            }
            if before.state == RUNNING {
                run_time[i] += p.at_s - since[i];
            }
            since[i] = p.at_s;
            if after.state == DOWN && before.state != DOWN {
                assert!(
                    DOWNTIME_REASONS.contains(&after.downtime_reason.as_str()),
                    "reason set when going DOWN"
                );
                assert_eq!(p.write[0].0, DOWNTIME_REASON, "reason written first");
            }
            if p.write.iter().any(|(k, _)| k == WORK_ORDER) {
                assert_eq!(after.state, CHANGEOVER);
                assert_ne!(after.work_order, before.work_order);
            }
            seen_states.insert(after.state.clone());
            values[i] = after;
        }
        assert_eq!(seen_states.len(), STATES.len(), "{seen_states:?}");
        assert!(resets > 0, "counter resets happen");
        for i in 0..2 {
            // Performance = ideal time of the units made / run time.
            let performance = ideal[i] / run_time[i];
            assert!(
                (0.75..=0.99).contains(&performance),
                "performance {performance}"
            );
            let ratio = rejects[i] as f64 / made[i] as f64;
            assert!((0.005..=0.035).contains(&ratio), "reject ratio {ratio}");
        }
    }

    #[test]
    fn states_are_checked() {
        for s in STATES {
            assert!(check_state(s).is_ok());
        }
        assert!(check_state("STOPPED").is_err());
        assert_eq!(node_id("LINE_A_FILLER", STATE), "LINE_A_FILLER.STATE");
        assert_eq!(work_order(4711), "WO-004711");
    }
}

#[cfg(test)]
mod e2e {
    use std::time::Duration;

    use opcua::types::Variant;

    use super::*;
    use crate::sim::test_client::{Change, TestClient};

    const WAIT: Duration = Duration::from_secs(30);
    const PARAMS: [&str; 7] = [
        STATE,
        WORK_ORDER,
        PRODUCT,
        GOOD_COUNT,
        REJECT_COUNT,
        IDEAL_CYCLE_TIME,
        DOWNTIME_REASON,
    ];

    fn nodes(wc: &str) -> Vec<String> {
        PARAMS.iter().map(|p| node_id(wc, p)).collect()
    }

    async fn server(dir: &std::path::Path, speed: f64, seed: u64) -> SimServer {
        let mut opts = SimOptions::new(dir.join("pki"));
        opts.speed = speed;
        opts.seed = seed;
        start_optomes(opts, SimExtras::default())
            .await
            .expect("simulator starts")
    }

    async fn collect_until(
        client: &mut TestClient,
        seen: &mut Vec<Change>,
        what: &str,
        done: impl Fn(&[Change]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(seen) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next(left).await {
                Some(c) => seen.push(c),
                None => panic!("timed out waiting for {what}; seen {seen:#?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripted_run_reaches_a_subscriber_with_exact_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 0.0, 1).await;
        assert_eq!(server.namespace_uri(), NAMESPACE_URI);
        assert!(server.deltav_units().is_none());
        let lines = server.optomes_work_centers().expect("work centers");
        assert_eq!(lines.work_centers(), WORK_CENTERS);
        let wc = "LINE_A_FILLER";
        let mut client =
            TestClient::connect(&server.endpoint(), server.namespace_index(), &nodes(wc)).await;
        let mut seen = Vec::new();
        collect_until(&mut client, &mut seen, "initial values", |s| {
            s.len() >= PARAMS.len()
        })
        .await;
        let start = lines.current(wc).unwrap();
        assert_eq!(start.state, RUNNING);
        assert!(start.work_order.starts_with("WO-"));
        assert!(start.ideal_cycle_time > 0.0);

        // Ahead of the initial values' source timestamps (see DeltaV test).
        let t0 = crate::record::now_ms() + 1000;
        let s = |k: i64| Some(t0 + k * 1000);
        lines.set_counts(wc, 1000, 10, s(0)).unwrap();
        lines.add_counts(wc, 100, 2, s(60)).unwrap();
        lines.set_down(wc, "JAM", s(61)).unwrap();
        lines.set_state(wc, RUNNING, s(90)).unwrap();
        lines.add_counts(wc, 50, 0, s(120)).unwrap();
        lines.set_state(wc, CHANGEOVER, s(121)).unwrap();
        lines
            .change_work_order(wc, "WO-000042", "JUICE-1L", 0.65, true, s(122))
            .unwrap();
        lines.set_state(wc, PLANNED_STOP, s(180)).unwrap();
        assert!(lines.set_state(wc, "STOPPED", None).is_err());
        let now = lines.current(wc).unwrap();
        assert_eq!((now.good_count, now.reject_count), (0, 0));
        assert_eq!(now.downtime_reason, "JAM");

        let from = seen.len();
        collect_until(&mut client, &mut seen, "the script's changes", |s| {
            s.len() - from >= 15
        })
        .await;
        if let Some(extra) = client.next(Duration::from_millis(500)).await {
            seen.push(extra);
        }
        let mut got: Vec<(i64, String, Variant)> = seen[from..]
            .iter()
            .map(|c| {
                let param = c.node.trim_start_matches("LINE_A_FILLER.");
                (
                    (c.source_ts_ms - t0) / 1000,
                    param.to_string(),
                    c.value.clone(),
                )
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let want: Vec<(i64, &str, Variant)> = vec![
            (0, GOOD_COUNT, Variant::UInt32(1000)),
            (0, REJECT_COUNT, Variant::UInt32(10)),
            (60, GOOD_COUNT, Variant::UInt32(1100)),
            (60, REJECT_COUNT, Variant::UInt32(12)),
            (61, DOWNTIME_REASON, Variant::from("JAM")),
            (61, STATE, Variant::from(DOWN)),
            (90, STATE, Variant::from(RUNNING)),
            (120, GOOD_COUNT, Variant::UInt32(1150)),
            (121, STATE, Variant::from(CHANGEOVER)),
            (122, GOOD_COUNT, Variant::UInt32(0)),
            (122, IDEAL_CYCLE_TIME, Variant::Double(0.65)),
            (122, PRODUCT, Variant::from("JUICE-1L")),
            (122, REJECT_COUNT, Variant::UInt32(0)),
            (122, WORK_ORDER, Variant::from("WO-000042")),
            (180, STATE, Variant::from(PLANNED_STOP)),
        ];
        let want: Vec<(i64, String, Variant)> = want
            .into_iter()
            .map(|(t, p, v)| (t, p.to_string(), v))
            .collect();
        assert_eq!(got, want);
        client.close().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn automatic_lines_count_and_stop_at_speed() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 50.0, 2).await;
        let mut all = nodes("LINE_A_FILLER");
        all.extend(nodes("LINE_A_CAPPER"));
        let mut client =
            TestClient::connect(&server.endpoint(), server.namespace_index(), &all).await;
        let mut seen = Vec::new();
        // Counting, and at least one stop (any non-RUNNING state) seen.
        collect_until(&mut client, &mut seen, "counts and a stop", |s| {
            let counts = s.iter().filter(|c| c.node.ends_with(GOOD_COUNT)).count();
            let stops = s
                .iter()
                .any(|c| c.node.ends_with(STATE) && c.text().is_some_and(|t| t != RUNNING));
            counts > 20 && stops
        })
        .await;
        for wc in WORK_CENTERS {
            let mine: Vec<&Change> = seen.iter().filter(|c| c.node.starts_with(wc)).collect();
            // Source timestamps never go back.
            assert!(mine
                .windows(2)
                .all(|w| w[0].source_ts_ms <= w[1].source_ts_ms || w[0].node != w[1].node));
            let mut last = None;
            let mut wo_changes = mine
                .iter()
                .filter(|c| c.node.ends_with(WORK_ORDER))
                .map(|c| c.source_ts_ms)
                .collect::<Vec<_>>();
            wo_changes.remove(0);
            for c in mine.iter().filter(|c| c.node.ends_with(GOOD_COUNT)) {
                let Variant::UInt32(n) = c.value else {
                    panic!("GOOD_COUNT is UInt32: {c:?}")
                };
                if let Some(prev) = last {
                    assert!(
                        n >= prev || wo_changes.contains(&c.source_ts_ms),
                        "{wc}: count went back without a work-order change"
                    );
                }
                last = Some(n);
            }
        }
        client.close().await;
        server.shutdown().await;
    }
}
