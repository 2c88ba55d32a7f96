//! The uplink: carries accepted records from the buffer to the MQTT broker
//! and deletes exactly the rows whose message the broker acknowledged
//! (docs/guarantees.md).
//!
//! - [`Uplink::run`] (this file): the reconnect loop, with backoff.
//! - [`link`]: one connected session, reading the buffer and publishing;
//!   [`delivery`]: its bookkeeping as a pure state machine (what is in
//!   flight, what an acknowledgement or a refusal means, when a backlog is
//!   delivered), model-tested.
//! - [`mqtt`]: rumqttc for either protocol version, reduced to the events the
//!   uplink needs; [`topics`] and [`payload`]: topic names, size limits and
//!   the bytes the cloud sees (docs/mqtt.md).
//!
//! Invariants:
//! - Rows are deleted only on a QoS 1 PUBACK of the message that carried
//!   them. A session lost for any reason forgets everything in flight; the
//!   next session re-reads the buffer from each stream's oldest row, so an
//!   un-acked message is always resent (duplicates possible, loss not).
//! - Within a stream, messages go out in seq order over one connection, so
//!   they arrive in seq order.
//! - The backlog stays on disk: at most `WINDOW` messages are read into
//!   memory at a time, whatever the size of the backlog.
//! - No message exceeds its [`topics::PayloadLimit`]: `max_message_bytes`
//!   and the broker's Maximum Packet Size (docs/guarantees.md#message-size).
//!   A broker closes the connection on an oversized packet, so one record
//!   that cannot fit is dead-lettered (data or event alike) and control
//!   messages are trimmed; nothing oversized ever reaches the client library.
//! - A message the broker refuses holds its stream back with a growing
//!   delay before the next attempt; other streams keep flowing.

pub mod delivery;
mod link;
pub mod mqtt;
pub mod payload;
pub mod probe;
mod replays;
pub mod tls;
pub mod topics;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::BufferHandle;
use crate::config::{MqttConfig, MqttFormat};
use crate::record::now_ms;
use crate::sparkplug::{DeviceSpec, EdgeNode};
use crate::status::StatusBoard;
use link::{Link, LinkEnd};
use mqtt::{MqttEvent, Session, SessionError, SessionOptions, Will};
use replays::Replays;
use topics::{PayloadLimit, Topics};

/// Messages in flight (submitted, not yet acknowledged).
const WINDOW: usize = 64;
/// Records read per stream per round; bounds memory together with WINDOW.
const MAX_RECORDS_PER_MESSAGE: usize = 2_000;
/// How long a clean shutdown waits for outstanding acknowledgements.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

pub struct UplinkSettings {
    pub mqtt: MqttConfig,
    pub agent_id: String,
    pub site: String,
    pub version: String,
    pub boot_id: String,
    /// None for plaintext `mqtt://` (only when allowed by config).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The connections as Sparkplug devices (used with
    /// `mqtt.format = "sparkplug_b"`).
    pub devices: Vec<DeviceSpec>,
}

pub struct Uplink {
    /// The broker's refusal of the commands subscription was announced
    /// (once until it is granted again, not on every reconnect).
    commands_refusal_announced: std::sync::atomic::AtomicBool,
    /// Set when a reload replaces this uplink: its clean stop says
    /// `reload`, not `shutdown`, and leaves the connections' statuses.
    replaced: std::sync::atomic::AtomicBool,
    settings: UplinkSettings,
    topics: Topics,
    buffer: BufferHandle,
    board: Arc<StatusBoard>,
    started: Instant,
}

/// Why a session could not be used or ended. Its text is the uplink's
/// reason in `/status` and the log.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("unexpected first event {0}")]
    UnexpectedFirstEvent(String),
    /// A broker whose Maximum Packet Size leaves less than
    /// [`topics::MIN_PAYLOAD_BYTES`] on the agent's longest fixed topic can
    /// carry neither the status messages nor the events announcing a dead
    /// letter.
    #[error(
        "the broker's Maximum Packet Size ({max_packet} bytes) leaves {room} bytes for a message; \
         plantgate needs at least {needed} (raise max_packet_size on the broker)"
    )]
    BrokerTooSmall {
        max_packet: u32,
        room: usize,
        needed: usize,
    },
}

enum SessionEnd {
    Shutdown,
    Lost(ConnectError),
}

