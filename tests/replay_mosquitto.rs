//! Replay on request (docs/mqtt.md, replay) through a real mosquitto: a
//! consumer that lost a range asks for it and gets it back exactly, bad
//! requests get their error and change nothing, a range partly let go
//! reports what is missing, live data keeps flowing during a large replay,
//! and delivered records survive an agent restart. Needs the `mosquitto`
//! binary; `.ci/run` installs it and runs these.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::load::{load_toml, start_load_sim};
use common::mosquitto::{start_mosquitto, Mosquitto};
use common::*;
use plantgate::sim::broker::TestPki;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const ROOT: &str = "plantgate/test-site/test-gw";

/// A cloud consumer speaking MQTT 5: sends requests (with a response topic
/// and correlation data when asked) and sees every answer.
struct Consumer {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Value, Option<Vec<u8>>)>,
    /// Every payload as it came off the broker, for the record.
    raw: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Consumer {
    async fn connect(addr: SocketAddr, ca: &Path, topics: &[&str]) -> Consumer {
        let o = common::mosquitto::mqtt5_options("consumer", addr, ca);
        let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let raw = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = raw.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if let Ok(mut kept) = keep.lock() {
                            kept.push(String::from_utf8_lossy(&p.payload).into_owned());
                        }
                        let corr = p
                            .properties
                            .and_then(|pr| pr.correlation_data)
                            .map(|b| b.to_vec());
                        if tx.send((topic, body, corr)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for t in topics {
            client
                .subscribe(*t, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            tokio::time::timeout(PATIENCE, sub_rx.recv())
                .await
                .expect("SUBACK in time");
        }
        Consumer {
            client,
            rx,
            raw,
            task,
        }
    }

    async fn send(&self, body: &[u8], response: Option<(&str, &[u8])>) {
        let topic = format!("{ROOT}/commands/replay");
        match response {
            Some((rt, corr)) => {
                let props = PublishProperties {
                    response_topic: Some(rt.to_string()),
                    correlation_data: Some(corr.to_vec().into()),
                    ..Default::default()
                };
                self.client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_vec(), props)
                    .await
            }
            None => {
                self.client
                    .publish(topic, QoS::AtLeastOnce, false, body.to_vec())
                    .await
            }
        }
        .expect("publish request");
    }

    /// The next answer whose request_id is `id` (Value::Null for none).
    async fn result(&mut self, id: Value) -> (String, Value, Option<Vec<u8>>) {
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            let got = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no replay result for {id}"))
                .expect("consumer open");
            if got.1.get("replayed").is_some() && got.1["request_id"] == id {
                return got;
            }
        }
    }
}

fn request(id: &str, connection: Value, kind: &str, epoch: &str, from: u64, to: u64) -> Vec<u8> {
    json!({"request_id": id, "connection": connection, "kind": kind, "epoch": epoch,
           "from_seq": from, "to_seq": to})
    .to_string()
    .into_bytes()
}

/// Live and replayed tag records of `sim1`, by seq (the record objects as
/// published: seq, ts, data).
#[derive(Default)]
struct Records {
    live: BTreeMap<u64, Value>,
    replayed: BTreeMap<u64, Vec<Value>>,
    replay_envelopes: Vec<Value>,
    epoch: String,
}

impl Records {
    fn take(&mut self, seen: &Seen) {
        for m in &seen.messages {
            if !m.topic.ends_with("/data/sim1/tag") {
                continue;
            }
            self.epoch = m.payload["epoch"].as_str().unwrap_or("").to_string();
            let replay = m.payload["replay"] == true;
            for r in m.payload["records"].as_array().into_iter().flatten() {
                let seq = r["seq"].as_u64().expect("seq");
                if replay {
                    self.replayed.entry(seq).or_default().push(r.clone());
                } else {
                    self.live.entry(seq).or_insert_with(|| r.clone());
                }
            }
            if replay {
                let mut envelope = m.payload.clone();
                envelope["records"] = Value::Null;
                self.replay_envelopes.push(envelope);
            }
        }
    }
}

struct Setup {
    _plant_dir: tempfile::TempDir,
    sim: plantgate::sim::SimServer,
    pki: TestPki,
    mosq: Mosquitto,
    data_dir: std::path::PathBuf,
    toml: String,
}

impl Setup {
    /// A consumer listening on the default result topic (and `more`).
    async fn consumer(&self, more: &[&str]) -> Consumer {
        let results = format!("{ROOT}/commands/replay/result");
        let mut topics = vec![results.as_str()];
        topics.extend_from_slice(more);
        Consumer::connect(self.mosq.tls, &self.pki.ca_file, &topics).await
    }

