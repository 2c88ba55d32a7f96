//! Message size limits and broker refusals against real brokers (docs/guarantees.md,
//! 1.11): the broker's MQTT 5 Maximum Packet Size after an outage under
//! load, an event larger than `max_message_bytes` (MQTT 5 and 3.1.1), and
//! messages a mosquitto ACL refuses. Each used to end in a reconnect loop or
//! a tight retry loop; here the agent stays connected, dead-letters what
//! cannot go (announced), and keeps everything else flowing without gaps.
//! The mosquitto tests need the `mosquitto` binary (`.ci/run` installs it).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::load::*;
use common::mosquitto::{start_mosquitto, MosquittoOptions};
use common::*;
use plantgate::buffer::{Append, Store, StoreOptions};
use plantgate::demo::{Watcher, WatcherOptions};
use plantgate::record::{now_ms, Kind, NewRecord};
use plantgate::sim::broker::TestPki;
use serde_json::{json, Value};

/// The broker limit of the outage test, as in the field report.
const BROKER_MAX_PACKET: u32 = 20_000;
/// Load tags × rate: 300 × 10 Hz = 3 000 values/s offered.
const LOAD_TAGS: usize = 300;
const LOAD_HZ: f64 = 10.0;

/// The size of a payload as the agent sent it (it sends compact JSON, which
/// re-serialises to the same length).
fn payload_len(v: &Value) -> usize {
    serde_json::to_vec(v).expect("json").len()
}

