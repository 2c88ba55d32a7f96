//! ISA-88 batch units of the DeltaV simulator, as pure logic: the values of a
//! unit, the plant's write conventions and the automatic batch cycle.
//!
//! Plant convention (docs/profiles.md): RECIPE and the recipe parameters are written
//! before BATCH_ID is set, and BATCH_ID is cleared last, after the final
//! BSTATUS. Every helper here that starts or ends a batch emits its writes in
//! that order, as separate writes, so a profile sees them in that order.

use std::collections::{BTreeMap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::server::SimValue;
use super::timeline::{pv, ObjectCycle, ObjectValues, Write};
use super::SimError;

/// The simulated batch units.
pub const UNITS: [&str; 2] = ["REACTOR_101", "REACTOR_102"];

pub const BATCH_ID: &str = "BATCH_ID";
pub const RECIPE: &str = "RECIPE";
pub const PHASE: &str = "PHASE";
pub const BSTATUS: &str = "BSTATUS";
pub const FAIL_INDEX: &str = "FAIL_INDEX";
/// Recipe parameters every unit has (Double).
pub const RECIPE_PARAMETERS: [&str; 3] = ["CHARGE_AMT", "REACT_TEMP_SP", "REACT_TIME"];
/// Phases of every recipe, in order.
pub const PHASES: [&str; 5] = ["CHARGE", "HEAT", "REACT", "COOL", "DISCHARGE"];

/// ISA-88 states (BSTATUS values).
pub const IDLE: &str = "IDLE";
pub const RUNNING: &str = "RUNNING";
pub const HOLDING: &str = "HOLDING";
pub const HELD: &str = "HELD";
pub const RESTARTING: &str = "RESTARTING";
pub const COMPLETE: &str = "COMPLETE";
pub const STOPPING: &str = "STOPPING";
pub const STOPPED: &str = "STOPPED";
pub const ABORTING: &str = "ABORTING";
pub const ABORTED: &str = "ABORTED";
pub const STATES: [&str; 10] = [
    IDLE, RUNNING, HOLDING, HELD, RESTARTING, COMPLETE, STOPPING, STOPPED, ABORTING, ABORTED,
];

/// Node id (string identifier) of a unit parameter: the default DeltaV
/// template `{unit}/{param}.CV`.
pub fn node_id(unit: &str, param: &str) -> String {
    format!("{unit}/{param}.CV")
}

/// The values a unit currently shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UnitValues {
    pub batch_id: String,
    pub recipe: String,
    pub phase: String,
    pub bstatus: String,
    pub fail_index: i32,
    /// Recipe parameters by name.
    pub params: BTreeMap<String, f64>,
}

impl UnitValues {
    /// An idle unit that has never run a batch.
    pub fn idle() -> Self {
        UnitValues {
            bstatus: IDLE.to_string(),
            params: RECIPE_PARAMETERS
                .iter()
                .map(|p| (p.to_string(), 0.0))
                .collect(),
            ..Default::default()
        }
    }

    /// Every variable of the unit with its value (initial address space).
    pub fn variables(&self) -> Vec<(String, SimValue)> {
        let mut out = vec![
            pv(BATCH_ID, self.batch_id.as_str()),
            pv(RECIPE, self.recipe.as_str()),
            pv(PHASE, self.phase.as_str()),
            pv(BSTATUS, self.bstatus.as_str()),
            pv(FAIL_INDEX, self.fail_index),
        ];
        out.extend(self.params.iter().map(|(p, v)| pv(p, *v)));
        out
    }

    pub fn in_batch(&self) -> bool {
        !self.batch_id.is_empty()
    }
}

impl ObjectValues for UnitValues {
    fn apply(&mut self, param: &str, value: &SimValue) {
        let text = |v: &SimValue| match v {
            SimValue::String(s) => s.clone(),
            _ => String::new(),
        };
        match param {
            BATCH_ID => self.batch_id = text(value),
            RECIPE => self.recipe = text(value),
            PHASE => self.phase = text(value),
            BSTATUS => self.bstatus = text(value),
            FAIL_INDEX => {
                if let SimValue::Int32(i) = value {
                    self.fail_index = *i;
                }
            }
            other => {
                if let SimValue::Double(v) = value {
                    self.params.insert(other.to_string(), *v);
                }
            }
        }
    }
}

