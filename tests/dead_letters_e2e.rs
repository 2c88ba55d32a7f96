//! docs/guarantees.md end to end: a broker that refuses every data message (a
//! mosquitto ACL, MQTT 5 PUBACK 0x87), a small buffer (1 MiB) and steady load
//! (100 tags). Once refused records filled the buffer the old agent
//! dropped every new record with one log line. Now dead letters are evicted
//! like any record (announced, reason `dead_letter`), the intake keeps being
//! accepted, nothing is dropped at the intake and `/readyz` says why the
//! agent is not ready. The rate is one at which a refused message survives
//! its retries (1 + 2 + 4 s) before size eviction would take it anyway.
//! Needs mosquitto; `.ci/run` installs it.

mod common;

use std::time::Duration;

use common::load::*;
use common::mosquitto::{start_mosquitto, MosquittoOptions};
use common::*;
use plantgate::sim::broker::TestPki;
use serde_json::Value;

const LOAD_TAGS: usize = 100;
const LOAD_HZ: f64 = 2.0;
const MAX_SIZE: u64 = 1024 * 1024;

fn on_disk(data_dir: &std::path::Path) -> u64 {
    ["buffer.db", "buffer.db-wal", "buffer.db.reserve"]
        .iter()
        .map(|f| {
            std::fs::metadata(data_dir.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

fn accepted_tags(st: &Value) -> u64 {
    st["connections"][0]["records_total"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn a_refusing_broker_never_makes_the_buffer_drop_new_records() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(
        &pki,
        MosquittoOptions {
            // Data refused, events and status allowed: the consumer sees
            // the announcements.
            acl: Some("topic deny plantgate/+/+/data/#\ntopic readwrite #\n".into()),
            ..Default::default()
        },
    );
    let sim = start_load_sim(dir.path(), LOAD_TAGS, LOAD_HZ).await;
    let data_dir = dir.path().join("agent");
    let mut toml = load_toml(&data_dir, mosq.tls, &pki.ca_file, "v5", &sim, LOAD_TAGS);
    toml.push_str("\n[buffer]\nmax_size = \"1MiB\"\n");
    let mut seen = watch(mosq.tls, &pki.ca_file).await;
    let agent = run_agent(&toml).await;

    // Refused records become dead letters, fill the buffer, and are then
    // evicted and announced like any record.
    seen.until("a buffer.evicted with reason dead_letter", |s| {
        s.messages.iter().any(|m| {
            m.topic.ends_with("/events/buffer.evicted")
                && m.payload["details"]["reason"] == "dead_letter"
        })
    })
    .await;
    let ev = seen
        .messages
        .iter()
        .find(|m| m.payload["details"]["reason"] == "dead_letter")
        .map(|m| m.payload["details"].clone())
        .expect("seen");
    assert_eq!(ev["connection"], "sim1", "{ev}");
    assert_eq!(ev["kind"], "tag", "{ev}");
    assert_eq!(ev["limit"], "max_size", "{ev}");

    // From here on the intake keeps being accepted: over the next seconds
    // the connection's accepted records grow by about the offered rate.
    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let before: Value = serde_json::from_str(&body).expect("json");
    let started = tokio::time::Instant::now();
    let deadline = started + PATIENCE;
    let after = loop {
        let (_, body) = http_get(agent.health_addr(), "/status").await;
        let st: Value = serde_json::from_str(&body).expect("json");
        // Ten seconds' worth of the offered rate.
        if accepted_tags(&st) >= accepted_tags(&before) + (LOAD_TAGS as u64) * 2 * 10 {
            break st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "records stopped being accepted: {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let conn = &after["connections"][0];
    for reason in ["queue_full", "buffer_refused"] {
        assert!(conn["dropped"][reason].is_null(), "{reason}: {after}");
    }
    assert_eq!(
        after["intake"]["agent_dropped"],
        serde_json::json!({}),
        "{after}"
    );
    // Dead letters come and go: the size limit takes them first.
    assert!(
        after["mqtt"]["dead_lettered_total"].as_u64() > Some(0),
        "{after}"
    );
    assert!(
        after["buffer"]["evicted_total"].as_u64() > Some(0),
        "{after}"
    );
    assert!(
        after["mqtt"]["rejected_total"].as_u64() > Some(0),
        "{after}"
    );
    assert!(
        on_disk(&data_dir) <= MAX_SIZE,
        "{} bytes on disk",
        on_disk(&data_dir)
    );

    // Not ready, and it says why.
    let (code, body) = http_get(agent.health_addr(), "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let why: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(why["reason"], "dead_letters", "{why}");
    // Alive all the same: nothing died.
    let (code, body) = http_get(agent.health_addr(), "/healthz").await;
    assert_eq!(code, 200, "{body}");
    agent.stop().await;
    drop(sim);
}
