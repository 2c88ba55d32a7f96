//! The agent as a Sparkplug edge node (docs/sparkplug.md): what its BIRTH
//! and DEATH certificates hold, which alias and datatype each metric has,
//! and the message sequence number. Pure: the uplink decides when a message
//! goes out and publishes it; this only builds it.
//!
//! Invariants:
//! - Every data message refers only to metrics (by alias) that the last
//!   BIRTH of its node or device declared with the same datatype: a record
//!   that brings a new tag or a new type marks its device for a new DBIRTH
//!   ([`EdgeNode::needs_birth`]), which the uplink sends first.
//! - `seq` is given when a message is sealed, just before it is published,
//!   so a message built and then not sent (too large, dead-lettered) leaves
//!   no gap; NBIRTH is 0, every later message one more, modulo 256.
//! - Aliases are never reused within a process: a metric keeps its alias
//!   across sessions and births.

use std::collections::BTreeMap;

use prost::Message as _;

use super::metric::{self, data_metric, record_properties, TagMetric};
use super::proto::{DataType, Metric, MetricValue, Payload, PropertySet, PropertyValueKind};
use super::topics::SpTopics;
use crate::record::{Kind, StoredRecord};

/// `bdSeq`: in NBIRTH and in the NDEATH registered as the Last Will.
pub const BD_SEQ: &str = "bdSeq";
/// The node control a host application writes to ask for all BIRTHs again.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// The node metric that carries the agent's events (JSON, docs/mqtt.md).
pub const EVENT: &str = "event";

/// The node's status metrics, in alias order after [`REBIRTH`] and
/// [`EVENT`]; then one `Status/connections/{id}` per connection.
const STATUS: [(&str, DataType); 7] = [
    ("Status/version", DataType::String),
    ("Status/boot_id", DataType::String),
    ("Status/uptime_s", DataType::UInt64),
    ("Status/buffer/records", DataType::UInt64),
    ("Status/buffer/bytes", DataType::UInt64),
    ("Status/buffer/oldest_ts", DataType::DateTime),
    ("Status/published_records_total", DataType::UInt64),
];
const REBIRTH_ALIAS: u64 = 1;
const EVENT_ALIAS: u64 = 2;
const STATUS_ALIAS: u64 = 3;

/// A plant connection as a device: the metrics it is known to have before
/// any data, the derived records of its profile. Its tags are declared as
/// their first values arrive, since only a value tells their datatype.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    pub id: String,
    pub derived: Vec<Kind>,
}

/// The node's status metrics' values (what a JSON heartbeat carries).
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    pub ts_ms: i64,
    pub version: String,
    pub boot_id: String,
    pub uptime_s: u64,
    pub records: u64,
    pub bytes: u64,
    pub oldest_ts_ms: Option<i64>,
    pub published_records_total: u64,
    /// Each configured connection's state (`online`, `offline`, ...).
    pub connections: Vec<(String, String)>,
}

/// The Sparkplug message types plantgate sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    NBirth,
    NData,
    DBirth,
    DData,
    DDeath,
}

/// A message built but not yet numbered: [`EdgeNode::seal`] gives it its
/// `seq` when it is published.
#[derive(Debug, Clone)]
pub struct Draft {
    pub message_type: MessageType,
    pub topic: String,
    pub payload: Payload,
    /// BIRTH and DEATH certificates and the status NDATA go at QoS 0 as
    /// the specification asks (they describe the present and are sent
    /// again); records at QoS 1, so the buffer deletes them only on the
    /// broker's PUBACK.
    pub qos0: bool,
}

impl Draft {
    /// The size of the sealed payload, an upper bound (the `seq` field
    /// takes at most 3 bytes).
    pub fn sealed_len(&self) -> usize {
        self.payload.encoded_len() + 3
    }
}

#[derive(Debug, Clone)]
struct MetricDef {
    alias: u64,
    datatype: DataType,
    /// The last value built for it, for the next BIRTH, with the
    /// properties of its record (`epoch`, `seq`, quality).
    last: Option<Last>,
}

