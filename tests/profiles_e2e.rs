//! Profiles end to end with real parts: the in-process DeltaV simulator runs
//! a scripted batch, the agent derives batch and recipe records (docs/profiles.md),
//! commits them with the profile state and publishes them over TLS to the
//! embedded broker, where a subscriber sees them complete and in seq order.

mod common;

use common::*;
use serde_json::Value;

const UNIT: &str = "REACTOR_101";

/// Data records of `kind` seen on `{root}/data/sim1/{kind}`, once per seq
/// (a re-delivery after a crash is at-least-once, not a new event), in seq
/// order.
fn records(seen: &Seen, kind: &str) -> Vec<Value> {
    let topic = format!("plantgate/test-site/test-gw/data/sim1/{kind}");
    let mut by_seq = std::collections::BTreeMap::new();
    for r in seen
        .messages
        .iter()
        .filter(|m| m.topic == topic)
        .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
    {
        let seq = r["seq"].as_u64().expect("record seq");
        by_seq.entry(seq).or_insert(r);
    }
    by_seq.into_values().collect()
}

/// Whether `connections/sim1/status` said online after message `from`.
fn online_since(seen: &Seen, from: usize) -> bool {
    seen.messages[from.min(seen.messages.len())..]
        .iter()
        .any(|m| m.topic.ends_with("connections/sim1/status") && m.payload["state"] == "online")
}

