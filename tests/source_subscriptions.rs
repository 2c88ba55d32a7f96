//! A connection with more tags than one subscription holds (docs/performance.md: tags
//! are spread over subscriptions of `TAGS_PER_SUBSCRIPTION`, 2 000): every
//! tag of every subscription delivers, in order, with nothing dropped.

mod common;

use common::load::*;
use common::*;
use std::collections::HashSet;

/// Three subscriptions, the last one partly filled.
const TAGS: usize = 4_100;
const HZ: f64 = 1.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_tag_of_every_subscription_delivers() {
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), TAGS, HZ).await;
    let data_dir = dir.path().join("agent");
    let toml = load_toml(
        &data_dir,
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim,
        TAGS,
    );
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;

    // Each tag at least twice: its initial value and a change after it.
    seen.until("two values of every tag", |s| {
        let mut once = HashSet::new();
        let mut twice = HashSet::new();
        for m in s
            .messages
            .iter()
            .filter(|m| m.topic.ends_with("/data/sim1/tag"))
        {
            for r in m.payload["records"].as_array().into_iter().flatten() {
                if let Some(name) = r["data"]["name"].as_str() {
                    if !once.insert(name.to_string()) {
                        twice.insert(name.to_string());
                    }
                }
            }
        }
        twice.len() == TAGS
    })
    .await;
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    assert_eq!(seen.tracker.duplicates, 0);
    let (_, body) = http_get(agent.health_addr, "/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).expect("status json");
    assert_eq!(st["connections"][0]["state"], "online", "{st}");
    assert_eq!(
        st["connections"][0]["dropped"],
        serde_json::json!({}),
        "nothing dropped: {st}"
    );
    agent.stop().await;
}
