//! One MQTT session over rumqttc, for either protocol version, reduced to the
//! few events the uplink needs. A session is never reused after an error: the
//! uplink drops it and builds a fresh one, so no stale in-flight state or
//! packet id can survive into the next connection (rumqttc discards un-acked
//! publishes on a new clean session anyway — CRATES.md pitfall 7 — and the
//! buffer, not rumqttc, is our source of truth for what must be resent).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::MqttProtocol;
use crate::secret::Secret;

/// Why an MQTT session ended. The text is what `/status` shows as the
/// uplink's reason and what the log says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The broker answered CONNECT with a refusal (bad credentials, not
    /// authorised, ...).
    #[error("connection refused: {0}")]
    Refused(String),
    /// The transport or the protocol failed (TLS, socket, keep-alive, a
    /// malformed packet).
    #[error("{0}")]
    Connection(String),
    /// The client library would not take a request (its event loop is gone).
    #[error("mqtt client: {0}")]
    Client(String),
    #[error("mqtt event loop stopped")]
    Stopped,
}

type Event = Result<MqttEvent, SessionError>;

pub struct SessionOptions {
    pub protocol: MqttProtocol,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The Last Will, published at QoS 1.
    pub will: Option<Will>,
    /// Largest packet we accept from the broker.
    pub max_packet_bytes: usize,
    /// Largest payload the uplink sends (`max_message_bytes`); with MQTT
    /// 3.1.1 rumqttc's own outgoing limit is set above it by the largest
    /// header and topic, so it never refuses what the uplink sized.
    pub max_payload_bytes: usize,
    /// rumqttc's in-flight limit; the uplink keeps its own window below it.
    pub inflight: u16,
}

