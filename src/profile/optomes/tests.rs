//! OptoMES rules of docs/profiles.md. Times are written relative to T0 =
//! 2026-11-28T10:00:00Z, which is aligned to both 60 s and 15 min.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::profile::testutil;

const T0: i64 = 1_795_860_000_000;
const S: i64 = 1_000;
const MIN: i64 = 60 * S;
const FILLER: usize = 0;
const CAPPER: usize = 1;

use WcParam::{DowntimeReason, GoodCount, IdealCycleTime, Product, RejectCount, State, WorkOrder};

fn profile(window: Duration) -> OptoMes {
    OptoMes::new(
        &testutil::connection(ConnectionKind::Optomes),
        &testutil::optomes_config(&["LINE_A_FILLER", "LINE_A_CAPPER"], window),
    )
}

fn s(wc: usize, param: WcParam, value: Value, ts_ms: i64) -> Sample {
    Sample {
        key: NodeKey::WorkCenter {
            work_center: wc,
            param,
        },
        value,
        good: true,
        ts_ms,
    }
}

/// What happens, by agent wall-clock time of arrival.
enum Act {
    Connect,
    Disconnect,
    Publish(Vec<Sample>),
}

/// Runs a script against the profile with a tick every second from `from`
/// to `to` (inclusive), inputs arriving before the tick of their second.
fn run(p: &mut OptoMes, mut script: Vec<(i64, Act)>, from: i64, to: i64) -> Vec<NewRecord> {
    script.sort_by_key(|(t, _)| *t);
    let mut script = script.into_iter().peekable();
    let mut records = Vec::new();
    let mut now = from;
    while now <= to {
        while let Some((at, _)) = script.peek() {
            if *at > now {
                break;
            }
            let Some((at, act)) = script.next() else {
                break;
            };
            let out = match act {
                Act::Connect => p.on_connected(at),
                Act::Disconnect => p.on_disconnected(at),
                Act::Publish(v) => p.on_values(&v),
            };
            records.extend(out.records);
        }
        records.extend(p.on_tick(now).records);
        now += S;
    }
    records
}

/// A live value: published 200 ms after its source timestamp.
fn live(wc: usize, param: WcParam, value: Value, ts: i64) -> (i64, Act) {
    (ts + 200, Act::Publish(vec![s(wc, param, value, ts)]))
}

fn of_kind(records: &[NewRecord], kind: Kind) -> Vec<&NewRecord> {
    records.iter().filter(|r| r.kind == kind).collect()
}

fn approx(v: &Value, expected: f64) {
    let got = v.as_f64().unwrap_or(f64::NAN);
    assert!((got - expected).abs() < 1e-9, "{got} != {expected}");
}

#[test]
fn nodes_from_default_and_custom_templates() {
    let p = profile(Duration::from_secs(60));
    let nodes = p.nodes();
    assert_eq!(nodes.len(), 14);
    assert!(nodes.iter().all(|n| n.subscribe));
    assert_eq!(nodes[0].node, "ns=2;s=LINE_A_FILLER.STATE");
    assert_eq!(nodes[6].node, "ns=2;s=LINE_A_FILLER.DOWNTIME_REASON");
    assert_eq!(
        nodes[10].key,
        NodeKey::WorkCenter {
            work_center: CAPPER,
            param: GoodCount
        }
    );
    assert_eq!(nodes[10].node, "ns=2;s=LINE_A_CAPPER.GOOD_COUNT");

    let mut cfg = testutil::optomes_config(&["WC"], Duration::from_secs(60));
    cfg.node_template = Some("nsu=urn:plantgate:sim:optomes;s={work_center}/{param}".into());
    assert_eq!(
        OptoMes::new(&testutil::connection(ConnectionKind::Optomes), &cfg).nodes()[1].node,
        "nsu=urn:plantgate:sim:optomes;s=WC/WORK_ORDER"
    );
    assert_eq!(p.grace_ms(), 2_000);
}

