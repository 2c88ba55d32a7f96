//! Live reload (SPEC 2, reload; docs/cli.md): a connection added while
//! another streams keeps the other untouched (its seqs continuous, its
//! state never left `online`); a changed tag list changes the running
//! subscription; a broken configuration is refused with its key paths and
//! the one in force stays; `/status` shows the generation, the last reload
//! and the connections in force; `plantgate reload` (the unit's
//! `ExecReload=`) exits with the outcome.

mod common;

use common::load::{load_toml, start_load_sim};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_added_leaves_the_other_untouched_and_a_broken_config_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = embedded_broker().await;
    // One load tag more than configured, for the tag-list change.
    let sim = start_load_sim(dir.path(), 6, 20.0).await;
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
    let outcome = agent.reload(Err(problems)).await;
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
    let outcome = agent.reload(Ok(load(&second))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "connection sim2 added");
    assert_eq!(agent.board.config().generation, 2);
    seen.until("sim2 streaming, sim1 going on", |s| {
        s.tracker.last_seq("sim2", "tag") >= Some(20)
            && s.tracker.last_seq("sim1", "tag") >= Some(before + 100)
    })
    .await;
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    let sim1_states = states_of(&seen, "sim1");
    let first_online = sim1_states
        .iter()
        .position(|s| s == "online")
        .expect("sim1 online");
    assert_eq!(
        sim1_states[first_online..],
        ["online"],
        "sim1 never left online: {sim1_states:?}"
    );
    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).expect("json");
    let listed: Vec<(String, String)> = st["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| (c["id"].to_string(), c["kind"].to_string()))
        .collect();
    assert_eq!(
        listed,
        [
            ("\"sim1\"".to_string(), "\"generic\"".to_string()),
            ("\"sim2\"".to_string(), "\"generic\"".to_string())
        ],
        "{body}"
    );

    // sim1's tag list: L00004 removed, L00005 added, in the running
    // subscription (the session stays, no reconnect).
    let retagged = second.replacen(
        &plantgate::sim::deltav::load_tag(4),
        &plantgate::sim::deltav::load_tag(5),
        1,
    );
    let retagged = retagged.replacen("name = \"L00004\"", "name = \"L00005\"", 1);
    let outcome = agent.reload(Ok(load(&retagged))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "connection sim1: tags +1 -1 ~0");
    seen.until("L00005 streaming", |s| {
        tag_seqs(s, "sim1", "L00005").len() >= 20
    })
    .await;
    let first_new = tag_seqs(&seen, "sim1", "L00005")[0];
    let last_removed = *tag_seqs(&seen, "sim1", "L00004")
        .last()
        .expect("L00004 before");
    assert!(
        last_removed < first_new,
        "L00004 recorded (seq {last_removed}) after L00005 began (seq {first_new})"
    );
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    let sim1_states = states_of(&seen, "sim1");
    assert_eq!(
        sim1_states[first_online..],
        ["online"],
        "sim1 never left online: {sim1_states:?}"
    );
    let second = retagged;

    // [mqtt] changed: the uplink alone reconnects, nothing is lost.
    let sim1_at = seen.tracker.last_seq("sim1", "tag").unwrap_or(0);
    let reconnects = agent.board.mqtt().reconnects_total;
    let keep_alive = second.replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"7s\"\n");
    let outcome = agent.reload(Ok(load(&keep_alive))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "mqtt reconnects");
    seen.until("sim1 going on after the uplink reconnected", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(sim1_at + 100)
    })
    .await;
    assert_eq!(agent.board.mqtt().reconnects_total, reconnects + 1);
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);

    // And removed again: offline with reason `removed`; sim1 still goes on.
    let removed = keep_alive
        .split("\n[[connections]]\nid = \"sim2\"")
        .next()
        .expect("sim1's part")
        .to_string();
    let outcome = agent.reload(Ok(load(&removed))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "connection sim2 removed");
    seen.until("sim2 removed", |s| {
        s.last_on("connections/sim2/status")
            .is_some_and(|p| p["state"] == "offline" && p["reason"] == "removed")
    })
    .await;
    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        st["connections"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    assert_eq!(st["connections"][0]["id"], "sim1", "{body}");

    // health.listen: the endpoint moves; /status there tells the generation.
    let old_addr = agent.health_addr();
    let port = plantgate::sim::broker::free_port().expect("a free port");
    let moved = removed.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let outcome = agent.reload(Ok(load(&moved))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(
        outcome.summary,
        format!("health endpoint moves to 127.0.0.1:{port}")
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (code, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(st["config"]["generation"], 6, "{body}");
    assert!(
        st["uptime_s"].as_u64() >= Some(1),
        "the agent's uptime, not the endpoint's: {body}"
    );
    assert_eq!(st["config"]["last_reload"]["result"], "applied", "{body}");
    // The old address is free again.
    assert_eq!(agent.health_addr(), addr);
    assert!(std::net::TcpStream::connect(old_addr).is_err());
    agent.stop().await;
}

/// The real binary: `plantgate reload` (the unit's `ExecReload=`) signals
/// the agent and exits with the outcome: 78 for a file that does not
/// validate (the agent, signalled, refuses it too), 1 for one the agent
/// refuses (a change that takes a restart), 0 when applied; a plain
/// SIGHUP applies as well. The process goes on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plantgate_reload_reports_refused_and_applied_reloads() {
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
    while !data_dir.join("reload.json").exists() {
        assert!(tokio::time::Instant::now() < deadline, "no reload report");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = agent.pid().to_string();
    let reload = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_plantgate"))
            .args(["reload", "--timeout", "60", "--pid", &pid, "-c"])
            .arg(&config)
            .output()
            .expect("plantgate reload");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let log = &log;
    let last_reload = |want: &'static str, generation: u64| async move {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(st) = status().await {
                if st["config"]["last_reload"]["result"] == want
                    && st["config"]["generation"] == generation
                {
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

    // Does not validate: 78 with the key path; the agent refuses it too.
    std::fs::write(
        &config,
        toml.replace("kind = \"generic\"", "kind = \"plc\""),
    )
    .expect("write");
    let (code, _, stderr) = reload();
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("connections[0].kind"), "{stderr}");
    let st = last_reload("refused", 1).await;
    let errors = st["config"]["last_reload"]["errors"].to_string();
    assert!(errors.contains("connections[0].kind"), "{errors}");

    // Valid, but refused by the agent: 1, with the agent's reason.
    std::fs::write(
        &config,
        toml.replace("id = \"test-gw\"", "id = \"other-gw\""),
    )
    .expect("write");
    let (code, _, stderr) = reload();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("reload refused")
            && stderr.contains("agent.id")
            && stderr.contains("takes a restart"),
        "{stderr}"
    );
    last_reload("refused", 1).await;

    // Applied: 0, with what changed.
    let good = toml.replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"9s\"\n");
    std::fs::write(&config, &good).expect("write");
    let (code, stdout, stderr) = reload();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "reload applied: mqtt reconnects");
    let st = last_reload("applied", 2).await;
    assert_eq!(
        st["config"]["last_reload"]["summary"], "mqtt reconnects",
        "{st}"
    );

    // A plain SIGHUP applies too.
    std::fs::write(
        &config,
        good.replace("keep_alive = \"9s\"", "keep_alive = \"8s\""),
    )
    .expect("write");
    agent.signal_keep("HUP");
    last_reload("applied", 3).await;
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        stderr.contains("reload refused: connections[0].kind")
            && stderr.contains("reload refused: agent.id"),
        "{stderr}"
    );
    assert_eq!(agent.signal("TERM").code(), Some(0));
}