/// Writes that start a batch, plant convention: first RECIPE, the recipe
/// parameters and FAIL_INDEX back to 0 (one write), then BATCH_ID alone.
pub fn start_batch_writes(batch_id: &str, recipe: &str, params: &[(String, f64)]) -> Vec<Write> {
    let mut first = vec![pv(RECIPE, recipe)];
    first.extend(params.iter().map(|(p, v)| pv(p, *v)));
    first.push(pv(FAIL_INDEX, 0));
    vec![first, vec![pv(BATCH_ID, batch_id)]]
}

/// Writes that end a batch, plant convention: the final BSTATUS (unless the
/// unit already shows it), then BATCH_ID cleared alone.
pub fn end_batch_writes(current: &UnitValues, final_state: &str) -> Vec<Write> {
    let mut out = Vec::new();
    if current.bstatus != final_state {
        out.push(vec![pv(BSTATUS, final_state)]);
    }
    out.push(vec![pv(BATCH_ID, "")]);
    out
}

/// What a unit shows once the batch is gone: IDLE, no phase. Written after
/// BATCH_ID is cleared, so it belongs to no batch.
pub fn idle_writes() -> Write {
    vec![pv(BSTATUS, IDLE), pv(PHASE, "")]
}

/// Checks a scripted state name: only ISA-88 states are accepted, typos
/// would otherwise silently produce a batch no profile recognises.
pub fn check_state(state: &str) -> Result<(), SimError> {
    if STATES.contains(&state) {
        Ok(())
    } else {
        Err(SimError::Script(format!(
            "unknown ISA-88 state {state:?} (expected one of {STATES:?})"
        )))
    }
}

/// `B2026-000123`.
pub fn batch_id(year: i32, seq: u64) -> String {
    format!("B{year}-{seq:06}")
}

/// Recipes: name and nominal (CHARGE_AMT kg, REACT_TEMP_SP °C, REACT_TIME min).
const RECIPES: [(&str, f64, f64, f64); 4] = [
    ("PVC-S70", 10_000.0, 57.0, 300.0),
    ("PVC-S65", 9_500.0, 54.5, 330.0),
    ("PVC-E80", 8_000.0, 50.0, 360.0),
    ("PVC-K57", 11_000.0, 62.0, 270.0),
];

/// Simulated seconds each phase lasts (min, max) at speed 1.
const PHASE_SECONDS: [(f64, f64); 5] = [
    (20.0, 40.0),
    (30.0, 60.0),
    (40.0, 90.0),
    (30.0, 60.0),
    (20.0, 40.0),
];

/// Chance that a batch goes through HOLDING/HELD/RESTARTING once.
const P_HOLD: f64 = 0.3;
/// Chance that a batch is aborted ("rarely").
const P_ABORT: f64 = 0.07;
/// Chance that a batch is stopped by the operator.
const P_STOP: f64 = 0.03;

/// How a planned batch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Aborted,
    Stopped,
}

/// One batch of the automatic cycle, fully planned.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPlan {
    pub batch_id: String,
    pub recipe: String,
    pub params: Vec<(String, f64)>,
    pub held: bool,
    pub outcome: Outcome,
    /// `(simulated seconds, write)`, in time order, from the recipe write to
    /// the return to IDLE.
    pub writes: Vec<(f64, Write)>,
}