impl Uplink {
    pub fn new(settings: UplinkSettings, buffer: BufferHandle, board: Arc<StatusBoard>) -> Self {
        let topics = Topics::new(
            &settings.mqtt.topic_prefix,
            &settings.site,
            &settings.agent_id,
        );
        Uplink {
            commands_refusal_announced: std::sync::atomic::AtomicBool::new(false),
            replaced: std::sync::atomic::AtomicBool::new(false),
            settings,
            topics,
            buffer,
            board,
            started: Instant::now(),
        }
    }

    /// Marks this uplink as being replaced by a reload (before its
    /// `cancel`): the agent stays up, another uplink takes over at once.
    pub fn replace(&self) {
        self.replaced
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_replaced(&self) -> bool {
        self.replaced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs sessions until `cancel`, reconnecting with backoff.
    pub async fn run(&self, cancel: CancellationToken) {
        let m = &self.settings.mqtt;
        let mut backoff = Backoff::new(m.reconnect_initial, m.reconnect_max);
        let mut quiet = crate::throttle::Throttle::new(Duration::from_secs(300));
        let mut replays = Replays::new();
        // The edge node outlives sessions: its aliases stay the same.
        let mut node = (m.format == MqttFormat::SparkplugB).then(|| {
            EdgeNode::new(
                &self.settings.site,
                &self.settings.agent_id,
                &self.settings.devices,
            )
        });
        loop {
            let (end, connected_at) = self.session(&cancel, &mut replays, node.as_mut()).await;
            match end {
                SessionEnd::Shutdown => {
                    if !replays.is_empty() {
                        tracing::warn!(
                            requests = replays.len(),
                            "replay requests left unanswered at shutdown; consumers ask again"
                        );
                    }
                    return;
                }
                SessionEnd::Lost(e) => {
                    let reason = e.to_string();
                    let was = self.board.mqtt().connected;
                    self.board.set_mqtt(false, &reason);
                    // Only a connection that stayed up a while starts the
                    // backoff over (docs/guarantees.md#reconnects-and-backoff):
                    // one dropped right after
                    // CONNACK, whatever the cause, keeps slowing down.
                    let up_for = connected_at.map(|t| t.elapsed());
                    if let Some(up) = up_for {
                        backoff.connection_ended(up);
                    }
                    let delay = backoff.next_delay();
                    if was {
                        quiet.reset();
                        tracing::warn!(
                            %reason,
                            up_for_ms = up_for.map_or(0, |d| d.as_millis() as u64),
                            retry_in_ms = delay.as_millis() as u64,
                            "mqtt connection lost; reconnecting"
                        );
                    } else if let Some(repeats) = quiet.check(&reason) {
                        tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, repeats, "mqtt connect failed");
                    }
                    // Sleep in short steps so /healthz sees this loop alive.
                    let until = tokio::time::Instant::now() + delay;
                    while tokio::time::Instant::now() < until {
                        self.board.beat("uplink");
                        let step = until.min(tokio::time::Instant::now() + Duration::from_secs(1));
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep_until(step) => {}
                        }
                    }
                }
            }
        }
    }

    /// The JSON format's Last Will: the agent's status, `offline`.
    fn status_will(&self) -> Will {
        Will {
            topic: self.topics.status(),
            payload: payload::agent_offline(
                now_ms(),
                &self.settings.version,
                &self.settings.boot_id,
                "connection_lost",
            ),
            retain: true,
        }
    }

    /// Sparkplug's Last Will: the NDEATH of the next session's `bdSeq`,
    /// which the buffer keeps across restarts; given to the node for its
    /// NBIRTH.
    async fn ndeath_will(&self, node: &mut EdgeNode) -> Will {
        let bd_seq = match self.buffer.next_bd_seq().await {
            Ok(b) => b,
            Err(e) => {
                // Still a new value, so host applications tell the sessions
                // apart; only a restart before the buffer works again could
                // repeat one.
                let b = node.bd_seq().wrapping_add(1);
                tracing::warn!(error = %e, bd_seq = b, "could not keep the Sparkplug bdSeq in the buffer");
                let ev = crate::record::NewRecord::event(
                    "",
                    crate::record::EventType::SystemError,
                    serde_json::json!({
                        "error": "sparkplug_bd_seq_not_kept",
                        "message": "the Sparkplug bdSeq could not be kept in the buffer; \
                                    a restart before it works again may repeat one",
                        "bd_seq": b,
                        "reason": e.to_string(),
                    }),
                );
                self.buffer.record_events(vec![ev]);
                b
            }
        };
        node.start_session(bd_seq);
        self.board.sparkplug(|sp| sp.bd_seq = Some(bd_seq));
        let (topic, payload) = node.ndeath(bd_seq, now_ms());
        Will {
            topic,
            payload,
            retain: false,
        }
    }