/// The current values as a server delivers them on a new subscription:
/// each with the timestamp of its last change.
fn initial_values(wc: usize, ts: i64) -> Vec<Sample> {
    vec![
        s(wc, State, json!("RUNNING"), ts),
        s(wc, WorkOrder, json!("WO-1"), ts),
        s(wc, Product, json!("P-1"), ts),
        s(wc, GoodCount, json!(1000), ts),
        s(wc, RejectCount, json!(10), ts),
        s(wc, IdealCycleTime, json!(2.0), ts),
        s(wc, DowntimeReason, json!(""), ts),
    ]
}

#[test]
fn a_scripted_hour_with_15_minute_windows() {
    let mut p = profile(Duration::from_secs(15 * 60));
    let t = |secs: i64| T0 + secs * S;
    let f = FILLER;
    let script = vec![
        // Agent connects at 09:59:50; the server re-delivers old values.
        (t(-10), Act::Connect),
        (t(-10) + 300, Act::Publish(initial_values(f, t(-3600)))),
        // 10:00-10:15
        live(f, GoodCount, json!(1050), t(100)),
        live(f, RejectCount, json!(12), t(150)),
        live(f, GoodCount, json!(1120), t(290)),
        (
            t(300) + 200,
            Act::Publish(vec![
                s(f, State, json!("DOWN"), t(300)),
                s(f, DowntimeReason, json!("JAM"), t(300)),
            ]),
        ),
        live(f, DowntimeReason, json!("MOTOR_JAM"), t(360)),
        live(f, State, json!("RUNNING"), t(420)),
        live(f, GoodCount, json!(1300), t(800)),
        live(f, RejectCount, json!(15), t(830)),
        live(f, State, json!("PLANNED_STOP"), t(840)),
        // 10:15-10:30: changeover to WO-2 with counter reset.
        live(f, State, json!("CHANGEOVER"), t(960)),
        (
            t(970) + 200,
            Act::Publish(vec![
                s(f, WorkOrder, json!("WO-2"), t(970)),
                s(f, Product, json!("P-2"), t(970)),
                s(f, IdealCycleTime, json!(1.5), t(970)),
            ]),
        ),
        (
            t(975) + 200,
            Act::Publish(vec![
                s(f, GoodCount, json!(5), t(975)),
                s(f, RejectCount, json!(0), t(975)),
            ]),
        ),
        live(f, State, json!("RUNNING"), t(1200)),
        (
            t(1500) + 200,
            Act::Publish(vec![
                s(f, GoodCount, json!(180), t(1500)),
                s(f, RejectCount, json!(4), t(1500)),
            ]),
        ),
        live(f, GoodCount, json!(390), t(1700)),
        // 10:30-10:45: nothing at all (idle window).
        // 10:45-11:00: OPC UA outage 10:48:20-10:50:00; during it the line
        // went DOWN at 10:48:40 and 60 parts were made (unobserved).
        (t(2900), Act::Disconnect),
        (t(3000), Act::Connect),
        (
            t(3000) + 300,
            Act::Publish(vec![
                s(f, State, json!("DOWN"), t(2920)),
                s(f, DowntimeReason, json!("NO_MATERIAL"), t(2920)),
                s(f, GoodCount, json!(450), t(2950)),
                s(f, RejectCount, json!(4), t(1500)),
                s(f, WorkOrder, json!("WO-2"), t(970)),
                s(f, Product, json!("P-2"), t(970)),
                s(f, IdealCycleTime, json!(1.5), t(970)),
            ]),
        ),
        live(f, State, json!("RUNNING"), t(3300)),
        live(f, GoodCount, json!(470), t(3400)),
    ];
    let records = run(&mut p, script, t(-20), t(3610));

    let downtime = of_kind(&records, Kind::Downtime);
    assert_eq!(downtime.len(), 2);
    // DOWN 10:05:00-10:07:00, reason reclassified while down.
    assert_eq!(
        downtime[0].data_json(),
        json!({"work_center":"LINE_A_FILLER","reason":"MOTOR_JAM",
               "started":"2026-11-28T10:05:00.000Z","ended":"2026-11-28T10:07:00.000Z","duration_s":120.0})
    );
    assert_eq!(downtime[0].ts_ms, t(420));
    // DOWN during the outage: its start comes from the source timestamp.
    assert_eq!(
        downtime[1].data_json(),
        json!({"work_center":"LINE_A_FILLER","reason":"NO_MATERIAL",
               "started":"2026-11-28T10:48:40.000Z","ended":"2026-11-28T10:55:00.000Z","duration_s":380.0})
    );

    let oee = of_kind(&records, Kind::Oee);
    // The capper is never heard from: no records. The filler has 5 windows.
    assert!(oee
        .iter()
        .all(|r| r.data_json()["work_center"] == json!("LINE_A_FILLER")));
    let starts: Vec<String> = oee
        .iter()
        .map(|r| {
            r.data_json()["window_start"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        starts,
        [
            "2026-11-28T09:45:00.000Z",
            "2026-11-28T10:00:00.000Z",
            "2026-11-28T10:15:00.000Z",
            "2026-11-28T10:30:00.000Z",
            "2026-11-28T10:45:00.000Z"
        ]
    );
    for r in &oee {
        let data = r.data_json();
        let end = data["window_end"].as_str().unwrap_or("");
        assert_eq!(format_ts(r.ts_ms), end, "ts is the window end");
    }

    // 09:45-10:00, observed from the connect only: 10 s RUNNING, no parts.
    // planned 10, A = 10/10 = 1, P = 2.0*0/10 = 0, Q = null, OEE = null.
    let w = &oee[0].data_json();
    assert_eq!(w["complete"], json!(false));
    assert_eq!(
        (w["run_time_s"].clone(), w["planned_time_s"].clone()),
        (json!(10.0), json!(10.0))
    );
    assert_eq!(
        (w["good_count"].clone(), w["total_count"].clone()),
        (json!(0), json!(0))
    );
    approx(&w["availability"], 1.0);
    approx(&w["performance"], 0.0);
    assert_eq!(
        (w["quality"].clone(), w["oee"].clone()),
        (Value::Null, Value::Null)
    );

    // 10:00-10:15: RUNNING 0-300 and 420-840 = 720 s, DOWN 300-420 = 120 s,
    // PLANNED_STOP 840-900 = 60 s. good = 50+70+180 = 300, reject = 2+3 = 5.
    // planned = 900-60 = 840; A = 720/840 = 6/7; P = 2.0*305/720 = 61/72;
    // Q = 300/305 = 60/61; OEE = 6/7 * 61/72 * 60/61 = 5/7 (= 2.0*300/840).
    assert_eq!(
        oee[1].data_json(),
        json!({"work_center":"LINE_A_FILLER",
               "window_start":"2026-11-28T10:00:00.000Z","window_end":"2026-11-28T10:15:00.000Z",
               "state":"PLANNED_STOP","work_order":"WO-1","product":"P-1",
               "good_count":300,"reject_count":5,"total_count":305,
               "run_time_s":720.0,"planned_time_s":840.0,"downtime_s":120.0,
               "availability":6.0/7.0,"performance":2.0*305.0/720.0,"quality":300.0/305.0,
               "oee":(6.0/7.0)*(2.0*305.0/720.0)*(300.0/305.0),"complete":true})
    );
    approx(&oee[1].data_json()["oee"], 5.0 / 7.0);

    // 10:15-10:30: PLANNED_STOP 900-960 = 60 s, CHANGEOVER 960-1200 = 240 s,
    // RUNNING 1200-1800 = 600 s. Counter reset 1300 -> 5 counts 5; then
    // +175, +210: good = 390; reject reset 15 -> 0 counts 0, then +4.
    // planned = 840; A = 600/840 = 5/7; P = 1.5*394/600 = 0.985;
    // Q = 390/394; OEE = 1.5*390/840 = 0.6964285714...
    let w = &oee[2].data_json();
    assert_eq!(w["complete"], json!(true));
    assert_eq!(
        (
            w["state"].clone(),
            w["work_order"].clone(),
            w["product"].clone()
        ),
        (json!("RUNNING"), json!("WO-2"), json!("P-2"))
    );
    assert_eq!(
        (
            w["good_count"].clone(),
            w["reject_count"].clone(),
            w["total_count"].clone()
        ),
        (json!(390), json!(4), json!(394))
    );
    assert_eq!(
        (
            w["run_time_s"].clone(),
            w["planned_time_s"].clone(),
            w["downtime_s"].clone()
        ),
        (json!(600.0), json!(840.0), json!(0.0))
    );
    approx(&w["availability"], 5.0 / 7.0);
    approx(&w["performance"], 0.985);
    approx(&w["quality"], 390.0 / 394.0);
    approx(&w["oee"], 1.5 * 390.0 / 840.0);

    // 10:30-10:45: idle, RUNNING throughout, nothing counted.
    // A = 1, P = 0, Q = null, OEE = null; complete.
    let w = &oee[3].data_json();
    assert_eq!(w["complete"], json!(true));
    assert_eq!(w["state"], json!("RUNNING"));
    assert_eq!(
        (
            w["run_time_s"].clone(),
            w["planned_time_s"].clone(),
            w["total_count"].clone()
        ),
        (json!(900.0), json!(900.0), json!(0))
    );
    approx(&w["availability"], 1.0);
    approx(&w["performance"], 0.0);
    assert_eq!(
        (w["quality"].clone(), w["oee"].clone()),
        (Value::Null, Value::Null)
    );

    // 10:45-11:00 with the outage 2900-3000: observed RUNNING 2700-2900
    // (200 s), DOWN 3000-3300 (300 s), RUNNING 3300-3600 (300 s) = 800 s.
    // The 60 parts of the outage only move the baseline; +20 at 3400.
    // planned = 800; A = 500/800 = 0.625; P = 1.5*20/500 = 0.06; Q = 1;
    // OEE = 0.0375; complete = false.
    let w = &oee[4].data_json();
    assert_eq!(w["complete"], json!(false));
    assert_eq!(
        (
            w["run_time_s"].clone(),
            w["planned_time_s"].clone(),
            w["downtime_s"].clone()
        ),
        (json!(500.0), json!(800.0), json!(300.0))
    );
    assert_eq!(
        (w["good_count"].clone(), w["reject_count"].clone()),
        (json!(20), json!(0))
    );
    approx(&w["availability"], 0.625);
    approx(&w["performance"], 0.06);
    approx(&w["quality"], 1.0);
    approx(&w["oee"], 0.0375);
    assert_eq!(w["state"], json!("RUNNING"));
}

#[test]
fn windows_of_60_s_align_to_the_minute() {
    let mut p = profile(Duration::from_secs(60));
    // Connect at 10:00:37.5; a window closes 2 s (grace) after its end.
    let script = vec![
        (T0 + 37_500, Act::Connect),
        (
            T0 + 37_600,
            Act::Publish(initial_values(FILLER, T0 - 3_600 * S)),
        ),
    ];
    let records = run(&mut p, script, T0, T0 + 2 * MIN + 2 * S);
    let oee = of_kind(&records, Kind::Oee);
    assert_eq!(oee.len(), 2);
    assert_eq!(
        oee[0].data_json()["window_start"],
        json!("2026-11-28T10:00:00.000Z")
    );
    assert_eq!(
        oee[0].data_json()["window_end"],
        json!("2026-11-28T10:01:00.000Z")
    );
    assert_eq!(oee[0].data_json()["run_time_s"], json!(22.5));
    assert_eq!(oee[0].data_json()["complete"], json!(false));
    assert_eq!(
        oee[1].data_json()["window_start"],
        json!("2026-11-28T10:01:00.000Z")
    );
    assert_eq!(oee[1].data_json()["run_time_s"], json!(60.0));
    assert_eq!(oee[1].data_json()["complete"], json!(true));
    assert_eq!(oee[1].ts_ms, T0 + 2 * MIN);
}

#[test]
fn a_window_closes_only_after_the_grace() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    assert!(p.on_tick(T0 + MIN).is_empty());
    assert!(p.on_tick(T0 + MIN + 1_999).is_empty());
    // A late publish within the grace still counts in its window, and the
    // next window's first values do not change "in force at window end".
    p.on_values(&[
        s(FILLER, GoodCount, json!(1007), T0 + MIN - 100),
        s(FILLER, State, json!("DOWN"), T0 + MIN + 500),
        s(FILLER, WorkOrder, json!("WO-9"), T0 + MIN + 500),
    ]);
    let out = p.on_tick(T0 + MIN + 2_000);
    let oee = of_kind(&out.records, Kind::Oee);
    assert_eq!(oee.len(), 1);
    let w = &oee[0].data_json();
    assert_eq!(w["good_count"], json!(7));
    assert_eq!(w["state"], json!("RUNNING"));
    assert_eq!(w["work_order"], json!("WO-1"));
    assert_eq!(w["run_time_s"], json!(60.0));
    assert_eq!(w["complete"], json!(true));
    // The next window: 0.5 s RUNNING, then DOWN.
    let out = p.on_tick(T0 + 2 * MIN + 2_000);
    let w = &out.records[0].data_json();
    assert_eq!(w["run_time_s"], json!(0.5));
    assert_eq!(w["downtime_s"], json!(59.5));
    assert_eq!(w["state"], json!("DOWN"));
    assert_eq!(w["work_order"], json!("WO-9"));
}

#[test]
fn late_values_count_in_the_open_window() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    p.on_tick(T0 + MIN + 2_000);
    // Arrives after its window [T0, T0+60s) was closed.
    p.on_values(&[
        s(FILLER, GoodCount, json!(1003), T0 + 30 * S),
        s(FILLER, State, json!("DOWN"), T0 + 50 * S),
    ]);
    let out = p.on_tick(T0 + 2 * MIN + 2_000);
    let w = &out.records[0].data_json();
    assert_eq!(w["good_count"], json!(3));
    // The late DOWN takes effect at the open window's start.
    assert_eq!(w["downtime_s"], json!(60.0));
    assert_eq!(w["run_time_s"], json!(0.0));
}

