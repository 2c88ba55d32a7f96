//! DeltaV rules of docs/profiles.md, one test per rule or transition.

use serde_json::{json, Value};

use super::*;
use crate::profile::testutil;

const R1: usize = 0;
const R2: usize = 1;

/// R1 has two recipe parameters, R2 none.
fn profile() -> DeltaV {
    DeltaV::new(
        &testutil::connection(ConnectionKind::Deltav),
        &testutil::deltav_config(&[
            ("REACTOR_101", &["CHARGE_AMT", "REACT_TEMP_SP"]),
            ("REACTOR_102", &[]),
        ]),
    )
}

fn key(unit: usize, param: UnitParam) -> NodeKey {
    NodeKey::Unit { unit, param }
}

fn s(unit: usize, param: UnitParam, value: Value, ts_ms: i64) -> Sample {
    Sample {
        key: key(unit, param),
        value,
        good: true,
        ts_ms,
    }
}

use UnitParam::{BatchId, Bstatus, FailIndex, Phase, Recipe};

/// (event, batch_id, phase, state, fail_index) of the batch records.
fn events(out: &Output) -> Vec<(String, String, Value, Value, Value)> {
    out.records
        .iter()
        .filter(|r| r.kind == Kind::Batch)
        .map(|r| {
            let d = &r.data_json();
            (
                d["event"].as_str().unwrap_or("").to_string(),
                d["batch_id"].as_str().unwrap_or("").to_string(),
                d["phase"].clone(),
                d["state"].clone(),
                d["fail_index"].clone(),
            )
        })
        .collect()
}

fn ev(
    event: &str,
    batch: &str,
    phase: &str,
    state: &str,
    fail: i64,
) -> (String, String, Value, Value, Value) {
    (
        event.into(),
        batch.into(),
        json!(phase),
        json!(state),
        json!(fail),
    )
}

/// `on_values` and then two ticks: everything the source has after ~2 s,
/// held batch ends released. (Tests of the hold itself call `on_values`.)
fn settle(p: &mut DeltaV, values: &[Sample]) -> Output {
    let mut out = p.on_values(values);
    out.append(p.on_tick(0));
    out.append(p.on_tick(0));
    out
}

/// Values in force before a batch, then RECIPE, then BATCH_ID (plant convention).
fn start_batch(p: &mut DeltaV, unit: usize, batch: &str, recipe: &str, ts: i64) -> Output {
    let mut out = p.on_values(&[
        s(unit, Phase, json!("IDLE_PHASE"), ts),
        s(unit, Bstatus, json!("IDLE"), ts),
        s(unit, FailIndex, json!(0), ts),
        s(unit, Recipe, json!(recipe), ts),
    ]);
    out.append(p.on_values(&[s(unit, BatchId, json!(batch), ts + 10)]));
    out
}

#[test]
fn nodes_from_default_and_custom_templates() {
    let p = profile();
    let nodes = p.nodes();
    // 5 fixed + 2 parameters for R1, 5 fixed for R2.
    assert_eq!(nodes.len(), 12);
    assert!(nodes.iter().all(|n| n.subscribe));
    let find = |k| nodes.iter().find(|n| n.key == k).map(|n| n.node.as_str());
    assert_eq!(
        find(key(R1, BatchId)),
        Some("ns=2;s=REACTOR_101/BATCH_ID.CV")
    );
    assert_eq!(
        find(key(R1, Bstatus)),
        Some("ns=2;s=REACTOR_101/BSTATUS.CV")
    );
    assert_eq!(
        find(key(R1, FailIndex)),
        Some("ns=2;s=REACTOR_101/FAIL_INDEX.CV")
    );
    assert_eq!(
        find(key(R1, UnitParam::RecipeParameter(1))),
        Some("ns=2;s=REACTOR_101/REACT_TEMP_SP.CV")
    );
    assert_eq!(find(key(R2, Phase)), Some("ns=2;s=REACTOR_102/PHASE.CV"));
    assert_eq!(find(key(R2, UnitParam::RecipeParameter(0))), None);

    let mut cfg = testutil::deltav_config(&[("R1", &["A"])]);
    cfg.node_template = Some("nsu=urn:plantgate:sim:deltav;s={unit}.{param}".into());
    let nodes = DeltaV::new(&testutil::connection(ConnectionKind::Deltav), &cfg).nodes();
    assert_eq!(nodes[0].node, "nsu=urn:plantgate:sim:deltav;s=R1.BATCH_ID");
    assert_eq!(nodes[5].node, "nsu=urn:plantgate:sim:deltav;s=R1.A");
}

