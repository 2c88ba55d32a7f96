//! A connection with more tags than one subscription holds (docs/performance.md: tags
//! are spread over subscriptions of `TAGS_PER_SUBSCRIPTION`, 2 000): every
//! tag of every subscription delivers, in order, with nothing dropped; a
//! server that allows fewer subscriptions still gets every tag monitored,
//! and the agent says so.

mod common;

use common::load::*;
use common::*;
use std::collections::HashSet;

/// Three subscriptions, the last one partly filled.
const TAGS: usize = 4_100;
const HZ: f64 = 1.0;

/// The `system.error` announcing refused subscriptions, if one arrived.
fn limited_notice(s: &Seen) -> Option<serde_json::Value> {
    s.messages
        .iter()
        .find(|m| m.payload["details"]["error"] == "subscriptions_limited")
        .map(|m| m.payload["details"].clone())
}

/// Runs the agent against a simulator of `TAGS` tags until every tag has
/// delivered twice (and, when `announced`, the refusal was announced);
/// checks order, that nothing was dropped, and that `/status` and
/// `/metrics` show `(wanted, created)` subscriptions.
async fn every_tag_twice(
    extras: plantgate::sim::SimExtras,
    announced: bool,
    subscriptions: (u64, u64),
) -> Seen {
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
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
    if announced {
        seen.until("subscriptions_limited announced", |s| {
            limited_notice(s).is_some()
        })
        .await;
    }
    assert_eq!(seen.tracker.gaps, 0, "gaps: {:?}", seen.tracker.gap_details);
    assert_eq!(seen.tracker.duplicates, 0);
    let (_, body) = http_get(agent.health_addr(), "/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).expect("status json");
    assert_eq!(st["connections"][0]["state"], "online", "{st}");
    assert_eq!(
        st["connections"][0]["dropped"],
        serde_json::json!({}),
        "nothing dropped: {st}"
    );
    let (wanted, created) = subscriptions;
    assert_eq!(
        st["connections"][0]["subscriptions"],
        serde_json::json!({"wanted": wanted, "created": created}),
        "{st}"
    );
    let (_, metrics) = http_get(agent.health_addr(), "/metrics").await;
    for line in [
        format!("plantgate_opcua_subscriptions{{connection=\"sim1\"}} {created}"),
        format!("plantgate_opcua_subscriptions_wanted{{connection=\"sim1\"}} {wanted}"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    agent.stop().await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_tag_of_every_subscription_delivers() {
    let seen = every_tag_twice(plantgate::sim::SimExtras::default(), false, (3, 3)).await;
    assert_eq!(limited_notice(&seen), None, "no refusal to announce");
}

/// The server allows one subscription per session where the agent asks for
/// three: the tags share it, and a `system.error` says what was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_allowing_fewer_subscriptions_still_gets_every_tag_and_is_announced() {
    let extras = plantgate::sim::SimExtras {
        max_subscriptions: Some(1),
        ..Default::default()
    };
    let seen = every_tag_twice(extras, true, (3, 1)).await;
    let notice =
        limited_notice(&seen).expect("a system.error announcing the refused subscriptions");
    assert_eq!(notice["wanted"], 3, "{notice}");
    assert_eq!(notice["created"], 1, "{notice}");
}