#[test]
fn counter_resets() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    p.on_values(&[
        s(FILLER, GoodCount, json!(1010), T0 + 10 * S), // +10
        s(FILLER, GoodCount, json!(4), T0 + 20 * S),    // reset: +4
        s(FILLER, GoodCount, json!(9), T0 + 30 * S),    // +5
        s(FILLER, RejectCount, json!(0), T0 + 20 * S),  // reset to 0: +0
        s(FILLER, RejectCount, json!(2), T0 + 40 * S),  // +2
        // Not a count: ignored.
        s(FILLER, GoodCount, json!(-5), T0 + 41 * S),
        s(FILLER, GoodCount, json!("x"), T0 + 42 * S),
    ]);
    let out = p.on_tick(T0 + MIN + 2 * S);
    let w = &out.records[0].data_json();
    assert_eq!(
        (
            w["good_count"].clone(),
            w["reject_count"].clone(),
            w["total_count"].clone()
        ),
        (json!(19), json!(2), json!(21))
    );
    // RUNNING 60 s; P = 2.0*21/60 = 0.7; Q = 19/21; A = 1.
    approx(&w["performance"], 0.7);
    approx(&w["quality"], 19.0 / 21.0);
    approx(&w["oee"], 0.7 * 19.0 / 21.0);
}

