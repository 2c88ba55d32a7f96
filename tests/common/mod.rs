//! Shared helpers of the integration tests: real parts only (in-process OPC
//! UA simulator, embedded rumqttd over TLS, real SQLite files), and waiting on
//! conditions with generous deadlines instead of fixed sleeps.

#![allow(dead_code)]

pub mod asyncua;
pub mod conn;
pub mod load;
pub mod mosquitto;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plantgate::demo::{SeqTracker, Watcher};
use serde_json::Value;

/// Upper bound for any single wait; a failure bound, not a pacing sleep.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub struct Message {
    pub topic: String,
    pub payload: Value,
}

/// Everything a subscriber saw, with seq bookkeeping of data and events.
pub struct Seen {
    pub watcher: Watcher,
    pub messages: Vec<Message>,
    pub tracker: SeqTracker,
}

impl Seen {
    pub fn new(watcher: Watcher) -> Self {
        Seen {
            watcher,
            messages: Vec::new(),
            tracker: SeqTracker::default(),
        }
    }

    /// Receives until `cond` holds over everything seen so far; panics with
    /// `what` after `PATIENCE`.
    pub async fn until(&mut self, what: &str, mut cond: impl FnMut(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !cond(self) {
            match tokio::time::timeout_at(deadline, self.watcher.rx.recv()).await {
                Ok(Some((topic, payload))) => self.push(topic, &payload),
                Ok(None) => panic!("watcher closed while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; saw {} messages, last: {:?}",
                    self.messages.len(),
                    self.messages
                        .last()
                        .map(|m| (&m.topic, m.payload.to_string()))
                ),
            }
        }
    }

    fn push(&mut self, topic: String, payload: &[u8]) {
        if topic.contains("/commands/replay") && !topic.ends_with("/result") {
            // Consumers' requests: whatever they sent, not the agent's.
            return;
        }
        let payload: Value = serde_json::from_slice(payload)
            .unwrap_or_else(|e| panic!("non-JSON payload on {topic}: {e}"));
        if topic.contains("/data/") || topic.contains("/events/") {
            self.tracker.see_payload(&payload);
        }
        self.messages.push(Message { topic, payload });
    }

    /// All tag records seen (after de-duplication is NOT applied).
    pub fn tag_values(&self, name: &str) -> Vec<Value> {
        self.messages
            .iter()
            .filter(|m| m.topic.contains("/data/") && m.payload["kind"] == "tag")
            .flat_map(|m| m.payload["records"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["data"]["name"] == name)
            .map(|r| r["data"]["value"].clone())
            .collect()
    }

    pub fn last_on(&self, topic_suffix: &str) -> Option<&Value> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.topic.ends_with(topic_suffix))
            .map(|m| &m.payload)
    }
}

pub struct Plant {
    pub broker: plantgate::sim::broker::EmbeddedBroker,
    pub sim: plantgate::sim::SimServer,
    pub dir: tempfile::TempDir,
}

/// The embedded broker and a frozen DeltaV simulator.
pub async fn start_plant() -> Plant {
    start_plant_with("deltav").await
}

/// The embedded TLS broker (rumqttd), started on its own thread.
pub async fn embedded_broker() -> plantgate::sim::broker::EmbeddedBroker {
    init_tracing();
    tokio::task::spawn_blocking(plantgate::sim::broker::EmbeddedBroker::start)
        .await
        .expect("broker thread")
        .expect("embedded broker starts")
}

/// The embedded broker and a frozen simulator of `kind` (only the values
/// the test sets change).
pub async fn start_plant_with(kind: &str) -> Plant {
    let broker = embedded_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = plantgate::sim::SimOptions::new(dir.path().join("sim-pki"));
    opts.speed = 0.0;
    let sim = match kind {
        "deltav" => plantgate::sim::start_deltav(opts, plantgate::sim::SimExtras::default()).await,
        "optomes" => {
            plantgate::sim::start_optomes(opts, plantgate::sim::SimExtras::default()).await
        }
        other => panic!("no simulator {other}"),
    }
    .expect("simulator starts");
    Plant { broker, sim, dir }
}

