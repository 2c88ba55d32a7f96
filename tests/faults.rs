//! Faults with the embedded broker (no outside binary): a buffer too small
//! for an outage evicts tag records first and announces the exact seq ranges;
//! a corrupt database file is moved aside and the agent carries on.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use plantgate::sim::proxy::CutProxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_buffer_evicts_oldest_tags_and_announces_exact_ranges() {
    init_tracing();
    let broker = tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("thread")
        .expect("broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = plantgate::sim::SimOptions::new(dir.path().join("sim-pki"));
    opts.speed = 0.0;
    opts.tags = 100;
    opts.rate_hz = 20.0;
    let sim = plantgate::sim::start_deltav(opts, plantgate::sim::SimExtras::default())
        .await
        .expect("sim");
    let proxy = CutProxy::start(broker.v5_addr).await.expect("proxy");
    proxy.cut();
    let names: Vec<(String, String)> = (0..100)
        .map(|i| (format!("L{i:03}"), plantgate::sim::deltav::load_tag(i)))
        .collect();
    let refs: Vec<(&str, &str)> = names
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let toml = agent_toml(
        &dir.path().join("agent"),
        proxy.addr(),
        &broker.pki.ca_file,
        "v5",
        &sim.endpoint(),
        sim.namespace_uri(),
        &refs,
    )
    .replace("[mqtt]\n", "[buffer]\nmax_size = \"512KiB\"\n\n[mqtt]\n");
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;

    // Broker unreachable: the buffer fills and must evict.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = agent.buffer.stats().await.expect("stats");
        if st.evicted_total >= 2_000 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never evicted: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let file = std::fs::metadata(dir.path().join("agent/buffer.db"))
        .expect("db")
        .len();
    let wal = std::fs::metadata(dir.path().join("agent/buffer.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        file + wal <= 512 * 1024,
        "buffer files {file} + {wal} bytes > max_size"
    );

    sim.shutdown().await;
    proxy.restore();
    let last = wait_drained(&agent.buffer, "sim1").await;
    seen.until("the last tag record", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(last)
    })
    .await;

    // Every seq was either delivered or announced as evicted — no silent gap.
    let mut evicted = BTreeSet::new();
    for m in seen
        .messages
        .iter()
        .filter(|m| m.topic.ends_with("/events/buffer.evicted"))
    {
        let d = &m.payload["details"];
        assert_eq!(m.payload["connection"], serde_json::Value::Null);
        if d["connection"] == "sim1" && d["kind"] == "tag" {
            let (a, b) = (
                d["first_seq"].as_u64().unwrap_or(0),
                d["last_seq"].as_u64().unwrap_or(0),
            );
            assert!(a >= 1 && b >= a, "{d}");
            assert_eq!(d["count"].as_u64(), Some(b - a + 1), "{d}");
            for s in a..=b {
                assert!(evicted.insert(s), "seq {s} evicted twice");
            }
        }
    }
    assert!(!evicted.is_empty(), "no buffer.evicted event arrived");
    let mut delivered = BTreeSet::new();
    for m in seen
        .messages
        .iter()
        .filter(|m| m.topic.ends_with("/data/sim1/tag"))
    {
        for r in m.payload["records"].as_array().into_iter().flatten() {
            if let Some(s) = r["seq"].as_u64() {
                delivered.insert(s);
            }
        }
    }
    let unexplained: Vec<u64> = (1..=last)
        .filter(|s| !delivered.contains(s) && !evicted.contains(s))
        .take(10)
        .collect();
    assert!(
        unexplained.is_empty(),
        "silently missing seqs {unexplained:?} of 1..={last}"
    );
    // Oldest first: the broker was cut from the start, so everything evicted
    // is older than everything delivered.
    let newest_evicted = evicted.iter().next_back().copied().unwrap_or(0);
    let oldest_delivered = delivered.iter().next().copied().unwrap_or(u64::MAX);
    assert!(
        newest_evicted < oldest_delivered,
        "{newest_evicted} vs {oldest_delivered}"
    );

    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_database_is_moved_aside_and_agent_carries_on() {
    let plant = start_plant().await;
    let data_dir = plant.dir.path().join("agent");
    std::fs::create_dir_all(&data_dir).expect("mkdir");
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(data_dir.join("buffer.db"), &garbage).expect("write garbage");
    let toml = agent_toml(
        &data_dir,
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("system.error about the corrupt database", |s| {
        s.messages.iter().any(|m| {
            m.topic.ends_with("/events/system.error")
                && m.payload["details"]["message"]
                    .as_str()
                    .is_some_and(|t| t.contains("corrupt"))
        })
    })
    .await;
    plant.sim.set_value("FIC-101/PV.CV", 77.0);
    seen.until("data flowing", |s| {
        s.tag_values("FLOW")
            .iter()
            .any(|v| v.as_f64() == Some(77.0))
    })
    .await;
    let moved: Vec<_> = std::fs::read_dir(&data_dir)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("buffer.db.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "one quarantined file");
    assert_eq!(
        std::fs::read(moved[0].path()).expect("read"),
        garbage,
        "original bytes kept"
    );
    agent.stop().await;
    plant.sim.shutdown().await;
}