#[test]
fn zero_counts_and_zero_planned_time_give_nulls() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    let mut init = initial_values(FILLER, T0 - MIN);
    init[0] = s(FILLER, State, json!("PLANNED_STOP"), T0 - MIN);
    p.on_values(&init);
    let out = p.on_tick(T0 + MIN + 2 * S);
    let w = &out.records[0].data_json();
    assert_eq!(w["planned_time_s"], json!(0.0));
    assert_eq!(w["run_time_s"], json!(0.0));
    assert_eq!(w["total_count"], json!(0));
    for k in ["availability", "performance", "quality", "oee"] {
        assert_eq!(w[k], Value::Null, "{k}");
    }
    assert_eq!(w["complete"], json!(true));
}

#[test]
fn unknown_ideal_cycle_time_gives_null_performance() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&[
        s(FILLER, State, json!("RUNNING"), T0 - MIN),
        s(FILLER, GoodCount, json!(0), T0 - MIN),
    ]);
    p.on_values(&[s(FILLER, GoodCount, json!(10), T0 + S)]);
    let out = p.on_tick(T0 + MIN + 2 * S);
    let w = &out.records[0].data_json();
    assert_eq!(
        (w["performance"].clone(), w["oee"].clone()),
        (Value::Null, Value::Null)
    );
    approx(&w["quality"], 1.0);
    assert_eq!(
        (w["work_order"].clone(), w["product"].clone()),
        (Value::Null, Value::Null)
    );
}

