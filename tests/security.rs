//! Secrets never reach the logs, in either log format and at debug level,
//! even while the agent is busy failing with a wrong OPC UA password.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MQTT_SECRET: &str = "mqtt-Secret-7f3a9";
const OPCUA_SECRET: &str = "opcua-Wrong-Secret-42c1";

async fn logs_of_a_run(log_format: &str, rust_log: &str) -> String {
    init_tracing();
    let broker = tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("thread")
        .expect("broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = plantgate::sim::SimOptions::new(dir.path().join("sim-pki"));
    opts.speed = 0.0;
    opts.user = Some(("operator".into(), "the-right-one".into()));
    let sim = plantgate::sim::start_deltav(opts, plantgate::sim::SimExtras::default())
        .await
        .expect("sim");
    let toml = agent_toml(
        &dir.path().join("agent"),
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim.endpoint(),
        sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    )
    .replace(
        "[mqtt]\n",
        "[mqtt]\nusername = \"gw\"\npassword_env = \"PG_MQTT_PW\"\n",
    )
    .replace(
        "security_mode = \"None\"\n",
        "security_mode = \"None\"\nusername = \"operator\"\npassword_env = \"PG_OPCUA_PW\"\n",
    );
    let config = write_file(dir.path(), "plantgate.toml", &toml);
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["--log-format", log_format, "run", "-c"])
        .arg(&config)
        .env("PG_MQTT_PW", MQTT_SECRET)
        .env("PG_OPCUA_PW", OPCUA_SECRET)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    // Wait until both the MQTT login and the refused OPC UA login happened.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("auth_required") && text.contains("mqtt connected") {
            break;
        }
        assert!(Instant::now() < deadline, "agent never got there:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("thread")
        .expect("wait");
    assert!(status.success());
    let mut text = String::new();
    std::fs::File::open(&log_path)
        .expect("log")
        .read_to_string(&mut text)
        .expect("read");
    sim.shutdown().await;
    text
}

fn assert_clean(text: &str) {
    assert!(!text.is_empty());
    for secret in [MQTT_SECRET, OPCUA_SECRET] {
        if let Some(line) = text.lines().find(|l| l.contains(secret)) {
            panic!("a secret reached the log: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_text_logs_at_debug() {
    assert_clean(&logs_of_a_run("text", "debug").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_json_logs() {
    let text = logs_of_a_run("json", "info").await;
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
    assert_clean(&text);
}
