//! `plantgate run` as a real process: SIGTERM stops it with exit 0 within
//! 10 s, it says `offline`/`shutdown`, and nothing accepted is lost — every
//! seq the buffer assigned was either delivered or is still in buffer.db.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use plantgate::record::{Kind, StreamKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_zero_quickly_and_loses_nothing() {
    let plant = start_plant().await;
    let data_dir = plant.dir.path().join("agent");
    let toml = agent_toml(
        &data_dir,
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let config_path = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["run", "-c"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plantgate run");

    let mut v = 0.0;
    seen.until("data flowing", |s| {
        v += 1.0;
        plant.sim.set_value("FIC-101/PV.CV", v);
        s.tracker.last_seq("sim1", "tag").unwrap_or(0) >= 5
    })
    .await;
    // A hang-up is a reload: with the same file nothing changes, and the
    // agent neither stops nor is disturbed (SIGHUP's default action would
    // end the process without a clean stop).
    let pid = child.id().to_string();
    let hup = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(hup.success());
    let before = seen.tracker.last_seq("sim1", "tag").unwrap_or(0);
    seen.until("data flowing after SIGHUP", |s| {
        v += 1.0;
        plant.sim.set_value("FIC-101/PV.CV", v);
        s.tracker.last_seq("sim1", "tag").unwrap_or(0) >= before + 3
    })
    .await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "SIGHUP ended the agent"
    );
    // Keep values changing right up to the signal.
    for _ in 0..20 {
        v += 1.0;
        plant.sim.set_value("FIC-101/PV.CV", v);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let t0 = Instant::now();
    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || {
        let s = child.wait();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (s, err)
    })
    .await
    .expect("wait thread");
    let (status, stderr) = status;
    let status = status.expect("wait");
    let took = t0.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    seen.until("offline shutdown", |s| {
        s.last_on("test-site/test-gw/status")
            .is_some_and(|p| p["state"] == "offline" && p["reason"] == "shutdown")
    })
    .await;

    // Delivered ∪ still buffered = every seq ever assigned, 1..=last.
    let store = plantgate::buffer::Store::open(
        &data_dir.join("buffer.db"),
        plantgate::buffer::StoreOptions::default(),
    )
    .expect("reopen buffer");
    let stats = store.stats().expect("stats");
    let stream = StreamKey::new("sim1", Kind::Tag);
    let last = stats
        .streams
        .iter()
        .find(|s| s.stream() == stream)
        .map(|s| s.next_seq - 1)
        .expect("tag stream exists");
    let mut have: BTreeSet<u64> = store
        .read_after(&stream, 0, usize::MAX, usize::MAX)
        .expect("read")
        .iter()
        .map(|r| r.seq)
        .collect();
    for m in &seen.messages {
        if m.topic.ends_with("/data/sim1/tag") {
            for r in m.payload["records"].as_array().into_iter().flatten() {
                if let Some(seq) = r["seq"].as_u64() {
                    have.insert(seq);
                }
            }
        }
    }
    let missing: Vec<u64> = (1..=last).filter(|s| !have.contains(s)).collect();
    assert!(missing.is_empty(), "lost seqs {missing:?} of 1..={last}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A clean stop closes the OPC UA session quietly, and the key the agent
    // made at its first start was private from the start.
    assert!(
        !stderr.contains("BadSessionClosed") && !stderr.contains("publish failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("readable by others"), "{stderr}");
    assert!(stderr.contains("reloading the configuration"), "{stderr}");
    assert!(stderr.contains("nothing changed"), "{stderr}");
    // A clean stop ends every task on purpose: none of them is reported
    // as died, neither in the log nor as an event (sent or still buffered).
    assert!(!stderr.contains("task died"), "{stderr}");
    let agent_events = store
        .read_after(&StreamKey::new("", Kind::Event), 0, usize::MAX, usize::MAX)
        .expect("read agent events");
    let sent = seen
        .messages
        .iter()
        .filter(|m| m.topic.contains("/events/"))
        .map(|m| m.payload.to_string());
    let buffered = agent_events.iter().map(|r| r.data.clone());
    for text in sent.chain(buffered) {
        assert!(!text.contains("task_died"), "{text}");
    }
    plant.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_the_broker_down_still_exits_zero_within_10s() {
    let plant = start_plant().await;
    let proxy = plantgate::sim::proxy::CutProxy::start(plant.broker.v5_addr)
        .await
        .expect("proxy");
    proxy.cut();
    let data_dir = plant.dir.path().join("agent");
    let toml = agent_toml(
        &data_dir,
        proxy.addr(),
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let config_path = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["run", "-c"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn plantgate run");
    // Wait until records are being accepted (the buffer file has rows).
    let deadline = Instant::now() + PATIENCE;
    let mut v = 0.0;
    loop {
        v += 1.0;
        plant.sim.set_value("FIC-101/PV.CV", v);
        let pending = plantgate::buffer::Store::open(
            &data_dir.join("buffer.db"),
            plantgate::buffer::StoreOptions::default(),
        )
        .and_then(|s| s.stats())
        .map(|s| s.records)
        .unwrap_or(0);
        if pending >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing buffered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("thread")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    plant.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_health_port_is_a_clear_error() {
    let plant = start_plant().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let config_path = write_file(plant.dir.path(), "plantgate.toml", &toml);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_plantgate"))
            .args(["run", "-c"])
            .arg(&config_path)
            .output()
            .expect("run")
    })
    .await
    .expect("thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("health.listen 127.0.0.1:{port}")),
        "{stderr}"
    );
    drop(taken);
    plant.sim.shutdown().await;
}