#[test]
fn full_isa88_cycle_with_hold_and_restart() {
    let mut p = profile();
    let out = start_batch(&mut p, R1, "B-001", "PVC_STD", 1_000);
    assert_eq!(
        events(&out),
        vec![ev("batch_started", "B-001", "IDLE_PHASE", "IDLE", 0)]
    );
    let started = &out.records[0];
    assert_eq!(started.connection, "deltav-line1");
    assert_eq!(started.ts_ms, 1_010);
    assert_eq!(
        started.data_json(),
        json!({"unit":"REACTOR_101","batch_id":"B-001","recipe":"PVC_STD","phase":"IDLE_PHASE",
               "state":"IDLE","fail_index":0,"event":"batch_started"})
    );
    // The recipe snapshot is read at that moment.
    assert_eq!(out.reads.len(), 1);
    assert_eq!(
        out.reads[0].keys,
        vec![
            key(R1, UnitParam::RecipeParameter(0)),
            key(R1, UnitParam::RecipeParameter(1))
        ]
    );

    let steps: Vec<(UnitParam, &str, (&str, &str, &str))> = vec![
        (
            Bstatus,
            "RUNNING",
            ("state_changed", "IDLE_PHASE", "RUNNING"),
        ),
        (Phase, "CHARGE", ("phase_changed", "CHARGE", "RUNNING")),
        (Phase, "HEAT", ("phase_changed", "HEAT", "RUNNING")),
        (Bstatus, "HOLDING", ("state_changed", "HEAT", "HOLDING")),
        (Bstatus, "HELD", ("state_changed", "HEAT", "HELD")),
        (
            Bstatus,
            "RESTARTING",
            ("state_changed", "HEAT", "RESTARTING"),
        ),
        (Bstatus, "RUNNING", ("state_changed", "HEAT", "RUNNING")),
        (Phase, "REACT", ("phase_changed", "REACT", "RUNNING")),
        (Phase, "COOL", ("phase_changed", "COOL", "RUNNING")),
        (
            Phase,
            "DISCHARGE",
            ("phase_changed", "DISCHARGE", "RUNNING"),
        ),
        (
            Bstatus,
            "COMPLETE",
            ("state_changed", "DISCHARGE", "COMPLETE"),
        ),
    ];
    for (i, (param, value, (event, phase, state))) in steps.into_iter().enumerate() {
        let ts = 2_000 + i as i64 * 1_000;
        let out = settle(&mut p, &[s(R1, param, json!(value), ts)]);
        assert_eq!(
            events(&out),
            vec![ev(event, "B-001", phase, state, 0)],
            "step {i}"
        );
        assert_eq!(out.records[0].ts_ms, ts);
        assert!(out.reads.is_empty());
    }
    let out = settle(&mut p, &[s(R1, BatchId, json!(""), 20_000)]);
    assert_eq!(
        events(&out),
        vec![ev("batch_ended", "B-001", "DISCHARGE", "COMPLETE", 0)]
    );
    assert_eq!(out.records[0].ts_ms, 20_000);
    assert_eq!(out.records[0].data_json()["recipe"], json!("PVC_STD"));
}

#[test]
fn abort_path_carries_fail_index() {
    let mut p = profile();
    start_batch(&mut p, R1, "B-002", "PVC_STD", 1_000);
    settle(&mut p, &[s(R1, Bstatus, json!("RUNNING"), 2_000)]);
    // FAIL_INDEX has no record of its own; it is carried by the next ones.
    assert!(settle(&mut p, &[s(R1, FailIndex, json!(17), 3_000)]).is_empty());
    let out = settle(&mut p, &[s(R1, Bstatus, json!("ABORTING"), 4_000)]);
    assert_eq!(
        events(&out),
        vec![ev("state_changed", "B-002", "IDLE_PHASE", "ABORTING", 17)]
    );
    let out = settle(&mut p, &[s(R1, Bstatus, json!("ABORTED"), 5_000)]);
    assert_eq!(
        events(&out),
        vec![ev("state_changed", "B-002", "IDLE_PHASE", "ABORTED", 17)]
    );
    let out = settle(&mut p, &[s(R1, BatchId, json!(""), 6_000)]);
    assert_eq!(
        events(&out),
        vec![ev("batch_ended", "B-002", "IDLE_PHASE", "ABORTED", 17)]
    );
}

