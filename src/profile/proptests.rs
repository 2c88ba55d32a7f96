//! Property test of the DeltaV profile: random plant scripts (batches with
//! phases, states and fail indexes, written in the plant's convention) are
//! delivered in random publish groupings, each publish shuffled, with random
//! reconnects (current values re-delivered) and agent restarts (restored from
//! the snapshot saved with the last records, as the buffer stores it), and
//! recipe reads answered late or lost with the session. The batch and recipe
//! records must be exactly the script's: no missing, extra or duplicate
//! event.
//!
//! The script is generated from a proptest-shrinkable stream of choices, so a
//! failure shrinks to a short script.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use serde_json::{json, Value};

use super::testutil;
use super::{DeltaV, NodeKey, Output, ReadRequest, Sample, UnitParam};
use crate::record::{Kind, NewRecord};

const PHASES: [&str; 6] = ["CHARGE", "HEAT", "REACT", "COOL", "DISCHARGE", ""];
const STATES: [&str; 10] = [
    "IDLE",
    "RUNNING",
    "HOLDING",
    "HELD",
    "RESTARTING",
    "COMPLETE",
    "STOPPING",
    "STOPPED",
    "ABORTING",
    "ABORTED",
];
const RECIPES: [&str; 3] = ["PVC_STD", "PVC_FAST", "CLEAN"];
const UNITS: [&str; 2] = ["REACTOR_101", "REACTOR_102"];
const PARAMS: [&str; 2] = ["CHARGE_AMT", "REACT_TEMP_SP"];

/// Draws from the proptest-generated stream; zeros once it runs out, which
/// ends scripts quickly and lets shrinking shorten them.
struct Choices {
    data: Vec<u32>,
    at: usize,
}

impl Choices {
    fn below(&mut self, n: u32) -> u32 {
        let v = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        v % n.max(1)
    }

    fn chance(&mut self, one_in: u32) -> bool {
        self.below(one_in) == 0
    }
}

/// One write to the simulated server.
#[derive(Clone, Debug)]
struct Write {
    unit: usize,
    param: UnitParam,
    value: Value,
    ts: i64,
}

/// A batch record as expected: (event, batch_id, recipe, phase, state, fail_index).
type Expected = (String, String, String, String, String, i64);

/// Order a script may write values at one timestamp in (same as the
/// profile's tie-break, which the plant convention implies).
fn rank(p: UnitParam) -> u8 {
    match p {
        UnitParam::Recipe | UnitParam::RecipeParameter(_) => 0,
        UnitParam::FailIndex => 1,
        UnitParam::Phase => 2,
        UnitParam::Bstatus => 3,
        UnitParam::BatchId => 4,
    }
}

/// Generates one unit's script and the records it must produce.
struct UnitScript {
    unit: usize,
    writes: Vec<Write>,
    ts: i64,
    last_rank: u8,
    phase: String,
    state: String,
    fail: i64,
    recipe: String,
    active: Option<(String, String)>,
    expected: Vec<Expected>,
    /// (batch_id, recipe) for every batch started.
    recipes: Vec<(String, String)>,
}

impl UnitScript {
    fn write(&mut self, c: &mut Choices, param: UnitParam, value: Value) {
        // Writes at one timestamp only in the convention's order.
        let mut step = i64::from(c.below(3));
        if step == 0 && rank(param) <= self.last_rank {
            step = 1;
        }
        self.ts += step * 100;
        self.last_rank = rank(param);
        self.writes.push(Write {
            unit: self.unit,
            param,
            value,
            ts: self.ts,
        });
    }

    fn event(&mut self, event: &str) {
        if let Some((id, recipe)) = &self.active {
            self.expected.push((
                event.to_string(),
                id.clone(),
                recipe.clone(),
                self.phase.clone(),
                self.state.clone(),
                self.fail,
            ));
        }
    }

    fn set_phase(&mut self, c: &mut Choices, v: &str) {
        self.write(c, UnitParam::Phase, json!(v));
        if self.phase != v {
            self.phase = v.to_string();
            self.event("phase_changed");
        }
    }

    fn set_state(&mut self, c: &mut Choices, v: &str) {
        self.write(c, UnitParam::Bstatus, json!(v));
        if self.state != v {
            self.state = v.to_string();
            self.event("state_changed");
        }
    }

    fn set_fail(&mut self, c: &mut Choices, v: i64) {
        self.write(c, UnitParam::FailIndex, json!(v));
        self.fail = v;
    }

    /// Phase/state/fail changes, with or without a batch.
    fn noise(&mut self, c: &mut Choices, n: u32) {
        for _ in 0..n {
            match c.below(4) {
                0 => {
                    let v = PHASES[c.below(6) as usize];
                    self.set_phase(c, v);
                }
                1 => {
                    let v = STATES[c.below(10) as usize];
                    self.set_state(c, v);
                }
                2 => {
                    let v = i64::from(c.below(4));
                    self.set_fail(c, v);
                }
                _ => {
                    // The same value written again: no change.
                    let v = self.state.clone();
                    self.set_state(c, &v);
                }
            }
        }
    }