/// A CA renewed under the same file name takes effect on reload: the
/// agent notices the new contents (nothing else changed), reconnects with
/// it, and a CA that does not match the broker stops the uplink (the
/// records wait in the buffer); the right one again, and everything that
/// waited arrives, without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_renewed_under_the_same_name_takes_effect_on_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = embedded_broker().await;
    let sim = start_load_sim(dir.path(), 2, 20.0).await;
    let data_dir = dir.path().join("agent");
    let right_ca = std::fs::read(&broker.pki.ca_file).expect("CA");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &right_ca).expect("write CA");
    let toml = load_toml(&data_dir, broker.v4_addr, &ca, "v311", &sim, 2);
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("sim1 streaming", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(20)
    })
    .await;

    // Another CA under the same name: the broker's certificate no longer
    // verifies.
    let other = plantgate::sim::broker::TestPki::generate().expect("another CA");
    std::fs::copy(&other.ca_file, &ca).expect("renew CA");
    let outcome = agent.reload(Ok(load(&toml))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "mqtt reconnects");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mqtt = agent.board.mqtt();
        if !mqtt.connected && !mqtt.reason.is_empty() && mqtt.reason != "reload" {
            assert!(
                mqtt.reason.to_lowercase().contains("certificate")
                    || mqtt.reason.contains("UnknownIssuer"),
                "{mqtt:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still connected: {mqtt:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The right CA again: connected, and what waited in the buffer arrives.
    std::fs::write(&ca, &right_ca).expect("write CA");
    let outcome = agent.reload(Ok(load(&toml))).await;
    assert_eq!(outcome.summary, "mqtt reconnects");
    let waited = plantgate::record::now_ms();
    seen.until("records from after the outage", |s| {
        s.messages
            .iter()
            .filter(|m| m.topic.ends_with("/data/sim1/tag"))
            .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["ts"].as_str().map(str::to_string))
            .any(|ts| ts > plantgate::record::format_ts(waited))
    })
    .await;
    assert!(agent.board.mqtt().connected);
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    agent.stop().await;
}