#[test]
fn window_crossing_an_outage_is_incomplete() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0 - MIN);
    p.on_values(&initial_values(FILLER, T0 - 2 * MIN));
    p.on_tick(T0 + 2 * S);
    // Outage 10:00:20 - 10:00:30, nothing changed meanwhile.
    p.on_disconnected(T0 + 20 * S);
    p.on_connected(T0 + 30 * S);
    p.on_values(&initial_values(FILLER, T0 - 2 * MIN));
    let out = p.on_tick(T0 + MIN + 2 * S);
    let w = &out.records[0].data_json();
    assert_eq!(w["complete"], json!(false));
    // Observed 50 of 60 s: the figures cover only that.
    assert_eq!(
        (w["run_time_s"].clone(), w["planned_time_s"].clone()),
        (json!(50.0), json!(50.0))
    );
    // The next window is complete again.
    let out = p.on_tick(T0 + 2 * MIN + 2 * S);
    assert_eq!(out.records[0].data_json()["complete"], json!(true));
}

#[test]
fn an_outage_longer_than_windows_emits_nothing_for_unobserved_windows() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    p.on_disconnected(T0 + 30 * S);
    let mut records = Vec::new();
    for k in 1..=4 {
        records.extend(p.on_tick(T0 + k * MIN + 2 * S).records);
    }
    p.on_connected(T0 + 4 * MIN + 30 * S);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    records.extend(p.on_tick(T0 + 5 * MIN + 2 * S).records);
    records.extend(p.on_tick(T0 + 6 * MIN + 2 * S).records);
    let windows: Vec<(Value, Value, Value)> = records
        .iter()
        .map(|r| {
            (
                r.data_json()["window_start"].clone(),
                r.data_json()["run_time_s"].clone(),
                r.data_json()["complete"].clone(),
            )
        })
        .collect();
    assert_eq!(
        windows,
        vec![
            (json!("2026-11-28T10:00:00.000Z"), json!(30.0), json!(false)),
            (json!("2026-11-28T10:04:00.000Z"), json!(30.0), json!(false)),
            (json!("2026-11-28T10:05:00.000Z"), json!(60.0), json!(true)),
        ]
    );
}