#[derive(Debug, Clone)]
struct Last {
    ts: u64,
    value: Option<MetricValue>,
    properties: PropertySet,
}

#[derive(Debug, Default)]
struct Device {
    /// By name, so a BIRTH lists them in a stable order.
    metrics: BTreeMap<String, MetricDef>,
    born: bool,
    /// A metric was added or changed its datatype since the last DBIRTH.
    stale: bool,
}

/// What a command from a host application asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// NCMD `Node Control/Rebirth = true`: send every BIRTH again.
    Rebirth,
    /// Anything else: refused, the agent never writes to the plant.
    Refused { what: String },
}

pub struct EdgeNode {
    topics: SpTopics,
    bd_seq: u64,
    /// The `seq` of the next sealed message.
    next_seq: u8,
    connections: Vec<String>,
    devices: BTreeMap<String, Device>,
    next_alias: u64,
    /// The node metrics' last values, for the next NBIRTH.
    last_event: Option<(u64, String)>,
}

impl EdgeNode {
    pub fn new(group: &str, node: &str, devices: &[DeviceSpec]) -> EdgeNode {
        let connections: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
        let mut n = EdgeNode {
            topics: SpTopics::new(group, node),
            bd_seq: 0,
            next_seq: 0,
            next_alias: STATUS_ALIAS + (STATUS.len() + connections.len()) as u64,
            connections,
            devices: BTreeMap::new(),
            last_event: None,
        };
        for spec in devices {
            let mut device = Device::default();
            for kind in &spec.derived {
                let alias = n.alias();
                device.metrics.insert(
                    kind.as_str().to_string(),
                    MetricDef {
                        alias,
                        datatype: DataType::String,
                        last: None,
                    },
                );
            }
            n.devices.insert(spec.id.clone(), device);
        }
        n
    }

    pub fn topics(&self) -> &SpTopics {
        &self.topics
    }

    fn alias(&mut self) -> u64 {
        let a = self.next_alias;
        self.next_alias += 1;
        a
    }

    /// The NDEATH certificate registered as the Last Will of a session with
    /// `bd_seq` (also published before a clean disconnect).
    pub fn ndeath(&self, bd_seq: u8, ts_ms: i64) -> (String, Vec<u8>) {
        let payload = Payload {
            timestamp: Some(metric::ms(ts_ms)),
            metrics: vec![Metric {
                name: Some(BD_SEQ.into()),
                datatype: Some(DataType::UInt64.code()),
                value: Some(MetricValue::Long(bd_seq.into())),
                ..Default::default()
            }],
            ..Default::default()
        };
        (self.topics.node("NDEATH"), payload.encode_to_vec())
    }

    /// The `bdSeq` of the current session.
    pub fn bd_seq(&self) -> u8 {
        u8::try_from(self.bd_seq).unwrap_or(0)
    }

    /// A new MQTT session with the Will of `bd_seq`: nothing is born.
    pub fn start_session(&mut self, bd_seq: u8) {
        self.bd_seq = bd_seq.into();
        for d in self.devices.values_mut() {
            d.born = false;
        }
    }

    /// The NBIRTH certificate: `bdSeq`, the rebirth control, the event
    /// metric and the status metrics. Sealed, it resets `seq` to 0.
    pub fn nbirth(&self, status: &NodeStatus) -> Draft {
        let ts = metric::ms(status.ts_ms);
        let mut metrics = vec![
            Metric {
                name: Some(BD_SEQ.into()),
                timestamp: Some(ts),
                datatype: Some(DataType::UInt64.code()),
                value: Some(MetricValue::Long(self.bd_seq)),
                ..Default::default()
            },
            Metric {
                name: Some(REBIRTH.into()),
                alias: Some(REBIRTH_ALIAS),
                timestamp: Some(ts),
                datatype: Some(DataType::Boolean.code()),
                value: Some(MetricValue::Boolean(false)),
                ..Default::default()
            },
        ];
        let (event_ts, event) = match &self.last_event {
            Some((t, v)) => (*t, Some(MetricValue::String(v.clone()))),
            None => (ts, None),
        };
        metrics.push(birth_metric(
            EVENT,
            EVENT_ALIAS,
            DataType::String,
            event_ts,
            event,
        ));
        for (i, (alias, value)) in self.status_values(status).into_iter().enumerate() {
            let (name, datatype) = self.status_metric(i);
            metrics.push(birth_metric(&name, alias, datatype, ts, value));
        }
        Draft {
            message_type: MessageType::NBirth,
            qos0: true,
            topic: self.topics.node("NBIRTH"),
            payload: Payload {
                timestamp: Some(ts),
                metrics,
                ..Default::default()
            },
        }
    }