/// An `optomes` connection untouched by a reload keeps its session and its
/// profile state: the OEE window a reload falls into (a connection added
/// beside it, the uplink reconnected) comes out `complete`, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_optomes_connection_keeps_its_oee_window_complete() {
    const WC: &str = "LINE_A_FILLER";
    const WINDOW_MS: i64 = 3_000;
    let plant = start_plant_with("optomes").await;
    let wcs = plant.sim.optomes_work_centers().expect("work centers");
    wcs.take_over(WC).expect("script the work center");
    let ns = plant.sim.namespace_uri();
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        plant.broker.v5_addr,
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        ns,
        &[],
    )
    .replace(r#"kind = "generic""#, r#"kind = "optomes""#)
        + &format!(
            "node_template = \"nsu={ns};s={{work_center}}.{{param}}\"\n\
             oee_window = \"{WINDOW_MS}ms\"\n\
             [[connections.work_centers]]\nname = \"{WC}\"\n"
        );
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("sim1 online", |s| {
        states_of(s, "sim1").iter().any(|st| st == "online")
    })
    .await;
    wcs.change_work_order(WC, "WO-1", "BOTTLE-500ML", 0.1, true, None)
        .expect("work order");
    wcs.set_state(WC, "RUNNING", None).expect("RUNNING");

    // A whole window after the connection came up; the reload in its middle.
    let now = plantgate::record::now_ms();
    let start = (now + 1_000).div_euclid(WINDOW_MS) * WINDOW_MS + WINDOW_MS;
    sleep_until_ms(start + 500).await;
    wcs.add_counts(WC, 7, 1, None).expect("counts");
    sleep_until_ms(start + WINDOW_MS / 2).await;
    let beside = format!(
        "{}\n[[connections]]\nid = \"sim2\"\nkind = \"generic\"\nendpoint = \"{}\"\n\
         security_policy = \"None\"\nsecurity_mode = \"None\"\n\
         [[connections.tags]]\nname = \"STATE\"\nnode = \"nsu={ns};s={WC}.STATE\"\n",
        toml.replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"7s\"\n"),
        plant.sim.endpoint(),
    );
    let outcome = agent.reload(Ok(load(&beside))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(outcome.summary, "connection sim2 added; mqtt reconnects");
    assert!(
        plantgate::record::now_ms() < start + WINDOW_MS,
        "the reload took past the window's end"
    );
    wcs.add_counts(WC, 3, 0, None).expect("counts");

    let window = plantgate::record::format_ts(start);
    seen.until("the window the reload fell into", |s| {
        oee_windows(s)
            .iter()
            .any(|r| r["data"]["window_start"] == window.as_str())
    })
    .await;
    seen.until("sim2 streaming", |s| !tag_seqs_any(s, "sim2").is_empty())
        .await;
    agent.stop().await;
    let found: Vec<serde_json::Value> = oee_windows(&seen)
        .into_iter()
        .filter(|r| r["data"]["window_start"] == window.as_str())
        .collect();
    assert_eq!(found.len(), 1, "one record for the window: {found:#?}");
    let w = &found[0]["data"];
    assert_eq!(w["complete"], true, "{w}");
    assert_eq!(w["good_count"], 10, "{w}");
    assert_eq!(w["reject_count"], 1, "{w}");
    let sim1 = states_of(&seen, "sim1");
    let first_online = sim1.iter().position(|s| s == "online").expect("online");
    // Online throughout (the new uplink says so again); at most the
    // stop's own `offline` at the end.
    let after = &sim1[first_online..];
    let last_online = after.iter().rposition(|s| s == "online").unwrap_or(0);
    assert!(
        after[..=last_online].iter().all(|s| s == "online")
            && after[last_online + 1..].iter().all(|s| s == "offline")
            && after.len() - last_online <= 2,
        "sim1 went through another session: {sim1:?}"
    );
}

/// OEE records seen, once per seq.
fn oee_windows(seen: &Seen) -> Vec<serde_json::Value> {
    let mut by_seq = std::collections::BTreeMap::new();
    for r in seen
        .messages
        .iter()
        .filter(|m| m.topic.ends_with("/data/sim1/oee"))
        .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
    {
        by_seq.entry(r["seq"].as_u64().unwrap_or(0)).or_insert(r);
    }
    by_seq.into_values().collect()
}

/// Sleeps until the wall clock reaches `t_ms` (OEE windows are aligned to
/// it by design).
async fn sleep_until_ms(t_ms: i64) {
    let wait = t_ms - plantgate::record::now_ms();
    if wait > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
    }
}

/// The seqs of every tag record of `connection`.
fn tag_seqs_any(seen: &Seen, connection: &str) -> Vec<u64> {
    let topic = format!("/data/{connection}/tag");
    seen.messages
        .iter()
        .filter(|m| m.topic.ends_with(&topic))
        .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["seq"].as_u64())
        .collect()
}

/// The tag records' seqs of tag `name` of `connection`, in arrival order.
fn tag_seqs(seen: &Seen, connection: &str, name: &str) -> Vec<u64> {
    let topic = format!("/data/{connection}/tag");
    seen.messages
        .iter()
        .filter(|m| m.topic.ends_with(&topic))
        .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["data"]["name"] == name)
        .filter_map(|r| r["seq"].as_u64())
        .collect()
}

/// The states published for `connection`, in order.
fn states_of(seen: &Seen, connection: &str) -> Vec<String> {
    let topic = format!("/connections/{connection}/status");
    seen.messages
        .iter()
        .filter(|m| m.topic.ends_with(&topic))
        .map(|m| m.payload["state"].as_str().unwrap_or("").to_string())
        .collect()
}