/// A config for one generic connection to the simulator with the given tags
/// (name, string id), through `mqtt_addr`, as TOML.
pub fn agent_toml(
    data_dir: &Path,
    mqtt_addr: SocketAddr,
    ca_file: &Path,
    protocol: &str,
    endpoint: &str,
    ns_uri: &str,
    tags: &[(&str, &str)],
) -> String {
    let mut t = format!(
        r#"
[agent]
id = "test-gw"
site = "test-site"
data_dir = {data_dir:?}

[health]
listen = "127.0.0.1:0"

[mqtt]
url = "mqtts://127.0.0.1:{port}"
ca_file = {ca:?}
protocol = "{protocol}"
heartbeat_interval = "1s"
reconnect_initial = "200ms"
reconnect_max = "1s"

[[connections]]
id = "sim1"
kind = "generic"
endpoint = "{endpoint}"
security_policy = "None"
security_mode = "None"
publishing_interval = "100ms"
sampling_interval = "100ms"
reconnect_initial = "200ms"
reconnect_max = "1s"
"#,
        data_dir = data_dir.display().to_string(),
        port = mqtt_addr.port(),
        ca = ca_file.display().to_string(),
    );
    for (name, id) in tags {
        t.push_str(&format!(
            "\n[[connections.tags]]\nname = \"{name}\"\nnode = \"nsu={ns_uri};s={id}\"\n"
        ));
    }
    t
}

pub fn load(toml: &str) -> plantgate::config::Config {
    plantgate::config::load_from(toml, &HashMap::new())
        .unwrap_or_else(|e| panic!("config does not load: {e}\n{toml}"))
        .config
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// A plain HTTP/1.1 GET over a real TCP connection: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect health");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// A subscriber to everything under `plantgate/#`.
pub async fn watch(addr: SocketAddr, ca_file: &Path) -> Seen {
    let watcher = Watcher::connect(addr, ca_file, "plantgate/#")
        .await
        .expect("watcher connects");
    Seen::new(watcher)
}

/// An agent running in this process; derefs to its [`plantgate::agent::Agent`].
pub struct Running {
    agent: plantgate::agent::Agent,
    cancel: tokio_util::sync::CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Running {
    type Target = plantgate::agent::Agent;
    fn deref(&self) -> &Self::Target {
        &self.agent
    }
}

impl Running {
    /// Clean stop; docs/cli.md allows 10 s for it.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.join)
            .await
            .expect("agent stops within 10 s")
            .expect("shutdown task");
    }
}

pub async fn run_agent(toml: &str) -> Running {
    let cancel = tokio_util::sync::CancellationToken::new();
    let (agent, join) = plantgate::agent::start(load(toml), cancel.clone())
        .await
        .expect("agent starts");
    Running {
        agent,
        cancel,
        join,
    }
}

/// Waits until the agent's uplink is connected and subscribed to its
/// commands topic (a replay request sent before is not kept by the broker).
pub async fn wait_listening_for_commands(board: &plantgate::status::StatusBoard) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while board.mqtt().commands_subscribed != Some(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never subscribed to its commands topic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the buffer holds nothing; returns the last seq ever assigned
/// to `connection`'s tag stream.
pub async fn wait_drained(buffer: &plantgate::buffer::BufferHandle, connection: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = buffer.stats().await.expect("stats");
        let last = st
            .streams
            .iter()
            .find(|s| s.connection == connection && s.kind == plantgate::record::Kind::Tag)
            .map(|s| s.next_seq - 1);
        if let (0, Some(last)) = (st.records, last) {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "buffer never drained: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real `plantgate run` binary as a child process, for tests that kill
/// it (stderr appended to `log`); killed when dropped.
pub struct AgentProcess(Option<std::process::Child>);

impl AgentProcess {
    pub fn start(config: &Path, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_plantgate"))
            .args(["run", "-c"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn plantgate");
        AgentProcess(Some(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// Sends `sig` (e.g. "HUP") to the running process, which goes on.
    pub fn signal_keep(&self, sig: &str) {
        let c = self.0.as_ref().expect("running");
        let sent = std::process::Command::new("kill")
            .args([format!("-{sig}"), c.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{sig}");
    }

    /// Sends `sig` (e.g. "KILL", "TERM") and waits for the exit.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let mut c = self.0.take().expect("running");
        let _ = std::process::Command::new("kill")
            .args([format!("-{sig}"), c.id().to_string()])
            .status();
        c.wait().expect("wait")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