    fn generate(unit: usize, c: &mut Choices) -> UnitScript {
        let mut s = UnitScript {
            unit,
            writes: Vec::new(),
            ts: 1_000_000,
            last_rank: u8::MAX,
            phase: String::new(),
            state: String::new(),
            fail: 0,
            recipe: String::new(),
            active: None,
            expected: Vec::new(),
            recipes: Vec::new(),
        };
        // The server's values before the agent starts.
        s.set_phase(c, "");
        s.set_state(c, "IDLE");
        s.set_fail(c, 0);
        s.write(c, UnitParam::BatchId, json!(""));
        let batches = c.below(6);
        for b in 0..batches {
            let n = c.below(3);
            s.noise(c, n);
            // Convention: RECIPE and parameters, then BATCH_ID.
            let recipe = RECIPES[c.below(3) as usize].to_string();
            s.write(c, UnitParam::Recipe, json!(recipe));
            s.recipe = recipe.clone();
            for p in 0..PARAMS.len() {
                let v = json!(c.below(100));
                s.write(c, UnitParam::RecipeParameter(p), v);
            }
            let id = format!("U{unit}-B{b}");
            s.write(c, UnitParam::BatchId, json!(id));
            // A direct change ends the previous batch first.
            s.event("batch_ended");
            s.active = Some((id.clone(), recipe.clone()));
            s.event("batch_started");
            s.recipes.push((id, recipe));
            let n = c.below(8);
            s.noise(c, n);
            match c.below(3) {
                // Ends with a final state, then BATCH_ID cleared last.
                0 => {
                    let last = ["COMPLETE", "ABORTED", "STOPPED"][c.below(3) as usize];
                    s.set_state(c, last);
                    s.write(c, UnitParam::BatchId, json!(""));
                    s.event("batch_ended");
                    s.active = None;
                }
                1 => {
                    s.write(c, UnitParam::BatchId, json!(""));
                    s.event("batch_ended");
                    s.active = None;
                }
                // Runs on into the next batch id (or the end of the script).
                _ => {}
            }
        }
        s
    }
}

/// A simulated agent around the profile: commits records with the snapshot
/// (as the buffer does), answers reads, reconnects and restarts.
struct Agent {
    conn: crate::config::ConnectionConfig,
    profile: DeltaV,
    saved: Value,
    records: Vec<NewRecord>,
    pending_reads: VecDeque<ReadRequest>,
    /// Server's current values: (value, timestamp of the last write).
    server: HashMap<NodeKey, (Value, i64)>,
    now: i64,
}

impl Agent {
    fn new() -> Agent {
        let conn = testutil::deltav(&[(UNITS[0], &PARAMS), (UNITS[1], &PARAMS)]);
        let profile = DeltaV::new(&conn, testutil::deltav_of(&conn));
        Agent {
            conn,
            profile,
            saved: Value::Null,
            records: Vec::new(),
            pending_reads: VecDeque::new(),
            server: HashMap::new(),
            now: 0,
        }
    }

    fn commit(&mut self, out: Output) {
        if !out.records.is_empty() || out.state_changed {
            // Same transaction as the records.
            self.saved = self.profile.snapshot();
        }
        self.records.extend(out.records);
        self.pending_reads.extend(out.reads);
    }

    fn answer_reads(&mut self, c: &mut Choices, all: bool) {
        let mut keep = VecDeque::new();
        while let Some(read) = self.pending_reads.pop_front() {
            if !all && c.chance(2) {
                keep.push_back(read);
                continue;
            }
            let results: Vec<(NodeKey, Value, bool)> = read
                .keys
                .iter()
                .map(|k| {
                    let value = self
                        .server
                        .get(k)
                        .map(|(v, _)| v.clone())
                        .unwrap_or(Value::Null);
                    (*k, value, !c.chance(4))
                })
                .collect();
            let out = self.profile.on_read(read.id, &results);
            // The record carries exactly the answer (bad -> null).
            for r in &out.records {
                assert_eq!(r.kind, Kind::Recipe);
                let params = &r.data_json()["parameters"];
                for (i, (_, v, good)) in results.iter().enumerate() {
                    let expected = if *good { v.clone() } else { Value::Null };
                    assert_eq!(params[PARAMS[i]], expected);
                }
            }
            self.commit(out);
        }
        self.pending_reads = keep;
    }