    /// Name and datatype of status metric `i` (after the fixed ones come
    /// the connections).
    fn status_metric(&self, i: usize) -> (String, DataType) {
        match STATUS.get(i) {
            Some((name, dt)) => (name.to_string(), *dt),
            None => {
                let id = self
                    .connections
                    .get(i - STATUS.len())
                    .map_or("", String::as_str);
                (format!("Status/connections/{id}"), DataType::String)
            }
        }
    }

    /// Every status metric's alias and value.
    fn status_values(&self, s: &NodeStatus) -> Vec<(u64, Option<MetricValue>)> {
        let mut v = vec![
            Some(MetricValue::String(s.version.clone())),
            Some(MetricValue::String(s.boot_id.clone())),
            Some(MetricValue::Long(s.uptime_s)),
            Some(MetricValue::Long(s.records)),
            Some(MetricValue::Long(s.bytes)),
            s.oldest_ts_ms.map(|t| MetricValue::Long(metric::ms(t))),
            Some(MetricValue::Long(s.published_records_total)),
        ];
        for id in &self.connections {
            let state = s
                .connections
                .iter()
                .find(|(c, _)| c == id)
                .map_or("unknown", |(_, st)| st.as_str());
            v.push(Some(MetricValue::String(state.to_string())));
        }
        v.into_iter()
            .enumerate()
            .map(|(i, value)| (STATUS_ALIAS + i as u64, value))
            .collect()
    }

    /// NDATA with the status metrics (the Sparkplug heartbeat).
    pub fn status(&self, status: &NodeStatus) -> Draft {
        let ts = metric::ms(status.ts_ms);
        let metrics = self
            .status_values(status)
            .into_iter()
            .enumerate()
            .map(|(i, (alias, value))| {
                let (_, datatype) = self.status_metric(i);
                data_metric(
                    alias,
                    datatype,
                    status.ts_ms,
                    value,
                    false,
                    PropertySet::default(),
                )
            })
            .collect();
        Draft {
            message_type: MessageType::NData,
            qos0: true,
            topic: self.topics.node("NDATA"),
            payload: Payload {
                timestamp: Some(ts),
                metrics,
                ..Default::default()
            },
        }
    }

    /// NDATA carrying one event (`json`: the event as docs/mqtt.md has it).
    /// It is historical if its seq is at most `historical_to` (accepted
    /// before this session, or sent again on request).
    pub fn event(
        &mut self,
        record: &StoredRecord,
        json: String,
        epoch: &str,
        historical_to: u64,
        replay: bool,
        now_ms: i64,
    ) -> Draft {
        let historical = record.seq <= historical_to;
        let mut props = record_properties(epoch, record.seq, replay);
        if !record.connection.is_empty() {
            props.push(
                "connection",
                DataType::String,
                PropertyValueKind::String(record.connection.clone()),
            );
        }
        if !replay {
            self.last_event = Some((metric::ms(record.ts_ms), json.clone()));
        }
        let m = data_metric(
            EVENT_ALIAS,
            DataType::String,
            record.ts_ms,
            Some(MetricValue::String(json)),
            historical,
            props,
        );
        Draft {
            message_type: MessageType::NData,
            qos0: false,
            topic: self.topics.node("NDATA"),
            payload: Payload {
                timestamp: Some(metric::ms(now_ms)),
                metrics: vec![m],
                ..Default::default()
            },
        }
    }

    pub fn is_device(&self, device: &str) -> bool {
        self.devices.contains_key(device)
    }

    pub fn is_born(&self, device: &str) -> bool {
        self.devices.get(device).is_some_and(|d| d.born)
    }