#[test]
fn stop_path() {
    let mut p = profile();
    start_batch(&mut p, R1, "B-003", "R", 1_000);
    let mut got = Vec::new();
    for (i, st) in ["RUNNING", "STOPPING", "STOPPED"].iter().enumerate() {
        got.extend(events(&settle(
            &mut p,
            &[s(R1, Bstatus, json!(st), 2_000 + i as i64)],
        )));
    }
    got.extend(events(&settle(&mut p, &[s(R1, BatchId, json!(""), 3_000)])));
    assert_eq!(
        got,
        vec![
            ev("state_changed", "B-003", "IDLE_PHASE", "RUNNING", 0),
            ev("state_changed", "B-003", "IDLE_PHASE", "STOPPING", 0),
            ev("state_changed", "B-003", "IDLE_PHASE", "STOPPED", 0),
            ev("batch_ended", "B-003", "IDLE_PHASE", "STOPPED", 0),
        ]
    );
}

fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first.clone());
            all.push(p);
        }
    }
    all
}

#[test]
fn start_publish_in_any_order() {
    // Everything written within one publishing interval with one timestamp.
    let publish = vec![
        s(R1, Recipe, json!("PVC_STD"), 1_000),
        s(R1, Phase, json!("CHARGE"), 1_000),
        s(R1, Bstatus, json!("RUNNING"), 1_000),
        s(R1, FailIndex, json!(0), 1_000),
        s(R1, BatchId, json!("B-1"), 1_000),
    ];
    let perms = permutations(&publish);
    assert_eq!(perms.len(), 120);
    for perm in perms {
        let mut p = profile();
        let out = settle(&mut p, &perm);
        assert_eq!(
            events(&out),
            vec![ev("batch_started", "B-1", "CHARGE", "RUNNING", 0)]
        );
        assert_eq!(out.records[0].data_json()["recipe"], json!("PVC_STD"));
        assert_eq!(out.reads.len(), 1);
    }
}

#[test]
fn end_publish_in_any_order_carries_the_final_state() {
    let publish = vec![
        s(R1, Bstatus, json!("COMPLETE"), 9_000),
        s(R1, Phase, json!("DISCHARGE"), 9_000),
        s(R1, FailIndex, json!(0), 9_000),
        s(R1, BatchId, json!(""), 9_000),
    ];
    for perm in permutations(&publish) {
        let mut p = profile();
        start_batch(&mut p, R1, "B-1", "R", 1_000);
        settle(
            &mut p,
            &[
                s(R1, Bstatus, json!("RUNNING"), 2_000),
                s(R1, Phase, json!("COOL"), 2_000),
            ],
        );
        let out = settle(&mut p, &perm);
        assert_eq!(
            events(&out),
            vec![
                ev("phase_changed", "B-1", "DISCHARGE", "RUNNING", 0),
                ev("state_changed", "B-1", "DISCHARGE", "COMPLETE", 0),
                ev("batch_ended", "B-1", "DISCHARGE", "COMPLETE", 0),
            ],
            "{perm:?}"
        );
    }
}

#[test]
fn publish_is_applied_in_timestamp_order() {
    // End of a batch and the unit's reset to IDLE in the same publish, the
    // reset listed first: the batch ends with COMPLETE, the reset is silent.
    let mut p = profile();
    start_batch(&mut p, R1, "B-1", "R", 1_000);
    settle(&mut p, &[s(R1, Bstatus, json!("COMPLETE"), 2_000)]);
    let out = settle(
        &mut p,
        &[
            s(R1, Bstatus, json!("IDLE"), 3_500),
            s(R1, BatchId, json!(""), 3_000),
        ],
    );
    assert_eq!(
        events(&out),
        vec![ev("batch_ended", "B-1", "IDLE_PHASE", "COMPLETE", 0)]
    );

    // Start of a batch and its first phase a little later, in one publish.
    let out = settle(
        &mut p,
        &[
            s(R1, Phase, json!("CHARGE"), 5_100),
            s(R1, Bstatus, json!("RUNNING"), 5_100),
            s(R1, BatchId, json!("B-2"), 5_000),
        ],
    );
    assert_eq!(
        events(&out),
        vec![
            ev("batch_started", "B-2", "IDLE_PHASE", "IDLE", 0),
            ev("phase_changed", "B-2", "CHARGE", "IDLE", 0),
            ev("state_changed", "B-2", "CHARGE", "RUNNING", 0),
        ]
    );
    assert_eq!(out.records[1].ts_ms, 5_100);
}

