//! Backfill (docs/backfill.md) with real parts: our DeltaV simulator keeps a
//! history of every value it produces and answers HistoryRead; the agent
//! runs as the real binary (SIGKILLed) or in this process (a session cut by
//! a TCP proxy in front of the server); records travel through the embedded
//! broker to a subscriber. Every test compares what the consumer got with
//! the simulator's own history: each value exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::load::{load_toml, start_load_sim, start_load_sim_with};
use common::*;
use plantgate::sim::history::HistoryQuirks;
use plantgate::sim::proxy::CutProxy;
use plantgate::sim::SimServer;
use serde_json::Value;

/// 50 tags at 20 Hz: 1 000 values/s.
const TAGS: usize = 50;
const HZ: f64 = 20.0;

fn ts_ms(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().expect("ts string"))
        .expect("RFC 3339")
        .timestamp_millis()
}

/// One tag record as the consumer got it.
#[derive(Clone, Debug)]
struct Got {
    name: String,
    ts: i64,
    backfill: bool,
}

/// The `sim1` tag records seen, by seq: a record delivered twice (same
/// seq, at-least-once) counts once; a value emitted twice has two seqs.
fn tag_records(seen: &Seen) -> BTreeMap<u64, Got> {
    let mut out = BTreeMap::new();
    for m in &seen.messages {
        if !m.topic.contains("/data/sim1/tag") {
            continue;
        }
        for r in m.payload["records"].as_array().into_iter().flatten() {
            let seq = r["seq"].as_u64().expect("seq");
            out.insert(
                seq,
                Got {
                    name: r["data"]["name"].as_str().unwrap_or_default().to_string(),
                    ts: ts_ms(&r["ts"]),
                    backfill: r["data"]["backfill"] == true,
                },
            );
        }
    }
    out
}

fn events(seen: &Seen, kind: &str) -> Vec<Value> {
    seen.messages
        .iter()
        .filter(|m| m.topic.ends_with(&format!("/events/{kind}")))
        .map(|m| m.payload["details"].clone())
        .collect()
}

/// How what the consumer got compares with the simulator's history.
#[derive(Debug, Default)]
struct Tally {
    /// Values of the server from each tag's first record on (to its last).
    produced: usize,
    /// Values emitted twice (same tag, same source timestamp, other seq).
    duplicates: usize,
    /// Values of the server never emitted.
    missing: usize,
    /// Records the server never produced.
    foreign: usize,
    backfilled: usize,
    /// Server values in (from, to), per the caller's window.
    in_window: usize,
    missing_examples: Vec<(String, i64)>,
    foreign_examples: Vec<(String, i64, bool)>,
}

/// Compares per tag: the server's values between the first and the last
/// record the consumer got of it, against those records. `skip` names tags
/// whose gap is known not to be read (no history). `window` counts the
/// server's values in it (a gap).
fn tally(seen: &Seen, sim: &SimServer, tags: usize, skip: &[&str], window: (i64, i64)) -> Tally {
    let mut by_tag: HashMap<String, Vec<&Got>> = HashMap::new();
    let records = tag_records(seen);
    for g in records.values() {
        by_tag.entry(g.name.clone()).or_default().push(g);
    }
    let mut t = Tally::default();
    for i in 0..tags {
        let name = format!("L{i:05}");
        let got = by_tag.get(&name).cloned().unwrap_or_default();
        t.backfilled += got.iter().filter(|g| g.backfill).count();
        let mut stamps: Vec<i64> = got.iter().map(|g| g.ts).collect();
        stamps.sort_unstable();
        let unique: BTreeSet<i64> = stamps.iter().copied().collect();
        t.duplicates += stamps.len() - unique.len();
        let (Some(&first), Some(&last)) = (unique.first(), unique.last()) else {
            continue;
        };
        let server: BTreeSet<i64> = sim
            .namespace()
            .history_ts(&plantgate::sim::deltav::load_tag(i))
            .into_iter()
            .filter(|ts| (first..=last).contains(ts))
            .collect();
        t.in_window += server
            .iter()
            .filter(|ts| **ts > window.0 && **ts < window.1)
            .count();
        t.produced += server.len();
        if skip.contains(&name.as_str()) {
            continue;
        }
        for ts in unique.difference(&server) {
            t.foreign += 1;
            if t.foreign_examples.len() < 5 {
                let b = got.iter().any(|g| g.ts == *ts && g.backfill);
                t.foreign_examples.push((name.clone(), *ts, b));
            }
        }
        for ts in server.difference(&unique) {
            t.missing += 1;
            if t.missing_examples.len() < 5 {
                t.missing_examples.push((name.clone(), *ts));
            }
        }
    }
    t
}

