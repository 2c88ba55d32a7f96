//! Interop with a real, independent broker: mosquitto over TLS, and over
//! mutual TLS (client certificate required), with MQTT 5 and 3.1.1.
//! Needs the `mosquitto` binary; `.ci/run` installs it and runs these.

mod common;

use std::time::Duration;

use common::mosquitto::start_mosquitto;
use common::*;
use plantgate::sim::broker::TestPki;

async fn flows_through_mosquitto(protocol: &str, mutual: bool) {
    let plant = start_plant().await;
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, Default::default());
    let target = if mutual { mosq.mtls } else { mosq.tls };
    let mut toml = agent_toml(
        &plant.dir.path().join("agent"),
        target,
        &pki.ca_file,
        protocol,
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    if mutual {
        toml = toml.replace(
            "[mqtt]\n",
            &format!(
                "[mqtt]\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
                pki.client_cert_file.display().to_string(),
                pki.client_key_file.display().to_string()
            ),
        );
    }
    let mut seen = watch(mosq.tls, &pki.ca_file).await;
    let agent = run_agent(&toml).await;
    for i in 1..=10 {
        let v = f64::from(i) * 3.5;
        plant.sim.set_value("FIC-101/PV.CV", v);
        seen.until(&format!("value {v}"), |s| {
            s.tag_values("FLOW").iter().any(|x| x.as_f64() == Some(v))
        })
        .await;
    }
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    assert!(seen.tracker.last_seq("sim1", "tag") >= Some(10));
    agent.stop().await;
    seen.until("offline shutdown", |s| {
        s.last_on("test-gw/status")
            .is_some_and(|p| p["reason"] == "shutdown")
    })
    .await;
    plant.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn mosquitto_tls_mqtt5() {
    flows_through_mosquitto("v5", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn mosquitto_tls_mqtt311() {
    flows_through_mosquitto("v311", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn mosquitto_mutual_tls_mqtt5() {
    flows_through_mosquitto("v5", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn mosquitto_refuses_agent_without_client_cert() {
    // Mutual TLS listener, no client certificate: the agent must not get in
    // (and must keep retrying rather than crash).
    let plant = start_plant().await;
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, Default::default());
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        mosq.mtls,
        &pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let agent = run_agent(&toml).await;
    // Records are accepted into the buffer although the broker refuses us.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut v = 0.0;
    loop {
        v += 1.0;
        plant.sim.set_value("FIC-101/PV.CV", v);
        let st = agent.buffer.stats().await.expect("stats");
        if st.records >= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing buffered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!agent.board.mqtt().connected);
    agent.stop().await;
    plant.sim.shutdown().await;
}
