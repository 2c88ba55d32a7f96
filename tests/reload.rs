//! Live reload (SPEC 2, reload; issue 17, work in progress): a connection
//! added while another streams keeps the other untouched (its seqs
//! continuous, its state never left `online`); a broken configuration is
//! refused with its key paths and the one in force stays; `/status` shows
//! the generation and the last reload.

mod common;

use common::load::{load_toml, start_load_sim};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_added_leaves_the_other_untouched_and_a_broken_config_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = embedded_broker().await;
    let sim = start_load_sim(dir.path(), 5, 20.0).await;
    let data_dir = dir.path().join("agent");
    let toml = load_toml(
        &data_dir,
        broker.v4_addr,
        &broker.pki.ca_file,
        "v311",
        &sim,
        5,
    );
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("sim1 streaming", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(50)
    })
    .await;

    // Broken: refused with its key path; nothing changes.
    let broken = load_toml(
        &data_dir,
        broker.v4_addr,
        &broker.pki.ca_file,
        "v311",
        &sim,
        5,
    )
    .replace(&sim.endpoint(), "http://nowhere");
    let problems = plantgate::config::load_from(&broken, &Default::default())
        .expect_err("broken")
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    let outcome = agent.reload(Err(problems), false).await;
    assert!(!outcome.applied, "{outcome:?}");
    assert!(
        outcome
            .errors
            .iter()
            .any(|e| e.starts_with("connections[0].endpoint")),
        "{outcome:?}"
    );
    assert_eq!(agent.board.config().generation, 1);

    // A second connection to the same server.
    let second = format!(
        "{toml}\n[[connections]]\nid = \"sim2\"\nkind = \"generic\"\nendpoint = \"{}\"\n\
         security_policy = \"None\"\nsecurity_mode = \"None\"\npublishing_interval = \"100ms\"\n\
         [[connections.tags]]\nname = \"B\"\nnode = \"nsu={};s={}\"\n",
        sim.endpoint(),
        sim.namespace_uri(),
        plantgate::sim::deltav::load_tag(0)
    );
    let before = seen.tracker.last_seq("sim1", "tag").unwrap_or(0);
    let outcome = agent.reload(Ok(load(&second)), false).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "connection sim2 added");
    assert_eq!(agent.board.config().generation, 2);
    seen.until("sim2 streaming, sim1 going on", |s| {
        s.tracker.last_seq("sim2", "tag") >= Some(20)
            && s.tracker.last_seq("sim1", "tag") >= Some(before + 100)
    })
    .await;
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    let sim1_states: Vec<String> = seen
        .messages
        .iter()
        .filter(|m| m.topic.ends_with("/connections/sim1/status"))
        .map(|m| m.payload["state"].as_str().unwrap_or("").to_string())
        .collect();
    let first_online = sim1_states
        .iter()
        .position(|s| s == "online")
        .expect("sim1 online");
    assert_eq!(
        sim1_states[first_online..],
        ["online"],
        "sim1 never left online: {sim1_states:?}"
    );

    // [mqtt] changed: the uplink alone reconnects, nothing is lost.
    let sim1_at = seen.tracker.last_seq("sim1", "tag").unwrap_or(0);
    let reconnects = agent.board.mqtt().reconnects_total;
    let keep_alive = second.replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"7s\"\n");
    let outcome = agent.reload(Ok(load(&keep_alive)), false).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "mqtt reconnects");
    seen.until("sim1 going on after the uplink reconnected", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(sim1_at + 100)
    })
    .await;
    assert_eq!(agent.board.mqtt().reconnects_total, reconnects + 1);
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);

    // And removed again: offline with reason `removed`; sim1 still goes on.
    let removed = toml.replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"7s\"\n");
    let outcome = agent.reload(Ok(load(&removed)), false).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "connection sim2 removed");
    seen.until("sim2 removed", |s| {
        s.last_on("connections/sim2/status")
            .is_some_and(|p| p["state"] == "offline" && p["reason"] == "removed")
    })
    .await;

    // health.listen: the endpoint moves; /status there tells the generation.
    let port = plantgate::sim::broker::free_port().expect("a free port");
    let moved = removed.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let outcome = agent.reload(Ok(load(&moved)), false).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(
        outcome.summary,
        format!("health endpoint moves to 127.0.0.1:{port}")
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (code, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(st["config"]["generation"], 5, "{body}");
    assert_eq!(st["config"]["last_reload"]["result"], "applied", "{body}");
    // The old address is free again.
    assert!(std::net::TcpStream::connect(agent.health_addr).is_err());
    agent.stop().await;
}

/// The real binary: SIGHUP (what `systemctl reload` sends) with a broken
/// file is refused, logged with its key path, and the process goes on;
/// with a good one it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_broken_file_and_applies_a_good_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = embedded_broker().await;
    let sim = start_load_sim(dir.path(), 2, 10.0).await;
    let data_dir = dir.path().join("agent");
    let port = plantgate::sim::broker::free_port().expect("a free port");
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let toml = load_toml(
        &data_dir,
        broker.v4_addr,
        &broker.pki.ca_file,
        "v311",
        &sim,
        2,
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{health}\""),
    );
    let config = write_file(dir.path(), "plantgate.toml", &toml);
    let log = dir.path().join("agent.log");
    let mut agent = AgentProcess::start(&config, &log);
    // A GET that may fail (the process is starting): None then.
    let status = || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(health).await.ok()?;
        let req = format!("GET /status HTTP/1.1\r\nHost: {health}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str::<serde_json::Value>(body).ok()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(health).is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no health endpoint");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let log = &log;
    let last_reload = |want: &'static str| async move {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(st) = status().await {
                if st["config"]["last_reload"]["result"] == want {
                    return st;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {want} reload; status {:?}; log:\n{}",
                status().await,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };

    std::fs::write(
        &config,
        toml.replace("kind = \"generic\"", "kind = \"plc\""),
    )
    .expect("write");
    agent.signal_keep("HUP");
    let st = last_reload("refused").await;
    assert_eq!(st["config"]["generation"], 1, "{st}");
    let errors = st["config"]["last_reload"]["errors"].to_string();
    assert!(errors.contains("connections[0].kind"), "{errors}");

    let good = toml.replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"9s\"\n");
    std::fs::write(&config, good).expect("write");
    agent.signal_keep("HUP");
    let st = last_reload("applied").await;
    assert_eq!(st["config"]["generation"], 2, "{st}");
    assert_eq!(
        st["config"]["last_reload"]["summary"], "mqtt reconnects",
        "{st}"
    );
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        stderr.contains("reload refused: connections[0].kind"),
        "{stderr}"
    );
    assert_eq!(agent.signal("TERM").code(), Some(0));
}