/// `v` rounded to `decimals` places, as the nearest double to the decimal
/// (dividing by 10^d, not multiplying by 0.1, so 54.4 prints as 54.4 and
/// not 54.400000000000006 in the recipe records).
fn round_dp(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

/// Plans one batch starting at `t0` (simulated seconds): recipe write,
/// BATCH_ID, RUNNING through the phases with maybe a hold, and the end
/// (COMPLETE, or ABORTED with a FAIL_INDEX, or STOPPED), BATCH_ID cleared,
/// IDLE.
pub fn plan_batch(rng: &mut impl Rng, t0: f64, batch_id: String) -> BatchPlan {
    // The draws happen in a fixed order (recipe, story, phases, end) so that
    // one seed always tells the same stories.
    let (recipe, params) = pick_recipe(rng);
    let story = Story::draw(rng);
    // A second between the recipe and BATCH_ID: the plant writes them in
    // separate steps.
    let mut writes: Vec<(f64, Write)> = start_batch_writes(&batch_id, recipe, &params)
        .into_iter()
        .enumerate()
        .map(|(i, w)| (t0 + i as f64, w))
        .collect();
    let phases = phase_writes(rng, &story, t0 + 2.0, &mut writes);
    let mut t = phases.t;
    if !phases.ended {
        writes.push((t, vec![pv(BSTATUS, COMPLETE)]));
    }
    // BATCH_ID cleared last, a few seconds after the final state.
    t += rng.gen_range(3.0..8.0);
    writes.push((t, vec![pv(BATCH_ID, "")]));
    t += 2.0;
    writes.push((t, idle_writes()));
    BatchPlan {
        batch_id,
        recipe: recipe.to_string(),
        params,
        held: phases.held,
        outcome: story.outcome,
        writes,
    }
}

/// A recipe and its parameters, each a little off the recipe's nominal value.
fn pick_recipe(rng: &mut impl Rng) -> (&'static str, Vec<(String, f64)>) {
    let (recipe, charge, temp, time) = RECIPES[rng.gen_range(0..RECIPES.len())];
    let params = vec![
        (
            "CHARGE_AMT".to_string(),
            round_dp(charge * rng.gen_range(0.95..1.05), 1),
        ),
        (
            "REACT_TEMP_SP".to_string(),
            round_dp(temp + rng.gen_range(-1.5..1.5), 1),
        ),
        (
            "REACT_TIME".to_string(),
            round_dp(time * rng.gen_range(0.9..1.1), 0),
        ),
    ];
    (recipe, params)
}

/// A batch's story, decided up front: where a hold and an abnormal end
/// happen, each as (phase index, fraction of that phase).
struct Story {
    hold: Option<(usize, f64)>,
    outcome: Outcome,
    /// Some exactly when `outcome` is not `Complete`.
    end_at: Option<(usize, f64)>,
}

impl Story {
    fn draw(rng: &mut impl Rng) -> Story {
        let hold = rng
            .gen_bool(P_HOLD)
            .then(|| (rng.gen_range(0..PHASES.len()), rng.gen_range(0.2..0.6)));
        let roll: f64 = rng.gen();
        let outcome = if roll < P_ABORT {
            Outcome::Aborted
        } else if roll < P_ABORT + P_STOP {
            Outcome::Stopped
        } else {
            Outcome::Complete
        };
        let end_at = (outcome != Outcome::Complete)
            .then(|| (rng.gen_range(0..PHASES.len()), rng.gen_range(0.3..0.9)));
        // A hold after the abnormal end would never happen.
        let hold = hold.filter(|&(hp, hf)| match end_at {
            Some((ep, ef)) => (hp, hf) < (ep, ef),
            None => true,
        });
        Story {
            hold,
            outcome,
            end_at,
        }
    }
}

/// Where the phases left the batch.
struct PhasesEnd {
    /// Time of the last state written.
    t: f64,
    held: bool,
    /// Ended abnormally (ABORTED or STOPPED written).
    ended: bool,
}

/// The phases from `t` on, RUNNING with the first, with the story's hold
/// and abnormal end (which stops the phases).
fn phase_writes(
    rng: &mut impl Rng,
    story: &Story,
    mut t: f64,
    writes: &mut Vec<(f64, Write)>,
) -> PhasesEnd {
    let mut held = false;
    for (i, phase) in PHASES.iter().enumerate() {
        let (lo, hi) = PHASE_SECONDS[i];
        let duration = rng.gen_range(lo..hi);
        let phase_start = t;
        if i == 0 {
            writes.push((t, vec![pv(BSTATUS, RUNNING), pv(PHASE, *phase)]));
        } else {
            writes.push((t, vec![pv(PHASE, *phase)]));
        }
        let mut extra = 0.0;
        if let Some((_, hf)) = story.hold.filter(|&(hp, _)| hp == i) {
            extra = hold_writes(rng, phase_start + duration * hf, writes);
            held = true;
        }
        if let Some((_, ef)) = story.end_at.filter(|&(ep, _)| ep == i) {
            let t = abnormal_end_writes(
                rng,
                story.outcome,
                phase_start + duration * ef + extra,
                writes,
            );
            return PhasesEnd {
                t,
                held,
                ended: true,
            };
        }
        t = phase_start + duration + extra;
    }
    PhasesEnd {
        t,
        held,
        ended: false,
    }
}

/// HOLDING, HELD, RESTARTING, RUNNING from `start` on; returns how long the
/// hold delayed the phase.
fn hold_writes(rng: &mut impl Rng, start: f64, writes: &mut Vec<(f64, Write)>) -> f64 {
    let mut th = start;
    writes.push((th, vec![pv(BSTATUS, HOLDING)]));
    th += rng.gen_range(2.0..5.0);
    writes.push((th, vec![pv(BSTATUS, HELD)]));
    th += rng.gen_range(10.0..40.0);
    writes.push((th, vec![pv(BSTATUS, RESTARTING)]));
    th += rng.gen_range(2.0..5.0);
    writes.push((th, vec![pv(BSTATUS, RUNNING)]));
    th - start
}

/// ABORTING then ABORTED (with a FAIL_INDEX), or STOPPING then STOPPED,
/// from `start` on; returns the time of the final state.
fn abnormal_end_writes(
    rng: &mut impl Rng,
    outcome: Outcome,
    start: f64,
    writes: &mut Vec<(f64, Write)>,
) -> f64 {
    let mut te = start;
    match outcome {
        Outcome::Aborted => {
            let fail = rng.gen_range(1..=40);
            // FAIL_INDEX with ABORTING: the reason is known when the abort
            // starts.
            writes.push((te, vec![pv(FAIL_INDEX, fail), pv(BSTATUS, ABORTING)]));
            te += rng.gen_range(3.0..8.0);
            writes.push((te, vec![pv(BSTATUS, ABORTED)]));
        }
        _ => {
            writes.push((te, vec![pv(BSTATUS, STOPPING)]));
            te += rng.gen_range(3.0..8.0);
            writes.push((te, vec![pv(BSTATUS, STOPPED)]));
        }
    }
    te
}

/// Seed for one unit's random stream: different units, different stories.
fn unit_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The automatic cycle of one unit: idle gap, batch, idle gap, ...
pub struct UnitCycle {
    index: usize,
    rng: StdRng,
    /// Simulated time the unit is free again (end of the last plan).
    free_at: f64,
    year: i32,
    /// Batch sequence shared with the other units (unique ids plant-wide).
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Plans made so far, for tests (kept short: only the last few).
    pub last_plans: VecDeque<BatchPlan>,
}

/// The cycles of all units, sharing one batch number sequence that starts at
/// a seed-derived number.
pub fn unit_cycles(seed: u64, year: i32) -> Vec<UnitCycle> {
    let first = StdRng::seed_from_u64(seed).gen_range(100..900);
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(first));
    (0..UNITS.len())
        .map(|index| {
            let mut rng = StdRng::seed_from_u64(unit_seed(seed, index));
            // The first batch starts soon (a demo shows one quickly), the
            // units staggered.
            let free_at = rng.gen_range(1.0..8.0) + index as f64 * 12.0;
            UnitCycle {
                index,
                rng,
                free_at,
                year,
                seq: seq.clone(),
                last_plans: VecDeque::new(),
            }
        })
        .collect()
}

