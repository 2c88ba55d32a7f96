//! The demo's consumer in Sparkplug mode (`plantgate demo --format
//! sparkplug_b`): a host application's view of the edge node. It decodes
//! every payload, resolves aliases to the names of the last BIRTH, checks
//! the message `seq`, and feeds each record's `epoch`/`seq` properties to
//! the same [`SeqTracker`] as the JSON view.

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use serde_json::Value;

use super::{clock, derived_line, SeqTracker};
use crate::sparkplug::proto::{Metric, MetricValue, Payload, PropertyValueKind};

/// What a host application keeps per edge node.
#[derive(Default)]
pub struct HostView {
    /// Per device ("" for the node): alias → metric name, from its last
    /// BIRTH.
    names: HashMap<String, HashMap<u64, String>>,
    /// The `seq` of the last message, for the 0–255 sequence check.
    last_seq: Option<u64>,
    pub messages: u64,
    pub seq_errors: u64,
    pub births: u64,
}

impl HostView {
    /// Prints one message and counts its records.
    pub fn show(&mut self, tracker: &mut SeqTracker, topic: &str, body: &[u8]) {
        let segs: Vec<&str> = topic.split('/').collect();
        let (Some(message_type), device) = (segs.get(2).copied(), segs.get(4).copied()) else {
            return;
        };
        let Ok(p) = Payload::decode(body) else {
            println!("{}  (undecodable Sparkplug payload on {topic})", clock());
            return;
        };
        self.messages += 1;
        self.check_seq(message_type, &p);
        let device_key = device.unwrap_or("").to_string();
        let line = match message_type {
            "NBIRTH" | "DBIRTH" => {
                self.births += 1;
                let names = self.names.entry(device_key).or_default();
                names.clear();
                for m in &p.metrics {
                    if let (Some(n), Some(a)) = (&m.name, m.alias) {
                        names.insert(a, n.clone());
                    }
                }
                birth_line(message_type, device, &p)
            }
            "NDEATH" => format!("ndeath   bdSeq {}", metric_text(p.metrics.first())),
            "DDEATH" => format!("ddeath   {}", device.unwrap_or("?")),
            "NDATA" | "DDATA" => self.data_lines(tracker, device, &p),
            other => format!("{}  {other} on {topic}", "other   "),
        };
        println!("{}  {line}", clock());
    }

    fn check_seq(&mut self, message_type: &str, p: &Payload) {
        let Some(seq) = p.seq else { return };
        if message_type != "NBIRTH" {
            if let Some(last) = self.last_seq {
                if seq != (last + 1) % 256 {
                    self.seq_errors += 1;
                    println!("{}  !! Sparkplug seq {seq} after {last}", clock());
                }
            }
        }
        self.last_seq = Some(seq);
    }

