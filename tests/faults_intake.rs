//! Faults at the intake (docs/guarantees.md) with real parts: a second process
//! holding the buffer's write lock while the simulator pushes load, and an
//! independent OPC UA server (python asyncua) that revises the subscription
//! to absurd values. Nothing may be lost silently, no task may die.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::load::*;
use common::*;
use serde_json::Value;

/// 100 tags at 10 Hz: 1 000 values/s offered.
const LOAD_TAGS: usize = 100;
const LOAD_HZ: f64 = 10.0;
/// Longer than the buffer's busy timeout, so appends really fail meanwhile.
const LOCK_SECS: u64 = 8;

fn status_json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("status is JSON ({e}): {body}"))
}

/// Holds `BEGIN IMMEDIATE` on `db` for `secs` from another process (python's
/// sqlite3 module, i.e. another SQLite library instance), as
/// `plantgate buffer retry` or an operator's `sqlite3` shell would. Prints
/// LOCKED once it holds the lock.
async fn hold_write_lock(db: &std::path::Path, secs: u64) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        "import sqlite3, sys, time\n\
         c = sqlite3.connect({db:?}, isolation_level=None, timeout=30)\n\
         c.execute('BEGIN IMMEDIATE')\n\
         print('LOCKED', flush=True)\n\
         time.sleep({secs})\n\
         c.execute('COMMIT')\n",
        db = db.display().to_string(),
    );
    let mut child = tokio::process::Command::new(python)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("lock taken in time")
        .expect("read");
    assert_eq!(line.as_deref(), Some("LOCKED"));
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_buffer_holds_records_back_and_loses_none() {
    init_tracing();
    let broker = tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("broker thread")
        .expect("embedded broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), LOAD_TAGS, LOAD_HZ).await;
    let data_dir = dir.path().join("agent");
    let toml = load_toml(
        &data_dir,
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim,
        LOAD_TAGS,
    );
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("tag data flows", |s| {
        s.tracker.last_seq("sim1", "tag").is_some()
    })
    .await;

    let mut lock = hold_write_lock(&data_dir.join("buffer.db"), LOCK_SECS).await;
    // While the lock is held: not ready, and it says why.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(LOCK_SECS);
    let mut saw_not_ready = None;
    while tokio::time::Instant::now() < deadline {
        let (code, body) = http_get(agent.health_addr(), "/readyz").await;
        if code == 503 && body.contains("buffer not accepting records") {
            saw_not_ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let why = saw_not_ready.expect("/readyz reports the refusing buffer while it is locked");
    assert!(why.contains("locked"), "{why}");
    let (code, body) = http_get(agent.health_addr(), "/healthz").await;
    assert_eq!(code, 200, "a lock is no dead task: {body}");
    let status = lock.wait().await.expect("lock holder ends");
    assert!(status.success());

    // Afterwards: announced, ready again, and every value accounted for.
    seen.until("system.error buffer_blocked", |s| {
        s.messages.iter().any(|m| {
            m.topic.ends_with("/events/system.error")
                && m.payload["details"]["error"] == "buffer_blocked"
        })
    })
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (code, _) = http_get(agent.health_addr(), "/readyz").await;
        if code == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(sim);
    let last = wait_drained(&agent.buffer, "sim1").await;
    seen.until("every tag seq delivered", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(last)
    })
    .await;
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    // 1 000 values/s for the lock's duration fit the intake queues: the
    // sources waited, the agent dropped nothing. (What the server itself
    // discarded, `opcua_queue_overflow`, is counted too, but is the server's
    // timing on a busy test machine, not the lock.)
    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let st = status_json(&body);
    let sim1 = &st["connections"][0];
    assert_eq!(sim1["id"], "sim1");
    for reason in ["queue_full", "buffer_refused"] {
        assert!(sim1["dropped"][reason].is_null(), "{reason}: {st}");
    }
    assert_eq!(st["intake"]["agent_dropped"], serde_json::json!({}), "{st}");
    assert!(
        last > (LOAD_TAGS as u64) * LOCK_SECS * 5,
        "load really ran through the lock: {last} records"
    );
    agent.stop().await;
}

/// The broker acknowledges messages while another process holds the
/// buffer's write lock, so the agent cannot delete their rows when the
/// PUBACKs come. It keeps the deletes and retries them: once the lock is
/// gone the delivered backlog leaves the disk in the same MQTT session,
/// instead of staying there (and being sent again) until the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_acknowledged_under_a_lock_are_deleted_once_it_is_gone() {
    init_tracing();
    let broker = tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("broker thread")
        .expect("embedded broker");
    let proxy = plantgate::sim::proxy::CutProxy::start(broker.v5_addr)
        .await
        .expect("proxy");
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), LOAD_TAGS, LOAD_HZ).await;
    let data_dir = dir.path().join("agent");
    let toml = load_toml(
        &data_dir,
        proxy.addr(),
        &broker.pki.ca_file,
        "v5",
        &sim,
        LOAD_TAGS,
    );
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    seen.until("tag data flows", |s| {
        s.tracker.last_seq("sim1", "tag").is_some()
    })
    .await;

    // A backlog on disk while the broker is out of reach.
    proxy.cut();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while agent.buffer.stats().await.expect("stats").records < 3_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backlog built up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Locked, then the broker is back: the backlog is read (WAL readers
    // pass the lock) and acknowledged, but cannot be deleted yet.
    let mut lock = hold_write_lock(&data_dir.join("buffer.db"), LOCK_SECS).await;
    let reconnects = agent.board.mqtt().reconnects_total;
    proxy.restore();
    let status = lock.wait().await.expect("lock holder ends");
    assert!(status.success());
    assert!(
        agent.board.mqtt().reconnects_total > reconnects,
        "the uplink came back while the lock was held"
    );
    let session = agent.board.mqtt().reconnects_total;
    drop(sim);
    let last = wait_drained(&agent.buffer, "sim1").await;
    seen.until("every tag seq delivered", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(last)
    })
    .await;
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    assert_eq!(
        agent.board.mqtt().reconnects_total,
        session,
        "drained in the same MQTT session"
    );
    // Not silent: counted, shown until caught up, and announced.
    let mqtt = agent.board.mqtt();
    assert!(mqtt.delete_retries_total > 0, "failed deletes counted");
    assert_eq!(mqtt.undeleted_records, 0, "every delete caught up");
    seen.until("the failed delete announced", |s| {
        s.messages.iter().any(|m| {
            m.topic.contains("/events/")
                && m.payload
                    .to_string()
                    .contains("cannot be deleted from the buffer yet")
        })
    })
    .await;
    agent.stop().await;
}