/// Backfill on, and every change sampled (the load tags change every
/// 50 ms; the tests compare every value with the server's history).
fn with_backfill(toml: String, extra: &str) -> String {
    toml.replacen(
        "sampling_interval = \"100ms\"",
        "sampling_interval = \"0s\"",
        1,
    )
    .replacen(
        "id = \"sim1\"\n",
        &format!("id = \"sim1\"\nbackfill = \"history\"\n{extra}"),
        1,
    )
}

/// Waits until every tag has a live (not backfilled) record with a source
/// timestamp after `after_ms`: the consumer is past the gap everywhere.
async fn live_past(seen: &mut Seen, tags: usize, after_ms: i64) {
    seen.until("live values past the gap on every tag", |s| {
        let mut past = BTreeSet::new();
        for g in tag_records(s).values() {
            if !g.backfill && g.ts > after_ms {
                past.insert(g.name.clone());
            }
        }
        past.len() >= tags
    })
    .await;
}

fn now_ms() -> i64 {
    plantgate::record::now_ms()
}

/// The subject of the test is an outage of this length: the agent is away
/// (killed, or cut off) while the plant goes on.
async fn outage(d: Duration) {
    tokio::time::sleep(d).await;
}

/// The load simulator, the broker, a backfill config for the real binary
/// and a consumer.
struct Plant {
    _broker: plantgate::sim::broker::EmbeddedBroker,
    _dir: tempfile::TempDir,
    sim: SimServer,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    seen: Seen,
}

impl Plant {
    async fn start() -> Plant {
        let broker = embedded_broker().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = start_load_sim(dir.path(), TAGS, HZ).await;
        let toml = load_toml(
            &dir.path().join("agent"),
            broker.v4_addr,
            &broker.pki.ca_file,
            "v311",
            &sim,
            TAGS,
        );
        let config = write_file(dir.path(), "plantgate.toml", &with_backfill(toml, ""));
        let log = dir.path().join("agent.log");
        let seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
        Plant {
            _broker: broker,
            log,
            _dir: dir,
            sim,
            config,
            seen,
        }
    }
}

/// Issue 19's measurement: the real agent SIGKILLed for 10 s while the
/// simulator produces 1 000 values/s, then restarted: every value the
/// server produced arrives exactly once, the gap's values marked
/// `backfill`, with one `backfill.completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_for_10_s_under_load_gets_every_value_once() {
    let Plant {
        _broker,
        _dir,
        sim,
        config,
        log,
        mut seen,
    } = Plant::start().await;

    let mut agent = AgentProcess::start(&config, &log);
    seen.until("3 000 tag records", |s| tag_records(s).len() >= 3_000)
        .await;
    let status = agent.signal("KILL");
    assert!(!status.success(), "SIGKILL: {status}");
    let killed_ms = now_ms();
    outage(Duration::from_secs(10)).await;
    let restarted_ms = now_ms();
    let restarted = Instant::now();
    let _agent = AgentProcess::start(&config, &log);
    seen.until("backfill.completed", |s| {
        !events(s, "backfill.completed").is_empty()
    })
    .await;
    let to_complete = restarted.elapsed();
    live_past(&mut seen, TAGS, now_ms()).await;

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let t = tally(&seen, &sim, TAGS, &[], (killed_ms, restarted_ms));
    let done = events(&seen, "backfill.completed");
    eprintln!(
        "10 s agent outage at {} values/s: {} values produced in the outage, {} backfilled, \
         {} duplicates, {} missing, restart -> backfill complete {} ms (event: {})",
        TAGS as f64 * HZ,
        t.in_window,
        t.backfilled,
        t.duplicates,
        t.missing,
        to_complete.as_millis(),
        done[0]
    );
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(t.missing, 0, "{t:?}\nagent log:\n{log_text}");
    assert_eq!(t.foreign, 0, "{t:?}");
    // What was produced while the agent was away came back, marked so (the
    // values between its last commit and the kill came back too).
    assert!(t.backfilled >= t.in_window, "{t:?}");
    assert!(t.in_window >= 5_000, "the simulator kept producing: {t:?}");
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0]["records"].as_u64(), Some(t.backfilled as u64));
    assert_eq!(done[0]["tags_without_history"], serde_json::json!([]));
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
}