#[test]
fn several_values_of_one_node_in_one_publish() {
    // A queue size > 1 delivers intermediate values; each is a change.
    let mut p = profile();
    start_batch(&mut p, R1, "B-1", "R", 1_000);
    let out = settle(
        &mut p,
        &[
            s(R1, Phase, json!("CHARGE"), 2_000),
            s(R1, Phase, json!("HEAT"), 2_100),
            s(R1, Phase, json!("REACT"), 2_200),
        ],
    );
    let phases: Vec<Value> = events(&out).into_iter().map(|e| e.2).collect();
    assert_eq!(phases, vec![json!("CHARGE"), json!("HEAT"), json!("REACT")]);
}

#[test]
fn batch_id_change_without_empty_in_between() {
    let mut p = profile();
    start_batch(&mut p, R1, "A", "RECIPE_A", 1_000);
    settle(&mut p, &[s(R1, Bstatus, json!("COMPLETE"), 2_000)]);
    // RECIPE for the next batch is written while A is still shown: it does
    // not relabel A.
    assert!(settle(&mut p, &[s(R1, Recipe, json!("RECIPE_B"), 3_000)]).is_empty());
    let out = settle(&mut p, &[s(R1, BatchId, json!("B"), 4_000)]);
    assert_eq!(
        events(&out),
        vec![
            ev("batch_ended", "A", "IDLE_PHASE", "COMPLETE", 0),
            ev("batch_started", "B", "IDLE_PHASE", "COMPLETE", 0),
        ]
    );
    assert_eq!(out.records[0].data_json()["recipe"], json!("RECIPE_A"));
    assert_eq!(out.records[1].data_json()["recipe"], json!("RECIPE_B"));
    assert!(out.records.iter().all(|r| r.ts_ms == 4_000));
    assert_eq!(out.reads.len(), 1);
    let out = p.on_read(out.reads[0].id, &[]);
    assert_eq!(out.records[0].data_json()["batch_id"], json!("B"));
    assert_eq!(out.records[0].data_json()["recipe"], json!("RECIPE_B"));
}

#[test]
fn no_batch_no_records() {
    let mut p = profile();
    let out = settle(
        &mut p,
        &[
            s(R1, Phase, json!("CHARGE"), 1_000),
            s(R1, Bstatus, json!("RUNNING"), 1_000),
            s(R1, FailIndex, json!(3), 1_000),
            s(R1, Recipe, json!("X"), 1_000),
            s(R1, UnitParam::RecipeParameter(0), json!(12.5), 1_000),
            s(R1, BatchId, json!(""), 1_000),
        ],
    );
    assert!(out.is_empty());
    for (i, st) in [
        "HOLDING",
        "HELD",
        "RESTARTING",
        "COMPLETE",
        "ABORTED",
        "IDLE",
    ]
    .iter()
    .enumerate()
    {
        assert!(settle(&mut p, &[s(R1, Bstatus, json!(st), 2_000 + i as i64)]).is_empty());
    }
    // Null and whitespace-only batch ids are "no batch" too.
    assert!(settle(&mut p, &[s(R1, BatchId, Value::Null, 3_000)]).is_empty());
    assert!(settle(&mut p, &[s(R1, BatchId, json!("  "), 3_100)]).is_empty());
    // And after a batch has ended, changes are silent again.
    start_batch(&mut p, R1, "B", "R", 4_000);
    settle(&mut p, &[s(R1, BatchId, json!(""), 5_000)]);
    assert!(settle(&mut p, &[s(R1, Phase, json!("CLEAN"), 6_000)]).is_empty());
}

#[test]
fn bad_values_are_ignored() {
    let mut p = profile();
    start_batch(&mut p, R1, "B", "R", 1_000);
    let bad = |param, value| Sample {
        key: key(R1, param),
        value,
        good: false,
        ts_ms: 2_000,
    };
    // A Bad (e.g. BadCommunicationError) empty BATCH_ID must not end the batch.
    assert!(settle(&mut p, &[bad(BatchId, json!("")), bad(Phase, Value::Null)]).is_empty());
    // A FAIL_INDEX that is not an integer is ignored (the last one is kept).
    assert!(settle(&mut p, &[s(R1, FailIndex, json!("n/a"), 2_100)]).is_empty());
    let out = settle(&mut p, &[s(R1, BatchId, json!(""), 3_000)]);
    assert_eq!(
        events(&out),
        vec![ev("batch_ended", "B", "IDLE_PHASE", "IDLE", 0)]
    );
}