/// The python server, misbehaving (tests/asyncua_absurd.py).
async fn absurd_server(pki: &std::path::Path) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/asyncua_absurd.py");
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg("--pki")
        .arg(pki)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with asyncua");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(PATIENCE * 2, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(rest) = line.strip_prefix("READY ") {
                return rest.to_string();
            }
        }
        panic!("asyncua server exited before READY");
    })
    .await
    .expect("server ready in time");
    let endpoint = ready
        .split_whitespace()
        .next()
        .expect("endpoint")
        .to_string();
    (child, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with asyncua"]
async fn absurd_subscription_revisions_do_not_kill_the_connection() {
    init_tracing();
    let broker = tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("broker thread")
        .expect("embedded broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, endpoint) = absurd_server(&dir.path().join("server-pki")).await;
    let toml = agent_toml(
        &dir.path().join("agent"),
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &endpoint,
        "urn:plantgate:interop",
        &[("Counter", "Line1/Counter")],
    );
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    // Values keep coming well after the subscription was set up with the
    // absurd figures: the connection task is alive and subscribed.
    seen.until("30 Counter values", |s| s.tag_values("Counter").len() >= 30)
        .await;
    let (code, body) = http_get(agent.health_addr(), "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let st = status_json(&body);
    assert_eq!(st["connections"][0]["state"], "online", "{st}");
    assert_eq!(st["tasks"]["dead"], serde_json::json!([]), "{st}");
    assert_eq!(st["tasks"]["restarts"], serde_json::json!({}), "{st}");
    agent.stop().await;
}