/// A restart in the middle of a backfill: the agent is killed again while
/// it reads a gap back from a slow historian; after the second restart it
/// goes on from where its committed marks say, and reads the new gap too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_in_the_middle_of_a_backfill_neither_repeats_nor_loses() {
    let Plant {
        _broker,
        _dir,
        sim,
        config,
        log,
        mut seen,
    } = Plant::start().await;

    let mut agent = AgentProcess::start(&config, &log);
    seen.until("1 000 tag records", |s| tag_records(s).len() >= 1_000)
        .await;
    agent.signal("KILL");
    outage(Duration::from_secs(4)).await;
    // Each HistoryRead now takes a second: the 50 tags' gaps take three
    // rounds (20 nodes each), seconds in all.
    sim.namespace().set_history_quirks(HistoryQuirks {
        delay: Duration::from_secs(1),
        ..Default::default()
    });
    let mut agent = AgentProcess::start(&config, &log);
    seen.until("the first values read back", |s| {
        tag_records(s).values().any(|g| g.backfill)
    })
    .await;
    assert!(
        events(&seen, "backfill.completed").is_empty(),
        "the kill must come mid-backfill"
    );
    let first_part = tag_records(&seen).values().filter(|g| g.backfill).count();
    agent.signal("KILL");
    outage(Duration::from_secs(2)).await;
    sim.namespace().set_history_quirks(HistoryQuirks::default());
    let _agent = AgentProcess::start(&config, &log);
    seen.until("backfill.completed", |s| {
        !events(s, "backfill.completed").is_empty()
    })
    .await;
    live_past(&mut seen, TAGS, now_ms()).await;

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let t = tally(&seen, &sim, TAGS, &[], (0, 0));
    eprintln!(
        "restart mid-backfill: {first_part} values read back before the second kill, {} in all, \
         {} duplicates, {} missing",
        t.backfilled, t.duplicates, t.missing
    );
    assert!(first_part > 0 && t.backfilled > first_part, "{t:?}");
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(t.missing, 0, "{t:?}\nagent log:\n{log_text}");
    assert_eq!(t.foreign, 0, "{t:?}");
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
}

/// An agent in this process whose OPC UA session runs through a proxy
/// that the test cuts (connections reset, new ones refused).
struct CutSession {
    broker: plantgate::sim::broker::EmbeddedBroker,
    sim: SimServer,
    proxy: CutProxy,
    dir: tempfile::TempDir,
    seen: Seen,
    agent: Running,
}

impl CutSession {
    async fn start(tags: usize, hz: f64, extra: &str) -> CutSession {
        let broker = embedded_broker().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = start_load_sim_with(dir.path(), tags, hz, Default::default()).await;
        let upstream = sim
            .endpoint()
            .trim_start_matches("opc.tcp://")
            .trim_end_matches('/')
            .parse()
            .expect("simulator address");
        let proxy = CutProxy::start(upstream).await.expect("proxy");
        let toml = with_backfill(
            load_toml(
                &dir.path().join("agent"),
                broker.v4_addr,
                &broker.pki.ca_file,
                "v311",
                &sim,
                tags,
            ),
            extra,
        )
        .replace(&sim.endpoint(), &format!("opc.tcp://{}/", proxy.addr()));
        let seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
        let agent = run_agent(&toml).await;
        CutSession {
            broker,
            sim,
            proxy,
            dir,
            seen,
            agent,
        }
    }