    /// NDATA / DDATA: derived records as table rows, tags as one line,
    /// events, and the node's status.
    fn data_lines(
        &mut self,
        tracker: &mut SeqTracker,
        device: Option<&str>,
        p: &Payload,
    ) -> String {
        let names = self
            .names
            .get(device.unwrap_or(""))
            .cloned()
            .unwrap_or_default();
        let name_of = |m: &Metric| {
            m.alias
                .and_then(|a| names.get(&a).cloned())
                .or_else(|| m.name.clone())
                .unwrap_or_else(|| "?".into())
        };
        let conn = device.unwrap_or("");
        let mut rows = Vec::new();
        let mut tags: BTreeMap<String, String> = BTreeMap::new();
        let mut seqs = Vec::new();
        let mut status: BTreeMap<String, String> = BTreeMap::new();
        let (mut replay, mut historical) = (false, false);
        for m in &p.metrics {
            let name = name_of(m);
            let props = m.properties.as_ref();
            let prop_str = |k: &str| match props.and_then(|ps| ps.get(k)) {
                Some(PropertyValueKind::String(s)) => s.clone(),
                _ => String::new(),
            };
            let seq = match props.and_then(|ps| ps.get("seq")) {
                Some(PropertyValueKind::Long(s)) => Some(*s),
                _ => None,
            };
            let is_replay = props.and_then(|ps| ps.get("replay")).is_some();
            replay |= is_replay;
            historical |= m.is_historical == Some(true);
            let kind = match name.as_str() {
                "batch" | "recipe" | "oee" | "downtime" => name.as_str(),
                "event" => "event",
                _ => "tag",
            };
            let Some(seq) = seq else {
                // A node status metric.
                status.insert(name.clone(), metric_text(Some(m)));
                continue;
            };
            if is_replay {
                tracker.replayed += 1;
            } else {
                let connection = if kind == "event" {
                    prop_str("connection")
                } else {
                    conn.to_string()
                };
                tracker.see(&connection, kind, &prop_str("epoch"), seq);
            }
            seqs.push(seq);
            match kind {
                "tag" => {
                    let good = props.and_then(|ps| ps.get("Quality")).is_none();
                    let mark = if good { "" } else { "!" };
                    tags.insert(name, format!("{}{mark}", metric_text(Some(m))));
                }
                "event" => {
                    let json: Value = match &m.value {
                        Some(MetricValue::String(s)) => serde_json::from_str(s).unwrap_or_default(),
                        _ => Value::Null,
                    };
                    let about = json["connection"].as_str().unwrap_or("(agent)");
                    rows.push(format!(
                        "event    {} {about} seq {seq} {}",
                        json["type"].as_str().unwrap_or("?"),
                        json["details"]
                    ));
                }
                kind => {
                    let data: Value = match &m.value {
                        Some(MetricValue::String(s)) => serde_json::from_str(s).unwrap_or_default(),
                        _ => Value::Null,
                    };
                    rows.push(derived_line(conn, kind, seq, &data));
                }
            }
        }
        let label = match (replay, historical) {
            (true, _) => "replay  ",
            (false, true) => "history ",
            _ => "ddata   ",
        };
        if !tags.is_empty() {
            let values: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let (first, last) = (seqs.iter().min(), seqs.iter().max());
            rows.push(format!(
                "{label} {conn}/tag seq {}..{} ({} records) {}",
                first.copied().unwrap_or(0),
                last.copied().unwrap_or(0),
                seqs.len(),
                values.join("  ")
            ));
        }
        if !status.is_empty() {
            rows.push(format!(
                "ndata    status: buffer {} records, published {}",
                status
                    .get("Status/buffer/records")
                    .map_or("?", String::as_str),
                status
                    .get("Status/published_records_total")
                    .map_or("?", String::as_str),
            ));
        }
        // Continuation lines align under the first (after the clock).
        rows.join("\n              ")
    }
}

fn birth_line(message_type: &str, device: Option<&str>, p: &Payload) -> String {
    match message_type {
        "NBIRTH" => {
            let bd = p
                .metrics
                .iter()
                .find(|m| m.name.as_deref() == Some("bdSeq"));
            format!(
                "nbirth   edge node born: bdSeq {}, {} metrics (Node Control/Rebirth, event, Status/...)",
                metric_text(bd),
                p.metrics.len()
            )
        }
        _ => {
            let names: Vec<String> = p
                .metrics
                .iter()
                .filter_map(|m| {
                    let dt = m
                        .datatype
                        .and_then(crate::sparkplug::proto::DataType::from_code)
                        .map_or("?", |d| d.name());
                    m.name.as_ref().map(|n| format!("{n}:{dt}"))
                })
                .collect();
            format!(
                "dbirth   {} born with {} metrics: {}",
                device.unwrap_or("?"),
                names.len(),
                names.join(" ")
            )
        }
    }
}

/// A metric's value as short text (null for none).
fn metric_text(m: Option<&Metric>) -> String {
    match m.and_then(|m| m.value.as_ref()) {
        None => "null".into(),
        Some(MetricValue::Double(f)) => format!("{f:.2}"),
        Some(MetricValue::Float(f)) => format!("{f:.2}"),
        Some(MetricValue::Int(i)) => {
            // Int8/16/32 travel in two's complement.
            let signed = matches!(m.and_then(|m| m.datatype), Some(1..=3));
            if signed {
                (*i as i32).to_string()
            } else {
                i.to_string()
            }
        }
        Some(MetricValue::Long(l)) => l.to_string(),
        Some(MetricValue::Boolean(b)) => b.to_string(),
        Some(MetricValue::String(s)) => s.clone(),
        Some(MetricValue::Bytes(b)) => format!("{} bytes", b.len()),
    }
}