impl SessionOptions {
    /// A command's own session to the configured broker (`replay`,
    /// `check --connect`): the service's settings and TLS, no Will, and a
    /// client id of its own (`{agent.id}-{role}-…`), since the broker would
    /// throw the running agent off for a second session under its id.
    pub fn for_command(
        config: &crate::config::Config,
        role: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> SessionOptions {
        let m = &config.mqtt;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        SessionOptions {
            protocol: m.protocol,
            client_id: format!("{}-{role}-{}", config.agent.id, &suffix[..8]),
            host: m.host.clone(),
            port: m.port,
            tls,
            keep_alive: m.keep_alive,
            username: m.username.clone(),
            password: m.password.clone(),
            will: None,
            max_packet_bytes: m.max_message_bytes + 4096,
            max_payload_bytes: m.max_message_bytes,
            inflight: 16,
        }
    }
}

/// What the broker publishes when the session ends without a DISCONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The JSON status is retained; a Sparkplug NDEATH is not.
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttEvent {
    /// The broker accepted the connection. `broker_max_packet` is the
    /// Maximum Packet Size of its MQTT 5 CONNACK (None: no limit announced,
    /// or MQTT 3.1.1); rumqttc refuses a larger outgoing packet by ending the
    /// session, so the uplink must size every message below it.
    Connected {
        session_present: bool,
        broker_max_packet: Option<u32>,
    },
    /// A publish left the client with this packet id (0 for QoS 0), in the
    /// order the publishes were submitted.
    Sent(u16),
    /// The broker acknowledged a QoS 1 publish. `rejected` carries the MQTT 5
    /// reason when the broker refused the message (reason code >= 0x80).
    Acked {
        pkid: u16,
        rejected: Option<String>,
    },
    /// A message on a topic the session subscribed to (the commands topic).
    /// `response_topic` and `correlation` are the MQTT 5 request/response
    /// properties, when the sender set them.
    Command {
        topic: String,
        payload: Vec<u8>,
        response_topic: Option<String>,
        correlation: Option<Vec<u8>>,
    },
    /// The broker answered a SUBSCRIBE; `refused` names why it did not
    /// grant it (an ACL, MQTT 5 reason codes or the 3.1.1 failure code).
    Subscribed {
        refused: Option<String>,
    },
    Other,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub struct Session {
    client: Client,
    events: mpsc::UnboundedReceiver<Event>,
    poller: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// An MQTT topic name is at most 65 535 bytes (its length is a u16).
const MAX_TOPIC_BYTES: usize = 65_535;

/// Capacity of rumqttc's request channel; small so publishes wait in our
/// bounded window rather than in an invisible queue.
const REQUEST_CAPACITY: usize = 16;

impl Session {
    /// Starts connecting in a background task; the first event is
    /// `Connected` or an error.
    pub fn start(o: &SessionOptions) -> Session {
        let (tx, events) = mpsc::unbounded_channel();
        let (client, poller) = match o.protocol {
            MqttProtocol::V311 => {
                let (c, el) = rumqttc::AsyncClient::new(v4_options(o), REQUEST_CAPACITY);
                (Client::V4(c), tokio::spawn(poll_v4(el, tx)))
            }
            MqttProtocol::V5 => {
                let (c, el) = rumqttc::v5::AsyncClient::new(v5_options(o), REQUEST_CAPACITY);
                (Client::V5(c), tokio::spawn(poll_v5(el, tx)))
            }
        };
        Session {
            client,
            events,
            poller,
        }
    }

    /// Queues a publish. QoS 1 unless `qos0`.
    pub async fn publish(
        &self,
        topic: String,
        qos0: bool,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), SessionError> {
        let client = |e: rumqttc::ClientError| SessionError::Client(e.to_string());
        let client5 = |e: rumqttc::v5::ClientError| SessionError::Client(e.to_string());
        match &self.client {
            Client::V4(c) => {
                let qos = if qos0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.publish(topic, qos, retain, payload).await.map_err(client)
            }
            Client::V5(c) => {
                let qos = if qos0 {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                };
                c.publish(topic, qos, retain, payload)
                    .await
                    .map_err(client5)
            }
        }
    }

    /// Subscribes to `topic` at QoS 1 (the broker's answer comes as
    /// [`MqttEvent::Subscribed`]).
    pub async fn subscribe(&self, topics: Vec<String>) -> Result<(), SessionError> {
        let err = |e: String| SessionError::Client(e);
        match &self.client {
            Client::V4(c) => c
                .subscribe_many(
                    topics
                        .into_iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t, rumqttc::QoS::AtLeastOnce)),
                )
                .await
                .map_err(|e| err(e.to_string())),
            Client::V5(c) => c
                .subscribe_many(topics.into_iter().map(|t| {
                    rumqttc::v5::mqttbytes::v5::Filter::new(
                        t,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    )
                }))
                .await
                .map_err(|e| err(e.to_string())),
        }
    }

    /// Queues a QoS 1 answer to a request: with MQTT 5, carrying the
    /// request's correlation data back.
    pub async fn respond(
        &self,
        topic: String,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
    ) -> Result<(), SessionError> {
        match (&self.client, correlation) {
            (Client::V5(c), Some(data)) => {
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: Some(data.into()),
                    ..Default::default()
                };
                c.publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    properties,
                )
                .await
                .map_err(|e| SessionError::Client(e.to_string()))
            }
            _ => self.publish(topic, false, false, payload).await,
        }
    }

    /// The next event; `Err` means the session is over.
    pub async fn next(&mut self) -> Event {
        self.events
            .recv()
            .await
            .unwrap_or(Err(SessionError::Stopped))
    }

    /// Sends DISCONNECT, so the broker discards the Last Will. Best effort:
    /// a session already gone has nothing to disconnect.
    pub async fn disconnect(&self) {
        match &self.client {
            Client::V4(c) => drop(c.disconnect().await),
            Client::V5(c) => drop(c.disconnect().await),
        }
    }
}

fn transport(o: &SessionOptions) -> rumqttc::Transport {
    match &o.tls {
        Some(cfg) => {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg.clone()))
        }
        None => rumqttc::Transport::tcp(),
    }
}

fn v4_options(o: &SessionOptions) -> rumqttc::MqttOptions {
    let mut m = rumqttc::MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
    m.set_keep_alive(o.keep_alive.max(Duration::from_secs(1)))
        .set_clean_session(true)
        .set_inflight(o.inflight.max(1))
        .set_max_packet_size(
            o.max_packet_bytes,
            o.max_payload_bytes + MAX_TOPIC_BYTES + super::topics::PUBLISH_HEADER_BYTES,
        )
        .set_transport(transport(o));
    if let Some(w) = &o.will {
        m.set_last_will(rumqttc::LastWill::new(
            w.topic.clone(),
            w.payload.clone(),
            rumqttc::QoS::AtLeastOnce,
            w.retain,
        ));
    }
    if let Some(user) = &o.username {
        let pass = o.password.as_ref().map(|p| p.expose()).unwrap_or("");
        m.set_credentials(user.clone(), pass);
    }
    m
}

