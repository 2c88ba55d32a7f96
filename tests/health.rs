//! The health endpoint of a running agent, read with a real HTTP client:
//! /healthz, /readyz flipping with the broker, /status fields, /metrics.

mod common;

use std::time::Duration;

use common::*;
use plantgate::sim::proxy::CutProxy;
use serde_json::Value;

async fn wait_http(addr: std::net::SocketAddr, path: &str, want: u16) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (code, body) = http_get(addr, path).await;
        if code == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} stayed {code}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/status` once `ok` holds for it.
async fn wait_status(addr: std::net::SocketAddr, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, body) = http_get(addr, "/status").await;
        let st: Value = serde_json::from_str(&body).expect("status json");
        if ok(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/status never got there: {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_endpoint_tracks_the_broker() {
    let plant = start_plant().await;
    let proxy = CutProxy::start(plant.broker.v5_addr).await.expect("proxy");
    let toml = agent_toml(
        &plant.dir.path().join("agent"),
        proxy.addr(),
        &plant.broker.pki.ca_file,
        "v5",
        &plant.sim.endpoint(),
        plant.sim.namespace_uri(),
        &[("FLOW", "FIC-101/PV.CV")],
    )
    .replace(
        "[mqtt]\n",
        "[mqtt]\nusername = \"gw\"\npassword = \"hunter2-secret\"\n",
    );
    let mut seen = watch(plant.broker.v4_addr, &plant.broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    let addr = agent.health_addr();
    assert!(addr.ip().is_loopback());

    wait_http(addr, "/readyz", 200).await;
    let (code, _) = http_get(addr, "/healthz").await;
    assert_eq!(code, 200);
    plant.sim.set_value("FIC-101/PV.CV", 12.5);
    seen.until("value", |s| {
        s.tag_values("FLOW")
            .iter()
            .any(|v| v.as_f64() == Some(12.5))
    })
    .await;

    let (code, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200);
    assert!(!body.contains("hunter2"), "secret in /status");
    let st: Value = serde_json::from_str(&body).expect("json");
    eprintln!("sample /status: {body}");
    seen.until("a heartbeat", |s| s.last_on("/heartbeat").is_some())
        .await;
    eprintln!(
        "sample heartbeat: {}",
        seen.last_on("/heartbeat").cloned().unwrap_or_default()
    );
    assert_eq!(st["agent"], "test-gw");
    assert_eq!(st["version"], plantgate::VERSION);
    assert!(st["uptime_s"].is_u64());
    assert_eq!(st["mqtt"]["state"], "connected");
    assert_eq!(
        st["mqtt"]["sparkplug"],
        serde_json::Value::Null,
        "JSON format"
    );
    assert_eq!(st["config"]["generation"], 1, "{body}");
    assert_eq!(st["config"]["last_reload"], serde_json::Value::Null);
    for k in [
        "records",
        "bytes",
        "oldest_ts",
        "evicted_total",
        "dead_letters",
    ] {
        assert!(st["buffer"].get(k).is_some(), "buffer.{k}: {body}");
    }
    // Once records came in for a few seconds: how long the free buffer
    // lasts at that rate, and what a record takes.
    let st = wait_status(addr, |st| st["buffer"]["headroom_s"].is_u64()).await;
    // What a record takes in its segment: more than nothing, less than its
    // text (a tag record's JSON is over a hundred bytes).
    let per_record = st["buffer"]["bytes_per_record"].as_f64().unwrap_or(0.0);
    assert!(per_record > 0.0 && per_record < 400.0, "{st}");
    assert!(st["intake"]["records_per_s"].is_u64(), "{st}");
    // A handful of records a second against 1 GiB: far more than a day.
    assert!(
        st["buffer"]["headroom_s"].as_u64().unwrap_or(0) > 86_400,
        "{st}"
    );
    let (_, metrics) = http_get(addr, "/metrics").await;
    for name in [
        "plantgate_buffer_headroom_seconds ",
        "plantgate_buffer_bytes_per_record ",
        "plantgate_intake_records_per_second ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name}in:\n{metrics}"
        );
    }
    let c = &st["connections"][0];
    assert_eq!(c["id"], "sim1");
    assert_eq!(c["kind"], "generic");
    assert_eq!(c["state"], "online");
    assert!(c["records_total"].as_u64().unwrap_or(0) >= 1);
    assert!(c["last_value_ts"].as_str().is_some(), "{c}");
    for k in ["since", "reason"] {
        assert!(c.get(k).is_some());
    }

    // Broker gone: not ready, with a reason; still alive.
    proxy.cut();
    let body = wait_http(addr, "/readyz", 503).await;
    let why: Value = serde_json::from_str(&body).expect("json reason");
    assert!(
        why["reason"].as_str().is_some_and(|r| r.contains("mqtt")),
        "{why}"
    );
    let (code, _) = http_get(addr, "/healthz").await;
    assert_eq!(code, 200);
    proxy.restore();
    wait_http(addr, "/readyz", 200).await;

    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(!metrics.contains("hunter2"));
    for name in [
        "plantgate_mqtt_connected 1",
        "plantgate_buffer_records ",
        "plantgate_published_records_total ",
        "plantgate_connection_state{connection=\"sim1\",state=\"online\"} 1",
        "plantgate_records_accepted_total{connection=\"sim1\",kind=\"tag\"}",
        "plantgate_config_generation 1",
        "plantgate_config_reloads_total{outcome=\"refused\"} 0",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }
    // Parsed as Prometheus would: types, labels and the latency histogram.
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition format");
    let find = |name: &str| scrape.samples.iter().find(|s| s.metric == name);
    assert!(matches!(
        find("plantgate_mqtt_connected").map(|s| &s.value),
        Some(prometheus_parse::Value::Gauge(v)) if *v == 1.0
    ));
    assert!(matches!(
        find("plantgate_published_records_total").map(|s| &s.value),
        Some(prometheus_parse::Value::Counter(v)) if *v >= 1.0
    ));
    match find("plantgate_publish_latency_seconds").map(|s| &s.value) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            assert_eq!(buckets.len(), 12, "{buckets:?}");
            assert!(
                buckets.last().is_some_and(|b| b.count >= 1.0),
                "{buckets:?}"
            );
        }
        other => panic!("no latency histogram: {other:?}"),
    }
    let state = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "plantgate_connection_state"
                && s.labels.get("connection") == Some("sim1")
                && s.labels.get("state") == Some("online")
        })
        .expect("connection state sample");
    assert!(matches!(state.value, prometheus_parse::Value::Gauge(v) if v == 1.0));
    // Every sample line is `name{labels} value` with a numeric value.
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap_or("");
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        assert!(line.starts_with("plantgate_"), "{line}");
    }

    agent.stop().await;
    plant.sim.shutdown().await;
}
