//! Load for fault tests: the DeltaV simulator with extra Double tags that all
//! change at a fixed rate, an agent config over them, and the checks that
//! every record reached the consumer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use plantgate::buffer::{Store, StoreOptions};
use plantgate::record::Kind;

use super::{agent_toml, init_tracing, Seen, PATIENCE};

/// The simulator (frozen batch cycle) with `tags` load tags changing at `hz`.
pub async fn start_load_sim(dir: &Path, tags: usize, hz: f64) -> plantgate::sim::SimServer {
    start_load_sim_with(dir, tags, hz, plantgate::sim::SimExtras::default()).await
}

/// [`start_load_sim`] with `extras` (server limits and the like).
pub async fn start_load_sim_with(
    dir: &Path,
    tags: usize,
    hz: f64,
    extras: plantgate::sim::SimExtras,
) -> plantgate::sim::SimServer {
    init_tracing();
    let mut opts = plantgate::sim::SimOptions::new(dir.join("sim-pki"));
    opts.speed = 0.0;
    opts.tags = tags;
    opts.rate_hz = hz;
    plantgate::sim::start_deltav(opts, extras)
        .await
        .expect("simulator")
}

/// A config for connection `sim1` over the first `tags` load tags (named
/// `L00000`, ...), data in `data_dir`.
pub fn load_toml(
    data_dir: &Path,
    mqtt: SocketAddr,
    ca: &Path,
    protocol: &str,
    sim: &plantgate::sim::SimServer,
    tags: usize,
) -> String {
    let tags: Vec<(String, String)> = (0..tags)
        .map(|i| (format!("L{i:05}"), plantgate::sim::deltav::load_tag(i)))
        .collect();
    let refs: Vec<(&str, &str)> = tags.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    agent_toml(
        data_dir,
        mqtt,
        ca,
        protocol,
        &sim.endpoint(),
        sim.namespace_uri(),
        &refs,
    )
}

/// Pending records and the last assigned tag seq of `sim1`, read from the
/// agent's buffer file (WAL: readable while the agent writes).
pub fn buffer_state(data_dir: &Path) -> (u64, u64) {
    let store =
        Store::open(&data_dir.join("buffer.db"), StoreOptions::default()).expect("open buffer");
    let st = store.stats().expect("stats");
    let last = st
        .streams
        .iter()
        .find(|s| s.connection == "sim1" && s.kind == Kind::Tag)
        .map(|s| s.next_seq - 1)
        .unwrap_or(0);
    (st.records, last)
}

/// Waits until the buffer is empty and the watcher has every tag record up
/// to the last seq ever assigned; returns that seq.
pub async fn drained_and_seen(seen: &mut Seen, data_dir: &Path) -> u64 {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    let last = loop {
        let (pending, last) = buffer_state(data_dir);
        if pending == 0 && last > 0 {
            break last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "buffer never drained: {pending} pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    seen.until(&format!("tag seq {last}"), |s| {
        s.tracker.last_seq("sim1", "tag") >= Some(last)
    })
    .await;
    last
}