impl UnitCycle {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl ObjectCycle for UnitCycle {
    fn plan_more(&mut self, out: &mut VecDeque<(f64, Write)>) {
        let t0 = self.free_at;
        // Numbers are handed out in planning order, which the merged
        // timeline makes deterministic.
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let plan = plan_batch(&mut self.rng, t0, batch_id(self.year, seq));
        let last = plan.writes.last().map_or(t0, |(t, _)| *t);
        self.free_at = last + self.rng.gen_range(15.0..45.0);
        out.extend(plan.writes.iter().cloned());
        if self.last_plans.len() >= 8 {
            self.last_plans.pop_front();
        }
        self.last_plans.push_back(plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::timeline::{Merged, Timeline};

    fn apply_all(v: &mut UnitValues, w: &Write) {
        for (p, x) in w {
            v.apply(p, x);
        }
    }

    /// Replays a plan write by write, checking the plant convention, and
    /// returns the BSTATUS values seen during the batch.
    fn check_plan(plan: &BatchPlan) -> Vec<String> {
        let mut v = UnitValues::idle();
        let mut states = Vec::new();
        let mut last_t = f64::MIN;
        let mut recipe_written_at = None;
        let mut cleared = false;
        for (t, w) in &plan.writes {
            assert!(*t >= last_t, "writes in time order");
            last_t = *t;
            let empty = SimValue::String(String::new());
            let sets_id = w.iter().any(|(p, x)| p == BATCH_ID && *x != empty);
            let clears_id = w.iter().any(|(p, x)| p == BATCH_ID && *x == empty);
            if w.iter().any(|(p, _)| p == RECIPE) {
                recipe_written_at = Some(*t);
            }
            if sets_id {
                // RECIPE and every parameter strictly before BATCH_ID.
                assert_eq!(w.len(), 1, "BATCH_ID set alone: {w:?}");
                let at = recipe_written_at.expect("recipe written before BATCH_ID");
                assert!(at < *t);
                assert_eq!(v.recipe, plan.recipe);
                for (p, x) in &plan.params {
                    assert_eq!(v.params.get(p), Some(x));
                }
                assert_eq!(v.fail_index, 0, "FAIL_INDEX reset before the batch");
            }
            if clears_id {
                assert_eq!(w.len(), 1, "BATCH_ID cleared alone: {w:?}");
                let final_state = match plan.outcome {
                    Outcome::Complete => COMPLETE,
                    Outcome::Aborted => ABORTED,
                    Outcome::Stopped => STOPPED,
                };
                assert_eq!(v.bstatus, final_state, "final state before BATCH_ID clear");
                cleared = true;
            } else if cleared {
                // After the clear only the return to IDLE, nothing of the batch.
                assert_eq!(*w, idle_writes());
            }
            apply_all(&mut v, w);
            if v.in_batch() && !clears_id {
                if let Some((_, SimValue::String(s))) = w.iter().find(|(p, _)| p == BSTATUS) {
                    states.push(s.clone());
                }
            }
        }
        assert!(cleared);
        assert_eq!((v.bstatus.as_str(), v.phase.as_str()), (IDLE, ""));
        states
    }

    #[test]
    fn start_and_end_writes_follow_the_plant_convention() {
        let params = vec![("CHARGE_AMT".to_string(), 1000.0)];
        let w = start_batch_writes("B1", "PVC-S70", &params);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0][0], pv(RECIPE, "PVC-S70"));
        assert!(w[0].contains(&pv("CHARGE_AMT", 1000.0)));
        assert_eq!(w[1], vec![pv(BATCH_ID, "B1")]);

        let mut v = UnitValues::idle();
        v.batch_id = "B1".into();
        v.bstatus = RUNNING.into();
        let w = end_batch_writes(&v, COMPLETE);
        assert_eq!(w, vec![vec![pv(BSTATUS, COMPLETE)], vec![pv(BATCH_ID, "")]]);
        v.bstatus = ABORTED.into();
        assert_eq!(end_batch_writes(&v, ABORTED), vec![vec![pv(BATCH_ID, "")]]);
    }

