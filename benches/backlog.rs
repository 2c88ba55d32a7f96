//! Backlog benchmark: does memory stay flat whatever the backlog?
//! Prefills a buffer with N tag records (as an outage would), starts a real
//! `plantgate run` on it against the embedded TLS broker, and prints the
//! drain time and the agent's peak RSS for each N.
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

fn main() {
    let broker = EmbeddedBroker::start().expect("broker");
    println!(
        "{:>12} {:>10} {:>10} {:>12} {:>10}",
        "backlog", "db MB", "fill s", "drain s", "peak RSS"
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
                let k = left.min(5_000);
                let batch: Vec<NewRecord> = (0..k)
                    .map(|_| {
                        i += 1;
                        NewRecord {
                            connection: "line1".into(),
                            kind: Kind::Tag,
                            ts_ms: 1_795_860_000_000 + i as i64,
                            data: serde_json::json!({"name": format!("T{:03}", i % 250), "node": "ns=2;s=X", "value": i as f64 * 0.5, "quality": "good", "status": "Good"}).to_string(),
                        }
                    })
                    .collect();
                store.append(Append::records(&batch)).expect("append");
                left -= k;
            }
        }
        let fill_s = fill.elapsed().as_secs_f64();
        let db_mb = std::fs::metadata(data_dir.join("buffer.db"))
            .map(|m| m.len() / 1_000_000)
            .unwrap_or(0);
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
            "{:>12} {:>10} {:>10.1} {:>12.1} {:>8}MB",
            n,
            db_mb,
            fill_s,
            drain_s,
            peak / 1024
        );
    }
}