fn v5_options(o: &SessionOptions) -> rumqttc::v5::MqttOptions {
    let mut m = rumqttc::v5::MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
    m.set_keep_alive(o.keep_alive.max(Duration::from_secs(1)))
        .set_clean_start(true)
        .set_outgoing_inflight_upper_limit(o.inflight.max(1))
        .set_max_packet_size(Some(o.max_packet_bytes as u32))
        .set_transport(transport(o));
    if let Some(w) = &o.will {
        m.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            w.topic.clone(),
            w.payload.clone(),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            w.retain,
            None,
        ));
    }
    if let Some(user) = &o.username {
        let pass = o.password.as_ref().map(|p| p.expose()).unwrap_or("");
        m.set_credentials(user.clone(), pass);
    }
    m
}

async fn poll_v4(mut el: rumqttc::EventLoop, tx: mpsc::UnboundedSender<Event>) {
    use rumqttc::{Event, Outgoing, Packet};
    loop {
        let ev = match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code == rumqttc::ConnectReturnCode::Success {
                    Ok(MqttEvent::Connected {
                        session_present: ack.session_present,
                        broker_max_packet: None,
                    })
                } else {
                    Err(SessionError::Refused(format!("{:?}", ack.code)))
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => Ok(MqttEvent::Acked {
                pkid: ack.pkid,
                rejected: None,
            }),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(MqttEvent::Sent(pkid)),
            Ok(Event::Incoming(Packet::Publish(p))) => Ok(MqttEvent::Command {
                topic: p.topic,
                payload: p.payload.to_vec(),
                response_topic: None,
                correlation: None,
            }),
            Ok(Event::Incoming(Packet::SubAck(ack))) => Ok(MqttEvent::Subscribed {
                refused: ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .then(|| "the broker refused the subscription (SUBACK failure)".to_string()),
            }),
            Ok(_) => Ok(MqttEvent::Other),
            Err(e) => Err(describe_v4(&e)),
        };
        let stop = ev.is_err();
        if tx.send(ev).is_err() || stop {
            return;
        }
    }
}

async fn poll_v5(mut el: rumqttc::v5::EventLoop, tx: mpsc::UnboundedSender<Event>) {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
    use rumqttc::v5::Event;
    use rumqttc::Outgoing;
    loop {
        let ev = match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code == ConnectReturnCode::Success {
                    Ok(MqttEvent::Connected {
                        session_present: ack.session_present,
                        broker_max_packet: ack.properties.as_ref().and_then(|p| p.max_packet_size),
                    })
                } else {
                    Err(SessionError::Refused(format!("{:?}", ack.code)))
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let rejected = match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(format!("{other:?}")),
                };
                Ok(MqttEvent::Acked {
                    pkid: ack.pkid,
                    rejected,
                })
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(MqttEvent::Sent(pkid)),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let props = p.properties.unwrap_or_default();
                Ok(MqttEvent::Command {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                    response_topic: props.response_topic,
                    correlation: props.correlation_data.map(|b| b.to_vec()),
                })
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as Code;
                let refused = ack
                    .return_codes
                    .iter()
                    .find(|c| !matches!(c, Code::Success(_)))
                    .map(|c| format!("the broker refused the subscription: {c:?}"));
                Ok(MqttEvent::Subscribed { refused })
            }
            Ok(_) => Ok(MqttEvent::Other),
            Err(e) => Err(describe_v5(&e)),
        };
        let stop = ev.is_err();
        if tx.send(ev).is_err() || stop {
            return;
        }
    }
}

fn describe_v4(e: &rumqttc::ConnectionError) -> SessionError {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            SessionError::Refused(format!("{code:?}"))
        }
        other => SessionError::Connection(other.to_string()),
    }
}

fn describe_v5(e: &rumqttc::v5::ConnectionError) -> SessionError {
    match e {
        rumqttc::v5::ConnectionError::ConnectionRefused(code) => {
            SessionError::Refused(format!("{code:?}"))
        }
        other => SessionError::Connection(other.to_string()),
    }
}
