//! Sparkplug B (`mqtt.format = "sparkplug_b"`, docs/sparkplug.md) through a
//! real mosquitto, every message decoded by an independent implementation:
//! Eclipse Tahu's payload codec (npm `sparkplug-payload`, run by node from
//! `tests/sparkplug/tahu.js`). Checked: every BIRTH, DATA and DEATH decodes,
//! aliases resolve to the names of the last BIRTH, datatypes are the OPC UA
//! types mapped, `seq` runs 0–255 and wraps, `bdSeq` of the NDEATH matches
//! the NBIRTH and goes on across restarts, backlog data is historical, a
//! rebirth request is served and writes are refused; MQTT 3.1.1 and 5.
//! Needs mosquitto and node; `.ci/run` installs both (and the codec) and
//! runs these.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::load::{buffer_state, load_toml};
use common::mosquitto::{start_mosquitto, Mosquitto};
use common::*;
use plantgate::sim::broker::TestPki;
use plantgate::sparkplug::proto::Payload;
use prost::Message as _;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

const UNIT: &str = "REACTOR_101";
const NODE: &str = "spBv1.0/test-site/NBIRTH/test-gw";

/// Every Sparkplug message the subscriber saw, in arrival order.
type Log = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A host application's view: subscribed to `spBv1.0/#` (again after every
/// reconnect: a broker restart forgets clean sessions), and able to send
/// commands.
struct Host {
    client: rumqttc::v5::AsyncClient,
    log: Log,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Host {
    async fn connect(addr: SocketAddr, ca: &Path) -> Host {
        let o = common::mosquitto::mqtt5_options("host", addr, ca);
        let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 100);
        let log: Log = Arc::default();
        let keep = log.clone();
        let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe("spBv1.0/#", QoS::AtLeastOnce);
                        // Replay results (JSON, docs/mqtt.md).
                        let _ = sub.try_subscribe("plantgate/#", QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        if let Ok(mut log) = keep.lock() {
                            log.push((topic, p.payload.to_vec()));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for _ in 0..2 {
            tokio::time::timeout(PATIENCE, sub_rx.recv())
                .await
                .expect("SUBACK in time");
        }
        Host { client, log, task }
    }

    /// The Sparkplug messages so far.
    fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.log
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(t, _)| t.starts_with("spBv1.0/"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The JSON messages on `topic` so far.
    fn json_on(&self, topic: &str) -> Vec<Value> {
        self.log
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(t, _)| t == topic)
                    .filter_map(|(_, b)| serde_json::from_slice(b).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `cond` holds on the messages so far, decoded with
    /// plantgate's own codec (the assertions use Tahu's).
    async fn until(&self, what: &str, cond: impl Fn(&[(String, Payload)]) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            let decoded: Vec<(String, Payload)> = self
                .messages()
                .into_iter()
                .map(|(t, b)| (t, Payload::decode(b.as_slice()).unwrap_or_default()))
                .collect();
            if cond(&decoded) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; saw {} messages",
                decoded.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn command(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish command");
    }
}

/// Runs Tahu's codec: `mode` is "decode" or "encode".
fn tahu(mode: &str, input: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug");
    assert!(
        dir.join("node_modules/sparkplug-payload").exists(),
        "Tahu's codec is missing: run `npm ci --prefix tests/sparkplug` (.ci/run does)"
    );
    let mut child = std::process::Command::new("node")
        .arg(dir.join("tahu.js"))
        .arg(mode)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node (apt-get install nodejs)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to node");
    let out = child.wait_with_output().expect("node runs");
    assert!(out.status.success(), "tahu.js {mode} failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Every message as Tahu decodes it: (topic, payload).
fn tahu_decode(messages: &[(String, Vec<u8>)]) -> Vec<(String, Value)> {
    let input: String = messages
        .iter()
        .map(|(t, b)| format!("{}\n", json!({"topic": t, "payload": hex(b)})))
        .collect();
    let decoded: Vec<(String, Value)> = tahu("decode", &input)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("tahu.js prints JSON");
            (
                v["topic"].as_str().unwrap_or("").to_string(),
                v["payload"].clone(),
            )
        })
        .collect();
    assert_eq!(
        decoded.len(),
        messages.len(),
        "one decoded line per message"
    );
    for (topic, p) in &decoded {
        assert!(p.get("decode_error").is_none(), "{topic}: {p}");
    }
    decoded
}

/// A payload encoded by Tahu (the command a host application sends).
fn tahu_encode(payload: Value) -> Vec<u8> {
    let text = tahu("encode", &payload.to_string());
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex from tahu.js"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 64-bit value as Tahu prints it (a decimal string) or a plain number.
fn num(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

fn metric<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no metric {name} in {p}"))
}

/// The last seq assigned to the tag stream of `dv`, from the buffer file
/// (WAL: readable while the agent writes).
fn last_tag_seq(data_dir: &Path) -> u64 {
    let store = plantgate::buffer::Store::open(
        &data_dir.join("buffer.db"),
        plantgate::buffer::StoreOptions::default(),
    )
    .expect("open buffer");
    let st = store.stats().expect("stats");
    st.streams
        .iter()
        .find(|s| s.connection == "dv" && s.kind == plantgate::record::Kind::Tag)
        .map_or(0, |s| s.next_seq - 1)
}

fn message_type(topic: &str) -> &str {
    topic.split('/').nth(2).unwrap_or("")
}

struct Setup {
    dir: tempfile::TempDir,
    /// None while it restarts.
    sim: Option<plantgate::sim::SimServer>,
    pki: TestPki,
    mosq: Mosquitto,
    data_dir: PathBuf,
}

/// The DeltaV simulator (frozen batch cycle) with five load tags at 10 Hz,
/// listening on `listen` (so a restart comes back on the same address).
async fn load_sim_at(dir: &Path, listen: SocketAddr) -> plantgate::sim::SimServer {
    let mut opts = plantgate::sim::SimOptions::new(dir.join("sim-pki"));
    opts.speed = 0.0;
    opts.tags = 5;
    opts.rate_hz = 10.0;
    opts.listen = listen;
    plantgate::sim::start_deltav(opts, Default::default())
        .await
        .expect("simulator")
}

async fn setup() -> Setup {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = plantgate::sim::broker::free_port().expect("a free port");
    let sim = load_sim_at(dir.path(), SocketAddr::from(([127, 0, 0, 1], port))).await;
    let pki = TestPki::generate().expect("pki");
    let mosq = start_mosquitto(&pki, Default::default());
    let data_dir = dir.path().join("agent");
    Setup {
        dir,
        sim: Some(sim),
        pki,
        mosq,
        data_dir,
    }
}

/// A DeltaV connection `dv` in Sparkplug mode: the unit's batches, five
/// load tags (Double), FAIL_INDEX (Int32), BSTATUS (String) and a node the
/// server does not have (bad, null).
fn sparkplug_toml(s: &Setup, protocol: &str, heartbeat: &str) -> String {
    let sim = s.sim.as_ref().expect("the simulator");
    let ns = sim.namespace_uri();
    let mut toml = load_toml(&s.data_dir, s.mosq.tls, &s.pki.ca_file, protocol, sim, 5)
        .replace("id = \"sim1\"", "id = \"dv\"")
        .replace("kind = \"generic\"", "kind = \"deltav\"")
        .replace(
            "heartbeat_interval = \"1s\"",
            &format!("heartbeat_interval = \"{heartbeat}\"\nformat = \"sparkplug_b\""),
        );
    toml.push_str(&format!(
        "\n[[connections.tags]]\nname = \"FAIL\"\nnode = \"nsu={ns};s={UNIT}/FAIL_INDEX.CV\"\n\
         \n[[connections.tags]]\nname = \"STATUS\"\nnode = \"nsu={ns};s={UNIT}/BSTATUS.CV\"\n\
         \n[[connections.tags]]\nname = \"MISSING\"\nnode = \"nsu={ns};s=NO/SUCH.CV\"\n"
    ));
    // The profile's keys after the tags would land in the last tag table.
    toml.replace(
        "reconnect_max = \"1s\"\n\n[[connections.tags]]",
        &format!(
            "reconnect_max = \"1s\"\nnode_template = \"nsu={ns};s={{unit}}/{{param}}.CV\"\n\
             [[connections.units]]\nname = \"{UNIT}\"\nrecipe_parameters = [\"CHARGE_AMT\"]\n\n[[connections.tags]]"
        ),
    )
}

/// What a host application learns from a session's messages, checked
/// message by message against the specification.
#[derive(Default)]
struct Session {
    /// alias -> (name, datatype) per device (None: the node), from the
    /// last BIRTH.
    aliases: HashMap<Option<String>, HashMap<u64, (String, String)>>,
    nbirths: Vec<Value>,
    dbirths: Vec<Value>,
    ddata: Vec<Value>,
    /// (metric name, metric) of every device data metric, live ones and
    /// those sent again on request.
    values: Vec<(String, Value)>,
    replayed: Vec<(String, Value)>,
    /// Seqs wrapped from 255 to 0 without a NBIRTH between.
    wrapped: bool,
    /// bdSeq of every NBIRTH and NDEATH, in order.
    bd_seqs: Vec<(String, u64)>,
}

impl Session {
    fn check(decoded: &[(String, Value)]) -> Session {
        let mut s = Session::default();
        let mut last_seq: Option<u64> = None;
        for (topic, p) in decoded {
            let kind = message_type(topic);
            let device = topic.split('/').nth(4).map(str::to_string);
            if kind == "NDEATH" {
                assert!(
                    p.get("seq").is_none() || p["seq"].is_null(),
                    "NDEATH has no seq: {p}"
                );
                s.bd_seqs
                    .push((kind.into(), num(&metric(p, "bdSeq")["value"])));
                continue;
            }
            if kind == "NCMD" || kind == "DCMD" {
                continue;
            }
            let seq = num(&p["seq"]);
            assert!(seq <= 255, "{topic}: seq {seq}");
            if kind == "NBIRTH" {
                assert_eq!(seq, 0, "NBIRTH starts at seq 0: {p}");
                s.bd_seqs
                    .push((kind.into(), num(&metric(p, "bdSeq")["value"])));
                assert_eq!(metric(p, "Node Control/Rebirth")["value"], false);
                s.aliases.clear();
                s.nbirths.push(p.clone());
            } else if let Some(prev) = last_seq {
                assert_eq!(seq, (prev + 1) % 256, "{topic}: seq after {prev}");
                if seq == 0 {
                    s.wrapped = true;
                }
            }
            last_seq = Some(seq);
            let declared = s.aliases.entry(device.clone()).or_default();
            if kind.ends_with("BIRTH") {
                declared.clear();
                for m in p["metrics"].as_array().into_iter().flatten() {
                    let (Some(name), Some(alias)) = (m["name"].as_str(), m.get("alias")) else {
                        continue;
                    };
                    let dt = m["type"].as_str().unwrap_or("").to_string();
                    declared.insert(num(alias), (name.to_string(), dt));
                }
                if kind == "DBIRTH" {
                    s.dbirths.push(p.clone());
                }
                continue;
            }
            if kind == "DDEATH" {
                continue;
            }
            // NDATA and DDATA: every metric by an alias the last BIRTH
            // declared, with the same datatype.
            for m in p["metrics"].as_array().into_iter().flatten() {
                let alias = num(&m["alias"]);
                let (name, dt) = declared
                    .get(&alias)
                    .unwrap_or_else(|| panic!("{topic}: alias {alias} not in the last BIRTH: {p}"));
                assert_eq!(m["type"].as_str(), Some(dt.as_str()), "{topic}: {name}");
                if kind == "DDATA" {
                    let props = &m["properties"];
                    assert_eq!(props["epoch"]["type"], "String", "{m}");
                    assert_eq!(props["seq"]["type"], "UInt64", "{m}");
                    if props["replay"]["value"] == true {
                        assert_eq!(m["isHistorical"], true, "a replayed value is history: {m}");
                        s.replayed.push((name.clone(), m.clone()));
                    } else {
                        s.values.push((name.clone(), m.clone()));
                    }
                }
            }
            if kind == "DDATA" {
                s.ddata.push(p.clone());
            }
        }
        s
    }

    /// The record seqs of the device's tag stream, in arrival order.
    fn tag_seqs(&self) -> Vec<u64> {
        self.values
            .iter()
            .filter(|(name, _)| !["batch", "recipe"].contains(&name.as_str()))
            .map(|(_, m)| num(&m["properties"]["seq"]["value"]))
            .collect()
    }
}

/// One live session: births, data of every kind, seq wrap, rebirth,
/// refused commands, clean shutdown; all decoded by Tahu.
async fn births_data_rebirth_and_death(protocol: &str) {
    let s = setup().await;
    let host = Host::connect(s.mosq.tls, &s.pki.ca_file).await;
    let units = s
        .sim
        .as_ref()
        .and_then(|sim| sim.deltav_units())
        .expect("deltav units");
    units.take_over(UNIT).expect("script the unit");
    let toml = sparkplug_toml(&s, protocol, "20ms");
    let agent = run_agent(&toml).await;

    // Every tag declared (the missing one too, as a null) and its data.
    host.until("a DBIRTH declaring every tag", |m| {
        m.iter().any(|(t, p)| {
            message_type(t) == "DBIRTH"
                && ["L00000", "FAIL", "STATUS", "MISSING"]
                    .iter()
                    .all(|n| p.metrics.iter().any(|x| x.name.as_deref() == Some(*n)))
        })
    })
    .await;
    units
        .start_batch(UNIT, "B-42", "PVC-STD", &[("CHARGE_AMT", 1200.0)], None)
        .expect("start batch");
    // More than 256 messages: seq wraps (heartbeats every 20 ms help).
    host.until("batch and recipe data, and 300 messages", |m| {
        m.len() > 300 && m.iter().filter(|(t, _)| message_type(t) == "DDATA").count() > 3
    })
    .await;
    host.until("the batch metric", |m| {
        m.iter().any(|(t, p)| {
            message_type(t) == "DDATA"
                && p.metrics.iter().any(|x| {
                    matches!(&x.value, Some(plantgate::sparkplug::proto::MetricValue::String(v)) if v.contains("batch_started"))
                })
        })
    })
    .await;

    // A host application asks for a rebirth, and tries to write.
    let before = host.messages().len();
    let rebirth = tahu_encode(json!({"timestamp": 1, "metrics": [
        {"name": "Node Control/Rebirth", "type": "Boolean", "value": true}]}));
    host.command("spBv1.0/test-site/NCMD/test-gw", rebirth)
        .await;
    let write = tahu_encode(json!({"timestamp": 1, "metrics": [
        {"name": "FAIL", "type": "Int32", "value": 5}]}));
    host.command("spBv1.0/test-site/DCMD/test-gw/dv", write)
        .await;
    host.until("a second NBIRTH and DBIRTH", |m| {
        m[before.min(m.len())..].iter().any(|(t, _)| t == NODE)
            && m[before.min(m.len())..]
                .iter()
                .any(|(t, _)| message_type(t) == "DBIRTH")
    })
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while agent
        .board
        .mqtt()
        .sparkplug
        .as_ref()
        .map(|sp| sp.commands_refused_total)
        != Some(1)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the DCMD was not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sp = agent
        .board
        .mqtt()
        .sparkplug
        .clone()
        .expect("sparkplug status");
    assert_eq!(sp.rebirths_total, 1);

    // Replay works in Sparkplug too: the range comes back as DDATA with
    // the `replay` property, the answer in JSON as always.
    let epoch = agent.buffer.epoch().to_string();
    let request = json!({"request_id": "sp-1", "connection": "dv", "kind": "tag",
        "epoch": epoch, "from_seq": 1, "to_seq": 10});
    host.command(
        "plantgate/test-site/test-gw/commands/replay",
        request.to_string().into_bytes(),
    )
    .await;
    let results = "plantgate/test-site/test-gw/commands/replay/result";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while host.json_on(results).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no replay result");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = &host.json_on(results)[0];
    assert_eq!(result["replayed"], 10, "{result}");
    assert_eq!(result["error"], Value::Null, "{result}");
    assert_eq!(
        units.current(UNIT).expect("unit").fail_index,
        0,
        "nothing written to the plant"
    );

    agent.stop().await;
    host.until("DDEATH and NDEATH", |m| {
        m.iter().any(|(t, _)| message_type(t) == "DDEATH")
            && m.iter().any(|(t, _)| message_type(t) == "NDEATH")
    })
    .await;

    let decoded = tahu_decode(&host.messages());
    let session = Session::check(&decoded);
    assert!(session.wrapped, "seq wrapped from 255 to 0");
    assert_eq!(session.nbirths.len(), 2, "the first NBIRTH and the rebirth");
    let bd: BTreeSet<u64> = session.bd_seqs.iter().map(|(_, b)| *b).collect();
    assert_eq!(
        bd.len(),
        1,
        "NBIRTHs and the NDEATH share one bdSeq: {:?}",
        session.bd_seqs
    );
    assert_eq!(
        session.bd_seqs.last().map(|(k, _)| k.as_str()),
        Some("NDEATH")
    );

    // Datatypes as the OPC UA types map, across all births.
    let dbirth = session.dbirths.last().expect("a DBIRTH");
    for (name, dt) in [
        ("L00000", "Double"),
        ("FAIL", "Int32"),
        ("STATUS", "String"),
        ("batch", "String"),
        ("recipe", "String"),
    ] {
        assert_eq!(metric(dbirth, name)["type"], dt, "{name}");
    }
    // The missing node: null with a Bad quality, as Ignition reads it.
    let missing: Vec<&Value> = session
        .values
        .iter()
        .filter(|(n, _)| n == "MISSING")
        .map(|(_, m)| m)
        .collect();
    assert!(!missing.is_empty(), "the bad tag's record arrived");
    for m in missing {
        // Tahu reads is_null as a null value.
        assert_eq!(m["value"], Value::Null, "{m}");
        assert_eq!(m["properties"]["Quality"]["value"], 0, "{m}");
        assert_eq!(
            m["properties"]["status"]["value"], "BadNodeIdUnknown",
            "{m}"
        );
    }
    // The record seqs of the tag stream: each once, no gap, live (not
    // historical).
    let seqs = session.tag_seqs();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "no record twice in one session");
    let (first, last) = (
        *unique.first().expect("tag records"),
        *unique.last().expect("tag records"),
    );
    assert_eq!(
        unique.len() as u64,
        last - first + 1,
        "no gap in the tag stream"
    );
    assert!(session
        .values
        .iter()
        .all(|(_, m)| m.get("isHistorical") != Some(&Value::Bool(true))));
    let batch = session
        .values
        .iter()
        .find(|(n, _)| n == "batch")
        .map(|(_, m)| m["value"].as_str().unwrap_or(""))
        .expect("a batch metric");
    let batch: Value = serde_json::from_str(batch).expect("the batch record's JSON");
    assert_eq!(batch["event"], "batch_started");
    assert_eq!(batch["batch_id"], "B-42");
    let replayed: BTreeSet<u64> = session
        .replayed
        .iter()
        .map(|(_, m)| num(&m["properties"]["seq"]["value"]))
        .collect();
    assert_eq!(replayed, (1..=10).collect(), "the range asked for, again");

    if protocol == "v5" {
        // For the record: certificates and data as Tahu decodes them.
        // Of each type, the one declaring or carrying the most metrics.
        let show = |kind: &str| {
            decoded
                .iter()
                .filter(|(t, _)| message_type(t) == kind)
                .max_by_key(|(_, p)| p["metrics"].as_array().map_or(0, Vec::len))
                .map(|(t, p)| {
                    format!(
                        "{t}\n{}",
                        serde_json::to_string_pretty(p).unwrap_or_default()
                    )
                })
                .unwrap_or_default()
        };
        println!("{}\n{}\n{}", show("NBIRTH"), show("DBIRTH"), show("DDATA"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn births_data_rebirth_and_death_mqtt5() {
    births_data_rebirth_and_death("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn births_data_rebirth_and_death_mqtt311() {
    births_data_rebirth_and_death("v311").await;
}

/// The real binary: a broker outage leaves a backlog that goes out as
/// historical data after a new NBIRTH; the OPC UA server going away and
/// coming back gives the device's DDEATH and a new DBIRTH; SIGKILL makes
/// the broker publish the Will, an NDEATH with the NBIRTH's bdSeq; a
/// restart goes on with the next bdSeq, from the buffer file.
async fn backlog_device_life_and_the_will(protocol: &str) {
    let mut s = setup().await;
    let host = Host::connect(s.mosq.tls, &s.pki.ca_file).await;
    let config = write_file(
        s.dir.path(),
        "plantgate.toml",
        &sparkplug_toml(&s, protocol, "1s"),
    );
    let log = s.dir.path().join("agent.log");
    let mut agent = AgentProcess::start(&config, &log);
    let births = |m: &[(String, Payload)]| m.iter().filter(|(t, _)| t == NODE).count();
    host.until("NBIRTH and live DDATA", |m| {
        births(m) == 1 && m.iter().any(|(t, _)| message_type(t) == "DDATA")
    })
    .await;

    // Broker outage: records wait on disk.
    s.mosq.stop("KILL");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while buffer_state(&s.data_dir).0 < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backlog built up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog_last = last_tag_seq(&s.data_dir);
    s.mosq.restart();
    host.until("a second NBIRTH and the backlog delivered", |m| {
        births(m) == 2
    })
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while buffer_state(&s.data_dir).0 > 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog not delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The plant connection drops and comes back: DDEATH, then DBIRTH.
    let sim = s.sim.take().expect("the simulator");
    let listen: SocketAddr = sim
        .endpoint()
        .trim_start_matches("opc.tcp://")
        .trim_end_matches('/')
        .parse()
        .expect("the simulator's address");
    sim.shutdown().await;
    let dv = |kind: &str| format!("spBv1.0/test-site/{kind}/test-gw/dv");
    host.until("the device's DDEATH", |m| {
        m.iter().any(|(t, _)| *t == dv("DDEATH"))
    })
    .await;
    s.sim = Some(load_sim_at(s.dir.path(), listen).await);
    host.until("a DBIRTH after the DDEATH, then data", |m| {
        let Some(death) = m.iter().position(|(t, _)| *t == dv("DDEATH")) else {
            return false;
        };
        m[death..].iter().any(|(t, _)| *t == dv("DBIRTH"))
            && m[death..].iter().any(|(t, _)| *t == dv("DDATA"))
    })
    .await;

    // Killed: the broker publishes the Will.
    agent.signal("KILL");
    host.until("the NDEATH Will", |m| {
        m.iter().any(|(t, _)| message_type(t) == "NDEATH")
    })
    .await;
    let mut agent = AgentProcess::start(&config, &log);
    host.until("an NBIRTH after the restart", |m| births(m) == 3)
        .await;
    agent.signal("TERM");
    // The clean stop's NDEATH left before the process exited; it reaches
    // this subscriber a moment later.
    host.until("the clean stop's NDEATH", |m| {
        m.iter()
            .filter(|(t, _)| message_type(t) == "NDEATH")
            .count()
            == 2
    })
    .await;

    let decoded = tahu_decode(&host.messages());
    // No data of a dead device: between a DDEATH and the next DBIRTH.
    let mut dead = false;
    for (topic, _) in &decoded {
        match (message_type(topic), topic.ends_with("/dv")) {
            ("DDEATH", true) | ("NDEATH", _) => dead = true,
            ("DBIRTH", true) => dead = false,
            ("DDATA", true) => assert!(!dead, "DDATA of a dead device"),
            _ => {}
        }
    }
    let mut history: BTreeMap<u64, bool> = BTreeMap::new();
    let mut bd_seqs = Vec::new();
    let mut session = 0;
    for (topic, p) in &decoded {
        match message_type(topic) {
            "NBIRTH" => {
                session += 1;
                bd_seqs.push(("NBIRTH", num(&metric(p, "bdSeq")["value"])));
            }
            "NDEATH" => bd_seqs.push(("NDEATH", num(&metric(p, "bdSeq")["value"]))),
            "DDATA" if session == 2 => {
                for m in p["metrics"].as_array().into_iter().flatten() {
                    let seq = num(&m["properties"]["seq"]["value"]);
                    let historical = m["isHistorical"] == true;
                    history.entry(seq).or_insert(historical);
                }
            }
            _ => {}
        }
    }
    // bdSeq goes up by one with every CONNECT, failed ones during the
    // outage included (each registers a Will); the Will carries its
    // session's value; a restart goes on from the file, not from 0.
    let kinds: Vec<&str> = bd_seqs.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        ["NBIRTH", "NBIRTH", "NDEATH", "NBIRTH", "NDEATH"],
        "{bd_seqs:?}"
    );
    let after = |a: u64, b: u64| (1..=50).contains(&((b + 256 - a) % 256));
    let (b0, b1, b2) = (bd_seqs[0].1, bd_seqs[1].1, bd_seqs[3].1);
    assert!(after(b0, b1), "{bd_seqs:?}");
    assert_eq!(
        bd_seqs[2].1, b1,
        "the Will is the NDEATH of the session's NBIRTH"
    );
    assert!(
        after(b1, b2),
        "a restart goes on from the last bdSeq: {bd_seqs:?}"
    );
    assert_eq!(bd_seqs[4].1, b2, "the clean stop's NDEATH");
    println!("bdSeq: {bd_seqs:?}");
    // In the session after the outage: what was on disk is historical,
    // what came after is live.
    let old: Vec<u64> = history
        .iter()
        .filter(|(_, h)| **h)
        .map(|(s, _)| *s)
        .collect();
    let live: Vec<u64> = history
        .iter()
        .filter(|(_, h)| !**h)
        .map(|(s, _)| *s)
        .collect();
    let (Some(last_old), Some(first_live)) = (old.last(), live.first()) else {
        panic!("both historical and live data after the outage: {history:?}");
    };
    assert!(
        last_old < first_live,
        "historical data is the backlog found at connect, all of it before the live data: \
         historical up to {last_old}, live from {first_live}"
    );
    assert!(
        old.contains(&backlog_last),
        "the backlog's last record is historical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn backlog_device_life_and_the_will_follow_the_specification_mqtt5() {
    backlog_device_life_and_the_will("v5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn backlog_device_life_and_the_will_follow_the_specification_mqtt311() {
    backlog_device_life_and_the_will("v311").await;
}

/// Delivery guarantees in Sparkplug too: a record too large for any message
/// (here a 12 KB batch record under a 1 KiB `max_message_bytes`) goes to the
/// dead letters, announced by a `system.error` event (the node's `event`
/// metric); the records around it arrive, nothing oversized is published
/// and the session stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn a_record_too_large_is_dead_lettered_and_announced() {
    let s = setup().await;
    std::fs::create_dir_all(&s.data_dir).expect("data dir");
    {
        let batch = |n: &str, pad: usize| {
            plantgate::record::NewRecord {
            connection: "dv".into(),
            kind: plantgate::record::Kind::Batch,
            ts_ms: plantgate::record::now_ms(),
            data: json!({"unit": UNIT, "batch_id": n, "event": "batch_started", "pad": "x".repeat(pad)})
                .to_string(),
        }
        };
        let mut store = plantgate::buffer::Store::open(
            &s.data_dir.join("buffer.db"),
            plantgate::buffer::StoreOptions::default(),
        )
        .expect("buffer");
        let records = [batch("before", 0), batch("big", 12_000), batch("after", 0)];
        let seqs = store
            .append(plantgate::buffer::Append::records(&records))
            .expect("append")
            .seqs;
        assert_eq!(seqs, [1, 2, 3]);
    }
    let host = Host::connect(s.mosq.tls, &s.pki.ca_file).await;
    let toml = sparkplug_toml(&s, "v5", "1s")
        .replace("[mqtt]\n", "[mqtt]\nmax_message_bytes = \"1KiB\"\n");
    let agent = run_agent(&toml).await;
    let texts = |m: &[(String, Payload)]| -> Vec<String> {
        m.iter()
            .flat_map(|(_, p)| p.metrics.iter())
            .filter_map(|x| match &x.value {
                Some(plantgate::sparkplug::proto::MetricValue::String(v)) => Some(v.clone()),
                _ => None,
            })
            .collect()
    };
    host.until(
        "the batches around the big one, and the dead-letter notice",
        |m| {
            let t = texts(m);
            t.iter().any(|v| v.contains("\"after\""))
                && t.iter()
                    .any(|v| v.contains("records moved to dead letters"))
        },
    )
    .await;
    let decoded = tahu_decode(&host.messages());
    let session = Session::check(&decoded);
    let batches: Vec<String> = session
        .values
        .iter()
        .filter(|(n, _)| n == "batch")
        .map(|(_, m)| m["value"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        batches.iter().any(|b| b.contains("\"before\"")),
        "{batches:?}"
    );
    assert!(
        !batches.iter().any(|b| b.contains("\"big\"")),
        "the big one went out"
    );
    let largest = host
        .messages()
        .iter()
        .map(|(_, b)| b.len())
        .max()
        .unwrap_or(0);
    assert!(
        largest <= 1024,
        "a {largest}-byte payload under a 1 KiB cap"
    );
    let m = agent.board.mqtt();
    assert_eq!(m.dead_lettered_by_cause.get("too_large"), Some(&1), "{m:?}");
    assert_eq!(m.reconnects_total, 1, "the session stayed up: {m:?}");
    let sp = m.sparkplug.clone().expect("sparkplug status");
    assert_eq!(sp.births_not_sent_total, 0, "every BIRTH fit: {sp:?}");
    let dead = agent.buffer.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].first_seq, dead[0].count), (2, 1));
    agent.stop().await;
}

/// A DBIRTH too large for one message (60 tags under a 1 KiB
/// `max_message_bytes`) is not sent (the broker would drop the session):
/// counted in `/status`, logged and announced by a `system.error` event;
/// the data still flows and the session stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn a_birth_too_large_is_counted_and_announced() {
    let s = setup().await;
    let host = Host::connect(s.mosq.tls, &s.pki.ca_file).await;
    let ns = s
        .sim
        .as_ref()
        .expect("the simulator")
        .namespace_uri()
        .to_string();
    let mut toml = sparkplug_toml(&s, "v5", "1s")
        .replace("[mqtt]\n", "[mqtt]\nmax_message_bytes = \"1KiB\"\n");
    for i in 0..60 {
        toml.push_str(&format!(
            "\n[[connections.tags]]\nname = \"A-RATHER-LONG-TAG-NAME-{i:03}\"\nnode = \"nsu={ns};s={}\"\n",
            plantgate::sim::deltav::load_tag(i % 5)
        ));
    }
    let agent = run_agent(&toml).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while agent
        .board
        .mqtt()
        .sparkplug
        .as_ref()
        .map_or(0, |sp| sp.births_not_sent_total)
        == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "no BIRTH refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.until("the announcement and data", |m| {
        let texts: Vec<String> = m
            .iter()
            .flat_map(|(_, p)| p.metrics.iter())
            .filter_map(|x| match &x.value {
                Some(plantgate::sparkplug::proto::MetricValue::String(v)) => Some(v.clone()),
                _ => None,
            })
            .collect();
        texts.iter().any(|t| t.contains("sparkplug_birth_not_sent"))
            && m.iter().any(|(t, _)| message_type(t) == "DDATA")
    })
    .await;
    let largest = host
        .messages()
        .iter()
        .map(|(_, b)| b.len())
        .max()
        .unwrap_or(0);
    assert!(
        largest <= 1024,
        "a {largest}-byte payload under a 1 KiB cap"
    );
    assert_eq!(
        agent.board.mqtt().reconnects_total,
        1,
        "the session stayed up"
    );
    agent.stop().await;
}

/// A reload that adds a connection in Sparkplug mode: the edge node can
/// declare a device only in a birth, so the uplink reconnects: NDEATH with
/// the old bdSeq, then a new NBIRTH (with the new connection's status
/// metric) and the new device's DBIRTH and data. The untouched device's tag
/// stream goes on without a gap. Every message decoded by Tahu.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and node"]
async fn a_device_added_by_a_reload_is_declared_by_a_new_birth() {
    let s = setup().await;
    let host = Host::connect(s.mosq.tls, &s.pki.ca_file).await;
    let toml = sparkplug_toml(&s, "v5", "1s");
    let agent = run_agent(&toml).await;
    host.until("data of dv", |m| {
        m.iter()
            .filter(|(t, _)| t == "spBv1.0/test-site/DDATA/test-gw/dv")
            .count()
            > 5
    })
    .await;
    let sim = s.sim.as_ref().expect("the simulator");
    let added = format!(
        "{toml}\n[[connections]]\nid = \"gen\"\nkind = \"generic\"\nendpoint = \"{}\"\n\
         security_policy = \"None\"\nsecurity_mode = \"None\"\npublishing_interval = \"100ms\"\n\
         [[connections.tags]]\nname = \"GEN\"\nnode = \"nsu={};s={}\"\n",
        sim.endpoint(),
        sim.namespace_uri(),
        plantgate::sim::deltav::load_tag(0)
    );
    let outcome = agent.reload(Ok(load(&added))).await;
    assert!(outcome.applied, "{outcome:?}");
    assert_eq!(
        outcome.summary,
        "connection gen added; the uplink reconnects (Sparkplug devices changed)"
    );
    host.until("gen born and streaming, dv going on", |m| {
        let after_birth = m
            .iter()
            .rposition(|(t, _)| t == NODE)
            .map_or(&[][..], |i| &m[i..]);
        after_birth
            .iter()
            .filter(|(t, _)| t == "spBv1.0/test-site/DDATA/test-gw/gen")
            .count()
            > 3
            && after_birth
                .iter()
                .filter(|(t, _)| t == "spBv1.0/test-site/DDATA/test-gw/dv")
                .count()
                > 3
    })
    .await;
    agent.stop().await;
    host.until("the clean stop's NDEATH", |m| {
        m.iter()
            .filter(|(t, _)| message_type(t) == "NDEATH")
            .count()
            >= 2
    })
    .await;

    let decoded = tahu_decode(&host.messages());
    let session = Session::check(&decoded);
    let births: Vec<u64> = session.bd_seqs.iter().map(|(_, b)| *b).collect();
    let kinds: Vec<&str> = session.bd_seqs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["NBIRTH", "NDEATH", "NBIRTH", "NDEATH"],
        "{:?}",
        session.bd_seqs
    );
    assert_eq!(
        births[0], births[1],
        "the reload's NDEATH ends the first birth"
    );
    assert_eq!(births[2], births[3]);
    assert_ne!(births[0], births[2], "a new birth, a new bdSeq");
    let second = session.nbirths.last().expect("the second NBIRTH");
    assert_eq!(
        metric(second, "Status/connections/gen")["type"],
        "String",
        "{second}"
    );
    assert!(
        session.dbirths.iter().any(|p| p["metrics"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["name"] == "GEN"))),
        "gen's DBIRTH declares its tag"
    );
    // dv's tag stream: every seq from the first to the last, across the
    // reload (a record sent again after the reconnect may come twice).
    let seqs: BTreeSet<u64> = session
        .values
        .iter()
        .filter(|(name, _)| !["batch", "recipe", "GEN"].contains(&name.as_str()))
        .map(|(_, m)| num(&m["properties"]["seq"]["value"]))
        .collect();
    let (first, last) = (
        *seqs.first().expect("dv data"),
        *seqs.last().expect("dv data"),
    );
    assert_eq!(
        seqs.len() as u64,
        last - first + 1,
        "dv's tag seqs have a gap: {seqs:?}"
    );
}
