//! A broker outage with the embedded broker: the line to the broker is cut
//! for real (a proxy drops every connection and refuses new ones) while values
//! keep coming. Records pile up in SQLite, then drain after the cut, with no
//! seq gap, and a `sync.completed` event says so.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use plantgate::sim::proxy::CutProxy;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_is_ridden_out_on_disk() {
    let plant = start_plant().await;
    let proxy = CutProxy::start(plant.broker.v5_addr).await.expect("proxy");
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        proxy.addr(),
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;

    // Values change continuously from here on.
    let sim = Arc::new(plant.sim);
    let driving = CancellationToken::new();
    let driver = {
        let sim = sim.clone();
        let driving = driving.clone();
        tokio::spawn(async move {
            let mut i = 0.0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !driving.is_cancelled() {
                tick.tick().await;
                i += 1.0;
                sim.set_value("FIC-101/PV.CV", i);
            }
        })
    };
    seen.until("first data", |s| {
        s.tracker.last_seq("sim1", "tag").is_some()
    })
    .await;

    proxy.cut();
    // While cut, the backlog grows in the buffer (waiting on a condition).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = agent.buffer.stats().await.expect("stats");
        if st.records >= 20 && !agent.board.mqtt().connected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog never grew: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.restore();
    driving.cancel();
    driver.await.expect("driver");

    // Everything accepted arrives: wait until the buffer is empty, then until
    // the subscriber has the last seq the buffer ever assigned.
    let last = wait_drained(&agent.buffer, "sim1").await;
    seen.until("every record up to the last", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(last)
    })
    .await;
    // The session after the cut reports the backlog it delivered (the first
    // session may have reported a small one of its own before the cut, and
    // under load the line may flap once more: look for the backlog's).
    let backlog_sync = |s: &Seen| {
        s.messages
            .iter()
            .filter(|m| m.topic.ends_with("/events/sync.completed"))
            .find(|m| m.payload["details"]["records"].as_u64().unwrap_or(0) >= 20)
            .map(|m| m.payload.clone())
    };
    seen.until("sync.completed for the backlog", |s| {
        backlog_sync(s).is_some()
    })
    .await;
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    let sync = backlog_sync(&seen).unwrap_or_default();
    assert_eq!(sync["connection"], serde_json::Value::Null);

    agent.stop().await;
}