    async fn watch(&self) -> Seen {
        watch(self.mosq.tls, &self.pki.ca_file).await
    }
}

/// Waits until the watcher has live tag records of `sim1` up to `seq`.
async fn live_until(seen: &mut Seen, seq: u64) {
    seen.until(&format!("live tag seq {seq}"), |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(seq)
    })
    .await;
}

async fn setup(protocol: &str, tags: usize, hz: f64, extra: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), tags, hz).await;
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, Default::default());
    let data_dir = dir.path().join("agent");
    let mut toml = load_toml(&data_dir, mosq.tls, &pki.ca_file, protocol, &sim, tags);
    toml = toml.replace("[[connections]]", &format!("{extra}\n[[connections]]"));
    Setup {
        _plant_dir: dir,
        sim,
        pki,
        mosq,
        data_dir,
        toml,
    }
}

async fn a_lost_range_comes_back_exactly(protocol: &str) {
    let s = setup(protocol, 20, 10.0, "").await;
    let mut seen = s.watch().await;
    let answers = "consumer/answers";
    let mut consumer = s.consumer(&[answers]).await;
    let agent = run_agent(&s.toml).await;
    live_until(&mut seen, 600).await;
    let mut records = Records::default();
    records.take(&seen);

    // The consumer "lost" 100..=400 and asks for it.
    let body = request("lost-1", json!("sim1"), "tag", &records.epoch, 100, 400);
    consumer.send(&body, Some((answers, b"corr-1"))).await;
    let (topic, result, corr) = consumer.result(json!("lost-1")).await;
    assert_eq!(result["error"], Value::Null, "{result}");
    assert_eq!(result["replayed"], 301, "{result}");
    assert_eq!(result["missing"], json!([]), "{result}");
    if protocol == "v5" {
        assert_eq!(topic, answers, "the request's response topic is honoured");
        assert_eq!(
            corr.as_deref(),
            Some(&b"corr-1"[..]),
            "correlation data back"
        );
    } else {
        assert_eq!(topic, format!("{ROOT}/commands/replay/result"));
    }
    println!("request: {}", String::from_utf8_lossy(&body));
    let raw = consumer
        .raw
        .lock()
        .map(|r| r.join("\n"))
        .unwrap_or_default();
    println!("result on {topic}: {raw}");

    seen.until("the replayed range", |s| s.tracker.replayed >= 301)
        .await;
    let mut records = Records::default();
    records.take(&seen);
    let got: BTreeSet<u64> = records.replayed.keys().copied().collect();
    assert_eq!(got, (100..=400).collect::<BTreeSet<u64>>());
    for (seq, copies) in &records.replayed {
        assert_eq!(copies.len(), 1, "seq {seq} replayed once");
        assert_eq!(
            &copies[0], &records.live[seq],
            "seq {seq} as first delivered"
        );
    }
    for e in &records.replay_envelopes {
        assert_eq!(
            (&e["agent"], &e["connection"], &e["kind"], &e["epoch"]),
            (
                &json!("test-gw"),
                &json!("sim1"),
                &json!("tag"),
                &json!(records.epoch)
            )
        );
    }
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    assert_eq!(
        seen.tracker.duplicates, 0,
        "replays are not live duplicates"
    );

    let (code, metrics) = http_get(agent.health_addr(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("plantgate_replay_requests_total{outcome=\"done\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("plantgate_replay_records_total 301"));
    agent.stop().await;
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn a_lost_range_comes_back_exactly_mqtt5() {
    a_lost_range_comes_back_exactly("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn a_lost_range_comes_back_exactly_mqtt311() {
    a_lost_range_comes_back_exactly("v311").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn every_bad_request_gets_its_error_and_changes_nothing() {
    let s = setup("v5", 5, 10.0, "").await;
    let toml = s
        .toml
        .replace("[mqtt]\n", "[mqtt]\nreplay_max_records = 1000\n");
    let mut seen = s.watch().await;
    let mut consumer = s.consumer(&[]).await;
    let agent = run_agent(&toml).await;
    live_until(&mut seen, 50).await;
    let mut records = Records::default();
    records.take(&seen);
    let epoch = records.epoch.clone();

    consumer.send(b"{not json", None).await;
    let (_, r, _) = consumer.result(Value::Null).await;
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("JSON")),
        "{r}"
    );

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown-connection",
            request("unknown-connection", json!("nope"), "tag", &epoch, 1, 10),
            "connection",
        ),
        (
            "unknown-kind",
            request("unknown-kind", json!("sim1"), "pressure", &epoch, 1, 10),
            "kind",
        ),
        (
            "another-epoch",
            request("another-epoch", json!("sim1"), "tag", "0123abcd", 1, 10),
            "epoch",
        ),
        (
            "inverted",
            request("inverted", json!("sim1"), "tag", &epoch, 10, 1),
            "to_seq",
        ),
        (
            "too-large",
            request("too-large", json!("sim1"), "tag", &epoch, 1, 1001),
            "replay_max_records",
        ),
    ];
    for (id, body, names) in &cases {
        consumer.send(body, None).await;
        let (_, r, _) = consumer.result(json!(id)).await;
        let error = r["error"].as_str().unwrap_or_else(|| panic!("{id}: {r}"));
        assert!(error.contains(names), "{id}: {error}");
        assert_eq!(
            (r["replayed"].as_u64(), &r["missing"]),
            (Some(0), &json!([]))
        );
    }
    // A good request after all that still works: nothing is stuck.
    let good = request("good", json!("sim1"), "tag", &epoch, 1, 10);
    consumer.send(&good, None).await;
    let (_, r, _) = consumer.result(json!("good")).await;
    assert_eq!(
        (r["error"].clone(), r["replayed"].as_u64()),
        (Value::Null, Some(10))
    );
    seen.until("the good replay", |s| s.tracker.replayed >= 10)
        .await;
    assert_eq!(seen.tracker.replayed, 10, "only the good request replayed");
    // Events come back too, one per message on their own topic, flagged.
    let events = request("events", json!("sim1"), "event", &epoch, 1, 1);
    consumer.send(&events, None).await;
    let (_, r, _) = consumer.result(json!("events")).await;
    assert_eq!(
        (r["error"].clone(), r["replayed"].as_u64()),
        (Value::Null, Some(1)),
        "{r}"
    );
    seen.until("the replayed event", |s| {
        s.messages.iter().any(|m| {
            m.topic.contains("/events/") && m.payload["replay"] == true && m.payload["seq"] == 1
        })
    })
    .await;
    let (_, metrics) = http_get(agent.health_addr(), "/metrics").await;
    assert!(
        metrics.contains("plantgate_replay_requests_total{outcome=\"refused\"} 6"),
        "{metrics}"
    );
    agent.stop().await;
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn a_range_partly_let_go_reports_what_is_missing() {
    // A small buffer: the kept history gives way to new records.
    let s = setup("v5", 200, 20.0, "[buffer]\nmax_size = \"1MiB\"\n").await;
    let mut consumer = s.consumer(&[]).await;
    let agent = run_agent(&s.toml).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = agent.buffer.stats().await.expect("stats");
        if st.retained_released_total > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing let go: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The plant goes quiet; what is kept stays as it is.
    s.sim.shutdown().await;
    wait_drained(&agent.buffer, "sim1").await;
    let st = agent.buffer.stats().await.expect("stats");
    assert_eq!(st.evicted_total, 0, "nothing undelivered was lost");
    let tag = st
        .streams
        .iter()
        .find(|x| x.connection == "sim1" && x.kind == plantgate::record::Kind::Tag)
        .expect("tag stream");
    let first_kept = tag.retained_first_seq.expect("kept history");
    let last = tag.next_seq - 1;
    assert!(first_kept > 1);

    let epoch = agent.buffer.epoch();
    let body = request("partly", json!("sim1"), "tag", &epoch, 1, last);
    consumer.send(&body, None).await;
    let (_, r, _) = consumer.result(json!("partly")).await;
    assert_eq!(r["error"], Value::Null, "{r}");
    assert_eq!(r["missing"], json!([[1, first_kept - 1]]), "{r}");
    assert_eq!(r["replayed"].as_u64(), Some(last - first_kept + 1), "{r}");
    println!("result: {r}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn kept_records_survive_an_agent_restart() {
    let s = setup("v5", 10, 10.0, "").await;
    let mut seen = s.watch().await;
    let mut consumer = s.consumer(&[]).await;
    let agent = run_agent(&s.toml).await;
    live_until(&mut seen, 200).await;
    agent.stop().await;
    let mut records = Records::default();
    records.take(&seen);
    let delivered = *records.live.keys().last().expect("records");

    let agent = run_agent(&s.toml).await;
    wait_listening_for_commands(&agent.board).await;
    let body = request(
        "after-restart",
        json!("sim1"),
        "tag",
        &records.epoch,
        1,
        delivered,
    );
    consumer.send(&body, None).await;
    let (_, r, _) = consumer.result(json!("after-restart")).await;
    assert_eq!(
        (
            r["error"].clone(),
            r["replayed"].as_u64(),
            r["missing"].clone()
        ),
        (Value::Null, Some(delivered), json!([])),
        "{r}"
    );
    seen.until("the replay", |s| s.tracker.replayed >= delivered)
        .await;
    let mut after = Records::default();
    after.take(&seen);
    for seq in 1..=delivered {
        assert_eq!(
            after.replayed.get(&seq).map(|c| &c[0]),
            records.live.get(&seq)
        );
    }
    agent.stop().await;
    s.sim.shutdown().await;
}

/// Live data keeps flowing at 5 000 values/s while 100 000 records are
/// replayed: no live gap, bounded latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn live_data_keeps_flowing_during_a_large_replay() {
    let s = setup("v5", 500, 10.0, "").await;
    // A lean subscriber: only seqs and timestamps are kept.
    let mut watcher = plantgate::demo::Watcher::connect(
        s.mosq.tls,
        &s.pki.ca_file,
        &format!("{ROOT}/data/sim1/tag"),
    )
    .await
    .expect("watcher");
    let mut consumer = s.consumer(&[]).await;
    let agent = run_agent(&s.toml).await;
    let epoch = agent.buffer.epoch();
    let mut live_last = 0u64;
    let mut gaps = 0u64;
    let mut replayed = BTreeSet::new();
    // Latency of live records (arrival - source ts) seen while replaying.
    let mut worst_during = 0i64;
    let mut replaying = false;
    let mut result: Option<Value> = None;
    let deadline = tokio::time::Instant::now() + PATIENCE * 4;
    while result.is_none() || replayed.len() < 100_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {} replayed, result {result:?}",
            replayed.len()
        );
        tokio::select! {
            got = watcher.rx.recv() => {
                let (_, body) = got.expect("watcher open");
                let p: Value = serde_json::from_slice(&body).expect("json");
                let recs = p["records"].as_array().cloned().unwrap_or_default();
                if p["replay"] == true {
                    replayed.extend(recs.iter().filter_map(|r| r["seq"].as_u64()));
                    continue;
                }
                let now = plantgate::record::now_ms();
                for r in recs {
                    let seq = r["seq"].as_u64().expect("seq");
                    if live_last > 0 && seq > live_last + 1 {
                        gaps += 1;
                    }
                    live_last = live_last.max(seq);
                    if replaying {
                        let ts = chrono::DateTime::parse_from_rfc3339(r["ts"].as_str().expect("ts"))
                            .expect("rfc3339")
                            .timestamp_millis();
                        worst_during = worst_during.max(now - ts);
                    }
                }
                if !replaying && live_last >= 110_000 {
                    replaying = true;
                    let body = request("big", json!("sim1"), "tag", &epoch, 5_001, 105_000);
                    consumer.send(&body, None).await;
                }
            }
            got = consumer.rx.recv() => {
                let (_, r, _) = got.expect("consumer open");
                if r["request_id"] == "big" {
                    result = Some(r);
                }
            }
        }
    }
    let r = result.expect("result");
    assert_eq!(
        (
            r["error"].clone(),
            r["replayed"].as_u64(),
            r["missing"].clone()
        ),
        (Value::Null, Some(100_000), json!([])),
        "{r}"
    );
    assert_eq!(replayed, (5_001..=105_000).collect::<BTreeSet<u64>>());
    assert_eq!(gaps, 0, "live data has no gap during the replay");
    println!("worst live latency during the replay: {worst_during} ms");
    assert!(
        worst_during < 5_000,
        "live latency during the replay: {worst_during} ms"
    );
    agent.stop().await;
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto"]
async fn the_replay_command_asks_the_running_agent() {
    let s = setup("v5", 5, 10.0, "").await;
    let mut seen = s.watch().await;
    let config = write_file(s.data_dir.parent().expect("dir"), "agent.toml", &s.toml);
    let agent = run_agent(&s.toml).await;
    live_until(&mut seen, 30).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["replay", "-c"])
        .arg(&config)
        .args([
            "--connection",
            "sim1",
            "--kind",
            "tag",
            "--from",
            "5",
            "--to",
            "24",
        ])
        .output()
        .await
        .expect("plantgate replay runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).expect("one JSON result");
    assert_eq!(
        (r["replayed"].as_u64(), r["error"].clone()),
        (Some(20), Value::Null)
    );
    seen.until("the replay", |s| s.tracker.replayed >= 20).await;
    agent.stop().await;
    s.sim.shutdown().await;
}