    #[test]
    fn recipe_parameters_print_as_the_plant_wrote_them() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let plan = plan_batch(&mut rng, 0.0, batch_id(2026, seed));
            for (name, v) in &plan.params {
                let text = serde_json::json!(v).to_string();
                let decimals = text.split('.').nth(1).map_or(0, str::len);
                assert!(decimals <= 1, "seed {seed}: {name} = {text}");
            }
        }
    }

    #[test]
    fn plans_follow_convention_and_cover_held_aborted_stopped() {
        let mut held = 0;
        let mut aborted = 0;
        let mut stopped = 0;
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let plan = plan_batch(&mut rng, 100.0, batch_id(2026, seed));
            let states = check_plan(&plan);
            assert_eq!(states.first().map(String::as_str), Some(RUNNING));
            let phases: Vec<&str> = plan
                .writes
                .iter()
                .flat_map(|(_, w)| w.iter())
                .filter_map(|(p, x)| match x {
                    SimValue::String(s) if p == PHASE && !s.is_empty() => Some(s.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(phases, &PHASES[..phases.len()], "phases in recipe order");
            match plan.outcome {
                Outcome::Complete => {
                    assert_eq!(phases, PHASES);
                    assert_eq!(states.last().map(String::as_str), Some(COMPLETE));
                }
                Outcome::Aborted => {
                    aborted += 1;
                    let n = states.len();
                    assert_eq!(&states[n - 2..], &[ABORTING, ABORTED]);
                    let fail = plan
                        .writes
                        .iter()
                        .flat_map(|(_, w)| w.iter())
                        .find_map(|(p, x)| match x {
                            SimValue::Int32(i) if p == FAIL_INDEX && *i != 0 => Some(*i),
                            _ => None,
                        });
                    assert!(fail.is_some(), "aborted batch sets FAIL_INDEX");
                }
                Outcome::Stopped => {
                    stopped += 1;
                    let n = states.len();
                    assert_eq!(&states[n - 2..], &[STOPPING, STOPPED]);
                }
            }
            if plan.held {
                held += 1;
                let pos = states.iter().position(|s| s == HOLDING).expect("HOLDING");
                assert_eq!(&states[pos..pos + 4], &[HOLDING, HELD, RESTARTING, RUNNING]);
            }
            // Phase durations of tens of seconds at speed 1 (an early abort or
            // stop makes a short batch).
            let len = plan.writes.last().map(|(t, _)| t - 100.0).unwrap_or(0.0);
            assert!(len > 5.0 && len < 600.0, "batch length {len}");
            for (p, v) in &plan.params {
                assert!(*v > 0.0, "{p} = {v}");
            }
        }
        assert!(held > 50 && held < 130, "held {held}");
        assert!(aborted > 5 && aborted < 45, "aborted {aborted}");
        assert!(stopped > 0 && stopped < 30, "stopped {stopped}");
    }

    #[test]
    fn cycle_is_deterministic_with_unique_batch_ids() {
        let run = |seed| {
            let mut t = Merged::new(unit_cycles(seed, 2026));
            (0..400)
                .map(|_| t.next_write().expect("endless"))
                .collect::<Vec<_>>()
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
        let mut last = 0.0;
        let mut ids = Vec::new();
        for p in &a {
            assert!(p.at_s >= last);
            last = p.at_s;
            for (param, v) in &p.write {
                if let (true, SimValue::String(s)) = (param == BATCH_ID, v) {
                    if !s.is_empty() {
                        assert!(s.starts_with("B2026-") && s.len() == 12, "{s}");
                        ids.push(s.clone());
                    }
                }
            }
        }
        let targets: std::collections::HashSet<usize> = a.iter().map(|p| p.target).collect();
        assert_eq!(targets.len(), 2, "both units run batches");
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "batch ids unique: {ids:?}");
        assert!(ids.len() >= 4);
    }

    #[test]
    fn unit_batches_do_not_overlap() {
        let mut t = Merged::new(unit_cycles(11, 2026));
        let mut v = [UnitValues::idle(), UnitValues::idle()];
        for _ in 0..2000 {
            let p = t.next_write().expect("endless");
            let u = &mut v[p.target];
            let sets = p
                .write
                .iter()
                .any(|(k, x)| k == BATCH_ID && *x != SimValue::String(String::new()));
            assert!(!(sets && u.in_batch()), "new batch while one runs");
            apply_all(u, &p.write);
        }
        assert!(t.cycle(0).last_plans.len() <= 8);
        assert_eq!(t.cycle(1).index(), 1);
    }

    #[test]
    fn states_are_checked() {
        for s in STATES {
            assert!(check_state(s).is_ok());
        }
        assert!(check_state("RUNING").is_err());
        assert_eq!(node_id("REACTOR_101", BATCH_ID), "REACTOR_101/BATCH_ID.CV");
    }
}
