//! DeltaV profile (docs/profiles.md): per unit, `batch` records from BATCH_ID, PHASE,
//! BSTATUS and FAIL_INDEX, and a `recipe` record read at batch start.
//!
//! # Rules
//!
//! The profile keeps, per unit, the last known RECIPE, PHASE, BSTATUS and
//! FAIL_INDEX and the *reported* batch (the one whose `batch_started` was
//! emitted and whose `batch_ended` was not). Records are derived by comparing
//! new values with these, so a value delivered twice (reconnect re-delivery)
//! is no change:
//!
//! - BATCH_ID empty/whitespace/null means no batch. A batch id different from
//!   the reported one ends the reported batch (`batch_ended`, carrying the
//!   phase/state/fail_index in force) and, if non-empty, starts the new one
//!   (`batch_started` with the values in force, plus a Read of the recipe
//!   parameters). The batch's `recipe` is the RECIPE in force at its start
//!   (by the plant convention RECIPE is written before BATCH_ID) and stays
//!   fixed for the batch, so a RECIPE written early for the next batch does
//!   not relabel the current one.
//! - PHASE / BSTATUS changes during a batch: `phase_changed` /
//!   `state_changed`. FAIL_INDEX changes produce no record of their own; the
//!   value is carried in every batch record. Changes with no batch are only
//!   remembered (they are the "values in force" of the next batch_started).
//! - Order within a publish: samples are applied in source-timestamp order,
//!   and at equal timestamps in a fixed order: RECIPE, FAIL_INDEX, PHASE,
//!   BSTATUS, BATCH_ID last. So with the plant convention
//!   (RECIPE/parameters before BATCH_ID is set, final state before it is
//!   cleared) a publish holding `BSTATUS=COMPLETE` and `BATCH_ID=""` ends the
//!   batch with COMPLETE whatever the order of the two values in the publish,
//!   and a publish that holds the end of one batch and values written after
//!   it is split correctly. Timestamp order (rather than "all state values
//!   first") also makes the re-delivered current values after a reconnect
//!   tell the right story: values older than the batch id change belong to
//!   the old batch, newer ones to the new batch. (This relies on one unit's
//!   values having consistent source timestamps, as they come from one
//!   controller module.)
//! - The end of a batch is held for one to two ticks (1–2 s): a server may
//!   sample BSTATUS and BATCH_ID apart, so the final state written just
//!   before the clear can arrive in a later publish than the clear itself.
//!   While held, PHASE/BSTATUS/FAIL_INDEX values stamped at or before the
//!   clear still belong to the ending batch (with their `phase_changed` /
//!   `state_changed`); later ones are the values in force after it. A new
//!   batch id ends the held batch at once, so `batch_ended` always comes
//!   before the next `batch_started`.
//! - Non-Good values are ignored: an unknown value is not a change (a Bad
//!   BATCH_ID must not end a batch).
//! - Record `ts`: the source timestamp of the value that caused it; the
//!   `recipe` record has the batch start's timestamp (it is the batch's
//!   snapshot at start even though the values arrive with the Read answer).
//! - The recipe Read: `parameters` has every configured parameter, null for
//!   a Bad or missing result. A unit without recipe parameters gets its
//!   (empty) recipe record at once. A Read lost with its session is asked
//!   again after the reconnect (so the values are those at that moment), and
//!   a pending recipe survives a restart in the snapshot.
//!
//! # Persisted state
//!
//! Per unit (by name): the last known values, the reported batch and the
//! recipes still due. After a restart the re-delivered current values are
//! compared against them, exactly like a reconnect: no duplicate
//! `batch_started`, and a batch that ended or changed while the agent was
//! down is ended (with the last state the server still shows, if its
//! timestamp is before the batch id's change, else the last state reported).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::template::{expand, DELTAV_DEFAULT};
use super::{
    as_int, as_text, check_envelope, NodeKey, NodeSpec, Output, ReadRequest, Sample, SnapshotError,
    UnitParam, SNAPSHOT_VERSION,
};
use crate::config::{ConnectionConfig, ConnectionKind, DeltavConfig, UnitConfig};
use crate::record::{Kind, NewRecord};

/// Recipes still waiting for their Read answer, per unit. Only grows if the
/// source never answers; beyond this the oldest is given up (logged).
const MAX_RECIPES_DUE: usize = 16;