    fn deliver(&mut self, c: &mut Choices, mut publish: Vec<Write>) {
        // Any order within the publish.
        for i in (1..publish.len()).rev() {
            let j = c.below(i as u32 + 1) as usize;
            publish.swap(i, j);
        }
        let samples: Vec<Sample> = publish
            .iter()
            .map(|w| Sample {
                key: NodeKey::Unit {
                    unit: w.unit,
                    param: w.param,
                },
                value: w.value.clone(),
                good: true,
                ts_ms: w.ts,
            })
            .collect();
        self.now = self
            .now
            .max(publish.iter().map(|w| w.ts).max().unwrap_or(0));
        let out = self.profile.on_values(&samples);
        self.commit(out);
    }

    /// The current values as a new subscription delivers them.
    fn redeliver(&mut self, c: &mut Choices) {
        let current: Vec<Write> = self
            .server
            .iter()
            .filter_map(|(k, (v, ts))| match k {
                NodeKey::Unit { unit, param } => Some(Write {
                    unit: *unit,
                    param: *param,
                    value: v.clone(),
                    ts: *ts,
                }),
                NodeKey::WorkCenter { .. } => None,
            })
            .collect();
        let mut current = current;
        current.sort_by_key(|w| (w.unit, w.param));
        self.deliver(c, current);
    }

    /// The source's 1 s tick (releases held batch ends).
    fn tick(&mut self) {
        let out = self.profile.on_tick(self.now);
        self.commit(out);
    }

    fn reconnect(&mut self, c: &mut Choices) {
        self.pending_reads.clear();
        let out = self.profile.on_disconnected(self.now);
        self.commit(out);
        let out = self.profile.on_connected(self.now + 1);
        self.commit(out);
        self.redeliver(c);
    }

    fn restart(&mut self, c: &mut Choices) {
        self.pending_reads.clear();
        self.profile = DeltaV::new(&self.conn, testutil::deltav_of(&self.conn));
        let saved = self.saved.clone();
        assert_eq!(self.profile.restore(&saved), Ok(()));
        let out = self.profile.on_connected(self.now + 1);
        self.commit(out);
        self.redeliver(c);
    }
}

fn batch_records(records: &[NewRecord], unit: &str) -> Vec<Expected> {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    records
        .iter()
        .filter(|r| r.kind == Kind::Batch && r.data_json()["unit"] == json!(unit))
        .map(|r| {
            let d = &r.data_json();
            (
                text(&d["event"]),
                text(&d["batch_id"]),
                text(&d["recipe"]),
                text(&d["phase"]),
                text(&d["state"]),
                d["fail_index"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

fn recipe_records(records: &[NewRecord], unit: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.kind == Kind::Recipe && r.data_json()["unit"] == json!(unit))
        .map(|r| {
            (
                r.data_json()["batch_id"].as_str().unwrap_or("").to_string(),
                r.data_json()["recipe"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn check_script(choices: Vec<u32>) {
    let mut c = Choices {
        data: choices,
        at: 0,
    };
    let scripts: Vec<UnitScript> = (0..UNITS.len())
        .map(|u| UnitScript::generate(u, &mut c))
        .collect();
    let mut writes: Vec<Write> = scripts.iter().flat_map(|s| s.writes.clone()).collect();
    // Stable: each unit's writes keep their script order at equal times.
    writes.sort_by_key(|w| w.ts);

    let mut agent = Agent::new();
    let out = agent.profile.on_connected(0);
    agent.commit(out);
    let mut rest = writes.as_slice();
    let mut first = true;
    while !rest.is_empty() {
        let n = (1 + c.below(6) as usize).min(rest.len());
        let (publish, tail) = rest.split_at(n);
        rest = tail;
        for w in publish {
            agent.server.insert(
                NodeKey::Unit {
                    unit: w.unit,
                    param: w.param,
                },
                (w.value.clone(), w.ts),
            );
        }
        agent.deliver(&mut c, publish.to_vec());
        agent.answer_reads(&mut c, false);
        if c.chance(3) {
            agent.tick();
        }
        if first {
            first = false;
            continue;
        }
        match c.below(8) {
            0 => agent.reconnect(&mut c),
            1 => agent.restart(&mut c),
            _ => {}
        }
    }
    agent.answer_reads(&mut c, true);
    agent.tick();
    agent.tick();

    for s in &scripts {
        let unit = UNITS[s.unit];
        assert_eq!(
            batch_records(&agent.records, unit),
            s.expected,
            "batch records of {unit}"
        );
        let mut expected = s.recipes.clone();
        expected.sort();
        assert_eq!(
            recipe_records(&agent.records, unit),
            expected,
            "recipe records of {unit}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn records_reconstruct_the_script(choices in prop::collection::vec(any::<u32>(), 0..600)) {
        check_script(choices);
    }
}

#[test]
fn a_long_fixed_script() {
    // Deterministic, dense choices: many batches, reconnects and restarts.
    let choices: Vec<u32> = (0..5_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) >> 7)
        .collect();
    check_script(choices);
}
