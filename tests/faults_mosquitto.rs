//! Faults against a real mosquitto under load (thousands of values per
//! second from the simulator): the broker restarted mid-stream, the agent
//! process killed with SIGKILL again and again, and a poison message the
//! broker keeps rejecting. The consumer must see zero seq gaps throughout.
//! Needs the `mosquitto` binary; `.ci/run` installs it and runs these.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::load::*;
use common::mosquitto::{start_mosquitto, MosquittoOptions};
use common::*;
use plantgate::demo::{Watcher, WatcherOptions};
use plantgate::sim::broker::TestPki;

/// Load tags × rate: 300 × 10 Hz = 3 000 values/s offered.
const LOAD_TAGS: usize = 300;
const LOAD_HZ: f64 = 10.0;

async fn broker_restart_under_load(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mut mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            persistence: true,
            ..Default::default()
        },
    );
    let sim = start_load_sim(dir.path(), LOAD_TAGS, LOAD_HZ).await;
    let toml = load_toml(
        &dir.path().join("agent"),
        mosq.tls,
        &pki.ca_file,
        protocol,
        &sim,
        LOAD_TAGS,
    );
    let watcher = Watcher::connect_with(
        mosq.tls,
        &pki.ca_file,
        "plantgate/#",
        WatcherOptions {
            persistent_id: Some(format!("watcher-{protocol}")),
            ..Default::default()
        },
    )
    .await
    .expect("watcher");
    let mut seen = Seen::new(watcher);
    let agent = run_agent(&toml).await;
    seen.until("load flowing", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(3_000)
    })
    .await;

    for round in 0..2 {
        mosq.stop("TERM");
        // The backlog grows on disk while the broker is gone.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let st = agent.buffer.stats().await.expect("stats");
            if st.records >= 2_000 && !agent.board.mqtt().connected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: no backlog: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        mosq.restart();
        let before = seen.tracker.received;
        seen.until("data after restart", |s| {
            s.tracker.received > before + 3_000
        })
        .await;
    }

    sim.shutdown().await;
    let last = drained_and_seen(&mut seen, &dir.path().join("agent")).await;
    eprintln!(
        "broker restarts ({protocol}): {last} records, {} duplicates, {} gaps",
        seen.tracker.duplicates, seen.tracker.gaps
    );
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn broker_restarts_under_load_lose_nothing_mqtt5() {
    broker_restart_under_load("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn broker_restarts_under_load_lose_nothing_mqtt311() {
    broker_restart_under_load("v311").await;
}

/// `plantgate buffer <command> -c <config>`: its stdout; panics unless it
/// succeeds.
fn buffer_cli(command: &str, config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["buffer", command, "-c"])
        .arg(config)
        .output()
        .expect("cli");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn agent_sigkill_under_load_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, MosquittoOptions::default());
    let sim = start_load_sim(dir.path(), LOAD_TAGS, LOAD_HZ).await;
    let toml = load_toml(
        &dir.path().join("agent"),
        mosq.tls,
        &pki.ca_file,
        "v5",
        &sim,
        LOAD_TAGS,
    );
    let config = write_file(dir.path(), "plantgate.toml", &toml);
    let log = dir.path().join("agent.log");
    let mut seen = watch(mosq.tls, &pki.ca_file).await;

    let mut agent = AgentProcess::start(&config, &log);
    for round in 0..3 {
        let before = seen.tracker.received;
        seen.until(&format!("round {round}: data flowing"), |s| {
            s.tracker.received > before + 2_000
        })
        .await;
        let status = agent.signal("KILL");
        assert!(!status.success());
        agent = AgentProcess::start(&config, &log);
    }
    let before = seen.tracker.received;
    seen.until("data after the last restart", |s| {
        s.tracker.received > before + 2_000
    })
    .await;
    sim.shutdown().await;
    let last = drained_and_seen(&mut seen, &dir.path().join("agent")).await;
    let status = agent.signal("TERM");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "clean exit after SIGTERM; log:\n{log_text}"
    );
    assert!(!log_text.contains("panicked"), "{log_text}");
    eprintln!(
        "agent SIGKILL x3: {last} records, {} duplicates, {} gaps",
        seen.tracker.duplicates, seen.tracker.gaps
    );
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    // One epoch throughout: the buffer survived every kill.
    let epochs: std::collections::BTreeSet<String> = seen
        .messages
        .iter()
        .filter(|m| m.topic.contains("/data/"))
        .filter_map(|m| m.payload["epoch"].as_str().map(str::to_string))
        .collect();
    assert_eq!(epochs.len(), 1, "{epochs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn poison_messages_go_to_dead_letters_and_others_flow() {
    let plant = start_plant().await;
    let pki = TestPki::generate().expect("pki");
    // The broker refuses one stream's topic: MQTT 5 PUBACK 0x87 not authorized.
    let mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            acl: Some("topic deny plantgate/+/+/data/poison/#\ntopic readwrite #\n".into()),
            ..Default::default()
        },
    );
    let mut toml = agent_toml(
        &plant.dir.path().join("agent"),
        mosq.tls,
        &pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    toml.push_str(&format!(
        r#"
[[connections]]
id = "poison"
kind = "generic"
endpoint = "{}"
security_policy = "None"
publishing_interval = "100ms"
sampling_interval = "100ms"

[[connections.tags]]
name = "TEMP"
node = "nsu={};s=TIC-201/PV.CV"
"#,
        plant.sim.endpoint(),
        plant.sim.namespace_uri()
    ));
    let config_path = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let mut seen = watch(mosq.tls, &pki.ca_file).await;
    let agent = run_agent(&toml).await;

    plant.sim.set_value("TIC-201/PV.CV", 1.5);
    seen.until("system.error naming the poison stream", |s| {
        s.messages.iter().any(|m| {
            m.topic.ends_with("/events/system.error")
                && m.payload["details"]["connection"] == "poison"
        })
    })
    .await;
    // The other stream keeps flowing.
    for i in 1..=5 {
        let v = 500.0 + f64::from(i);
        plant.sim.set_value("FIC-101/PV.CV", v);
        seen.until(&format!("FLOW {v}"), |s| {
            s.tag_values("FLOW").iter().any(|x| x.as_f64() == Some(v))
        })
        .await;
    }
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    assert!(
        !seen
            .messages
            .iter()
            .any(|m| m.topic.contains("/data/poison/")),
        "the broker let a denied message through"
    );

    // The CLI sees them while the service runs, and can re-queue them.
    let text = buffer_cli("dead-letters", &config_path);
    assert!(text.contains("poison") && text.contains("tag"), "{text}");
    let text = buffer_cli("retry", &config_path);
    assert!(text.contains("re-queued"), "{text}");
    // The running service notices the re-queued rows and sends them again;
    // the broker still refuses them, so they come back as dead letters.
    let poison_errors = |s: &Seen| {
        s.messages
            .iter()
            .filter(|m| {
                m.topic.ends_with("/events/system.error")
                    && m.payload["details"]["connection"] == "poison"
            })
            .count()
    };
    let before = poison_errors(&seen);
    seen.until("the re-queued records rejected again", |s| {
        poison_errors(s) > before
    })
    .await;

    agent.stop().await;
    plant.sim.shutdown().await;
}