    /// Cuts the session for `d`; returns (cut, restored) times.
    async fn cut_for(&mut self, d: Duration) -> (i64, i64) {
        self.proxy.cut();
        let cut = now_ms();
        let board = self.agent.board.clone();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while board.connections()[0].1.state == plantgate::status::ConnState::Online {
            assert!(tokio::time::Instant::now() < deadline, "never offline");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        outage(d).await;
        self.proxy.restore();
        (cut, now_ms())
    }

    async fn status(&self) -> Value {
        let (code, body) = http_get(self.agent.health_addr(), "/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    async fn metrics(&self) -> String {
        http_get(self.agent.health_addr(), "/metrics").await.1
    }
}

/// A session lost to a server-side cut is read back the same way, and a
/// tag whose node keeps no history is reported while the others are read
/// back: in the event, `/status` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_session_is_read_back_and_a_node_without_history_is_reported() {
    let mut c = CutSession::start(10, 20.0, "").await;
    let no_history = plantgate::sim::deltav::load_tag(3);
    c.sim.namespace().set_historized(&no_history, false);
    c.seen
        .until("500 tag records", |s| tag_records(s).len() >= 500)
        .await;
    let (cut, restored) = c.cut_for(Duration::from_secs(4)).await;
    c.seen
        .until("backfill.completed", |s| {
            !events(s, "backfill.completed").is_empty()
        })
        .await;
    live_past(&mut c.seen, 10, now_ms()).await;

    let t = tally(&c.seen, &c.sim, 10, &["L00003"], (cut, restored));
    eprintln!("session cut {} ms: {t:?}", restored - cut);
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(t.missing, 0, "{t:?}");
    assert_eq!(t.foreign, 0, "{t:?}");
    assert!(t.backfilled > 0, "{t:?}");
    let done = events(&c.seen, "backfill.completed");
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        done[0]["tags_without_history"],
        serde_json::json!(["L00003"])
    );
    assert_eq!(done[0]["records"].as_u64(), Some(t.backfilled as u64));
    let status = c.status().await;
    let b = &status["connections"][0]["backfill"];
    assert_eq!(b["runs_total"], 1, "{b}");
    assert_eq!(
        b["records_total"].as_u64(),
        Some(t.backfilled as u64),
        "{b}"
    );
    assert_eq!(b["tags_without_history_total"], 1, "{b}");
    assert_eq!(b["running"], false, "{b}");
    assert_eq!(b["gaps_pending"], 0, "{b}");
    let metrics = c.metrics().await;
    assert!(
        metrics.contains(&format!(
            "plantgate_backfill_records_total{{connection=\"sim1\"}} {}",
            t.backfilled
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("plantgate_backfill_tags_without_history_total{connection=\"sim1\"} 1"),
        "{metrics}"
    );
    assert_eq!(c.seen.tracker.gaps, 0, "{:?}", c.seen.tracker.gap_details);
    c.agent.stop().await;
    drop(c.broker);
    drop(c.dir);
}

/// `backfill_max` bounds how far back a gap is read: a 6 s cut with
/// `backfill_max = "2s"` reads the last 2 s of each tag's gap and reports
/// the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_max_bounds_the_gap_and_reports_the_rest() {
    let mut c = CutSession::start(5, 20.0, "backfill_max = \"2s\"\n").await;
    c.seen
        .until("200 tag records", |s| tag_records(s).len() >= 200)
        .await;
    let (cut, restored) = c.cut_for(Duration::from_secs(6)).await;
    c.seen
        .until("backfill.completed", |s| {
            !events(s, "backfill.completed").is_empty()
        })
        .await;
    live_past(&mut c.seen, 5, now_ms()).await;

    let records = tag_records(&c.seen);
    // Per tag: its first live value after the cut, and what was read back.
    let mut first_live: HashMap<String, i64> = HashMap::new();
    for g in records
        .values()
        .filter(|g| !g.backfill && g.ts > restored - 500)
    {
        let e = first_live.entry(g.name.clone()).or_insert(g.ts);
        *e = (*e).min(g.ts);
    }
    let back: Vec<&Got> = records.values().filter(|g| g.backfill).collect();
    assert!(!back.is_empty());
    for g in &back {
        let end = first_live[&g.name];
        assert!(
            g.ts > end - 2_000 && g.ts < end,
            "{g:?} is outside the last 2 s before {end}"
        );
    }
    let done = events(&c.seen, "backfill.completed");
    let not_read = done[0]["not_read_ms"].as_u64().expect("not_read_ms");
    // 5 tags, each about (6 s + detection) - 2 s not read.
    assert!(not_read >= 5 * 3_000, "{done:?}");
    let status = c.status().await;
    assert_eq!(
        status["connections"][0]["backfill"]["not_read_ms_total"].as_u64(),
        Some(not_read)
    );
    eprintln!(
        "cut {} ms, backfill_max 2 s: {} values read back, {} ms not read",
        restored - cut,
        back.len(),
        not_read
    );
    c.agent.stop().await;
}

/// A server that ignores the values asked per node and forgets its
/// continuation points: counted, never obeyed, and still every value once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misbehaving_historian_is_counted_not_obeyed() {
    // 50 Hz: a 12 s gap holds more than the 500 values asked per node.
    let mut c = CutSession::start(4, 50.0, "").await;
    c.seen
        .until("400 tag records", |s| tag_records(s).len() >= 400)
        .await;
    c.sim.namespace().set_history_quirks(HistoryQuirks {
        ignore_max: true,
        ..Default::default()
    });
    c.cut_for(Duration::from_secs(12)).await;
    c.seen
        .until("backfill.completed", |s| {
            !events(s, "backfill.completed").is_empty()
        })
        .await;
    c.sim.namespace().set_history_quirks(HistoryQuirks {
        forget_continuation_points: true,
        ..Default::default()
    });
    c.cut_for(Duration::from_secs(12)).await;
    c.seen
        .until("the second backfill.completed", |s| {
            events(s, "backfill.completed").len() >= 2
        })
        .await;
    live_past(&mut c.seen, 4, now_ms()).await;