#[test]
fn never_connected_no_records() {
    let mut p = profile(Duration::from_secs(60));
    for k in 0..5 {
        assert!(p.on_tick(T0 + k * MIN).is_empty());
    }
}

#[test]
fn downtime_reason_rules() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    // A reason in force at entry (left from before) is taken...
    p.on_values(&[
        s(FILLER, DowntimeReason, json!("OLD"), T0),
        s(FILLER, State, json!("RUNNING"), T0),
    ]);
    p.on_values(&[s(FILLER, State, json!("DOWN"), T0 + S)]);
    // ...a null/unknown STATE is not an exit...
    assert!(p
        .on_values(&[s(FILLER, State, Value::Null, T0 + 2 * S)])
        .is_empty());
    // ...a reason cleared at the exit is not taken.
    let out = p.on_values(&[
        s(FILLER, DowntimeReason, json!(""), T0 + 3_500),
        s(FILLER, State, json!("IDLE"), T0 + 3_500),
    ]);
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.records[0].data_json()["reason"], json!("OLD"));
    assert_eq!(out.records[0].data_json()["duration_s"], json!(2.5));
    // No reason at all: null.
    p.on_values(&[s(FILLER, State, json!("DOWN"), T0 + 10 * S)]);
    let out = p.on_values(&[s(FILLER, State, json!("RUNNING"), T0 + 11 * S)]);
    assert_eq!(out.records[0].data_json()["reason"], Value::Null);
    // Leaving DOWN to any state counts; DOWN re-delivered is no new start.
    p.on_values(&[s(FILLER, State, json!("DOWN"), T0 + 20 * S)]);
    p.on_values(&[s(FILLER, State, json!("DOWN"), T0 + 20 * S)]);
    let out = p.on_values(&[s(FILLER, State, json!("CHANGEOVER"), T0 + 25 * S)]);
    assert_eq!(
        out.records[0].data_json()["started"],
        json!("2026-11-28T10:00:20.000Z")
    );
    assert_eq!(out.records[0].data_json()["duration_s"], json!(5.0));
    // Other states do not produce downtime.
    assert!(p
        .on_values(&[s(FILLER, State, json!("PLANNED_STOP"), T0 + 30 * S)])
        .is_empty());
    assert!(p
        .on_values(&[s(FILLER, State, json!("RUNNING"), T0 + 31 * S)])
        .is_empty());
}