    fn session_options(&self, will: Will) -> SessionOptions {
        let m = &self.settings.mqtt;
        SessionOptions {
            protocol: m.protocol,
            client_id: self.settings.agent_id.clone(),
            host: m.host.clone(),
            port: m.port,
            tls: self.settings.tls.clone(),
            keep_alive: m.keep_alive,
            username: m.username.clone(),
            password: m.password.clone(),
            will: Some(will),
            // Room for the topic and MQTT header on top of the payload.
            max_packet_bytes: m.max_message_bytes + 4096,
            max_payload_bytes: m.max_message_bytes,
            inflight: (WINDOW + 16) as u16,
        }
    }

    /// One session, from connect to its end; also when it got connected
    /// (None if it never did), for the backoff.
    async fn session(
        &self,
        cancel: &CancellationToken,
        replays: &mut Replays,
        mut node: Option<&mut EdgeNode>,
    ) -> (SessionEnd, Option<Instant>) {
        self.board.beat("uplink");
        let will = match node.as_deref_mut() {
            Some(node) => self.ndeath_will(node).await,
            None => self.status_will(),
        };
        let mut session = Session::start(&self.session_options(will));
        let first = tokio::select! {
            _ = cancel.cancelled() => return (SessionEnd::Shutdown, None),
            ev = session.next() => ev,
        };
        let limit = match self.connected(first) {
            Ok(limit) => limit,
            // Dropping the session closes the socket without DISCONNECT, so
            // the broker publishes the Last Will: the agent is offline.
            Err(e) => return (SessionEnd::Lost(e), None),
        };
        let connected_at = Instant::now();
        let (backlog, requeues) = self.backlog().await;
        let link = Link::new(self, session, limit, backlog, requeues, replays, node);
        let end = match link.run(cancel).await {
            LinkEnd::Shutdown => SessionEnd::Shutdown,
            LinkEnd::Lost(e) => SessionEnd::Lost(e.into()),
        };
        (end, Some(connected_at))
    }

    /// The broker's answer to CONNECT: the payload limit of the session, or
    /// why it cannot be used.
    fn connected(
        &self,
        first: Result<MqttEvent, SessionError>,
    ) -> Result<PayloadLimit, ConnectError> {
        let broker_max_packet = match first? {
            MqttEvent::Connected {
                broker_max_packet, ..
            } => broker_max_packet,
            other => return Err(ConnectError::UnexpectedFirstEvent(format!("{other:?}"))),
        };
        let max_message_bytes = self.settings.mqtt.max_message_bytes;
        let limit = PayloadLimit::new(max_message_bytes, broker_max_packet);
        let room = limit.for_topic(
            &self
                .topics
                .event(crate::record::EventType::ConnectionStatusChanged.as_str()),
        );
        if room < topics::MIN_PAYLOAD_BYTES {
            return Err(ConnectError::BrokerTooSmall {
                max_packet: broker_max_packet.unwrap_or(0),
                room,
                needed: topics::MIN_PAYLOAD_BYTES,
            });
        }
        let status_room = limit.for_topic(&self.topics.status());
        self.board.set_mqtt_limits(broker_max_packet, status_room);
        self.board.set_mqtt(true, "");
        tracing::info!(
            host = %self.settings.mqtt.host,
            port = self.settings.mqtt.port,
            broker_max_packet,
            "mqtt connected"
        );
        if status_room < max_message_bytes {
            tracing::info!(
                broker_max_packet,
                max_message_bytes,
                payload_limit = status_room,
                "the broker's Maximum Packet Size is below mqtt.max_message_bytes; messages are sized to the broker"
            );
        }
        Ok(limit)
    }

    /// What is on disk at connect time: per stream with rows, the seq of its
    /// newest row; and the buffer's count of re-queues.
    async fn backlog(&self) -> (HashMap<crate::record::StreamKey, u64>, u64) {
        let Ok(stats) = self.buffer.stats().await else {
            return (HashMap::new(), 0);
        };
        let backlog: HashMap<_, _> = stats
            .streams
            .iter()
            .filter(|st| st.records > 0)
            .filter_map(|st| st.last_seq.map(|last| (st.stream(), last)))
            .collect();
        if !backlog.is_empty() {
            tracing::info!(records = stats.records, "delivering buffered backlog");
        }
        (backlog, stats.requeues)
    }
}