    /// Devices born in this session.
    pub fn born(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, d)| d.born)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether `device` needs a DBIRTH before its next DDATA: not born in
    /// this session, or a metric was added or changed type since.
    pub fn needs_birth(&self, device: &str) -> bool {
        self.devices.get(device).is_some_and(|d| !d.born || d.stale)
    }

    /// The DBIRTH certificate of `device`: every metric known, with its
    /// last value. Marks the device born.
    pub fn dbirth(&mut self, device: &str, now_ms: i64) -> Option<Draft> {
        let d = self.devices.get_mut(device)?;
        d.born = true;
        d.stale = false;
        let now = metric::ms(now_ms);
        let metrics = d
            .metrics
            .iter()
            .map(|(name, def)| {
                let mut m = birth_metric(name, def.alias, def.datatype, now, None);
                if let Some(last) = &def.last {
                    m.timestamp = Some(last.ts);
                    m.is_null = last.value.is_none().then_some(true);
                    m.value = last.value.clone();
                    m.properties =
                        (!last.properties.keys.is_empty()).then(|| last.properties.clone());
                }
                m
            })
            .collect();
        Some(Draft {
            message_type: MessageType::DBirth,
            qos0: true,
            topic: self.topics.device("DBIRTH", device),
            payload: Payload {
                timestamp: Some(now),
                metrics,
                ..Default::default()
            },
        })
    }

    /// The DDEATH certificate of a born `device`. Marks it dead.
    pub fn ddeath(&mut self, device: &str, now_ms: i64) -> Option<Draft> {
        let d = self.devices.get_mut(device)?;
        if !d.born {
            return None;
        }
        d.born = false;
        Some(Draft {
            message_type: MessageType::DDeath,
            qos0: true,
            topic: self.topics.device("DDEATH", device),
            payload: Payload {
                timestamp: Some(metric::ms(now_ms)),
                ..Default::default()
            },
        })
    }

    /// DDATA carrying `records` (one stream of `device`, in seq order);
    /// those with a seq up to `historical_to` are flagged historical.
    /// Tags not declared yet, or with a new datatype, are declared here and
    /// mark the device for a DBIRTH ([`Self::needs_birth`]), which must go
    /// out before this message.
    pub fn ddata(
        &mut self,
        device: &str,
        records: &[StoredRecord],
        epoch: &str,
        historical_to: u64,
        replay: bool,
        now_ms: i64,
    ) -> Draft {
        let mut metrics = Vec::with_capacity(records.len());
        for r in records {
            let (name, datatype, value, extra) = match r.kind {
                Kind::Tag => tag_parts(r),
                kind => (
                    kind.as_str().to_string(),
                    Some(DataType::String),
                    Some(MetricValue::String(r.data.clone())),
                    None,
                ),
            };
            let mut quality = PropertySet::default();
            if let Some((q, status)) = extra {
                quality.push("Quality", DataType::Int32, PropertyValueKind::Int(q));
                if let Some(s) = status {
                    quality.push("status", DataType::String, PropertyValueKind::String(s));
                }
            }
            let mut props = record_properties(epoch, r.seq, replay);
            props.keys.extend(quality.keys.iter().cloned());
            props.values.extend(quality.values.iter().cloned());
            let def = self.declare(device, &name, datatype);
            if !replay {
                // In the next BIRTH a derived record keeps its epoch/seq
                // (docs/sparkplug.md); a tag only its quality, so that a
                // BIRTH of thousands of tags stays small.
                let properties = if r.kind == Kind::Tag {
                    quality
                } else {
                    props.clone()
                };
                def.last = Some(Last {
                    ts: metric::ms(r.ts_ms),
                    value: value.clone(),
                    properties,
                });
            }
            let (alias, datatype) = (def.alias, def.datatype);
            let historical = r.seq <= historical_to;
            metrics.push(data_metric(
                alias, datatype, r.ts_ms, value, historical, props,
            ));
        }
        Draft {
            message_type: MessageType::DData,
            qos0: false,
            topic: self.topics.device("DDATA", device),
            payload: Payload {
                timestamp: Some(metric::ms(now_ms)),
                metrics,
                ..Default::default()
            },
        }
    }

    /// The definition of metric `name` of `device`, declared now if new or
    /// if `datatype` differs (which makes the device's DBIRTH stale). A
    /// value of unknown type (a bad value of a tag never seen good) keeps
    /// the known datatype, or is declared String until a value says more.
    fn declare(&mut self, device: &str, name: &str, datatype: Option<DataType>) -> &mut MetricDef {
        let next_alias = self.next_alias;
        // A stream of a connection no longer configured still has its
        // records delivered: it becomes a device of its own.
        let d = self.devices.entry(device.to_string()).or_default();
        let mut used_alias = false;
        let def = d.metrics.entry(name.to_string()).or_insert_with(|| {
            used_alias = true;
            MetricDef {
                alias: next_alias,
                datatype: datatype.unwrap_or(DataType::String),
                last: None,
            }
        });
        if used_alias {
            d.stale = true;
            self.next_alias += 1;
        } else if let Some(dt) = datatype.filter(|dt| *dt != def.datatype) {
            def.datatype = dt;
            def.last = None;
            d.stale = true;
        }
        def
    }

    /// Gives a draft its `seq` and encodes it.
    pub fn seal(&mut self, draft: Draft) -> (String, Vec<u8>, bool) {
        let qos0 = draft.qos0;
        let mut payload = draft.payload;
        if draft.message_type == MessageType::NBirth {
            self.next_seq = 0;
        }
        payload.seq = Some(self.next_seq.into());
        self.next_seq = self.next_seq.wrapping_add(1);
        (draft.topic, payload.encode_to_vec(), qos0)
    }

    /// What a message on a command topic asks.
    pub fn command(&self, topic: &str, payload: &[u8]) -> Command {
        let Some((message_type, device)) = self.topics.parse(topic) else {
            return Command::Refused {
                what: format!("a message on {topic}"),
            };
        };
        if message_type != "NCMD" || device.is_some() {
            return Command::Refused {
                what: format!("{message_type} to {}", device.unwrap_or("the node")),
            };
        }
        let Ok(p) = Payload::decode(payload) else {
            return Command::Refused {
                what: "an NCMD that is not a Sparkplug B payload".into(),
            };
        };
        let rebirth = |m: &Metric| {
            (m.name.as_deref() == Some(REBIRTH) || m.alias == Some(REBIRTH_ALIAS))
                && m.value == Some(MetricValue::Boolean(true))
        };
        if !p.metrics.is_empty() && p.metrics.iter().all(rebirth) {
            return Command::Rebirth;
        }
        let names: Vec<String> = p
            .metrics
            .iter()
            .map(|m| match (&m.name, m.alias) {
                (Some(n), _) => n.clone(),
                (None, Some(a)) => format!("alias {a}"),
                (None, None) => "?".into(),
            })
            .collect();
        Command::Refused {
            what: format!("NCMD writing {}", names.join(", ")),
        }
    }
}

/// Name, datatype, value and (quality, status) of a tag record; an
/// unreadable one (never written by plantgate) travels as text.
#[allow(clippy::type_complexity)]
fn tag_parts(
    r: &StoredRecord,
) -> (
    String,
    Option<DataType>,
    Option<MetricValue>,
    Option<(u32, Option<String>)>,
) {
    match metric::tag_metric(r) {
        Ok(TagMetric {
            name,
            datatype,
            value,
            quality,
            status,
        }) => (name, datatype, value, quality.map(|q| (q, status))),
        Err(_) => (
            "unreadable tag record".into(),
            Some(DataType::String),
            Some(MetricValue::String(r.data.clone())),
            Some((metric::QUALITY_BAD, None)),
        ),
    }
}

fn birth_metric(
    name: &str,
    alias: u64,
    datatype: DataType,
    ts: u64,
    value: Option<MetricValue>,
) -> Metric {
    Metric {
        name: Some(name.to_string()),
        alias: Some(alias),
        timestamp: Some(ts),
        datatype: Some(datatype.code()),
        is_null: value.is_none().then_some(true),
        value,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
