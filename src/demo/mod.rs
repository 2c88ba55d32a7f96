//! `plantgate demo`: the whole product on one machine with no files, network
//! or root. A simulated DeltaV OPC UA server, an embedded TLS broker (fresh
//! CA), the real agent (configured through the real config loader), and a
//! watcher that subscribes to everything and prints it readably, checking
//! every stream for seq gaps and duplicates as it goes.

mod sparkplug_host;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sim::broker::EmbeddedBroker;
use crate::sim::proxy::CutProxy;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    pub duration: Option<Duration>,
    pub outage: Option<Duration>,
    /// Stop the agent for this long mid-run; its DeltaV connection reads
    /// the gap back from the simulator's history (docs/backfill.md).
    pub restart: Option<Duration>,
    /// JSON or Sparkplug B on the wire (docs/sparkplug.md).
    pub format: crate::config::MqttFormat,
    /// Where the log goes, named at the top of the live view.
    pub log_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub received: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Records that came again on request (`"replay": true`): neither
    /// duplicates nor part of the live sequence.
    pub replayed: u64,
    /// Sparkplug only: messages decoded, BIRTHs, and `seq` breaks.
    pub sparkplug_messages: u64,
    pub sparkplug_births: u64,
    pub sparkplug_seq_errors: u64,
}

/// Per-stream seq bookkeeping of a consumer: what docs/guarantees.md lets a cloud
/// consumer detect (duplicates to drop, gaps that mean loss).
#[derive(Debug, Default)]
pub struct SeqTracker {
    /// (connection, kind, epoch) → highest seq seen.
    last: HashMap<(String, String, String), u64>,
    pub received: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Records that came again on request (`"replay": true`): neither
    /// duplicates nor part of the live sequence.
    pub replayed: u64,
    /// Human descriptions of the gaps seen.
    pub gap_details: Vec<String>,
}

impl SeqTracker {
    /// Records one seq; returns false if it was a duplicate.
    pub fn see(&mut self, connection: &str, kind: &str, epoch: &str, seq: u64) -> bool {
        let key = (connection.to_string(), kind.to_string(), epoch.to_string());
        let last = self.last.entry(key).or_insert(0);
        if seq <= *last {
            self.duplicates += 1;
            return false;
        }
        if seq > *last + 1 {
            // The first message of a stream may start above 1 if the watcher
            // joined late; only count gaps after the first one.
            if *last != 0 {
                self.gaps += 1;
                self.gap_details
                    .push(format!("{connection}/{kind}: {} → {seq}", *last));
            }
        }
        *last = seq;
        self.received += 1;
        true
    }

    /// Feeds a data or event payload; returns the number of new records.
    pub fn see_payload(&mut self, payload: &Value) -> u64 {
        if payload["replay"] == true {
            let n = payload["records"].as_array().map_or(1, |r| r.len() as u64);
            self.replayed += n;
            return 0;
        }
        let epoch = payload["epoch"].as_str().unwrap_or("");
        let connection = payload["connection"].as_str().unwrap_or("");
        if let Some(records) = payload["records"].as_array() {
            let kind = payload["kind"].as_str().unwrap_or("");
            let mut n = 0;
            for r in records {
                if let Some(seq) = r["seq"].as_u64() {
                    if self.see(connection, kind, epoch, seq) {
                        n += 1;
                    }
                }
            }
            n
        } else if let Some(seq) = payload["seq"].as_u64() {
            u64::from(self.see(connection, "event", epoch, seq))
        } else {
            0
        }
    }

    pub fn last_seq(&self, connection: &str, kind: &str) -> Option<u64> {
        self.last
            .iter()
            .filter(|((c, k, _), _)| c == connection && k == kind)
            .map(|(_, v)| *v)
            .max()
    }
}