#[test]
fn unknown_keys_are_ignored() {
    let mut p = profile();
    let out = settle(
        &mut p,
        &[
            s(7, BatchId, json!("X"), 1_000),
            Sample {
                key: NodeKey::WorkCenter {
                    work_center: 0,
                    param: crate::profile::WcParam::State,
                },
                value: json!("RUNNING"),
                good: true,
                ts_ms: 1_000,
            },
        ],
    );
    assert!(out.is_empty());
}

#[test]
fn units_are_independent_in_one_publish() {
    let mut p = profile();
    let out = settle(
        &mut p,
        &[
            s(R2, Recipe, json!("R2_RECIPE"), 1_000),
            s(R1, BatchId, json!("B1"), 1_000),
            s(R2, BatchId, json!("B2"), 1_000),
            s(R1, Recipe, json!("R1_RECIPE"), 1_000),
        ],
    );
    let started: Vec<(Value, Value)> = out
        .records
        .iter()
        .filter(|r| r.kind == Kind::Batch)
        .map(|r| {
            (
                r.data_json()["unit"].clone(),
                r.data_json()["recipe"].clone(),
            )
        })
        .collect();
    assert_eq!(started.len(), 2);
    assert!(started.contains(&(json!("REACTOR_101"), json!("R1_RECIPE"))));
    assert!(started.contains(&(json!("REACTOR_102"), json!("R2_RECIPE"))));
    // R2 has no recipe parameters: its (empty) recipe record comes at once;
    // R1's needs a read.
    let recipes: Vec<&NewRecord> = out
        .records
        .iter()
        .filter(|r| r.kind == Kind::Recipe)
        .collect();
    assert_eq!(recipes.len(), 1);
    assert_eq!(
        recipes[0].data_json(),
        json!({"unit":"REACTOR_102","batch_id":"B2","recipe":"R2_RECIPE","parameters":{}})
    );
    assert_eq!(out.reads.len(), 1);
}

#[test]
fn recipe_read_answer_with_a_bad_parameter() {
    let mut p = profile();
    let out = start_batch(&mut p, R1, "B-7", "PVC_STD", 1_000);
    let read = &out.reads[0];
    let answer = p.on_read(
        read.id,
        &[
            (key(R1, UnitParam::RecipeParameter(0)), json!(1250.0), true),
            // BadNodeIdUnknown or similar: null, the record is still emitted.
            (key(R1, UnitParam::RecipeParameter(1)), Value::Null, false),
        ],
    );
    assert!(answer.reads.is_empty());
    assert_eq!(answer.records.len(), 1);
    let r = &answer.records[0];
    assert_eq!(r.kind, Kind::Recipe);
    assert_eq!(r.connection, "deltav-line1");
    assert_eq!(r.ts_ms, 1_010, "the batch start's timestamp");
    assert_eq!(
        r.data_json(),
        json!({"unit":"REACTOR_101","batch_id":"B-7","recipe":"PVC_STD",
               "parameters":{"CHARGE_AMT":1250.0,"REACT_TEMP_SP":null}})
    );
    // A second answer to the same id is ignored, as is an unknown id.
    assert!(p.on_read(read.id, &[]).is_empty());
    assert!(p.on_read(999, &[]).is_empty());
}

#[test]
fn recipe_missing_results_are_null_and_late_answers_still_count() {
    let mut p = profile();
    let out = start_batch(&mut p, R1, "B-8", "R", 1_000);
    let id = out.reads[0].id;
    // The batch ends before the answer: the recipe still belongs to B-8.
    settle(&mut p, &[s(R1, BatchId, json!(""), 2_000)]);
    let answer = p.on_read(
        id,
        &[(key(R1, UnitParam::RecipeParameter(1)), json!(80), true)],
    );
    assert_eq!(
        answer.records[0].data_json()["parameters"],
        json!({"CHARGE_AMT":null,"REACT_TEMP_SP":80})
    );
    assert_eq!(answer.records[0].data_json()["batch_id"], json!("B-8"));
}

