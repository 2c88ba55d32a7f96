//! Records as one message in the session's format (`mqtt.format`): JSON
//! batches and events (docs/mqtt.md), or Sparkplug B DDATA and NDATA
//! (docs/sparkplug.md). The rest of the link sends, acknowledges and
//! dead-letters messages the same way whatever the format.

use prost::Message as _;

use super::super::mqtt::SessionError;
use super::super::payload;
use super::super::Uplink;
use super::Link;
use crate::record::{now_ms, Kind, StoredRecord, StreamKey};
use crate::sparkplug::{Draft, EdgeNode};

/// A prefix of some records (`n` of them) as one message.
pub(super) struct Encoded {
    pub topic: String,
    pub body: Body,
    pub n: usize,
}

pub(super) enum Body {
    Json(Vec<u8>),
    /// Numbered when published; a device's DBIRTH goes first if due.
    Sparkplug {
        draft: Draft,
        device: Option<String>,
    },
}

impl Encoded {
    /// The payload's size (for Sparkplug an upper bound: its `seq` is not
    /// given yet).
    pub fn len(&self) -> usize {
        match &self.body {
            Body::Json(b) => b.len(),
            Body::Sparkplug { draft, .. } => draft.sealed_len(),
        }
    }
}

impl Link<'_> {
    /// As many of `records` (one stream, in seq order, not empty) as fit
    /// one message, at least one; an event goes alone. `replay`: sent
    /// again on request.
    pub(super) fn encode(
        &mut self,
        stream: &StreamKey,
        records: &[StoredRecord],
        replay: bool,
    ) -> Encoded {
        let up = self.up;
        if let Some(node) = self.node.as_deref_mut() {
            let historical_to = if replay {
                u64::MAX
            } else {
                self.delivery.backlog_target(stream).unwrap_or(0)
            };
            let max = self.limit.for_topic(&device_topic(node, stream));
            return encode_sparkplug(node, up, stream, records, historical_to, replay, max);
        }
        let epoch = up.buffer.epoch();
        let agent = &up.settings.agent_id;
        if stream.kind == Kind::Event {
            let (event_type, body) = if replay {
                payload::encode_replay_event(agent, &epoch, &records[0])
            } else {
                payload::encode_event(agent, &epoch, &records[0])
            };
            return Encoded {
                topic: up.topics.event(&event_type),
                body: Body::Json(body),
                n: 1,
            };
        }
        let encode = |records: &[StoredRecord]| {
            if replay {
                payload::encode_replay_batch(agent, &epoch, records)
            } else {
                payload::encode_batch(agent, &epoch, records)
            }
        };
        let topic = up.topics.data(&stream.connection, stream.kind);
        let max = self.limit.for_topic(&topic);
        let envelope = agent.len() + stream.connection.len() + epoch.len() + 16;
        let mut n = payload::fit(records, max, envelope);
        let mut body = encode(&records[..n]);
        // `fit` estimates; the encoded size decides. Shrink until it fits
        // or a single record is left.
        while body.len() > max && n > 1 {
            n = (n * max / body.len()).clamp(1, n - 1);
            body = encode(&records[..n]);
        }
        Encoded {
            topic,
            body: Body::Json(body),
            n,
        }
    }

    /// The topic a stream's records go to.
    pub(super) fn topic_of(&self, stream: &StreamKey) -> String {
        match self.node.as_deref() {
            Some(node) => device_topic(node, stream),
            None => self.up.topics.data(&stream.connection, stream.kind),
        }
    }

    /// Publishes records at QoS 1. Sparkplug: the device's DBIRTH first
    /// when it is not born in this session or declares too little.
    pub(super) async fn publish_encoded(&mut self, e: Encoded) -> Result<(), SessionError> {
        let (draft, device) = match e.body {
            Body::Json(body) => return self.session.publish(e.topic, false, false, body).await,
            Body::Sparkplug { draft, device } => (draft, device),
        };
        let Some(node) = self.node.as_deref_mut() else {
            // Never: only a session with an edge node makes Sparkplug
            // bodies. Sent unnumbered rather than lost.
            let body = draft.payload.encode_to_vec();
            return self.session.publish(e.topic, false, false, body).await;
        };
        // Both numbered now, the birth first, so they keep that order.
        let birth = match device {
            Some(d) if node.needs_birth(&d) => node.dbirth(&d, now_ms()).map(|b| node.seal(b)),
            _ => None,
        };
        let (topic, body, qos0) = node.seal(draft);
        if let Some(birth) = birth {
            self.publish_sealed(birth).await?;
        }
        self.session.publish(topic, qos0, false, body).await
    }
}

/// Sparkplug: an event as NDATA, other records as their device's DDATA.
fn encode_sparkplug(
    node: &mut EdgeNode,
    up: &Uplink,
    stream: &StreamKey,
    records: &[StoredRecord],
    historical_to: u64,
    replay: bool,
    max: usize,
) -> Encoded {
    let epoch = up.buffer.epoch();
    let now = now_ms();
    if stream.kind == Kind::Event {
        // The event's JSON (docs/mqtt.md) is the metric's value; a replay
        // says so in a property.
        let (_, json) = payload::encode_event(&up.settings.agent_id, &epoch, &records[0]);
        let json = String::from_utf8_lossy(&json).into_owned();
        let draft = node.event(&records[0], json, &epoch, historical_to, replay, now);
        return Encoded {
            topic: draft.topic.clone(),
            body: Body::Sparkplug {
                draft,
                device: None,
            },
            n: 1,
        };
    }
    let device = stream.connection.as_str();
    // A metric takes far less than a record's JSON (no name, no node id),
    // so the JSON estimate would leave messages half empty: encode all
    // (at most MAX_RECORDS_PER_MESSAGE, cheap) and shrink to fit.
    let mut n = records.len();
    let mut draft = node.ddata(device, &records[..n], &epoch, historical_to, replay, now);
    while draft.sealed_len() > max && n > 1 {
        n = (n * max / draft.sealed_len()).clamp(1, n - 1);
        draft = node.ddata(device, &records[..n], &epoch, historical_to, replay, now);
    }
    Encoded {
        topic: draft.topic.clone(),
        body: Body::Sparkplug {
            draft,
            device: Some(device.to_string()),
        },
        n,
    }
}

/// The topic a stream's records go to in Sparkplug.
fn device_topic(node: &EdgeNode, stream: &StreamKey) -> String {
    if stream.kind == Kind::Event {
        node.topics().node("NDATA")
    } else {
        node.topics().device("DDATA", &stream.connection)
    }
}
