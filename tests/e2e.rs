//! End to end with real parts: in-process OPC UA simulator → agent → embedded
//! rumqttd over TLS → an MQTT subscriber. Every value the test drives through
//! the simulator must arrive, with each stream's seq continuous from 1.

mod common;

use common::*;

async fn every_value_arrives(protocol: &str) {
    let plant = start_plant().await;
    let (mqtt_addr, watch_addr) = if protocol == "v5" {
        (plant.broker.v5_addr, plant.broker.v4_addr)
    } else {
        (plant.broker.v4_addr, plant.broker.v4_addr)
    };
    let tags = [("FLOW", "FIC-101/PV.CV"), ("TEMP", "TIC-201/PV.CV")];
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        mqtt_addr,
        &plant.broker.pki.ca_file,
        protocol,
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &tags,
    );
    let mut seen = watch(watch_addr, &plant.broker.pki.ca_file).await;

    let agent = run_agent(&toml).await;

    seen.until("agent online", |s| {
        s.last_on("test-site/test-gw/status")
            .is_some_and(|p| p["state"] == "online")
    })
    .await;
    seen.until("connection online", |s| {
        s.last_on("connections/sim1/status")
            .is_some_and(|p| p["state"] == "online")
    })
    .await;

    // Drive distinct values one at a time; each must arrive.
    for i in 1..=15 {
        let v = 1000.0 + f64::from(i);
        plant.sim.set_value("FIC-101/PV.CV", v);
        plant.sim.set_value("TIC-201/PV.CV", -v);
        seen.until(&format!("value {v}"), |s| {
            s.tag_values("FLOW").iter().any(|x| x.as_f64() == Some(v))
                && s.tag_values("TEMP").iter().any(|x| x.as_f64() == Some(-v))
        })
        .await;
    }

    // The stream is continuous from seq 1, and every record has the documented shape (docs/mqtt.md).
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    let data: Vec<_> = seen
        .messages
        .iter()
        .filter(|m| m.topic == "plantgate/test-site/test-gw/data/sim1/tag")
        .collect();
    assert!(!data.is_empty());
    let first = &data[0].payload;
    assert_eq!(first["agent"], "test-gw");
    assert_eq!(first["connection"], "sim1");
    assert_eq!(first["kind"], "tag");
    assert!(first["epoch"].as_str().is_some_and(|e| e.len() >= 16));
    assert_eq!(first["records"][0]["seq"], 1, "stream starts at seq 1");
    let rec = &first["records"][0];
    assert!(rec["ts"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.len() == 24));
    for key in ["name", "node", "value", "quality", "status"] {
        assert!(rec["data"].get(key).is_some(), "tag data has {key}: {rec}");
    }
    let last_seq = seen.tracker.last_seq("sim1", "tag").expect("tag stream");
    assert!(last_seq >= 30, "at least the 30 driven values: {last_seq}");

    // Heartbeats flow (QoS 0, not retained).
    seen.until("a heartbeat", |s| s.last_on("/heartbeat").is_some())
        .await;
    let hb = seen.last_on("/heartbeat").cloned().unwrap_or_default();
    assert_eq!(hb["connections"]["sim1"], "online");
    assert!(hb["uptime_s"].is_u64());

    // Clean stop: offline/shutdown for the connection and the agent.
    agent.stop().await;
    seen.until("offline shutdown status", |s| {
        s.last_on("test-site/test-gw/status")
            .is_some_and(|p| p["state"] == "offline" && p["reason"] == "shutdown")
            && s.last_on("connections/sim1/status")
                .is_some_and(|p| p["state"] == "offline")
    })
    .await;
    plant.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_value_arrives_mqtt5() {
    every_value_arrives("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_value_arrives_mqtt311() {
    every_value_arrives("v311").await;
}