#[test]
fn read_lost_with_the_session_is_asked_again() {
    let mut p = profile();
    let out = start_batch(&mut p, R1, "B-9", "R", 1_000);
    let old_id = out.reads[0].id;
    p.on_disconnected(1_500);
    let again = p.on_connected(3_000);
    assert!(again.records.is_empty());
    assert_eq!(again.reads.len(), 1);
    assert_ne!(again.reads[0].id, old_id);
    assert_eq!(again.reads[0].keys, out.reads[0].keys);
    // A stray answer to the old request is ignored.
    assert!(p.on_read(old_id, &[]).is_empty());
    let answer = p.on_read(again.reads[0].id, &[]);
    assert_eq!(answer.records.len(), 1);
    // Nothing is due any more.
    p.on_disconnected(4_000);
    assert!(p.on_connected(5_000).is_empty());
}

/// The current values of R1 as a server re-delivers them after a
/// (re)connect: each with the timestamp of its last change.
fn redelivery(
    batch: &str,
    recipe: &str,
    phase: &str,
    state: &str,
    fail: i64,
    ts: [i64; 5],
) -> Vec<Sample> {
    vec![
        s(R1, BatchId, json!(batch), ts[0]),
        s(R1, Recipe, json!(recipe), ts[1]),
        s(R1, Phase, json!(phase), ts[2]),
        s(R1, Bstatus, json!(state), ts[3]),
        s(R1, FailIndex, json!(fail), ts[4]),
        s(R1, UnitParam::RecipeParameter(0), json!(1.0), ts[1]),
    ]
}

/// R1 in batch B-1 (recipe R), phase HEAT, RUNNING.
fn mid_batch() -> DeltaV {
    let mut p = profile();
    let out = start_batch(&mut p, R1, "B-1", "R", 1_000);
    p.on_read(out.reads[0].id, &[]);
    settle(
        &mut p,
        &[
            s(R1, Bstatus, json!("RUNNING"), 2_000),
            s(R1, Phase, json!("HEAT"), 3_000),
        ],
    );
    p
}