#[test]
fn downtime_in_any_order_within_a_publish() {
    // Reason and state written together, listed in either order.
    for flip in [false, true] {
        let mut p = profile(Duration::from_secs(60));
        let mut publish = vec![
            s(CAPPER, State, json!("DOWN"), T0),
            s(CAPPER, DowntimeReason, json!("JAM"), T0),
        ];
        if flip {
            publish.reverse();
        }
        p.on_values(&[s(CAPPER, State, json!("RUNNING"), T0 - S)]);
        p.on_values(&publish);
        let out = p.on_values(&[s(CAPPER, State, json!("RUNNING"), T0 + MIN)]);
        assert_eq!(out.records[0].data_json()["reason"], json!("JAM"));
        assert_eq!(
            out.records[0].data_json()["work_center"],
            json!("LINE_A_CAPPER")
        );
        assert_eq!(out.records[0].data_json()["duration_s"], json!(60.0));
    }
}

#[test]
fn bad_values_are_ignored() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    let mut bad = s(FILLER, State, json!("DOWN"), T0 + S);
    bad.good = false;
    let mut bad_count = s(FILLER, GoodCount, json!(0), T0 + S);
    bad_count.good = false;
    assert!(p.on_values(&[bad, bad_count]).is_empty());
    let out = p.on_tick(T0 + MIN + 2 * S);
    let w = &out.records[0].data_json();
    assert_eq!(
        (w["run_time_s"].clone(), w["good_count"].clone()),
        (json!(60.0), json!(0))
    );
}