#[derive(Debug)]
pub struct DeltaV {
    connection: String,
    units: Vec<UnitConfig>,
    nodes: Vec<NodeSpec>,
    state: Vec<UnitState>,
    next_read_id: u64,
    /// Read id -> (unit index, batch id). Valid for the current session only.
    in_flight: HashMap<u64, (usize, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct UnitState {
    recipe: Option<String>,
    phase: Option<String>,
    state: Option<String>,
    fail_index: Option<i64>,
    /// The reported batch: batch_started emitted, batch_ended not yet.
    active: Option<ActiveBatch>,
    /// A batch whose id was cleared; batch_ended held (see the rules).
    ending: Option<EndingBatch>,
    recipe_due: Vec<RecipeDue>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EndingBatch {
    batch: ActiveBatch,
    /// Source timestamp of the BATCH_ID clear: the batch_ended `ts`.
    ts_ms: i64,
    phase: Option<String>,
    state: Option<String>,
    fail_index: Option<i64>,
    /// Ticks seen since; released at the second.
    ticks: u8,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ActiveBatch {
    batch_id: String,
    recipe: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecipeDue {
    batch_id: String,
    recipe: Option<String>,
    ts_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    v: u64,
    kind: String,
    units: BTreeMap<String, UnitState>,
}

#[derive(Clone, Copy)]
enum Event {
    Started,
    PhaseChanged,
    StateChanged,
    Ended,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Started => "batch_started",
            Event::PhaseChanged => "phase_changed",
            Event::StateChanged => "state_changed",
            Event::Ended => "batch_ended",
        }
    }
}

/// Order of application at equal source timestamps: what the plant writes
/// first by convention (recipe) first, BATCH_ID last; FAIL_INDEX before
/// BSTATUS so that an ABORTING carries the fail index written with it. A
/// fixed order also makes the records independent of the order of values
/// in the publish.
fn apply_rank(param: UnitParam) -> u8 {
    match param {
        UnitParam::Recipe | UnitParam::RecipeParameter(_) => 0,
        UnitParam::FailIndex => 1,
        UnitParam::Phase => 2,
        UnitParam::Bstatus => 3,
        UnitParam::BatchId => 4,
    }
}

impl DeltaV {
    pub fn new(conn: &ConnectionConfig, cfg: &DeltavConfig) -> DeltaV {
        let template = cfg.node_template.as_deref().unwrap_or(DELTAV_DEFAULT);
        let mut nodes = Vec::new();
        for (u, unit) in cfg.units.iter().enumerate() {
            let params = UnitParam::FIXED
                .into_iter()
                .chain((0..unit.recipe_parameters.len()).map(UnitParam::RecipeParameter));
            for param in params {
                let Some(name) = param.name(&unit.recipe_parameters) else {
                    continue;
                };
                nodes.push(NodeSpec {
                    key: NodeKey::Unit { unit: u, param },
                    node: expand(template, "unit", &unit.name, name),
                    subscribe: true,
                });
            }
        }
        DeltaV {
            connection: conn.id.clone(),
            units: cfg.units.clone(),
            nodes,
            state: vec![UnitState::default(); cfg.units.len()],
            next_read_id: 1,
            in_flight: HashMap::new(),
        }
    }

    pub fn nodes(&self) -> Vec<NodeSpec> {
        self.nodes.clone()
    }

    pub fn on_values(&mut self, values: &[Sample]) -> Output {
        let mut samples: Vec<(usize, UnitParam, &Sample)> = values
            .iter()
            .filter_map(|s| match s.key {
                NodeKey::Unit { unit, param } if unit < self.units.len() && s.good => {
                    Some((unit, param, s))
                }
                _ => None,
            })
            .collect();
        // Stable: same-timestamp values of one node keep their arrival order.
        samples.sort_by_key(|(_, param, s)| (s.ts_ms, apply_rank(*param)));
        let mut out = Output::default();
        for (unit, param, sample) in samples {
            self.apply(unit, param, sample, &mut out);
        }
        out
    }

    fn apply(&mut self, u: usize, param: UnitParam, s: &Sample, out: &mut Output) {
        let ts = s.ts_ms;
        match param {
            UnitParam::Recipe => self.state[u].recipe = as_text(&s.value),
            // The recipe snapshot comes from the Read at batch start.
            UnitParam::RecipeParameter(_) => {}
            UnitParam::Phase => {
                let v = as_text(&s.value);
                if let Some(e) = self.late_for_ending(u, ts) {
                    if e.phase != v {
                        e.phase = v.clone();
                        self.emit_ending(u, Event::PhaseChanged, ts, out);
                    }
                }
                let st = &mut self.state[u];
                if st.phase != v {
                    st.phase = v;
                    self.emit_batch(u, Event::PhaseChanged, ts, out);
                }
            }
            UnitParam::Bstatus => {
                let v = as_text(&s.value);
                if let Some(e) = self.late_for_ending(u, ts) {
                    if e.state != v {
                        e.state = v.clone();
                        self.emit_ending(u, Event::StateChanged, ts, out);
                    }
                }
                let st = &mut self.state[u];
                if st.state != v {
                    st.state = v;
                    self.emit_batch(u, Event::StateChanged, ts, out);
                }
            }
            UnitParam::FailIndex => {
                let v = match (&s.value, as_int(&s.value)) {
                    (Value::Null, _) => None,
                    (_, Some(n)) => Some(n),
                    (other, None) => {
                        tracing::warn!(
                            connection = %self.connection,
                            unit = %self.units[u].name,
                            value = %other,
                            "FAIL_INDEX is not an integer; ignored"
                        );
                        return;
                    }
                };
                if let Some(e) = self.late_for_ending(u, ts) {
                    if e.fail_index != v {
                        e.fail_index = v;
                        out.state_changed = true;
                    }
                }
                self.state[u].fail_index = v;
            }
            UnitParam::BatchId => {
                let id = as_text(&s.value).filter(|t| !t.trim().is_empty());
                let reported = self.state[u].active.as_ref().map(|a| &a.batch_id);
                if reported == id.as_ref() {
                    return;
                }
                if let Some(batch) = self.state[u].active.take() {
                    out.state_changed = true;
                    let st = &mut self.state[u];
                    st.ending = Some(EndingBatch {
                        batch,
                        ts_ms: ts,
                        phase: st.phase.clone(),
                        state: st.state.clone(),
                        fail_index: st.fail_index,
                        ticks: 0,
                    });
                }
                if let Some(id) = id {
                    self.release_ending(u, out);
                    self.start(u, id, ts, out);
                }
            }
        }
    }

    fn start(&mut self, u: usize, batch_id: String, ts: i64, out: &mut Output) {
        let st = &mut self.state[u];
        st.active = Some(ActiveBatch {
            batch_id: batch_id.clone(),
            recipe: st.recipe.clone(),
        });
        let due = RecipeDue {
            batch_id,
            recipe: st.recipe.clone(),
            ts_ms: ts,
        };
        self.emit_batch(u, Event::Started, ts, out);
        if self.units[u].recipe_parameters.is_empty() {
            out.records.push(self.recipe_record(u, &due, Map::new()));
            return;
        }
        let st = &mut self.state[u];
        if st.recipe_due.len() >= MAX_RECIPES_DUE {
            let lost = st.recipe_due.remove(0);
            tracing::warn!(
                connection = %self.connection,
                unit = %self.units[u].name,
                batch_id = %lost.batch_id,
                "recipe read never answered; recipe record given up"
            );
        }
        st.recipe_due.push(due.clone());
        self.request_recipe(u, &due.batch_id, out);
    }

    fn request_recipe(&mut self, u: usize, batch_id: &str, out: &mut Output) {
        let id = self.next_read_id;
        self.next_read_id += 1;
        self.in_flight.insert(id, (u, batch_id.to_string()));
        let keys = (0..self.units[u].recipe_parameters.len())
            .map(|i| NodeKey::Unit {
                unit: u,
                param: UnitParam::RecipeParameter(i),
            })
            .collect();
        out.reads.push(ReadRequest { id, keys });
    }

    /// A batch record for the reported batch, with the values in force.
    /// Nothing when no batch is reported (changes with no batch are silent).
    fn emit_batch(&self, u: usize, event: Event, ts: i64, out: &mut Output) {
        let st = &self.state[u];
        if let Some(active) = &st.active {
            out.records.push(self.batch_record(
                u,
                active,
                (&st.phase, &st.state, st.fail_index),
                event,
                ts,
            ));
        }
    }

    /// A batch record for the held ending batch, with its own values.
    fn emit_ending(&self, u: usize, event: Event, ts: i64, out: &mut Output) {
        if let Some(e) = &self.state[u].ending {
            out.records.push(self.batch_record(
                u,
                &e.batch,
                (&e.phase, &e.state, e.fail_index),
                event,
                ts,
            ));
        }
    }

    fn batch_record(
        &self,
        u: usize,
        batch: &ActiveBatch,
        (phase, state, fail_index): (&Option<String>, &Option<String>, Option<i64>),
        event: Event,
        ts: i64,
    ) -> NewRecord {
        NewRecord {
            connection: self.connection.clone(),
            kind: Kind::Batch,
            ts_ms: ts,
            data: json!({
                "unit": self.units[u].name,
                "batch_id": batch.batch_id,
                "recipe": batch.recipe,
                "phase": phase,
                "state": state,
                "fail_index": fail_index,
                "event": event.as_str(),
            })
            .to_string(),
        }
    }

    /// The held ending batch if a value stamped `ts` still belongs to it.
    fn late_for_ending(&mut self, u: usize, ts: i64) -> Option<&mut EndingBatch> {
        self.state[u].ending.as_mut().filter(|e| ts <= e.ts_ms)
    }

    /// Emits the held `batch_ended`, if any.
    fn release_ending(&mut self, u: usize, out: &mut Output) {
        if let Some(e) = &self.state[u].ending {
            self.emit_ending(u, Event::Ended, e.ts_ms, out);
            self.state[u].ending = None;
        }
    }

    fn recipe_record(
        &self,
        u: usize,
        due: &RecipeDue,
        parameters: Map<String, Value>,
    ) -> NewRecord {
        NewRecord {
            connection: self.connection.clone(),
            kind: Kind::Recipe,
            ts_ms: due.ts_ms,
            data: json!({
                "unit": self.units[u].name,
                "batch_id": due.batch_id,
                "recipe": due.recipe,
                "parameters": parameters,
            })
            .to_string(),
        }
    }

    /// Releases the batch ends held since the previous tick (so each is
    /// held one to two tick periods).
    pub fn on_tick(&mut self, _now_ms: i64) -> Output {
        let mut out = Output::default();
        for u in 0..self.units.len() {
            match self.state[u].ending.as_mut() {
                Some(e) if e.ticks == 0 => e.ticks = 1,
                Some(_) => self.release_ending(u, &mut out),
                None => {}
            }
        }
        out
    }

    pub fn on_read(&mut self, request_id: u64, results: &[(NodeKey, Value, bool)]) -> Output {
        let mut out = Output::default();
        let Some((u, batch_id)) = self.in_flight.remove(&request_id) else {
            tracing::debug!(connection = %self.connection, request_id, "answer to an unknown read; ignored");
            return out;
        };
        let Some(pos) = self.state[u]
            .recipe_due
            .iter()
            .position(|d| d.batch_id == batch_id)
        else {
            return out;
        };
        let due = self.state[u].recipe_due.remove(pos);
        let parameters = self.units[u]
            .recipe_parameters
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let key = NodeKey::Unit {
                    unit: u,
                    param: UnitParam::RecipeParameter(i),
                };
                let value = results
                    .iter()
                    .find(|(k, _, good)| *k == key && *good)
                    .map(|(_, v, _)| v.clone())
                    .unwrap_or(Value::Null);
                (name.clone(), value)
            })
            .collect();
        out.records.push(self.recipe_record(u, &due, parameters));
        out
    }

    pub fn on_disconnected(&mut self, _at_ms: i64) -> Output {
        // Reads of the lost session will never be answered.
        self.in_flight.clear();
        Output::default()
    }

    pub fn on_connected(&mut self, _at_ms: i64) -> Output {
        // Ask again for every recipe still due (lost with the previous
        // session, or restored from a snapshot).
        self.in_flight.clear();
        let mut out = Output::default();
        for u in 0..self.units.len() {
            let due: Vec<String> = self.state[u]
                .recipe_due
                .iter()
                .map(|d| d.batch_id.clone())
                .collect();
            for batch_id in due {
                self.request_recipe(u, &batch_id, &mut out);
            }
        }
        out
    }

    pub fn snapshot(&self) -> Value {
        let snap = Snapshot {
            v: SNAPSHOT_VERSION,
            kind: ConnectionKind::Deltav.as_str().to_string(),
            units: self
                .units
                .iter()
                .zip(&self.state)
                .map(|(unit, st)| (unit.name.clone(), st.clone()))
                .collect(),
        };
        serde_json::to_value(snap).unwrap_or(Value::Null)
    }

    pub fn restore(&mut self, snapshot: &Value) -> Result<(), SnapshotError> {
        if !check_envelope(snapshot, ConnectionKind::Deltav)? {
            return Ok(());
        }
        let snap: Snapshot = serde_json::from_value(snapshot.clone())
            .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        let mut units = snap.units;
        for (unit, st) in self.units.iter().zip(self.state.iter_mut()) {
            *st = units.remove(&unit.name).unwrap_or_default();
        }
        for name in units.keys() {
            tracing::info!(connection = %self.connection, unit = %name, "unit no longer configured; its saved batch state is dropped");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