#[test]
fn reconnect_redelivery_is_not_a_change() {
    let mut p = mid_batch();
    assert!(p.on_disconnected(4_000).is_empty());
    assert!(p.on_connected(9_000).is_empty());
    let out = settle(
        &mut p,
        &redelivery(
            "B-1",
            "R",
            "HEAT",
            "RUNNING",
            0,
            [1_010, 1_000, 3_000, 2_000, 1_000],
        ),
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn reconnect_reports_changes_made_during_the_outage() {
    // Still B-1 but phase and state moved on.
    let mut p = mid_batch();
    p.on_disconnected(4_000);
    p.on_connected(9_000);
    let out = settle(
        &mut p,
        &redelivery(
            "B-1",
            "R",
            "REACT",
            "HELD",
            0,
            [1_010, 1_000, 5_000, 6_000, 1_000],
        ),
    );
    assert_eq!(
        events(&out),
        vec![
            ev("phase_changed", "B-1", "REACT", "RUNNING", 0),
            ev("state_changed", "B-1", "REACT", "HELD", 0),
        ]
    );

    // B-1 completed and its id was cleared during the outage; the unit still
    // shows the final state, written before the clear.
    let mut p = mid_batch();
    p.on_disconnected(4_000);
    p.on_connected(9_000);
    let mut publish = redelivery(
        "",
        "R",
        "DISCHARGE",
        "COMPLETE",
        0,
        [7_000, 1_000, 5_000, 6_000, 1_000],
    );
    publish.reverse();
    let out = settle(&mut p, &publish);
    assert_eq!(
        events(&out),
        vec![
            ev("phase_changed", "B-1", "DISCHARGE", "RUNNING", 0),
            ev("state_changed", "B-1", "DISCHARGE", "COMPLETE", 0),
            ev("batch_ended", "B-1", "DISCHARGE", "COMPLETE", 0),
        ]
    );

    // B-1 ended and B-2 started during the outage.
    let mut p = mid_batch();
    p.on_disconnected(4_000);
    p.on_connected(9_000);
    let out = settle(
        &mut p,
        &redelivery(
            "B-2",
            "R2",
            "CHARGE",
            "RUNNING",
            0,
            [7_000, 6_500, 7_500, 7_500, 1_000],
        ),
    );
    assert_eq!(
        events(&out),
        vec![
            ev("batch_ended", "B-1", "HEAT", "RUNNING", 0),
            ev("batch_started", "B-2", "HEAT", "RUNNING", 0),
            ev("phase_changed", "B-2", "CHARGE", "RUNNING", 0),
        ]
    );
    assert_eq!(out.records[1].data_json()["recipe"], json!("R2"));
    assert_eq!(out.reads.len(), 1);
}

#[test]
fn restart_mid_batch_no_duplicate_start_and_correct_end() {
    let p = mid_batch();
    let saved = p.snapshot();
    // The snapshot is small and readable.
    assert_eq!(saved["kind"], json!("deltav"));
    assert_eq!(
        saved["units"]["REACTOR_101"]["active"]["batch_id"],
        json!("B-1")
    );

    let mut q = profile();
    q.restore(&saved).unwrap();
    assert!(q.on_connected(50_000).is_empty(), "no recipe is due");
    let out = settle(
        &mut q,
        &redelivery(
            "B-1",
            "R",
            "HEAT",
            "RUNNING",
            0,
            [1_010, 1_000, 3_000, 2_000, 1_000],
        ),
    );
    assert!(out.is_empty(), "{out:?}");
    let out = settle(&mut q, &[s(R1, Phase, json!("COOL"), 60_000)]);
    assert_eq!(
        events(&out),
        vec![ev("phase_changed", "B-1", "COOL", "RUNNING", 0)]
    );
    let out = settle(
        &mut q,
        &[
            s(R1, Bstatus, json!("COMPLETE"), 61_000),
            s(R1, BatchId, json!(""), 61_000),
        ],
    );
    assert_eq!(
        events(&out),
        vec![
            ev("state_changed", "B-1", "COOL", "COMPLETE", 0),
            ev("batch_ended", "B-1", "COOL", "COMPLETE", 0),
        ]
    );
    assert_eq!(out.records[1].data_json()["recipe"], json!("R"));
}

#[test]
fn restart_after_the_batch_changed_while_down() {
    let saved = mid_batch().snapshot();
    let mut q = profile();
    q.restore(&saved).unwrap();
    q.on_connected(50_000);
    let out = settle(
        &mut q,
        &redelivery(
            "B-2",
            "R2",
            "CHARGE",
            "RUNNING",
            0,
            [40_000, 39_000, 41_000, 30_000, 1_000],
        ),
    );
    assert_eq!(
        events(&out),
        vec![
            ev("batch_ended", "B-1", "HEAT", "RUNNING", 0),
            ev("batch_started", "B-2", "HEAT", "RUNNING", 0),
            ev("phase_changed", "B-2", "CHARGE", "RUNNING", 0),
        ]
    );
    // The restored state goes on: no duplicate on a further re-delivery.
    q.on_disconnected(60_000);
    q.on_connected(61_000);
    let again = settle(
        &mut q,
        &redelivery(
            "B-2",
            "R2",
            "CHARGE",
            "RUNNING",
            0,
            [40_000, 39_000, 41_000, 30_000, 1_000],
        ),
    );
    assert!(again.records.is_empty());
}

#[test]
fn restart_with_a_recipe_still_due() {
    // Crash after batch_started was committed, before the read answer.
    let mut p = profile();
    let out = start_batch(&mut p, R1, "B-5", "R", 1_000);
    assert_eq!(out.reads.len(), 1);
    let saved = p.snapshot();

    let mut q = profile();
    q.restore(&saved).unwrap();
    let out = q.on_connected(10_000);
    assert_eq!(out.reads.len(), 1);
    let answer = q.on_read(
        out.reads[0].id,
        &[
            (key(R1, UnitParam::RecipeParameter(0)), json!(1), true),
            (key(R1, UnitParam::RecipeParameter(1)), json!(2), true),
        ],
    );
    assert_eq!(
        answer.records[0].data_json(),
        json!({"unit":"REACTOR_101","batch_id":"B-5","recipe":"R",
               "parameters":{"CHARGE_AMT":1,"REACT_TEMP_SP":2}})
    );
    assert_eq!(answer.records[0].ts_ms, 1_010);
    // And the re-delivered batch id is no new start.
    let out = settle(&mut q, &[s(R1, BatchId, json!("B-5"), 1_010)]);
    assert!(out.is_empty());
}

#[test]
fn snapshot_restore_edge_cases() {
    let mut p = profile();
    assert_eq!(p.restore(&Value::Null), Ok(()));
    assert!(matches!(
        p.restore(&json!({"v":1,"kind":"optomes"})),
        Err(SnapshotError::KindMismatch { .. })
    ));
    assert!(matches!(
        p.restore(&json!({"v":1,"kind":"deltav","units":"nope"})),
        Err(SnapshotError::Malformed(_))
    ));
    // A unit no longer configured is dropped; a new one starts fresh.
    let saved = json!({"v":1,"kind":"deltav","units":{
        "OLD_UNIT":{"active":{"batch_id":"X","recipe":null}},
        "REACTOR_102":{"phase":"P","active":{"batch_id":"Y","recipe":"RY"}}
    }});
    p.restore(&saved).unwrap();
    let snap = p.snapshot();
    assert!(snap["units"].get("OLD_UNIT").is_none());
    assert_eq!(snap["units"]["REACTOR_101"]["active"], Value::Null);
    let out = settle(&mut p, &[s(R2, BatchId, json!(""), 5_000)]);
    assert_eq!(out.records[0].data_json()["batch_id"], json!("Y"));
    assert_eq!(out.records[0].data_json()["phase"], json!("P"));
    assert_eq!(out.records[0].data_json()["event"], json!("batch_ended"));
}

#[test]
fn snapshot_round_trips() {
    let p = mid_batch();
    let mut q = profile();
    q.restore(&p.snapshot()).unwrap();
    assert_eq!(q.snapshot(), p.snapshot());
}

#[test]
fn ticks_do_nothing_without_an_ending_batch() {
    let mut p = mid_batch();
    assert!(p.on_tick(1_000_000).is_empty());
    assert!(p.on_tick(1_001_000).is_empty());
}

/// The server sampled BATCH_ID before BSTATUS: the clear arrives first,
/// the final state (stamped before it) one publish later. The batch still
/// ends with COMPLETE; a value stamped after the clear is not the batch's.
#[test]
fn final_state_arriving_after_the_clear_still_belongs_to_the_batch() {
    let mut p = mid_batch();
    let out = p.on_values(&[s(R1, BatchId, json!(""), 9_000)]);
    assert!(out.records.is_empty(), "batch_ended is held: {out:?}");
    // ... in the saved state, as the server may overwrite its values.
    assert!(out.state_changed);
    let out = p.on_values(&[
        s(R1, Bstatus, json!("COMPLETE"), 8_999),
        s(R1, FailIndex, json!(3), 8_999),
    ]);
    assert_eq!(
        events(&out),
        vec![ev("state_changed", "B-1", "HEAT", "COMPLETE", 3)]
    );
    assert!(p
        .on_values(&[s(R1, Bstatus, json!("IDLE"), 9_500)])
        .is_empty());
    // Held for one to two ticks.
    assert!(p.on_tick(10_000).is_empty());
    let out = p.on_tick(11_000);
    assert_eq!(
        events(&out),
        vec![ev("batch_ended", "B-1", "HEAT", "COMPLETE", 3)]
    );
    assert_eq!(out.records[0].ts_ms, 9_000);
    assert!(p.on_tick(12_000).is_empty());
    // The next batch starts with the values in force after the end.
    let out = settle(&mut p, &[s(R1, BatchId, json!("B-2"), 13_000)]);
    assert_eq!(
        events(&out),
        vec![ev("batch_started", "B-2", "HEAT", "IDLE", 3)]
    );
}

/// A new batch id while the previous end is still held: `batch_ended`
/// comes first, at once.
#[test]
fn new_batch_releases_the_held_end_first() {
    let mut p = mid_batch();
    assert!(p
        .on_values(&[s(R1, BatchId, json!(""), 9_000)])
        .records
        .is_empty());
    let out = p.on_values(&[s(R1, BatchId, json!("B-2"), 9_100)]);
    assert_eq!(
        events(&out),
        vec![
            ev("batch_ended", "B-1", "HEAT", "RUNNING", 0),
            ev("batch_started", "B-2", "HEAT", "RUNNING", 0),
        ]
    );
    assert!(p.on_tick(10_000).is_empty());
    assert!(p.on_tick(11_000).is_empty());
}

/// A held end survives a restart (it is in the snapshot) and is released
/// after it, once.
#[test]
fn held_end_survives_a_restart() {
    let mut p = mid_batch();
    let out = p.on_values(&[
        s(R1, BatchId, json!(""), 9_000),
        s(R1, Bstatus, json!("COMPLETE"), 8_999),
    ]);
    assert_eq!(events(&out).len(), 1);
    let mut q = profile();
    q.restore(&p.snapshot()).unwrap();
    assert!(q.on_connected(20_000).reads.is_empty());
    let out = settle(
        &mut q,
        &redelivery(
            "",
            "R",
            "HEAT",
            "COMPLETE",
            0,
            [9_000, 500, 600, 8_999, 700],
        ),
    );
    assert_eq!(
        events(&out),
        vec![ev("batch_ended", "B-1", "HEAT", "COMPLETE", 0)]
    );
}