    let t = tally(&c.seen, &c.sim, 4, &[], (0, 0));
    let status = c.status().await;
    let b = &status["connections"][0]["backfill"];
    eprintln!("misbehaving historian: {t:?}, status {b}");
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(t.missing, 0, "{t:?}");
    assert_eq!(t.foreign, 0, "{t:?}");
    assert!(b["values_skipped_total"].as_u64() > Some(0), "{b}");
    assert!(b["continuation_restarts_total"].as_u64() > Some(0), "{b}");
    assert_eq!(b["runs_total"], 2, "{b}");
    c.agent.stop().await;
}

/// The independent python `asyncua` server with its own history manager
/// (`--historize`: Counter and Temp historized, State not): the agent is
/// SIGKILLed for 10 s and restarted; the counter (+1 every 100 ms) then
/// arrives without a hole and without a repeat, the missed part marked
/// `backfill`, and State is reported as having no history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs python asyncua"]
async fn asyncua_history_fills_a_10_s_agent_outage() {
    let server = common::asyncua::PyServer::start(0, &["--historize"]).await;
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = "urn:plantgate:interop";
    let toml = agent_toml(
        &dir.path().join("agent"),
        broker.v4_addr,
        &broker.pki.ca_file,
        "v311",
        &server.endpoint,
        ns,
        &[
            ("Counter", "Line1/Counter"),
            ("Temp", "Line1/Temp"),
            ("State", "Line1/State"),
        ],
    );
    let config = write_file(dir.path(), "plantgate.toml", &with_backfill(toml, ""));
    let log = dir.path().join("agent.log");
    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let counters = |s: &Seen| -> BTreeMap<u64, (i64, bool)> {
        let mut out = BTreeMap::new();
        for m in s
            .messages
            .iter()
            .filter(|m| m.topic.contains("/data/sim1/tag"))
        {
            for r in m.payload["records"].as_array().into_iter().flatten() {
                if r["data"]["name"] == "Counter" {
                    let v = r["data"]["value"].as_i64().expect("counter value");
                    let seq = r["seq"].as_u64().expect("seq");
                    out.insert(seq, (v, r["data"]["backfill"] == true));
                }
            }
        }
        out
    };

    let mut agent = AgentProcess::start(&config, &log);
    seen.until("20 counter values", |s| counters(s).len() >= 20)
        .await;
    agent.signal("KILL");
    outage(Duration::from_secs(10)).await;
    let restarted = Instant::now();
    let _agent = AgentProcess::start(&config, &log);
    seen.until("backfill.completed", |s| {
        !events(s, "backfill.completed").is_empty()
    })
    .await;
    let to_complete = restarted.elapsed();
    let last_before = counters(&seen).values().map(|(v, _)| *v).max().unwrap_or(0);
    seen.until("live counter values after the backfill", |s| {
        counters(s)
            .values()
            .any(|(v, b)| !b && *v > last_before + 10)
    })
    .await;

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let got = counters(&seen);
    let mut values: Vec<i64> = got.values().map(|(v, _)| *v).collect();
    values.sort_unstable();
    let unique: BTreeSet<i64> = values.iter().copied().collect();
    let (first, last) = (values[0], values[values.len() - 1]);
    let holes: Vec<i64> = (first..=last).filter(|v| !unique.contains(v)).collect();
    let backfilled = got.values().filter(|(_, b)| *b).count();
    let done = events(&seen, "backfill.completed");
    eprintln!(
        "asyncua, 10 s agent outage: counter {first}..={last}, {backfilled} values read back, \
         {} duplicates, {} holes, restart -> complete {} ms; event {}",
        values.len() - unique.len(),
        holes.len(),
        to_complete.as_millis(),
        done[0]
    );
    assert_eq!(values.len(), unique.len(), "a counter value twice");
    assert!(holes.is_empty(), "holes {holes:?}\nagent log:\n{log_text}");
    assert!(backfilled >= 90, "10 s at 10 Hz read back: {backfilled}");
    assert_eq!(
        done[0]["tags_without_history"],
        serde_json::json!(["State"])
    );
    assert_eq!(seen.tracker.gaps, 0, "{:?}", seen.tracker.gap_details);
    server.stop().await;
}