fn events(seen: &Seen) -> Vec<String> {
    records(seen, "batch")
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["data"]["event"].as_str().unwrap_or("?"),
                r["data"]["phase"].as_str().unwrap_or("-"),
                r["data"]["state"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

/// The plant's pace: successive writes at least two sampling intervals
/// (100 ms in `agent_toml`) apart. A server delays a change that comes
/// sooner after the previous one and stamps it with the next sample time
/// (async-opcua does), which could move a final BSTATUS after the BATCH_ID
/// clear written 1 ms later; real DeltaV steps are seconds apart.
struct Pace(i64);

impl Pace {
    fn new() -> Pace {
        Pace(0)
    }

    /// Waits until the next write may go; call right before each write.
    async fn step(&mut self) {
        sleep_until_ms(self.0 + 200).await;
        self.0 = plantgate::record::now_ms();
    }
}

/// The agent config: one connection of `kind` to the plant's simulator,
/// publishing over MQTT 5, with `extra` TOML for that connection.
fn profile_toml(plant: &Plant, kind: &str, extra: &str) -> String {
    agent_toml(
        &plant.dir.path().join("agent"),
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[],
    )
    .replace(r#"kind = "generic""#, &format!("kind = \"{kind}\""))
        + extra
}

/// DeltaV: the simulator's `UNIT` with its three recipe parameters.
fn deltav_toml(plant: &Plant) -> String {
    let extra = format!(
        "node_template = \"nsu={ns};s={{unit}}/{{param}}.CV\"\n\
         [[connections.units]]\nname = \"{UNIT}\"\n\
         recipe_parameters = [\"CHARGE_AMT\", \"REACT_TEMP_SP\", \"REACT_TIME\"]\n",
        ns = plant.sim.namespace_uri()
    );
    profile_toml(plant, "deltav", &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_batch_arrives_as_batch_and_recipe_records() {
    let plant = start_plant().await;
    let units = plant.sim.deltav_units().expect("deltav units");
    units.take_over(UNIT).expect("script the unit");
    let toml = deltav_toml(&plant);
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("connection online", |s| {
        s.last_on("connections/sim1/status")
            .is_some_and(|p| p["state"] == "online")
    })
    .await;

    units
        .start_batch(
            UNIT,
            "B-2026-0042",
            "PVC-STD",
            &[
                ("CHARGE_AMT", 1200.0),
                ("REACT_TEMP_SP", 85.5),
                ("REACT_TIME", 3600.0),
            ],
            None,
        )
        .expect("start batch");
    seen.until("batch_started and recipe", |s| {
        !records(s, "batch").is_empty() && !records(s, "recipe").is_empty()
    })
    .await;
    let steps: [(&str, &str); 4] = [
        ("state", "RUNNING"),
        ("phase", "CHARGE"),
        ("phase", "HEAT"),
        ("state", "HELD"),
    ];
    let mut pace = Pace::new();
    for (i, (what, value)) in steps.iter().enumerate() {
        pace.step().await;
        match *what {
            "state" => units.set_state(UNIT, value, None),
            _ => units.set_phase(UNIT, value, None),
        }
        .expect("script step");
        seen.until(&format!("step {value}"), |s| {
            records(s, "batch").len() >= i + 2
        })
        .await;
    }
    pace.step().await;
    units.end_batch(UNIT, "ABORTED", None).expect("end batch");
    seen.until("batch_ended", |s| {
        events(s).iter().any(|e| e.starts_with("batch_ended"))
    })
    .await;

    assert_eq!(
        events(&seen),
        vec![
            "batch_started  IDLE",
            "state_changed  RUNNING",
            "phase_changed CHARGE RUNNING",
            "phase_changed HEAT RUNNING",
            "state_changed HEAT HELD",
            "state_changed HEAT ABORTED",
            "batch_ended HEAT ABORTED",
        ]
    );
    let batch = records(&seen, "batch");
    assert!(batch
        .iter()
        .all(|r| r["data"]["batch_id"] == "B-2026-0042" && r["data"]["unit"] == UNIT));
    let recipe = records(&seen, "recipe");
    assert_eq!(recipe.len(), 1, "{recipe:?}");
    assert_eq!(recipe[0]["data"]["recipe"], "PVC-STD");
    assert_eq!(
        recipe[0]["data"]["parameters"],
        serde_json::json!({"CHARGE_AMT": 1200.0, "REACT_TEMP_SP": 85.5, "REACT_TIME": 3600.0})
    );
    // Each stream continuous from seq 1.
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    let seqs: Vec<u64> = batch.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<u64>>());
    assert_eq!(recipe[0]["seq"], 1);
    agent.stop().await;
}

/// docs/profiles.md: no duplicate `batch_started` (or any other event) for a batch
/// already reported, across agent restarts. The real agent process is
/// SIGKILLed mid-batch (all it keeps is the profile state committed with its
/// records), the batch moves on while it is down, and later it is stopped
/// cleanly while the batch is HELD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarts_mid_batch_produce_no_duplicate_events() {
    let plant = start_plant().await;
    let units = plant.sim.deltav_units().expect("deltav units");
    units.take_over(UNIT).expect("script the unit");
    let config = write_file(plant.dir.path(), "plantgate.toml", &deltav_toml(&plant));
    let log = plant.dir.path().join("agent.log");
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;

    let mut agent = AgentProcess::start(&config, &log);
    seen.until("first agent online", |s| online_since(s, 0))
        .await;
    let mut pace = Pace::new();
    pace.step().await;
    units
        .start_batch(
            UNIT,
            "B-2026-0077",
            "PVC-S65",
            &[
                ("CHARGE_AMT", 9_620.5),
                ("REACT_TEMP_SP", 54.4),
                ("REACT_TIME", 318.0),
            ],
            None,
        )
        .expect("start batch");
    pace.step().await;
    units.set_state(UNIT, "RUNNING", None).expect("RUNNING");
    seen.until("batch_started, RUNNING", |s| records(s, "batch").len() >= 2)
        .await;
    pace.step().await;
    units.set_phase(UNIT, "CHARGE", None).expect("CHARGE");
    seen.until("CHARGE", |s| records(s, "batch").len() >= 3)
        .await;

    let status = agent.signal("KILL");
    assert!(!status.success(), "SIGKILL: {status}");
    // The plant goes on while the agent is down.
    pace.step().await;
    units.set_phase(UNIT, "HEAT", None).expect("HEAT");
    let mark = seen.messages.len();
    let mut agent = AgentProcess::start(&config, &log);
    seen.until("HEAT reported after the crash", |s| {
        online_since(s, mark) && records(s, "batch").len() >= 4
    })
    .await;
    pace.step().await;
    units.set_state(UNIT, "HELD", None).expect("HELD");
    seen.until("HELD", |s| records(s, "batch").len() >= 5).await;

    let status = agent.signal("TERM");
    assert!(status.success(), "SIGTERM: {status}");
    let mark = seen.messages.len();
    let _agent = AgentProcess::start(&config, &log);
    seen.until("third agent online", |s| online_since(s, mark))
        .await;
    pace.step().await;
    units
        .set_state(UNIT, "RUNNING", None)
        .expect("RUNNING again");
    seen.until("RUNNING again", |s| records(s, "batch").len() >= 6)
        .await;
    pace.step().await;
    units.end_batch(UNIT, "COMPLETE", None).expect("end batch");
    seen.until("batch_ended", |s| {
        events(s).iter().any(|e| e.starts_with("batch_ended"))
    })
    .await;

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        events(&seen),
        vec![
            "batch_started  IDLE",
            "state_changed  RUNNING",
            "phase_changed CHARGE RUNNING",
            "phase_changed HEAT RUNNING",
            "state_changed HEAT HELD",
            "state_changed HEAT RUNNING",
            "state_changed HEAT COMPLETE",
            "batch_ended HEAT COMPLETE",
        ],
        "agent log:\n{log_text}"
    );
    let seqs: Vec<u64> = records(&seen, "batch")
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
    let recipe = records(&seen, "recipe");
    assert_eq!(recipe.len(), 1, "one recipe per batch: {recipe:?}");
    assert_eq!(
        recipe[0]["data"]["parameters"],
        serde_json::json!({"CHARGE_AMT": 9620.5, "REACT_TEMP_SP": 54.4, "REACT_TIME": 318.0})
    );
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    // For the record (`--nocapture`): the batch as it arrived.
    for r in records(&seen, "recipe")
        .iter()
        .chain(records(&seen, "batch").iter())
    {
        println!("{r}");
    }
}

const WC: &str = "LINE_A_FILLER";
/// Short windows so the test sees whole ones (the config minimum is 1 s).
const WINDOW_MS: i64 = 4_000;

/// Sleeps until the wall clock reaches `t_ms`: OEE windows are aligned to
/// the wall clock by design, so a script is paced by it (the figures come
/// from the source timestamps the script sets, not from this pacing).
async fn sleep_until_ms(t_ms: i64) {
    let wait = t_ms - plantgate::record::now_ms();
    if wait > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
    }
}

/// A scripted OptoMES run through the broker: the OEE window holding the
/// script has exactly the hand-computed figures (docs/profiles.md formulas, durations
/// from the source timestamps the simulator stamps), the stop produces one
/// `downtime` record, and the idle window after it reports zero counts with
/// a null quality.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_optomes_run_arrives_as_oee_windows_and_downtime() {
    let plant = start_plant_with("optomes").await;
    let wcs = plant.sim.optomes_work_centers().expect("work centers");
    wcs.take_over(WC).expect("script the work center");
    let extra = format!(
        "node_template = \"nsu={ns};s={{work_center}}.{{param}}\"\n\
         oee_window = \"{WINDOW_MS}ms\"\n\
         [[connections.work_centers]]\nname = \"{WC}\"\n",
        ns = plant.sim.namespace_uri()
    );
    let toml = profile_toml(&plant, "optomes", &extra);
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("connection online", |s| online_since(s, 0))
        .await;
    wcs.change_work_order(WC, "WO-4711", "BOTTLE-500ML", 0.1, true, None)
        .expect("work order");
    wcs.set_state(WC, "RUNNING", None).expect("RUNNING");

    // The first whole window after the script is in place.
    let start = (plantgate::record::now_ms() + 1_000).div_euclid(WINDOW_MS) * WINDOW_MS + WINDOW_MS;
    let at = |offset: i64| Some(start + offset);
    sleep_until_ms(start + 300).await;
    wcs.add_counts(WC, 10, 2, at(300)).expect("counts");
    sleep_until_ms(start + 1_000).await;
    wcs.set_down(WC, "JAM", at(1_000)).expect("DOWN");
    sleep_until_ms(start + 2_000).await;
    wcs.set_state(WC, "RUNNING", at(2_000)).expect("RUNNING");
    sleep_until_ms(start + 3_000).await;
    wcs.add_counts(WC, 5, 0, at(3_000)).expect("counts");

    let ts = plantgate::record::format_ts;
    let (scripted, idle) = (ts(start), ts(start + WINDOW_MS));
    seen.until("the scripted window and the idle one after it", |s| {
        records(s, "oee")
            .iter()
            .any(|r| r["data"]["window_start"] == idle.as_str())
    })
    .await;
    agent.stop().await;

    let oee = records(&seen, "oee");
    let window = |start: &str| -> Value {
        let found: Vec<&Value> = oee
            .iter()
            .filter(|r| r["data"]["window_start"] == start)
            .collect();
        assert_eq!(found.len(), 1, "one record for window {start}: {oee:#?}");
        found[0]["data"].clone()
    };
    let close = |v: &Value, want: f64| v.as_f64().is_some_and(|x| (x - want).abs() < 1e-9);

    // RUNNING 0–1 s, DOWN 1–2 s, RUNNING 2–4 s; 15 good + 2 rejects.
    let w = window(&scripted);
    assert_eq!(w["work_center"], WC, "{w}");
    assert_eq!(w["window_end"], ts(start + WINDOW_MS), "{w}");
    assert_eq!(w["state"], "RUNNING", "{w}");
    assert_eq!(w["work_order"], "WO-4711", "{w}");
    assert_eq!(w["product"], "BOTTLE-500ML", "{w}");
    assert_eq!(
        (&w["good_count"], &w["reject_count"], &w["total_count"]),
        (&Value::from(15), &Value::from(2), &Value::from(17)),
        "{w}"
    );
    assert!(close(&w["run_time_s"], 3.0), "{w}");
    assert!(close(&w["planned_time_s"], 4.0), "{w}");
    assert!(close(&w["downtime_s"], 1.0), "{w}");
    assert!(close(&w["availability"], 0.75), "{w}");
    // 0.1 s × 17 / 3 s
    assert!(close(&w["performance"], 1.7 / 3.0), "{w}");
    assert!(close(&w["quality"], 15.0 / 17.0), "{w}");
    assert!(close(&w["oee"], 0.375), "{w}");
    assert_eq!(w["complete"], true, "{w}");

    let i = window(&idle);
    assert_eq!(i["total_count"], 0, "{i}");
    assert!(close(&i["run_time_s"], 4.0), "{i}");
    assert!(close(&i["availability"], 1.0), "{i}");
    assert!(close(&i["performance"], 0.0), "{i}");
    assert!(i["quality"].is_null(), "no parts, no quality: {i}");
    assert!(i["oee"].is_null(), "{i}");
    assert_eq!(i["complete"], true, "{i}");

    let downtime = records(&seen, "downtime");
    assert_eq!(downtime.len(), 1, "{downtime:#?}");
    let d = &downtime[0]["data"];
    assert_eq!(d["work_center"], WC, "{d}");
    assert_eq!(d["reason"], "JAM", "{d}");
    assert_eq!(d["started"], ts(start + 1_000), "{d}");
    assert_eq!(d["ended"], ts(start + 2_000), "{d}");
    assert!(close(&d["duration_s"], 1.0), "{d}");
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);

    // For the record (`--nocapture`): the messages as they arrived.
    for m in seen
        .messages
        .iter()
        .filter(|m| m.topic.ends_with("/oee") || m.topic.ends_with("/downtime"))
    {
        println!("{} {}", m.topic, m.payload);
    }
}