#[test]
fn restart_mid_downtime_keeps_the_true_start() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    p.on_values(&[
        s(FILLER, DowntimeReason, json!("JAM"), T0 + 10 * S),
        s(FILLER, State, json!("DOWN"), T0 + 10 * S),
    ]);
    let out = p.on_tick(T0 + MIN + 2 * S);
    assert_eq!(out.records.len(), 1);
    let saved = p.snapshot();
    assert_eq!(
        saved["work_centers"]["LINE_A_FILLER"]["down"]["since_ms"],
        json!(T0 + 10 * S)
    );

    // The agent restarts; the server re-delivers STATE with a fresh
    // timestamp (some servers do), yet the downtime keeps its start.
    let mut q = profile(Duration::from_secs(60));
    q.restore(&saved).unwrap();
    q.on_connected(T0 + 5 * MIN);
    q.on_values(&[
        s(FILLER, State, json!("DOWN"), T0 + 5 * MIN),
        s(FILLER, DowntimeReason, json!("JAM"), T0 + 5 * MIN),
    ]);
    let out = q.on_values(&[s(FILLER, State, json!("RUNNING"), T0 + 6 * MIN)]);
    assert_eq!(
        out.records[0].data_json(),
        json!({"work_center":"LINE_A_FILLER","reason":"JAM","started":"2026-11-28T10:00:10.000Z",
               "ended":"2026-11-28T10:06:00.000Z","duration_s":350.0})
    );
}

#[test]
fn restart_within_a_window_marks_it_incomplete_and_never_repeats_one() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0 - 5 * MIN);
    p.on_values(&initial_values(FILLER, T0 - 10 * MIN));
    let out = p.on_tick(T0 + 2 * S);
    assert_eq!(
        of_kind(&out.records, Kind::Oee)
            .last()
            .map(|r| r.data_json()["window_end"].clone()),
        Some(json!("2026-11-28T10:00:00.000Z"))
    );
    let saved = p.snapshot();

    // Restart at 10:00:40 within the window 10:00-10:01.
    let mut q = profile(Duration::from_secs(60));
    q.restore(&saved).unwrap();
    q.on_connected(T0 + 40 * S);
    q.on_values(&initial_values(FILLER, T0 - 10 * MIN));
    let out = q.on_tick(T0 + MIN + 2 * S);
    let w = &out.records[0].data_json();
    assert_eq!(w["window_start"], json!("2026-11-28T10:00:00.000Z"));
    assert_eq!(w["complete"], json!(false));
    assert_eq!(w["run_time_s"], json!(20.0));

    // With the wall clock stepped back, a window already emitted is not
    // emitted again.
    let mut r = profile(Duration::from_secs(60));
    r.restore(&saved).unwrap();
    r.on_connected(T0 - 30 * S);
    r.on_values(&initial_values(FILLER, T0 - 10 * MIN));
    let out = r.on_tick(T0 + 2 * S);
    assert!(out.records.is_empty());
    let out = r.on_tick(T0 + MIN + 2 * S);
    assert_eq!(
        out.records[0].data_json()["window_start"],
        json!("2026-11-28T10:00:00.000Z")
    );
}

#[test]
fn clock_step_skips_instead_of_flooding() {
    let mut p = profile(Duration::from_secs(60));
    p.on_connected(T0);
    p.on_values(&initial_values(FILLER, T0 - MIN));
    // A year later.
    let later = T0 + 365 * 24 * 60 * MIN;
    let out = p.on_tick(later);
    assert!(out.records.is_empty());
    let out = p.on_tick(later + MIN);
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.records[0].data_json()["state"], json!("RUNNING"));
}

#[test]
fn snapshot_edge_cases() {
    let mut p = profile(Duration::from_secs(60));
    assert_eq!(p.restore(&Value::Null), Ok(()));
    assert!(matches!(
        p.restore(&json!({"v":1,"kind":"deltav","units":{}})),
        Err(SnapshotError::KindMismatch { .. })
    ));
    assert!(matches!(
        p.restore(&json!({"v":1,"kind":"optomes","work_centers":[1]})),
        Err(SnapshotError::Malformed(_))
    ));
    p.restore(&json!({"v":1,"kind":"optomes","work_centers":{"GONE":{}}}))
        .unwrap();
    let snap = p.snapshot();
    assert!(snap["work_centers"].get("GONE").is_none());
    assert_eq!(
        snap["work_centers"]["LINE_A_FILLER"],
        json!({"down":null,"last_closed_end":null})
    );
    assert!(p.on_read(1, &[]).is_empty());
}
