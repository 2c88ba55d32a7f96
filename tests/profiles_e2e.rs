//! Profiles end to end with real parts: the in-process DeltaV simulator runs
//! a scripted batch, the agent derives batch and recipe records (SPEC 5),
//! commits them with the profile state and publishes them over TLS to the
//! embedded broker, where a subscriber sees them complete and in seq order.

mod common;

use common::*;
use serde_json::Value;

const UNIT: &str = "REACTOR_101";

/// Data records of `kind` seen on `{root}/data/sim1/{kind}`, in arrival order.
fn records(seen: &Seen, kind: &str) -> Vec<Value> {
    let topic = format!("plantgate/test-site/test-gw/data/sim1/{kind}");
    seen.messages
        .iter()
        .filter(|m| m.topic == topic)
        .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
        .collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_batch_arrives_as_batch_and_recipe_records() {
    let plant = start_plant().await;
    let units = plant.sim.deltav_units().expect("deltav units");
    units.take_over(UNIT).expect("script the unit");
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[],
    )
    .replace(r#"kind = "generic""#, r#"kind = "deltav""#)
    + &format!(
        "node_template = \"nsu={ns};s={{unit}}/{{param}}.CV\"\n\
         [[connections.units]]\nname = \"{UNIT}\"\nrecipe_parameters = [\"CHARGE_AMT\", \"REACT_TEMP_SP\", \"REACT_TIME\"]\n",
        ns = plant.sim.namespace_uri()
    );
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
    for (i, (what, value)) in steps.iter().enumerate() {
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
