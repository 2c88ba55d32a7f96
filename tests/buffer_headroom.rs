//! The headroom warning end to end (docs/configuration.md,
//! `buffer.headroom_warning`): an agent whose buffer would ride out far
//! less than an hour at its real intake rate says so with a
//! `system.error` (`buffer_headroom_low`), and `/status` shows the same
//! estimate.

mod common;

use common::load::*;
use common::*;

/// 2 000 values/s, some 0.5 MB/s: a 16 MiB buffer lasts about half a minute.
const TAGS: usize = 200;
const HZ: f64 = 10.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buffer_too_small_for_an_hour_of_outage_is_announced() {
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), TAGS, HZ).await;
    let mut toml = load_toml(
        &dir.path().join("agent"),
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim,
        TAGS,
    );
    toml.push_str("\n[buffer]\nmax_size = \"16MiB\"\n");
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;

    seen.until("system.error buffer_headroom_low", |s| {
        s.messages.iter().any(|m| {
            m.topic.ends_with("/events/system.error")
                && m.payload["details"]["error"] == "buffer_headroom_low"
        })
    })
    .await;
    let details = seen
        .messages
        .iter()
        .find(|m| m.payload["details"]["error"] == "buffer_headroom_low")
        .map(|m| m.payload["details"].clone())
        .expect("seen");
    assert_eq!(details["threshold_s"], 3_600, "{details}");
    let headroom = details["headroom_s"].as_u64().expect("headroom_s");
    assert!(headroom < 600, "{details}");
    let rate = details["records_per_s"].as_u64().expect("records_per_s");
    assert!((500..=4_000).contains(&rate), "{details}");
    assert!(
        details["message"]
            .as_str()
            .is_some_and(|m| m.contains("buffer.max_size")),
        "{details}"
    );

    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).expect("status json");
    assert!(
        st["buffer"]["headroom_s"].as_u64().is_some_and(|h| h < 600),
        "{st}"
    );
    // Once per low episode: after some 25 s more of intake (two or three
    // more checks) has reached the consumer, still the one warning.
    let total = st["connections"][0]["records_total"].as_u64().unwrap_or(0);
    let later = total + (TAGS as u64) * 10 * 25;
    seen.until("25 s more of tag records", |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(later)
    })
    .await;
    let warnings = seen
        .messages
        .iter()
        .filter(|m| m.payload["details"]["error"] == "buffer_headroom_low")
        .count();
    assert_eq!(warnings, 1);
    agent.stop().await;
}
