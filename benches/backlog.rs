//! Backlog benchmark: does memory stay flat whatever the backlog, and how
//! densely is it stored? Prefills a buffer with N tag records shaped like
//! the load simulator's (1 000 tags, 500 values per commit, as an outage
//! would), starts a real `plantgate run` on it against the embedded TLS
//! broker, and prints the database size (bytes per record, main file and
//! WAL), the fill and drain times and rates and the agent's peak RSS for
//! each N.
//!
//! `cargo bench --bench backlog -- [--sizes 1000,1000000,10000000]`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plantgate::buffer::{Append, Store, StoreOptions};
use plantgate::record::{Kind, NewRecord};
use plantgate::sim::broker::EmbeddedBroker;

fn sizes() -> Vec<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 1_000_000, 10_000_000])
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `i`-th value of the load simulator's 1 000 tags (the DeltaV
/// simulator's formula) as the agent records it: tag `L0000`..`L0999` on
/// node `LOAD/TAG00000.CV`..., ten rounds a second.
fn load_record(i: u64) -> NewRecord {
    let (tick, tag) = (i / 1_000, i % 1_000);
    let v = (tick as f64 * 0.1 + tag as f64).sin() * 50.0 + tick as f64 * 1e-3;
    NewRecord {
        connection: "line1".into(),
        kind: Kind::Tag,
        ts_ms: 1_795_860_000_000 + tick as i64 * 100 + (tag % 7) as i64,
        data: serde_json::json!({
            "name": format!("L{tag:04}"),
            "node": format!("nsu=urn:plantgate:sim:deltav;s=LOAD/TAG{tag:05}.CV"),
            "quality": "good",
            "status": "Good",
            "value": v,
        })
        .to_string(),
    }
}

fn main() {
    let broker = EmbeddedBroker::start().expect("broker");
    println!(
        "{:>12} {:>8} {:>7} {:>10} {:>8} {:>10} {:>8} {:>10} {:>10}",
        "backlog",
        "db MB",
        "B/rec",
        "M rec/GiB",
        "fill s",
        "fill/s",
        "drain s",
        "drain/s",
        "peak RSS"
    );
    for n in sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("agent");
        let fill = Instant::now();
        {
            let mut store =
                Store::open(&data_dir.join("buffer.db"), StoreOptions::default()).expect("store");
            let mut left = n;
            let mut i: u64 = 0;
            while left > 0 {
                let k = left.min(500);
                let batch: Vec<NewRecord> = (0..k)
                    .map(|_| {
                        i += 1;
                        load_record(i)
                    })
                    .collect();
                store.append(Append::records(&batch)).expect("append");
                left -= k;
            }
        }
        let fill_s = fill.elapsed().as_secs_f64();
        let size = |suffix: &str| {
            std::fs::metadata(data_dir.join(format!("buffer.db{suffix}")))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let db_bytes = size("") + size("-wal");
        let per_record = db_bytes as f64 / n.max(1) as f64;
        let config = dir.path().join("plantgate.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nid = \"bench-gw\"\nsite = \"bench\"\ndata_dir = {:?}\n\n[health]\nlisten = \"127.0.0.1:0\"\n\n\
                 [buffer]\nmax_size = \"8GiB\"\n\n[mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = {:?}\n",
                data_dir.display().to_string(),
                broker.v5_addr.port(),
                broker.pki.ca_file.display().to_string()
            ),
        )
        .expect("config");
        let start = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_plantgate"))
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent");
        let pid = child.id();
        let mut peak = 0;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            peak = peak.max(vm_hwm_kib(pid));
            let left = Store::open(&data_dir.join("buffer.db"), StoreOptions::default())
                .and_then(|s| s.stats())
                .map(|s| s.records)
                .unwrap_or(u64::MAX);
            // Only the agent's own events may remain.
            if left <= 2 {
                break;
            }
        }
        let drain_s = start.elapsed().as_secs_f64();
        peak = peak.max(vm_hwm_kib(pid));
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = child.wait();
        println!(
            "{:>12} {:>8.1} {:>7.1} {:>10.1} {:>8.1} {:>10.0} {:>8.1} {:>10.0} {:>8}MB",
            n,
            db_bytes as f64 / 1e6,
            per_record,
            (1u64 << 30) as f64 / per_record.max(1.0) / 1e6,
            fill_s,
            n as f64 / fill_s.max(1e-9),
            drain_s,
            n as f64 / drain_s.max(1e-9),
            peak / 1024
        );
    }
}
