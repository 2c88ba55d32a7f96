//! Outage benchmark: a real agent process under load loses its
//! broker for a while; prints a table of what was buffered (and evicted),
//! how densely it was stored (bytes per record all-in: the database file
//! with its free pages, and the WAL; the file alone; the segments alone;
//! records per GiB and how long a 1 GiB buffer lasts at this rate, both
//! from the all-in figure), how long the backlog took to drain, duplicates,
//! gaps and the agent's peak memory. The WAL is bounded (at most 64 MiB)
//! whatever the backlog, so it dominates a short outage's all-in figure:
//! outages of ten minutes and more give the figure that matters.
//!
//! `cargo bench --bench outage -- [--rate 5000] [--outage 60] [--tags 250]
//! [--max-size-mib 1024] [--retain 24h] [--runs 1]`
//!
//! `--retain` is `buffer.retain_delivered` (`0s`: delivered records are
//! deleted, as before replay existed): run both to see what keeping
//! history costs the live path; `kept` is the history held at the end.
//!
//! Parts: in-process simulator (load tags), embedded rumqttd over TLS behind a
//! cuttable proxy, and `plantgate run` as a child process (its RSS is read
//! from /proc). Not a pass/fail test: figures vary with the machine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plantgate::buffer::{Store, StoreOptions};
use plantgate::demo::{SeqTracker, Watcher};
use plantgate::record::Kind;
use plantgate::sim::broker::EmbeddedBroker;
use plantgate::sim::proxy::CutProxy;
use serde_json::Value;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg_str(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the agent's buffer holds, read from the file (WAL: the agent
/// keeps running).
#[derive(Default)]
struct Held {
    records: u64,
    /// Highest tag seq handed out.
    last_tag_seq: u64,
    evicted: u64,
    /// The database file (free pages included) and its WAL.
    bytes: u64,
    /// The database file alone: a short outage's figure is dominated by
    /// the WAL, which is bounded by its share of `max_size` (at most
    /// 64 MiB) whatever the backlog.
    file_bytes: u64,
    /// What the pending records' segments take.
    segment_bytes: u64,
    /// Delivered records kept for replay.
    kept: u64,
}

fn held(data_dir: &Path) -> Held {
    match Store::open(&data_dir.join("buffer.db"), StoreOptions::default()).and_then(|s| s.stats())
    {
        Ok(st) => Held {
            records: st.records,
            last_tag_seq: st
                .streams
                .iter()
                .filter(|s| s.kind == Kind::Tag)
                .map(|s| s.next_seq - 1)
                .sum(),
            evicted: st.evicted_total,
            bytes: st.file_bytes + st.wal_bytes,
            file_bytes: st.file_bytes,
            segment_bytes: st.bytes,
            kept: st.retained_records,
        },
        Err(_) => Held::default(),
    }
}

struct Row {
    rate: u64,
    outage_s: u64,
    buffered: u64,
    evicted: u64,
    buffer_bytes: u64,
    file_bytes: u64,
    segment_bytes: u64,
    drain_ms: u64,
    records: u64,
    duplicates: u64,
    gaps: u64,
    rss_before_kib: u64,
    peak_rss_kib: u64,
    kept: u64,
}

async fn run_once(
    rate: u64,
    outage: Duration,
    tags: usize,
    max_size_mib: u64,
    retain: &str,
) -> Row {
    let broker = tokio::task::spawn_blocking(EmbeddedBroker::start)
        .await
        .expect("thread")
        .expect("broker");
    let proxy = CutProxy::start(broker.v5_addr).await.expect("proxy");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = plantgate::sim::SimOptions::new(dir.path().join("sim-pki"));
    opts.speed = 0.0;
    opts.tags = tags;
    opts.rate_hz = rate as f64 / tags as f64;
    let sim = plantgate::sim::start_deltav(opts, plantgate::sim::SimExtras::default())
        .await
        .expect("sim");
    let data_dir = dir.path().join("agent");
    let mut toml = format!(
        "[agent]\nid = \"bench-gw\"\nsite = \"bench\"\ndata_dir = {:?}\n\n[health]\nlisten = \"127.0.0.1:0\"\n\n\
         [buffer]\nmax_size = \"{max_size_mib}MiB\"\nretain_delivered = \"{retain}\"\n\n\
         [mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = {:?}\nreconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n\n\
         [[connections]]\nid = \"sim1\"\nkind = \"generic\"\nendpoint = \"{}\"\nsecurity_policy = \"None\"\n\
         publishing_interval = \"100ms\"\nsampling_interval = \"50ms\"\n",
        data_dir.display().to_string(),
        proxy.addr().port(),
        broker.pki.ca_file.display().to_string(),
        sim.endpoint()
    );
    for i in 0..tags {
        toml.push_str(&format!(
            "\n[[connections.tags]]\nname = \"L{i:04}\"\nnode = \"nsu={};s={}\"\n",
            sim.namespace_uri(),
            plantgate::sim::deltav::load_tag(i)
        ));
    }
    let config = dir.path().join("plantgate.toml");
    std::fs::write(&config, toml).expect("config");
    let mut watcher = Watcher::connect(broker.v4_addr, &broker.pki.ca_file, "plantgate/#")
        .await
        .expect("watcher");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let pid = child.id();
    let mut tracker = SeqTracker::default();
    let mut drain_ms = 0;
    let mut phase_end = Instant::now() + Duration::from_secs(10);
    let mut phase = 0; // 0 warm-up, 1 outage, 2 recovering, 3 final drain
    let mut at_end = Held::default();
    let mut at_drained = Held::default();
    let mut rss_before = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = watcher.rx.recv() => {
                let Some((topic, payload)) = msg else { break };
                let Ok(v) = serde_json::from_slice::<Value>(&payload) else { continue };
                if topic.contains("/data/") || topic.contains("/events/") {
                    tracker.see_payload(&v);
                }
                if topic.ends_with("/events/sync.completed") && phase == 2 {
                    drain_ms = v["details"]["duration_ms"].as_u64().unwrap_or(0);
                    phase = 3;
                    sim.handle().token().cancel();
                }
            }
            _ = tick.tick() => {
                match phase {
                    0 if Instant::now() >= phase_end => {
                        rss_before = rss_kib(pid, "VmRSS:");
                        proxy.cut();
                        phase = 1;
                        phase_end = Instant::now() + outage;
                    }
                    1 if Instant::now() >= phase_end => {
                        at_end = held(&data_dir);
                        proxy.restore();
                        phase = 2;
                    }
                    3 => {
                        let now = held(&data_dir);
                        let seen: u64 = tracker.last_seq("sim1", "tag").unwrap_or(0);
                        if now.records == 0 && seen >= now.last_tag_seq {
                            at_drained = now;
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let peak = rss_kib(pid, "VmHWM:");
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    Row {
        rate,
        outage_s: outage.as_secs(),
        buffered: at_end.records,
        evicted: at_end.evicted,
        buffer_bytes: at_end.bytes,
        file_bytes: at_end.file_bytes,
        segment_bytes: at_end.segment_bytes,
        drain_ms,
        records: tracker.received,
        duplicates: tracker.duplicates,
        gaps: tracker.gaps,
        rss_before_kib: rss_before,
        peak_rss_kib: peak,
        kept: at_drained.kept,
    }
}

fn main() {
    let rate = arg("--rate", 5000);
    let outage = Duration::from_secs(arg("--outage", 60));
    let tags = arg("--tags", 250) as usize;
    let max_size_mib = arg("--max-size-mib", 1024);
    let runs = arg("--runs", 1);
    let retain = arg_str("--retain", "24h");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{:>6} {:>8} {:>8} {:>10} {:>8} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>9} {:>10} {:>6} {:>6} {:>10} {:>10} {:>10}",
        "retain",
        "values/s",
        "outage",
        "buffered",
        "evicted",
        "B/rec",
        "db B",
        "seg B",
        "M rec/GiB",
        "1GiB lasts",
        "drain ms",
        "drain/s",
        "records",
        "dups",
        "gaps",
        "RSS before",
        "peak RSS",
        "kept"
    );
    for _ in 0..runs {
        let r = rt.block_on(run_once(rate, outage, tags, max_size_mib, &retain));
        let per_record = r.buffer_bytes as f64 / r.buffered.max(1) as f64;
        let per_gib = GIB / per_record.max(1.0);
        println!(
            "{:>6} {:>8} {:>7}s {:>10} {:>8} {:>6.1} {:>6.1} {:>6.1} {:>9.1} {:>7.0}min {:>9} {:>9.0} {:>10} {:>6} {:>6} {:>8}MB {:>8}MB {:>10}",
            retain,
            r.rate,
            r.outage_s,
            r.buffered,
            r.evicted,
            per_record,
            r.file_bytes as f64 / r.buffered.max(1) as f64,
            r.segment_bytes as f64 / r.buffered.max(1) as f64,
            per_gib / 1e6,
            per_gib / r.rate.max(1) as f64 / 60.0,
            r.drain_ms,
            r.buffered as f64 * 1000.0 / r.drain_ms.max(1) as f64,
            r.records,
            r.duplicates,
            r.gaps,
            r.rss_before_kib / 1024,
            r.peak_rss_kib / 1024,
            r.kept
        );
    }
}
