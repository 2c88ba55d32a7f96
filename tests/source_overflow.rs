//! Loss at the source (docs/guarantees.md) against an OPC UA server whose
//! monitored-item queues really overflow: our simulator capped at a queue of
//! 2 values per item, 20 tags changing at 20 Hz, and an agent sampling every
//! 50 ms but publishing once a second. The agent asks for queues of twice
//! the ratio (41), the server revises them down to 2 and discards ~18 of
//! every 20 values per item and cycle, flagging the value after each discard
//! with the `Overflow` info bit. That loss must show in `/metrics`, in
//! `/status` and as a `source.dropped` event, while the values the server
//! kept still flow.

mod common;

use common::load::*;
use common::*;
use serde_json::Value;

const TAGS: usize = 20;
const HZ: f64 = 20.0;
/// The server's cap on every monitored item's queue. Not 1: OPC UA sets no
/// Overflow bit on a queue of one (it just keeps the latest value).
const SERVER_QUEUE: usize = 2;
const REASON: &str = "opcua_queue_overflow";

fn is_overflow_event(m: &Message) -> bool {
    m.topic.ends_with("/events/source.dropped")
        && m.payload["connection"] == "sim1"
        && m.payload["details"]["reason"] == REASON
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_queue_overflow_is_counted_announced_and_values_still_flow() {
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extras = plantgate::sim::SimExtras {
        max_queue_size: Some(SERVER_QUEUE),
        ..Default::default()
    };
    let sim = start_load_sim_with(dir.path(), TAGS, HZ, extras).await;

    let data_dir = dir.path().join("agent");
    let toml = load_toml(
        &data_dir,
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim,
        TAGS,
    );
    let (publishing, sampling) = (
        r#"publishing_interval = "100ms""#,
        r#"sampling_interval = "100ms""#,
    );
    assert!(
        toml.contains(publishing) && toml.contains(sampling),
        "{toml}"
    );
    let toml = toml
        .replace(publishing, r#"publishing_interval = "1s""#)
        .replace(sampling, r#"sampling_interval = "50ms""#);
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;

    // Announced: the reason, a count, and tag names to look at.
    seen.until("source.dropped for opcua_queue_overflow", |s| {
        s.messages.iter().any(is_overflow_event)
    })
    .await;
    let event = seen
        .messages
        .iter()
        .find(|m| is_overflow_event(m))
        .map(|m| m.payload.clone())
        .expect("seen");
    let announced = event["details"]["count"].as_u64().unwrap_or(0);
    assert!(announced > 0, "{event}");
    let samples: Vec<&str> = event["details"]["samples"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(!samples.is_empty(), "no sample tags: {event}");
    for name in &samples {
        let i: usize = name
            .strip_prefix('L')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("sample {name:?} is no configured tag: {event}"));
        assert!(i < TAGS, "{event}");
    }

    // Counted per connection and reason in /status (read first: the
    // counters only grow, so /metrics read after it shows at least as much).
    let (code, body) = http_get(agent.health_addr(), "/status").await;
    assert_eq!(code, 200, "{body}");
    let st: Value = serde_json::from_str(&body).expect("status is JSON");
    let sim1 = st["connections"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "sim1"))
        .unwrap_or_else(|| panic!("no sim1 in {st}"))
        .clone();
    let in_status = sim1["dropped"][REASON].as_u64().unwrap_or(0);
    assert!(
        in_status >= announced,
        "dropped {REASON} {in_status} < {announced} announced: {sim1}"
    );
    assert!(
        sim1["dropped_total"].as_u64().unwrap_or(0) >= in_status,
        "{sim1}"
    );
    // The agent itself lost nothing: only the server discarded values.
    assert_eq!(
        sim1["dropped"].as_object().map(|d| d.len()),
        Some(1),
        "{sim1}"
    );

    let (code, metrics) = http_get(agent.health_addr(), "/metrics").await;
    assert_eq!(code, 200, "{metrics}");
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition format");
    let in_metrics = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "plantgate_intake_dropped_total"
                && s.labels.get("connection") == Some("sim1")
                && s.labels.get("reason") == Some(REASON)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("not a counter: {other:?}"),
        })
        .unwrap_or_else(|| panic!("no intake_dropped_total for sim1/{REASON}:\n{metrics}"));
    assert!(
        in_metrics >= in_status as f64 && in_metrics > 0.0,
        "{in_metrics} in /metrics, {in_status} in /status"
    );

    // What the server kept still flows, for every tag, as good values (the
    // Overflow info bit is no quality problem of the value it sits on).
    seen.until("3 values of every tag", |s| {
        (0..TAGS).all(|i| s.tag_values(&format!("L{i:05}")).len() >= 3)
    })
    .await;
    let bad: Vec<&Value> = seen
        .messages
        .iter()
        .filter(|m| m.topic.contains("/data/") && m.payload["kind"] == "tag")
        .flat_map(|m| m.payload["records"].as_array().into_iter().flatten())
        .filter(|r| r["data"]["quality"] != "good" || r["data"]["status"] != "Good")
        .collect();
    assert!(bad.is_empty(), "{bad:?}");

    // Everything accepted was delivered, without a gap.
    sim.shutdown().await;
    let last = drained_and_seen(&mut seen, &data_dir).await;
    assert!(last >= (TAGS * 3) as u64, "{last}");
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    agent.stop().await;
}
