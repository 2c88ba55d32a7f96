//! Live reload against real mosquitto (docs/cli.md, reload): a rotated
//! MQTT password takes effect on reload. The broker's password changes
//! (its password file rewritten, mosquitto reloaded), the agent's password
//! file too; the reload makes the uplink reconnect with the new password,
//! and no record is lost across it.

mod common;

use common::load::{load_toml, start_load_sim};
use common::mosquitto::{start_mosquitto, MosquittoOptions};
use common::*;
use plantgate::sim::broker::TestPki;

/// Sets `user`'s password in a mosquitto password file (hashed by
/// mosquitto's own tool, created if missing).
fn set_broker_password(file: &std::path::Path, user: &str, password: &str) {
    let mut cmd = std::process::Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let done = cmd
        .arg("-b")
        .arg(file)
        .args([user, password])
        .status()
        .expect("mosquitto_passwd (apt-get install mosquitto)");
    assert!(done.success(), "mosquitto_passwd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto"]
async fn a_rotated_mqtt_password_takes_effect_on_reload_without_loss() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let broker_passwords = dir.path().join("mosquitto.passwd");
    set_broker_password(&broker_passwords, "gw1", "first-Secret-1");
    let mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            password_file: Some(broker_passwords.clone()),
            ..Default::default()
        },
    );
    let sim = start_load_sim(dir.path(), 3, 20.0).await;
    let data_dir = dir.path().join("agent");
    let agent_password = write_file(dir.path(), "mqtt-password", "first-Secret-1\n");
    let toml = load_toml(&data_dir, mosq.tls, &pki.ca_file, "v5", &sim, 3).replace(
        "[mqtt]\n",
        &format!("[mqtt]\nusername = \"gw1\"\npassword_file = {agent_password:?}\n"),
    );
    let mut seen = watch(mosq.tls, &pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("sim1 streaming", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(50)
    })
    .await;
    assert!(agent.board.mqtt().connected);

    // The password is rotated: on the broker, then in the agent's file.
    set_broker_password(&broker_passwords, "gw1", "second-Secret-2");
    mosq.reload();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while connects_as(&mosq, &pki, "gw1", "first-Secret-1").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto kept the old password"
        );
    }
    std::fs::write(&agent_password, "second-Secret-2\n").expect("write password");
    let reconnects = agent.board.mqtt().reconnects_total;
    let at = seen.tracker.last_seq("sim1", "tag").unwrap_or(0);
    let outcome = agent.reload(Ok(load(&toml))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "mqtt reconnects");
    seen.until("sim1 going on with the new password", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(at + 100)
    })
    .await;
    let mqtt = agent.board.mqtt();
    assert!(mqtt.connected, "{mqtt:?}");
    assert_eq!(mqtt.reconnects_total, reconnects + 1, "{mqtt:?}");
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    // The rotation is real: the old password no longer gets in.
    assert!(!connects_as(&mosq, &pki, "gw1", "first-Secret-1").await);
    assert!(connects_as(&mosq, &pki, "gw1", "second-Secret-2").await);
    assert!(
        !format!("{outcome:?}").contains("Secret"),
        "a password in the reload outcome"
    );
    agent.stop().await;
}

/// Whether the broker accepts a connection as `user` with `password`.
async fn connects_as(
    mosq: &common::mosquitto::Mosquitto,
    pki: &TestPki,
    user: &str,
    password: &str,
) -> bool {
    let mut o = common::mosquitto::mqtt5_options("probe", mosq.tls, &pki.ca_file);
    o.set_credentials(user, password);
    let (_client, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
    let answer = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(
                    ack,
                ))) => return ack.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    answer.expect("the broker answers the CONNECT")
}