/// Issue report: mosquitto `max_packet_size 20000`, a 10 s outage under
/// load, then 26 connect/disconnect cycles in 25 s and no data at all (the
/// backlog went out in 128 KiB batches). Now every message is sized to the
/// limit from the CONNACK: one reconnect, the whole backlog delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn broker_max_packet_size_holds_after_an_outage_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mut mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            persistence: true,
            max_packet_size: Some(BROKER_MAX_PACKET),
            ..Default::default()
        },
    );
    let sim = start_load_sim(dir.path(), LOAD_TAGS, LOAD_HZ).await;
    let data_dir = dir.path().join("agent");
    let toml = load_toml(&data_dir, mosq.tls, &pki.ca_file, "v5", &sim, LOAD_TAGS);
    let watcher = Watcher::connect_with(
        mosq.tls,
        &pki.ca_file,
        "plantgate/#",
        WatcherOptions {
            persistent_id: Some("watcher-limits".into()),
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
    let m = agent.board.mqtt();
    assert_eq!(m.broker_max_packet_bytes, Some(BROKER_MAX_PACKET));
    assert!(m.payload_limit_bytes < BROKER_MAX_PACKET as usize);

    // The outage: the backlog grows on disk to far more than one message
    // of 20 000 bytes can carry (20 000 records ≈ 3 MB).
    mosq.stop("TERM");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = agent.buffer.stats().await.expect("stats");
        if st.records >= 20_000 && !agent.board.mqtt().connected {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no backlog: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mosq.restart();
    let before = seen.tracker.received;
    seen.until("backlog flowing after the outage", |s| {
        s.tracker.received > before + 20_000
    })
    .await;
    sim.shutdown().await;
    let last = drained_and_seen(&mut seen, &data_dir).await;

    let m = agent.board.mqtt();
    let data_sizes: Vec<usize> = seen
        .messages
        .iter()
        .filter(|m| m.topic.contains("/data/"))
        .map(|m| payload_len(&m.payload))
        .collect();
    let largest = data_sizes.iter().copied().max().unwrap_or(0);
    let topic = "plantgate/test-site/test-gw/data/sim1/tag";
    eprintln!(
        "max_packet_size {BROKER_MAX_PACKET}: {last} records in {} data messages (largest payload {largest} B), \
         {} reconnects, {} duplicates, {} gaps",
        data_sizes.len(),
        m.reconnects_total,
        seen.tracker.duplicates,
        seen.tracker.gaps
    );
    // One connect before the outage, one after: no loop.
    assert_eq!(m.reconnects_total, 2, "reconnect loop: {m:?}");
    let clients = mosq.log().matches(" as test-gw ").count();
    assert_eq!(clients, 1, "connections after the restart:\n{}", mosq.log());
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    // Within the broker's limit, and using it (not needlessly tiny).
    assert!(
        largest + topic.len() + 10 <= BROKER_MAX_PACKET as usize,
        "{largest}"
    );
    assert!(largest > BROKER_MAX_PACKET as usize / 2, "{largest}");
    assert_eq!(m.dead_lettered_total(), 0, "{m:?}");
    agent.stop().await;
}

/// An event `{"type":"test.marker","details":{"marker":..}}` of
/// `connection` ("" for the agent's own stream), padded by `pad` bytes.
fn marker(connection: &str, name: &str, pad: usize) -> NewRecord {
    NewRecord {
        connection: connection.to_string(),
        kind: Kind::Event,
        ts_ms: now_ms(),
        data: json!({"type": "test.marker", "details": {"marker": name, "pad": "x".repeat(pad)}})
            .to_string(),
    }
}

/// `connection` as events carry it: null for the agent.
fn conn_value(connection: &str) -> Value {
    if connection.is_empty() {
        Value::Null
    } else {
        Value::from(connection)
    }
}

fn is_marker(m: &Message, connection: &str, name: &str) -> bool {
    m.topic.ends_with("/events/test.marker")
        && m.payload["connection"] == conn_value(connection)
        && m.payload["details"]["marker"] == name
}

fn is_dead_letter_notice(m: &Message) -> bool {
    m.topic.ends_with("/events/system.error")
        && m.payload["details"]["message"] == "records moved to dead letters"
}

/// The dead-letter notice about `connection`'s records, if seen.
fn notice_about(seen: &Seen, connection: &str) -> Option<Value> {
    seen.messages
        .iter()
        .find(|m| {
            is_dead_letter_notice(m) && m.payload["details"]["connection"] == conn_value(connection)
        })
        .map(|m| m.payload["details"].clone())
}

/// Issue report: a 12 KB event went out under a 1 KiB cap with MQTT 5, and
/// with MQTT 3.1.1 it became a reconnect loop that never moved past it. Two
/// such events, one of the agent's own stream and one of a connection's,
/// are put into a real buffer file before the agent starts, each between
/// two small ones.
async fn oversized_event_is_dead_lettered(
    mqtt: SocketAddr,
    watch_addr: SocketAddr,
    ca_file: &Path,
    protocol: &str,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("agent");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    {
        let mut store =
            Store::open(&data_dir.join("buffer.db"), StoreOptions::default()).expect("buffer");
        let mut records = Vec::new();
        for connection in ["", "sim1"] {
            records.push(marker(connection, "before", 0));
            records.push(marker(connection, "big", 12_000));
            records.push(marker(connection, "after", 0));
        }
        let seqs = store
            .append(Append::records(&records))
            .expect("append")
            .seqs;
        assert_eq!(seqs, vec![1, 2, 3, 1, 2, 3]);
    }
    let sim = start_load_sim(dir.path(), 0, LOAD_HZ).await;
    let toml = agent_toml(
        &data_dir,
        mqtt,
        ca_file,
        protocol,
        &sim.endpoint(),
        sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    )
    .replace("[mqtt]\n", "[mqtt]\nmax_message_bytes = \"1KiB\"\n");
    let mut seen = watch(watch_addr, ca_file).await;
    let agent = run_agent(&toml).await;

    seen.until(
        "the events around the big ones, and their dead letters",
        |s| {
            ["", "sim1"].iter().all(|c| {
                s.messages.iter().any(|m| is_marker(m, c, "after")) && notice_about(s, c).is_some()
            })
        },
    )
    .await;
    // Later events and data still flow, on the same connection.
    for i in 1..=3 {
        let v = 100.0 + f64::from(i);
        sim.set_value("FIC-101/PV.CV", v);
        seen.until(&format!("FLOW {v}"), |s| {
            s.tag_values("FLOW").iter().any(|x| x.as_f64() == Some(v))
        })
        .await;
    }
    // A few more heartbeats: the session is stable, not cycling.
    let beats = |s: &Seen| {
        s.messages
            .iter()
            .filter(|m| m.topic.ends_with("/heartbeat"))
            .count()
    };
    let before = beats(&seen);
    seen.until("three more heartbeats", |s| beats(s) >= before + 3)
        .await;

    let mut reason = String::new();
    for connection in ["", "sim1"] {
        let notice = notice_about(&seen, connection).expect("notice");
        assert_eq!(notice["kind"], "event", "{notice}");
        assert_eq!(notice["first_seq"], 2, "{notice}");
        assert_eq!(notice["last_seq"], 2, "{notice}");
        assert_eq!(notice["count"], 1, "{notice}");
        reason = notice["reason"].as_str().unwrap_or("").to_string();
        assert!(reason.contains("mqtt.max_message_bytes (1024)"), "{reason}");
        assert!(
            !seen
                .messages
                .iter()
                .any(|m| is_marker(m, connection, "big")),
            "the oversized event of {connection:?} went out"
        );
    }
    let largest = seen
        .messages
        .iter()
        .map(|m| payload_len(&m.payload))
        .max()
        .unwrap_or(0);
    assert!(
        largest <= 1024,
        "a {largest}-byte message under a 1 KiB cap"
    );
    // The only gaps are the dead letters, and they were announced above.
    let mut gaps = seen.tracker.gap_details.clone();
    gaps.sort();
    assert_eq!(
        gaps,
        vec!["/event: 1 → 3".to_string(), "sim1/event: 1 → 3".to_string()],
        "{protocol}"
    );
    let m = agent.board.mqtt();
    assert_eq!(m.reconnects_total, 1, "{protocol}: reconnect loop: {m:?}");
    assert_eq!(m.dead_lettered_by_cause.get("too_large"), Some(&2), "{m:?}");
    let dead = agent.buffer.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert_eq!((d.kind, d.first_seq, d.count), (Kind::Event, 2, 1), "{d:?}");
    }
    eprintln!("oversized event ({protocol}): dead-lettered, reason: {reason}");
    agent.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_event_is_dead_lettered_embedded_mqtt311() {
    init_tracing();
    let broker = tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("broker thread")
        .expect("embedded broker");
    oversized_event_is_dead_lettered(broker.v4_addr, broker.v4_addr, &broker.pki.ca_file, "v311")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn oversized_event_is_dead_lettered_mosquitto_mqtt5() {
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, MosquittoOptions::default());
    oversized_event_is_dead_lettered(mosq.tls, mosq.tls, &pki.ca_file, "v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn oversized_event_is_dead_lettered_mosquitto_mqtt311() {
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, MosquittoOptions::default());
    oversized_event_is_dead_lettered(mosq.tls, mosq.tls, &pki.ca_file, "v311").await;
}

/// Issue report: a refused message was retried at once, three times in a
/// row. Now its stream waits 1 s, 2 s, 4 s between attempts (measured on
/// the refusals the real broker sent back), other streams flow meanwhile,
/// and after the fourth refusal the records go to the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn refused_messages_back_off_then_go_to_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            acl: Some("topic deny plantgate/+/+/data/poison/#\ntopic readwrite #\n".into()),
            log_all: true,
            ..Default::default()
        },
    );
    let sim = start_load_sim(dir.path(), 0, LOAD_HZ).await;
    let mut toml = agent_toml(
        &dir.path().join("agent"),
        mosq.tls,
        &pki.ca_file,
        "v5",
        &sim.endpoint(),
        sim.namespace_uri(),
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
        sim.endpoint(),
        sim.namespace_uri()
    ));
    let mut seen = watch(mosq.tls, &pki.ca_file).await;
    let agent = run_agent(&toml).await;

    // Every refusal's time, from the board, until the records are dead
    // letters. Polled every 10 ms; refusals come at least a second apart.
    let board = agent.board.clone();
    let poller = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut times: Vec<i64> = Vec::new();
        let mut count = 0;
        loop {
            let m = board.mqtt();
            if m.rejected_total > count {
                count = m.rejected_total;
                times.push(m.last_rejected_ms.expect("time of the refusal"));
            }
            if m.dead_lettered_by_cause
                .get("refused")
                .copied()
                .unwrap_or(0)
                > 0
            {
                return (times, m);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never dead-lettered: {times:?} {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // While the poison stream waits, the other one flows.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while agent.board.mqtt().rejected_total == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no refusal");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.set_value("FIC-101/PV.CV", 777.0);
    seen.until("FLOW 777 while the poison stream waits", |s| {
        s.tag_values("FLOW")
            .iter()
            .any(|x| x.as_f64() == Some(777.0))
    })
    .await;
    let flow_seen_ms = now_ms();
    let (times, m) = poller.await.expect("poller");

    // Refusals within 500 ms of each other belong to one attempt.
    let mut attempts: Vec<i64> = Vec::new();
    for t in &times {
        if attempts.last().is_none_or(|a| t - a > 500) {
            attempts.push(*t);
        }
    }
    let gaps: Vec<i64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("refusals at {times:?}; attempts spaced {gaps:?} ms; {m:?}");
    assert_eq!(attempts.len(), 4, "attempts: {attempts:?}");
    for (gap, want) in gaps.iter().zip([1000i64, 2000, 4000]) {
        assert!(
            *gap >= want - 50 && *gap <= want + 2000,
            "spacing {gaps:?}, wanted about 1 s, 2 s, 4 s"
        );
    }
    assert!(
        flow_seen_ms < attempts[3],
        "the other stream waited for the poison one"
    );
    // The broker saw exactly the attempts the agent counted.
    let denied = mosq
        .log()
        .lines()
        .filter(|l| l.contains("Denied PUBLISH") && l.contains("/data/poison/"))
        .count();
    assert_eq!(denied as u64, m.rejected_total, "{}", mosq.log());

    seen.until("system.error naming the poison stream", |s| {
        s.messages
            .iter()
            .any(|m| is_dead_letter_notice(m) && m.payload["details"]["connection"] == "poison")
    })
    .await;
    let notice = seen
        .messages
        .iter()
        .find(|m| is_dead_letter_notice(m) && m.payload["details"]["connection"] == "poison")
        .map(|m| m.payload["details"].clone())
        .expect("notice");
    let reason = notice["reason"].as_str().unwrap_or("");
    assert!(reason.contains("refused the message 4 times"), "{reason}");
    let dead = agent.buffer.dead_letters().await.expect("dead letters");
    assert!(
        dead.iter()
            .any(|d| d.connection == "poison" && d.kind == Kind::Tag),
        "{dead:?}"
    );
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    assert_eq!(agent.board.mqtt().reconnects_total, 1);
    agent.stop().await;
    sim.shutdown().await;
}

/// A broker whose Maximum Packet Size cannot carry even a status message or
/// a dead-letter notice is a configuration error on the broker: the agent
/// says so (status reason), keeps every record in its buffer (nothing is
/// dead-lettered for the broker's sake) and retries with its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn a_broker_limit_too_small_for_any_message_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            max_packet_size: Some(600),
            ..Default::default()
        },
    );
    let sim = start_load_sim(dir.path(), 0, LOAD_HZ).await;
    let toml = agent_toml(
        &dir.path().join("agent"),
        mosq.tls,
        &pki.ca_file,
        "v5",
        &sim.endpoint(),
        sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    );
    let agent = run_agent(&toml).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let m = agent.board.mqtt();
        let connects = mosq.log().matches(" as test-gw ").count();
        if m.reason.contains("Maximum Packet Size (600 bytes)") && connects >= 3 {
            assert!(
                m.reason.contains("raise max_packet_size on the broker"),
                "{}",
                m.reason
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clear error: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = agent.board.mqtt();
    assert!(!m.connected);
    assert_eq!(m.reconnects_total, 0, "{m:?}");
    let st = agent.buffer.stats().await.expect("stats");
    assert!(st.records > 0, "records kept: {st:?}");
    assert!(
        agent
            .buffer
            .dead_letters()
            .await
            .expect("dead letters")
            .is_empty(),
        "nothing dead-lettered for the broker's limit"
    );
    agent.stop().await;
    sim.shutdown().await;
}