/// An MQTT client that subscribes to `{filter}` and hands every message over.
pub struct Watcher {
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a [`Watcher`] connects.
#[derive(Debug, Clone, Default)]
pub struct WatcherOptions {
    /// Fixed client id with a persistent session (clean session off), so the
    /// broker queues messages for it across its own restarts.
    pub persistent_id: Option<String>,
    /// Client certificate and key for mutual TLS.
    pub client_auth: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Watcher {
    /// Connects over TLS (verifying with `ca_file`) with MQTT 3.1.1 and
    /// subscribes to `filter` with QoS 1. Returns once subscribed.
    pub async fn connect(
        addr: std::net::SocketAddr,
        ca_file: &std::path::Path,
        filter: &str,
    ) -> Result<Watcher, DemoError> {
        Self::connect_with(addr, ca_file, filter, WatcherOptions::default()).await
    }

    /// As [`Watcher::connect`]; reconnects by itself and subscribes again
    /// whenever the broker has no session for it.
    pub async fn connect_with(
        addr: std::net::SocketAddr,
        ca_file: &std::path::Path,
        filter: &str,
        opts: WatcherOptions,
    ) -> Result<Watcher, DemoError> {
        let (cert, key) = match &opts.client_auth {
            Some((c, k)) => (Some(c.as_path()), Some(k.as_path())),
            None => (None, None),
        };
        let tls = crate::uplink::tls::client_config(Some(ca_file), cert, key)
            .map_err(setup("watcher TLS"))?;
        let id = opts
            .persistent_id
            .clone()
            .unwrap_or_else(|| format!("plantgate-watcher-{}", uuid::Uuid::new_v4().simple()));
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(opts.persistent_id.is_none())
            .set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024)
            .set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let filter = filter.to_string();
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        if !ack.session_present || subscribed_tx.is_some() {
                            // try_subscribe: the request channel is drained by
                            // this very loop, so awaiting here could deadlock.
                            let _ =
                                sub_client.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "watcher connection error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), subscribed_rx)
            .await
            .map_err(setup("watcher: no SUBACK"))?
            .map_err(setup("watcher"))?;
        Ok(Watcher { rx, client, task })
    }

    /// A client that publishes as this watcher (QoS 1): what a consumer
    /// uses to ask the agent for a replay.
    pub fn publisher(&self) -> rumqttc::AsyncClient {
        self.client.clone()
    }
}

/// The demo's DeltaV connection and topic root (see `demo_config_toml`).
const DEMO_CONNECTION: &str = "deltav-sim";
const DEMO_ROOT: &str = "plantgate/demo-plant/demo-gw";

const DEMO_TAGS: [(&str, &str); 4] = [
    ("FIC-101.PV", "FIC-101/PV.CV"),
    ("FIC-101.SP", "FIC-101/SP.CV"),
    ("TIC-201.PV", "TIC-201/PV.CV"),
    ("LIC-301.PV", "LIC-301/PV.CV"),
];

/// Recipe parameters of the simulated DeltaV units (docs/cli.md).
const DEMO_RECIPE_PARAMETERS: &str = r#"["CHARGE_AMT", "REACT_TEMP_SP", "REACT_TIME"]"#;

fn demo_config_toml(
    data_dir: &std::path::Path,
    broker: std::net::SocketAddr,
    ca_file: &std::path::Path,
    deltav: (&str, &str),
    optomes: (&str, &str),
    format: crate::config::MqttFormat,
) -> String {
    let format = match format {
        crate::config::MqttFormat::Json => "json",
        crate::config::MqttFormat::SparkplugB => "sparkplug_b",
    };
    let (endpoint, ns_uri) = deltav;
    let (om_endpoint, om_ns) = optomes;
    let mut t = format!(
        r#"
[agent]
id = "demo-gw"
site = "demo-plant"
data_dir = {data_dir:?}

[mqtt]
url = "mqtts://127.0.0.1:{port}"
ca_file = {ca:?}
heartbeat_interval = "5s"
format = "{format}"
reconnect_initial = "500ms"
reconnect_max = "2s"

[buffer]
max_size = "64MiB"
# A small buffer for a short demo: warn only if it would not last 5 minutes.
headroom_warning = "5m"

[[connections]]
id = "deltav-sim"
kind = "deltav"
endpoint = "{endpoint}"
security_policy = "None"
security_mode = "None"
publishing_interval = "500ms"
sampling_interval = "250ms"
node_template = "nsu={ns_uri};s={{unit}}/{{param}}.CV"
# The simulator keeps history: a gap is read back after a restart.
backfill = "history"
"#,
        data_dir = data_dir.display().to_string(),
        port = broker.port(),
        ca = ca_file.display().to_string(),
    );
    for unit in crate::sim::batch::UNITS {
        t.push_str(&format!(
            "\n[[connections.units]]\nname = \"{unit}\"\nrecipe_parameters = {DEMO_RECIPE_PARAMETERS}\n"
        ));
    }
    for (name, id) in DEMO_TAGS {
        t.push_str(&format!(
            "\n[[connections.tags]]\nname = \"{name}\"\nnode = \"nsu={ns_uri};s={id}\"\n"
        ));
    }
    // Short OEE windows so that a demo of a minute shows several.
    t.push_str(&format!(
        r#"
[[connections]]
id = "optomes-sim"
kind = "optomes"
endpoint = "{om_endpoint}"
security_policy = "None"
security_mode = "None"
publishing_interval = "500ms"
sampling_interval = "250ms"
oee_window = "15s"
node_template = "nsu={om_ns};s={{work_center}}.{{param}}"
"#
    ));
    for wc in crate::sim::optomes::WORK_CENTERS {
        t.push_str(&format!(
            "\n[[connections.work_centers]]\nname = \"{wc}\"\n"
        ));
    }
    t
}

/// One batch / recipe / OEE / downtime record as a compact table row.
fn derived_line(conn: &str, kind: &str, seq: u64, d: &Value) -> String {
    let text = |k: &str| d[k].as_str().unwrap_or("-").to_string();
    let ratio = |k: &str| match d[k].as_f64() {
        Some(f) => format!("{:>5.1}%", f * 100.0),
        None => "    - ".to_string(),
    };
    let row = match kind {
        "batch" => format!(
            "{:<12} {:<14} {:<14} phase {:<10} state {:<10} fail {}",
            text("unit"),
            text("batch_id"),
            text("event"),
            text("phase"),
            text("state"),
            d["fail_index"]
        ),
        "recipe" => {
            let params: Vec<String> = d["parameters"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            format!(
                "{:<12} {:<14} {:<14} {}",
                text("unit"),
                text("batch_id"),
                text("recipe"),
                params.join(" ")
            )
        }
        "oee" => {
            // Window as HH:MM:SS-HH:MM:SS (the date adds nothing live).
            let hms = |k: &str| {
                let t = text(k);
                t.get(11..19).map(str::to_string).unwrap_or(t)
            };
            format!(
                "{:<14} {}-{} {:<12} good {:>5} rej {:>4} A {} P {} Q {} OEE {}{}",
                text("work_center"),
                hms("window_start"),
                hms("window_end"),
                text("state"),
                d["good_count"],
                d["reject_count"],
                ratio("availability"),
                ratio("performance"),
                ratio("quality"),
                ratio("oee"),
                if d["complete"] == Value::Bool(false) {
                    "  (partial)"
                } else {
                    ""
                }
            )
        }
        _ => format!(
            "{:<14} reason {:<12} {:.1} s",
            text("work_center"),
            text("reason"),
            d["duration_s"].as_f64().unwrap_or(0.0)
        ),
    };
    format!("{kind:<8} {conn} #{seq} {row}")
}

fn clock() -> String {
    chrono::Utc::now().format("%H:%M:%S%.3f").to_string()
}

/// Prints one received message in a compact, readable line.
fn describe(topic: &str, payload: &Value) -> String {
    let segs: Vec<&str> = topic.split('/').collect();
    let tail = segs.get(3..).unwrap_or(&[]);
    match tail {
        ["status"] => format!(
            "agent    {} {}",
            payload["state"].as_str().unwrap_or("?"),
            payload["reason"].as_str().unwrap_or("")
        ),
        ["heartbeat"] => format!(
            "heartbeat buffer {} records, published {}",
            payload["buffer"]["records"], payload["published_records_total"]
        ),
        ["connections", conn, "status"] => format!(
            "conn     {conn} {} {}",
            payload["state"].as_str().unwrap_or("?"),
            payload["reason"].as_str().unwrap_or("")
        ),
        ["events", ty] => format!(
            "{}{ty} seq {} {}",
            if payload["replay"] == true {
                "replay   event "
            } else {
                "event    "
            },
            payload["seq"],
            payload["details"]
        ),
        ["commands", "replay"] => format!(
            "ask      replay {}/{} seq {}..{} (request {})",
            payload["connection"].as_str().unwrap_or("(agent)"),
            payload["kind"].as_str().unwrap_or("?"),
            payload["from_seq"],
            payload["to_seq"],
            payload["request_id"]
        ),
        ["commands", "replay", "result"] => format!(
            "answer   request {}: {} records replayed, missing {}, error {}",
            payload["request_id"], payload["replayed"], payload["missing"], payload["error"]
        ),
        ["data", conn, kind @ ("batch" | "recipe" | "oee" | "downtime")] => {
            let records = payload["records"].as_array().cloned().unwrap_or_default();
            let lines: Vec<String> = records
                .iter()
                .map(|r| derived_line(conn, kind, r["seq"].as_u64().unwrap_or(0), &r["data"]))
                .collect();
            // Continuation lines align under the first (after the clock).
            lines.join("\n              ")
        }
        ["data", conn, kind] => {
            let records = payload["records"].as_array().cloned().unwrap_or_default();
            let first = records.first().and_then(|r| r["seq"].as_u64()).unwrap_or(0);
            let last = records.last().and_then(|r| r["seq"].as_u64()).unwrap_or(0);
            // Latest value per tag in this message.
            let mut latest: BTreeMap<String, String> = BTreeMap::new();
            for r in &records {
                let d = &r["data"];
                let v = match &d["value"] {
                    Value::Number(n) => n.as_f64().map(|f| format!("{f:.2}")).unwrap_or_default(),
                    other => other.to_string(),
                };
                let q = d["quality"].as_str().unwrap_or("");
                let mark = if q == "good" { "" } else { "!" };
                latest.insert(
                    d["name"].as_str().unwrap_or("?").to_string(),
                    format!("{v}{mark}"),
                );
            }
            let values: Vec<String> = latest.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let backfilled = records
                .iter()
                .filter(|r| r["data"]["backfill"] == true)
                .count();
            let label = if payload["replay"] == true {
                "replay  "
            } else if backfilled > 0 {
                "backfill"
            } else {
                "data    "
            };
            format!(
                "{label} {conn}/{kind} seq {first}..{last} ({} records) {}",
                records.len(),
                values.join("  ")
            )
        }
        _ => format!("other    {topic}"),
    }
}

/// The demo's plant: a DeltaV and an OptoMES simulator, an embedded TLS
/// broker and the proxy that cuts the agent off it.
struct Plant {
    broker: EmbeddedBroker,
    proxy: CutProxy,
    deltav: crate::sim::SimServer,
    optomes: crate::sim::SimServer,
}

impl Plant {
    async fn start(work: &std::path::Path) -> Result<Plant, DemoError> {
        let broker = tokio::task::spawn_blocking(EmbeddedBroker::start)
            .await
            .map_err(setup("broker"))?
            .map_err(setup("broker"))?;
        let proxy = CutProxy::start(broker.v5_addr)
            .await
            .map_err(setup("proxy"))?;
        let options = |speed: f64, pki: &str| -> Result<crate::sim::SimOptions, DemoError> {
            Ok(crate::sim::SimOptions {
                listen: "127.0.0.1:0".parse().map_err(setup("listen"))?,
                seed: 7,
                speed,
                tags: 0,
                rate_hz: 1.0,
                user: None,
                pki_dir: work.join(pki),
            })
        };
        // Batches take hours of plant time; ten-fold shows several phases
        // within a minute.
        let deltav =
            crate::sim::start_deltav(options(10.0, "sim-pki")?, crate::sim::SimExtras::default())
                .await
                .map_err(setup("simulator"))?;
        let optomes = crate::sim::start_optomes(
            options(1.0, "optomes-pki")?,
            crate::sim::SimExtras::default(),
        )
        .await
        .map_err(setup("OptoMES simulator"))?;
        Ok(Plant {
            broker,
            proxy,
            deltav,
            optomes,
        })
    }

    fn print(&self, config: &crate::config::Config, log_file: Option<&std::path::Path>) {
        let (sim, optomes) = (&self.deltav, &self.optomes);
        println!("plantgate demo");
        println!(
            "  DeltaV simulator  {}  (namespace {})",
            sim.endpoint(),
            sim.namespace_uri()
        );
        println!(
            "  OptoMES simulator {}  (namespace {})",
            optomes.endpoint(),
            optomes.namespace_uri()
        );
        println!("  MQTT broker       mqtts://{} (embedded, TLS, fresh CA); agent connects through a cuttable proxy at {}", self.broker.v5_addr, self.proxy.addr());
        println!(
            "  buffer            {}",
            config.agent.data_dir.join("buffer.db").display()
        );
        if let Some(log) = log_file {
            println!("  log               {}", log.display());
        }
        println!();
    }
}

pub async fn run(opts: DemoOptions, cancel: CancellationToken) -> Result<DemoSummary, DemoError> {
    let work = tempfile::Builder::new()
        .prefix("plantgate-demo-")
        .tempdir()
        .map_err(setup("temp dir"))?;
    let plant = Plant::start(work.path()).await?;
    let toml = demo_config_toml(
        &work.path().join("agent"),
        plant.proxy.addr(),
        &plant.broker.pki.ca_file,
        (&plant.deltav.endpoint(), plant.deltav.namespace_uri()),
        (&plant.optomes.endpoint(), plant.optomes.namespace_uri()),
        opts.format,
    );
    let config = crate::config::load_from(&toml, &HashMap::new())
        .map_err(|e| DemoError::Setup(format!("demo config: {e}")))?
        .config;
    plant.print(&config, opts.log_file.as_deref());

    let broker = &plant.broker;
    let sparkplug = opts.format == crate::config::MqttFormat::SparkplugB;
    // Sparkplug: the `spBv1.0` topics, and the replay topics under the
    // root (the demo's broker carries nothing else).
    let filter = if sparkplug { "#" } else { "plantgate/#" };
    let mut watcher = Watcher::connect(broker.v4_addr, &broker.pki.ca_file, filter).await?;
    let mut agent_cancel = CancellationToken::new();
    let (agent, mut agent_join) = crate::agent::start(config.clone(), agent_cancel.clone())
        .await
        .map_err(setup("agent"))?;
    let Plant {
        proxy,
        deltav,
        optomes,
        broker: _broker,
    } = plant;
    let proxy = Arc::new(proxy);
    let outage_task = opts.outage.map(|len| {
        spawn_outage(
            &opts,
            len,
            proxy.clone(),
            agent.buffer.clone(),
            cancel.clone(),
        )
    });

    let ask_task = spawn_replay_ask(
        &opts,
        watcher.publisher(),
        agent.buffer.clone(),
        cancel.clone(),
    );

    let mut tracker = SeqTracker::default();
    let mut host = sparkplug_host::HostView::default();
    let started = tokio::time::Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    // `--restart`: two thirds of the way in, or after 10 s.
    let mut restart = opts.restart.map(|len| {
        let at = opts
            .duration
            .map(|d| d * 2 / 3)
            .unwrap_or(Duration::from_secs(10));
        (started + at, len)
    });
    loop {
        let sleep_until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let restart_at = async {
            match restart {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = sleep_until => break,
            _ = restart_at => {
                let len = restart.take().map(|(_, len)| len).unwrap_or_default();
                println!("{}  ---- agent stopped for {} s: the plant goes on ----", clock(), len.as_secs());
                agent_cancel.cancel();
                let _ = (&mut agent_join).await;
                let back = tokio::time::Instant::now() + len;
                while let Ok(Some((topic, payload))) = tokio::time::timeout_at(back, watcher.rx.recv()).await {
                    show(&mut tracker, &mut host, &topic, &payload);
                }
                agent_cancel = CancellationToken::new();
                let (_agent, join) = crate::agent::start(config.clone(), agent_cancel.clone())
                    .await
                    .map_err(setup("agent restart"))?;
                agent_join = join;
                println!("{}  ---- agent back: reading the gap back from the server's history ----", clock());
            }
            msg = watcher.rx.recv() => {
                let Some((topic, payload)) = msg else { break };
                show(&mut tracker, &mut host, &topic, &payload);
            }
        }
    }
    if let Some(t) = outage_task {
        t.abort();
    }
    ask_task.abort();
    proxy.restore();
    agent_cancel.cancel();
    let _ = agent_join.await;
    // Collect what the clean shutdown published (offline status).
    while let Ok(Some((topic, payload))) =
        tokio::time::timeout(Duration::from_millis(500), watcher.rx.recv()).await
    {
        show(&mut tracker, &mut host, &topic, &payload);
    }
    deltav.shutdown().await;
    optomes.shutdown().await;
    Ok(summarize(&tracker, sparkplug.then_some(&host)))
}

/// Prints one message as it arrives and counts its records.
fn show(
    tracker: &mut SeqTracker,
    host: &mut sparkplug_host::HostView,
    topic: &str,
    payload: &[u8],
) {
    if topic.starts_with(crate::sparkplug::topics::NAMESPACE) {
        host.show(tracker, topic, payload);
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        println!("{}  (unparsable message on {topic})", clock());
        return;
    };
    if topic.contains("/data/") || topic.contains("/events/") {
        tracker.see_payload(&v);
    }
    println!("{}  {}", clock(), describe(topic, &v));
}

/// `--outage`: cuts the broker a third of the way in (or after 5 s without
/// `--duration`) for `len`, printing the backlog on disk meanwhile.
fn spawn_outage(
    opts: &DemoOptions,
    len: Duration,
    proxy: Arc<CutProxy>,
    buffer: crate::buffer::BufferHandle,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let at = opts
        .duration
        .map(|d| d / 3)
        .unwrap_or(Duration::from_secs(5));
    tokio::spawn(async move {
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(at) => {} }
        println!(
            "{}  ---- outage: broker cut for {} s ----",
            clock(),
            len.as_secs()
        );
        proxy.cut();
        let end = tokio::time::Instant::now() + len;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while tokio::time::Instant::now() < end {
            tokio::select! { _ = cancel.cancelled() => break, _ = tick.tick() => {} }
            if let Ok(st) = buffer.stats().await {
                println!(
                    "{}  buffer   {} records waiting on disk ({} bytes)",
                    clock(),
                    st.records,
                    st.bytes
                );
            }
        }
        proxy.restore();
        println!("{}  ---- broker back: draining the backlog ----", clock());
    })
}

/// The consumer's backup path (docs/mqtt.md, replay): once the outage is
/// over (or halfway through a demo without one), the watcher "loses" 50
/// tag records it already had and asks the agent for them again; they
/// come back with `"replay": true`, then the answer.
fn spawn_replay_ask(
    opts: &DemoOptions,
    publisher: rumqttc::AsyncClient,
    buffer: crate::buffer::BufferHandle,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let at = match (opts.outage, opts.duration) {
        (Some(len), Some(d)) => d / 3 + len + Duration::from_secs(3),
        (Some(len), None) => Duration::from_secs(5) + len + Duration::from_secs(3),
        (None, Some(d)) => d / 2,
        (None, None) => Duration::from_secs(10),
    };
    tokio::spawn(async move {
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(at) => {} }
        let Ok(stats) = buffer.stats().await else {
            return;
        };
        let stream = crate::record::StreamKey::new(DEMO_CONNECTION, crate::record::Kind::Tag);
        let Some(last) = stats
            .streams
            .iter()
            .find(|s| s.stream() == stream)
            .map(|s| s.next_seq.saturating_sub(1))
            .filter(|last| *last > 60)
        else {
            return;
        };
        let (from, to) = (last - 59, last - 10);
        println!(
            "{}  ---- consumer: pretends it lost {DEMO_CONNECTION}/tag seq {from}..{to} and asks for it again ----",
            clock()
        );
        let request = serde_json::json!({
            "request_id": "demo-1",
            "connection": DEMO_CONNECTION,
            "kind": "tag",
            "epoch": buffer.epoch().to_string(),
            "from_seq": from,
            "to_seq": to,
        });
        let topic = format!("{DEMO_ROOT}/commands/replay");
        if let Err(e) = publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, request.to_string())
            .await
        {
            println!("{}  (could not send the replay request: {e})", clock());
        }
    })
}

/// The closing line the CI checks: records, duplicates, seq gaps.
fn summarize(tracker: &SeqTracker, host: Option<&sparkplug_host::HostView>) -> DemoSummary {
    println!();
    println!(
        "summary: {} records received, {} duplicates dropped, {} seq gaps{}",
        tracker.received,
        tracker.duplicates,
        tracker.gaps,
        if tracker.gaps == 0 {
            " (nothing lost)"
        } else {
            ""
        }
    );
    for g in &tracker.gap_details {
        println!("  gap {g}");
    }
    if tracker.replayed > 0 {
        println!(
            "replay: {} records came again on request (\"replay\": true), apart from the live ones",
            tracker.replayed
        );
    }
    if let Some(h) = host {
        println!(
            "sparkplug: {} messages decoded, {} BIRTH certificates, {} seq breaks",
            h.messages, h.births, h.seq_errors
        );
    }
    DemoSummary {
        received: tracker.received,
        duplicates: tracker.duplicates,
        gaps: tracker.gaps,
        replayed: tracker.replayed,
        sparkplug_messages: host.map_or(0, |h| h.messages),
        sparkplug_births: host.map_or(0, |h| h.births),
        sparkplug_seq_errors: host.map_or(0, |h| h.seq_errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_duplicates_and_gaps() {
        let mut t = SeqTracker::default();
        assert!(t.see("c", "tag", "e", 1));
        assert!(t.see("c", "tag", "e", 2));
        assert!(!t.see("c", "tag", "e", 2));
        assert!(t.see("c", "tag", "e", 5));
        assert!(t.see("c", "batch", "e", 1));
        assert_eq!((t.received, t.duplicates, t.gaps), (4, 1, 1));
        assert_eq!(t.last_seq("c", "tag"), Some(5));
    }

    #[test]
    fn describes_data_messages() {
        let v: Value = serde_json::json!({"records":[
            {"seq":3,"data":{"name":"A","value":1.234,"quality":"good"}},
            {"seq":4,"data":{"name":"A","value":2.0,"quality":"bad"}}]});
        let line = describe("plantgate/site/gw/data/conn/tag", &v);
        assert!(
            line.contains("conn/tag seq 3..4 (2 records) A=2.00!"),
            "{line}"
        );
    }

    #[test]
    fn describes_derived_records_as_rows() {
        let v: Value = serde_json::json!({"records":[
            {"seq":7,"data":{"unit":"REACTOR_101","batch_id":"B1","recipe":"R","phase":"HEAT",
             "state":"RUNNING","fail_index":0,"event":"phase_changed"}}]});
        let line = describe("plantgate/site/gw/data/dv/batch", &v);
        assert!(line.contains("batch    dv #7 REACTOR_101"), "{line}");
        assert!(
            line.contains("phase_changed") && line.contains("HEAT"),
            "{line}"
        );
        let v: Value = serde_json::json!({"records":[
            {"seq":2,"data":{"work_center":"LINE_A_FILLER","window_start":"2026-11-22T10:00:00.000Z",
             "window_end":"2026-11-22T10:00:15.000Z","state":"RUNNING","good_count":40,
             "reject_count":2,"availability":1.0,"performance":0.5,"quality":null,"oee":null,
             "complete":false}}]});
        let line = describe("plantgate/site/gw/data/om/oee", &v);
        assert!(line.contains("10:00:00-10:00:15"), "{line}");
        assert!(
            line.contains("100.0%") && line.contains("(partial)"),
            "{line}"
        );
    }
}
