//! `plantgate buffer stats` next to a running agent (docs/cli.md): besides
//! the totals it says what a record takes and how long the free buffer
//! lasts at the agent's real intake rate, read from the agent's `/status`;
//! without an agent it says the rate is unknown.

mod common;

use std::process::Command;

use common::load::*;
use common::*;

const TAGS: usize = 100;
const HZ: f64 = 10.0;

fn buffer_stats(config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_plantgate"))
        .args(["buffer", "stats", "-c"])
        .arg(config)
        .output()
        .expect("plantgate buffer stats");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buffer_stats_tells_how_long_the_free_buffer_lasts() {
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = start_load_sim(dir.path(), TAGS, HZ).await;
    // A fixed health port, so the command finds the agent from the config.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let data_dir = dir.path().join("agent");
    let toml = load_toml(
        &data_dir,
        broker.v5_addr,
        &broker.pki.ca_file,
        "v5",
        &sim,
        TAGS,
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let config = write_file(dir.path(), "plantgate.toml", &toml);

    let mut seen = watch(broker.v4_addr, &broker.pki.ca_file).await;
    let agent = run_agent(&toml).await;
    // The rate is known once records came in for a few seconds.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let line = loop {
        seen.until("more tag records", |s| {
            s.tracker.last_seq("sim1", "tag").unwrap_or(0) >= TAGS as u64
        })
        .await;
        let out = buffer_stats(&config);
        if let Some(line) = out.lines().find(|l| l.contains("records/s")) {
            break line.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no rate: {out}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    eprintln!("plantgate buffer stats: {line}");
    // "bytes per record: -; free: 1024 of 1024 MiB; at 887 records/s the
    // free buffer holds 1 h 50 min"
    let rate: u64 = line
        .split("at ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {line:?}"));
    assert!((300..=3_000).contains(&rate), "{line}");
    assert!(line.contains("the free buffer holds"), "{line}");
    assert!(line.starts_with("bytes per record: "), "{line}");
    agent.stop().await;

    let after = buffer_stats(&config);
    assert!(
        after.contains("intake rate unknown (no agent answering on 127.0.0.1:"),
        "{after}"
    );
}
