//! The uplink: carries accepted records from the buffer to the MQTT broker
//! and deletes exactly the rows whose message the broker acknowledged.
//!
//! Invariants:
//! - Rows are deleted only on a QoS 1 PUBACK of the message that carried them
//!   (SPEC 1.1). A session lost for any reason forgets everything in flight;
//!   the next session re-reads the buffer from each stream's oldest row, so an
//!   un-acked message is always resent (duplicates possible, loss not).
//! - Within a stream, messages go out in seq order over one connection, so
//!   they arrive in seq order (SPEC 1.3).
//! - The backlog stays on disk: at most `WINDOW` messages are read into
//!   memory at a time, whatever the size of the backlog.
//! - Packet ids are matched to rows by order: rumqttc reports
//!   `Outgoing::Publish(pkid)` in the order publishes were submitted, so a
//!   FIFO of submitted messages pairs each with its pkid.
//! - No message exceeds its [`topics::PayloadLimit`]: `max_message_bytes`
//!   and the broker's Maximum Packet Size (SPEC 1.10). A broker closes the
//!   connection on an oversized packet, so one record that cannot fit is
//!   dead-lettered (data or event alike) and control messages are trimmed;
//!   nothing oversized ever reaches the client library.
//! - A message the broker refuses holds its stream back with a growing
//!   delay before the next attempt; other streams keep flowing.

pub mod mqtt;
pub mod tls;
pub mod topics;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::buffer::BufferHandle;
use crate::config::MqttConfig;
use crate::record::{now_ms, Kind, StoredRecord, StreamKey};
use crate::status::{
    event_record, ConnState, StatusBoard, DEAD_LETTER_REFUSED, DEAD_LETTER_TOO_LARGE,
};
use mqtt::{MqttEvent, Session, SessionOptions};
use topics::{PayloadLimit, Topics};

/// Messages in flight (submitted, not yet acknowledged).
const WINDOW: usize = 64;
/// Records read per stream per round; bounds memory together with WINDOW.
const MAX_RECORDS_PER_MESSAGE: usize = 2_000;
/// A message the broker refuses (MQTT 5 reason code >= 0x80) is sent this
/// many times in a session, then its records go to the dead letters so the
/// stream moves on (SPEC 1.10, 1.11).
const MAX_REJECTIONS: u32 = 4;
/// After a refusal its stream waits this long before the next attempt,
/// doubling per attempt of the same message (1 s, 2 s, 4 s): a broker that
/// refuses everything (an ACL) is not hammered, and the dead letters grow at
/// the pace of the backoff rather than of the intake.
const REJECTION_BACKOFF: Duration = Duration::from_secs(1);
/// `details.message` of the `system.error` event announcing dead letters,
/// as the buffer writes it.
const DEAD_LETTER_NOTICE: &str = "records moved to dead letters";
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
}

pub struct Uplink {
    settings: UplinkSettings,
    topics: Topics,
    buffer: BufferHandle,
    board: Arc<StatusBoard>,
    started: Instant,
}

/// What one message carried, so its acknowledgement deletes the right rows.
#[derive(Debug)]
enum Pending {
    Records {
        ids: Vec<i64>,
        stream: StreamKey,
        first_seq: u64,
        last_seq: u64,
        submitted: Instant,
    },
    /// Status and heartbeat messages: nothing to delete.
    Control { topic: String },
}

/// The wait before sending a message again after its `attempts`-th refusal.
fn rejection_delay(attempts: u32) -> Duration {
    REJECTION_BACKOFF.saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Uplink {
    pub fn new(settings: UplinkSettings, buffer: BufferHandle, board: Arc<StatusBoard>) -> Self {
        let topics = Topics::new(
            &settings.mqtt.topic_prefix,
            &settings.site,
            &settings.agent_id,
        );
        Uplink {
            settings,
            topics,
            buffer,
            board,
            started: Instant::now(),
        }
    }

    /// Runs sessions until `cancel`, reconnecting with backoff.
    pub async fn run(&self, cancel: CancellationToken) {
        let m = &self.settings.mqtt;
        let mut backoff = Backoff::new(m.reconnect_initial, m.reconnect_max);
        let mut quiet = crate::throttle::Throttle::new(Duration::from_secs(300));
        loop {
            let (end, connected_at) = self.session(&cancel).await;
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(reason) => {
                    let was = self.board.mqtt().connected;
                    self.board.set_mqtt(false, &reason);
                    // Only a connection that stayed up a while starts the
                    // backoff over (SPEC 1.10): one dropped right after
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

    fn session_options(&self) -> SessionOptions {
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
            will_topic: self.topics.status(),
            will_payload: topics::agent_offline(
                now_ms(),
                &self.settings.version,
                &self.settings.boot_id,
                "connection_lost",
            ),
            // Room for the topic and MQTT header on top of the payload.
            max_packet_bytes: m.max_message_bytes + 4096,
            max_payload_bytes: m.max_message_bytes,
            inflight: (WINDOW + 16) as u16,
        }
    }

    /// One session, from connect to its end; also when it got connected
    /// (None if it never did), for the backoff.
    async fn session(&self, cancel: &CancellationToken) -> (SessionEnd, Option<Instant>) {
        self.board.beat("uplink");
        let mut session = Session::start(&self.session_options());
        let first = tokio::select! {
            _ = cancel.cancelled() => return (SessionEnd::Shutdown, None),
            ev = session.next() => ev,
        };
        let broker_max_packet = match first {
            Ok(MqttEvent::Connected {
                broker_max_packet, ..
            }) => broker_max_packet,
            Ok(other) => {
                return (
                    SessionEnd::Lost(format!("unexpected first event {other:?}")),
                    None,
                )
            }
            Err(e) => return (SessionEnd::Lost(e), None),
        };
        let limit = PayloadLimit::new(self.settings.mqtt.max_message_bytes, broker_max_packet);
        if let Some(reason) = self.unusable(&limit) {
            // Dropping the session closes the socket without DISCONNECT, so
            // the broker publishes the Last Will: the agent is offline.
            return (SessionEnd::Lost(reason), None);
        }
        let connected_at = Instant::now();
        let status_room = limit.for_topic(&self.topics.status());
        self.board.set_mqtt_limits(broker_max_packet, status_room);
        self.board.set_mqtt(true, "");
        tracing::info!(
            host = %self.settings.mqtt.host,
            port = self.settings.mqtt.port,
            broker_max_packet,
            "mqtt connected"
        );
        if status_room < self.settings.mqtt.max_message_bytes {
            tracing::info!(
                broker_max_packet,
                max_message_bytes = self.settings.mqtt.max_message_bytes,
                payload_limit = status_room,
                "the broker's Maximum Packet Size is below mqtt.max_message_bytes; messages are sized to the broker"
            );
        }
        let mut s = SessionState {
            limit,
            ..SessionState::default()
        };
        if let Ok(stats) = self.buffer.stats().await {
            for st in &stats.streams {
                if let (true, Some(last)) = (st.records > 0, st.last_seq) {
                    s.sync_targets.insert(st.stream(), last);
                }
            }
            if !s.sync_targets.is_empty() {
                s.sync_started = Some(Instant::now());
                tracing::info!(records = stats.records, "delivering buffered backlog");
            }
        }
        let end = self.session_loop(cancel, &mut session, &mut s).await;
        if matches!(end, SessionEnd::Shutdown) {
            self.shutdown(&mut session, &mut s).await;
        }
        (end, Some(connected_at))
    }

    /// A broker whose Maximum Packet Size leaves less than
    /// [`topics::MIN_PAYLOAD_BYTES`] on the agent's longest fixed topic can
    /// carry neither the status messages nor the events announcing a dead
    /// letter: the reason to give up on this session, or None.
    fn unusable(&self, limit: &PayloadLimit) -> Option<String> {
        let topic = self.topics.event("connection.status_changed");
        let room = limit.for_topic(&topic);
        if room >= topics::MIN_PAYLOAD_BYTES {
            return None;
        }
        Some(format!(
            "the broker's Maximum Packet Size ({} bytes) leaves {room} bytes for a message; \
             plantgate needs at least {} (raise max_packet_size on the broker)",
            limit.broker_max_packet.unwrap_or(0),
            topics::MIN_PAYLOAD_BYTES
        ))
    }

    async fn session_loop(
        &self,
        cancel: &CancellationToken,
        session: &mut Session,
        s: &mut SessionState,
    ) -> SessionEnd {
        let online = topics::agent_online(now_ms(), &self.settings.version, &self.settings.boot_id);
        if let Err(e) = self
            .publish_control(session, s, self.topics.status(), true, online, false)
            .await
        {
            return SessionEnd::Lost(e);
        }
        let mut status_rx = self.board.subscribe();
        status_rx.mark_changed();
        let hb_every = self
            .settings
            .mqtt
            .heartbeat_interval
            .max(Duration::from_millis(100));
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + hb_every, hb_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let appended = self.buffer.appended();
        // A slow safety net in case a wake-up is missed; the notify does the real work.
        let mut rescan = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_hold = s.holds.values().min().copied();
            self.board.beat("uplink");
            self.board.set_inflight(s.outstanding());
            // Register interest before reading, so an append that lands
            // between our read and the select still wakes us.
            let notified = appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if s.outstanding() < WINDOW {
                if let Err(e) = self.fill(session, s).await {
                    return SessionEnd::Lost(e);
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return SessionEnd::Shutdown,
                ev = session.next() => {
                    match ev {
                        Ok(ev) => self.on_event(ev, s).await,
                        Err(e) => return SessionEnd::Lost(e),
                    }
                }
                _ = status_rx.changed() => {
                    if let Err(e) = self.publish_connection_states(session, s).await {
                        return SessionEnd::Lost(e);
                    }
                }
                _ = heartbeat.tick() => {
                    let topic = self.topics.heartbeat();
                    let limit = s.limit.for_topic(&topic);
                    let payload = self.heartbeat_payload(s, limit).await;
                    if let Err(e) = self.publish_control(session, s, topic, false, payload, true).await {
                        return SessionEnd::Lost(e);
                    }
                }
                _ = &mut notified, if s.outstanding() < WINDOW => {}
                // A stream held back after a refusal may go again.
                _ = tokio::time::sleep_until(next_hold.unwrap_or_else(tokio::time::Instant::now)), if next_hold.is_some() => {}
                _ = rescan.tick() => self.rewind_requeued(s).await,
            }
        }
    }

    /// Rows put back below a stream's cursor (dead letters re-queued by
    /// `plantgate buffer retry`, possibly from another process) would never
    /// be read again in this session; move the cursor back to them. Rows
    /// below the cursor that are merely in flight don't count.
    async fn rewind_requeued(&self, s: &mut SessionState) {
        let Ok(stats) = self.buffer.stats().await else {
            return;
        };
        for st in stats.streams {
            let Some(first) = st.first_seq else { continue };
            let stream = st.stream();
            let Some(cursor) = s.cursors.get(&stream).copied() else {
                continue;
            };
            let in_flight_min = s
                .fifo
                .iter()
                .chain(s.inflight.values())
                .filter_map(|p| match p {
                    Pending::Records {
                        stream: ps,
                        first_seq,
                        ..
                    } if *ps == stream => Some(*first_seq),
                    _ => None,
                })
                .min();
            if first <= cursor && in_flight_min.map_or(true, |m| first < m) {
                tracing::info!(connection = %stream.connection, kind = %stream.kind, from_seq = first, "re-queued records found; sending them again");
                s.cursors.insert(stream, first - 1);
            }
        }
    }

    /// Reads the next messages from the buffer, round-robin over streams,
    /// until the window is full or nothing is left to send.
    async fn fill(&self, session: &Session, s: &mut SessionState) -> Result<(), String> {
        let streams = match self.buffer.streams().await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "buffer read failed");
                return Ok(());
            }
        };
        let now = tokio::time::Instant::now();
        s.holds.retain(|_, until| *until > now);
        let mut progressed = true;
        while progressed && s.outstanding() < WINDOW {
            progressed = false;
            for stream in &streams {
                if s.outstanding() >= WINDOW {
                    break;
                }
                if s.holds.contains_key(stream) {
                    continue;
                }
                // Events go one per message, so any one may fill a message.
                let max_bytes = if stream.kind == Kind::Event {
                    self.settings.mqtt.max_message_bytes
                } else {
                    s.limit
                        .for_topic(&self.topics.data(&stream.connection, stream.kind))
                };
                let after = s.cursors.get(stream).copied().unwrap_or(0);
                let records = match self
                    .buffer
                    .read_after(stream.clone(), after, MAX_RECORDS_PER_MESSAGE, max_bytes)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "buffer read failed");
                        continue;
                    }
                };
                if records.is_empty() {
                    continue;
                }
                progressed = true;
                if stream.kind == Kind::Event {
                    // Events go one per message to their own topic.
                    for r in records {
                        self.send_event(session, s, r).await?;
                    }
                } else {
                    self.send_batch(session, s, stream, records).await?;
                }
            }
        }
        Ok(())
    }

    async fn send_batch(
        &self,
        session: &Session,
        s: &mut SessionState,
        stream: &StreamKey,
        mut records: Vec<StoredRecord>,
    ) -> Result<(), String> {
        let epoch = self.buffer.epoch();
        let envelope = self.settings.agent_id.len() + stream.connection.len() + epoch.len();
        let topic = self.topics.data(&stream.connection, stream.kind);
        let max = s.limit.for_topic(&topic);
        let mut n = topics::fit(&records, max, envelope);
        let mut payload = topics::encode_batch(&self.settings.agent_id, &epoch, &records[..n]);
        // `fit` estimates; the encoded size decides. Shrink until it fits or
        // a single record is left.
        while payload.len() > max && n > 1 {
            n = (n * max / payload.len()).clamp(1, n - 1);
            payload = topics::encode_batch(&self.settings.agent_id, &epoch, &records[..n]);
        }
        records.truncate(n);
        let first_seq = records.first().map(|r| r.seq).unwrap_or(0);
        let last_seq = records.last().map(|r| r.seq).unwrap_or(0);
        if let Some(why) = s.limit.exceeded(&topic, payload.len()) {
            // A single record too large for any message: it can never be
            // sent within the contract, so it goes to the dead letters
            // (announced by a system.error event) instead of blocking its
            // stream or, sent anyway, making the broker drop the connection.
            let ids = records.iter().map(|r| r.id).collect();
            self.dead_letter_too_large(stream, first_seq, ids, why, false)
                .await;
            s.cursors.insert(stream.clone(), last_seq);
            // Dealt with, as far as the backlog is concerned.
            self.check_sync(s, stream, last_seq).await;
            return Ok(());
        }
        let ids = records.iter().map(|r| r.id).collect();
        session.publish(topic, false, false, payload).await?;
        s.cursors.insert(stream.clone(), last_seq);
        s.fifo.push_back(Pending::Records {
            ids,
            stream: stream.clone(),
            first_seq,
            last_seq,
            submitted: Instant::now(),
        });
        Ok(())
    }

    async fn send_event(
        &self,
        session: &Session,
        s: &mut SessionState,
        record: StoredRecord,
    ) -> Result<(), String> {
        let epoch = self.buffer.epoch();
        let (event_type, payload) = topics::encode_event(&self.settings.agent_id, &epoch, &record);
        let stream = record.stream();
        let topic = self.topics.event(&event_type);
        if let Some(why) = s.limit.exceeded(&topic, payload.len()) {
            // Same rule as a data record (SPEC 1.10): the event's own stream
            // moves on; the announcement is a small system.error that fits.
            let is_notice = serde_json::from_str::<serde_json::Value>(&record.data)
                .is_ok_and(|v| v["details"]["message"] == DEAD_LETTER_NOTICE);
            self.dead_letter_too_large(&stream, record.seq, vec![record.id], why, is_notice)
                .await;
            s.cursors.insert(stream.clone(), record.seq);
            self.check_sync(s, &stream, record.seq).await;
            return Ok(());
        }
        session.publish(topic, false, false, payload).await?;
        s.cursors.insert(stream.clone(), record.seq);
        s.fifo.push_back(Pending::Records {
            ids: vec![record.id],
            stream,
            first_seq: record.seq,
            last_seq: record.seq,
            submitted: Instant::now(),
        });
        Ok(())
    }

    /// Moves records that cannot fit one message to the dead letters (the
    /// buffer logs it and announces it with a `system.error` event).
    ///
    /// The buffer does not announce dead letters of the agent's own event
    /// stream: a notice refused like the event it announces would feed
    /// itself. A size limit cannot loop that way (the notice is small and
    /// the limit is at least [`topics::MIN_PAYLOAD_BYTES`]), so an oversized
    /// agent event is announced here, unless it is itself such a notice.
    async fn dead_letter_too_large(
        &self,
        stream: &StreamKey,
        seq: u64,
        ids: Vec<i64>,
        why: String,
        is_notice: bool,
    ) {
        let reason = format!("too large for one MQTT message: {why}");
        let count = ids.len() as u64;
        if let Err(e) = self.buffer.dead_letter(ids, reason.clone()).await {
            tracing::error!(connection = %stream.connection, kind = %stream.kind, seq, error = %e, "could not move an oversized record to dead letters; it stays in the buffer");
            return;
        }
        self.board.add_dead_lettered(DEAD_LETTER_TOO_LARGE, count);
        if stream.connection.is_empty() && stream.kind == Kind::Event && !is_notice {
            let notice = event_record(
                "",
                "system.error",
                serde_json::json!({
                    "message": DEAD_LETTER_NOTICE,
                    "connection": null,
                    "kind": Kind::Event.as_str(),
                    "first_seq": seq,
                    "last_seq": seq,
                    "count": count,
                    "reason": reason,
                }),
            );
            if let Err(e) = self.buffer.append(vec![notice]).await {
                tracing::error!(error = %e, "could not record the dead letter notice");
            }
        }
    }

    /// Publishes a status or heartbeat message. The callers trim their
    /// payloads to the limit; one still over it is not sent (the broker
    /// would drop the connection for it) but logged.
    async fn publish_control(
        &self,
        session: &Session,
        s: &mut SessionState,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        qos0: bool,
    ) -> Result<(), String> {
        if let Some(why) = s.limit.exceeded(&topic, payload.len()) {
            tracing::error!(%topic, %why, "control message too large for the broker; not sent");
            return Ok(());
        }
        session
            .publish(topic.clone(), qos0, retain, payload)
            .await?;
        // QoS 0 too: rumqttc reports every publish sent, with pkid 0.
        s.fifo.push_back(Pending::Control { topic });
        Ok(())
    }

    async fn on_event(&self, ev: MqttEvent, s: &mut SessionState) {
        match ev {
            MqttEvent::Sent(pkid) => {
                let Some(p) = s.fifo.pop_front() else {
                    tracing::warn!(pkid, "mqtt publish sent that we did not submit");
                    return;
                };
                if pkid != 0 {
                    s.inflight.insert(pkid, p);
                }
            }
            MqttEvent::Acked { pkid, rejected } => {
                let Some(p) = s.inflight.remove(&pkid) else {
                    return;
                };
                if rejected.is_some() {
                    self.board.record_rejected();
                }
                let (ids, stream, first_seq, last_seq, submitted) = match p {
                    Pending::Records {
                        ids,
                        stream,
                        first_seq,
                        last_seq,
                        submitted,
                    } => (ids, stream, first_seq, last_seq, submitted),
                    Pending::Control { topic } => {
                        // Nothing to retry: the next status change or
                        // heartbeat is sent anyway.
                        if let Some(reason) = rejected {
                            if let Some(repeats) = s.quiet.check(&topic) {
                                tracing::warn!(%topic, %reason, repeats, "broker refused a status message");
                            }
                        }
                        return;
                    }
                };
                if let Some(reason) = rejected {
                    self.on_rejected(s, ids, stream, (first_seq, last_seq), reason)
                        .await;
                    return;
                }
                if let Some(first) = ids.first() {
                    s.rejections.remove(first);
                }
                let n = ids.len() as u64;
                match self.buffer.ack(ids).await {
                    Ok(_) => {
                        self.board.add_published(&stream, n, submitted.elapsed());
                        s.acked_records += n;
                    }
                    Err(e) => tracing::error!(error = %e, "buffer ack failed; rows will be resent"),
                }
                self.check_sync(s, &stream, last_seq).await;
            }
            MqttEvent::Connected { .. } | MqttEvent::Other => {}
        }
    }

    /// A message the broker refused: resend it (and what followed it in its
    /// stream, to keep order) a bounded number of times, each after a longer
    /// wait during which its stream holds back, then dead-letter it.
    async fn on_rejected(
        &self,
        s: &mut SessionState,
        ids: Vec<i64>,
        stream: StreamKey,
        (first_seq, last_seq): (u64, u64),
        reason: String,
    ) {
        let key = ids.first().copied().unwrap_or(0);
        let attempts = s.rejections.entry(key).or_insert(0);
        *attempts += 1;
        if *attempts < MAX_REJECTIONS {
            let delay = rejection_delay(*attempts);
            tracing::warn!(connection = %stream.connection, kind = %stream.kind, seq = first_seq, %reason, attempt = *attempts, retry_in_ms = delay.as_millis() as u64, "broker refused a message; its stream waits, then retries");
            let until = tokio::time::Instant::now() + delay;
            let hold = s.holds.entry(stream.clone()).or_insert(until);
            *hold = (*hold).max(until);
            let cursor = s.cursors.entry(stream).or_insert(0);
            *cursor = (*cursor).min(first_seq.saturating_sub(1));
            return;
        }
        s.rejections.remove(&key);
        let reason = format!("broker refused the message {MAX_REJECTIONS} times: {reason}");
        let count = ids.len() as u64;
        tracing::error!(connection = %stream.connection, kind = %stream.kind, seq = first_seq, count, %reason, "records moved to dead letters");
        match self.buffer.dead_letter(ids, reason).await {
            Ok(_) => {
                self.board.add_dead_lettered(DEAD_LETTER_REFUSED, count);
                self.check_sync(s, &stream, last_seq).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not move refused records to dead letters; they will be resent")
            }
        }
    }

    /// Emits `sync.completed` once every stream that had a backlog at connect
    /// time has been acknowledged (or dead-lettered) up to where it stood.
    async fn check_sync(&self, s: &mut SessionState, stream: &StreamKey, acked_seq: u64) {
        if let Some(target) = s.sync_targets.get(stream) {
            if acked_seq >= *target {
                s.sync_targets.remove(stream);
            }
        }
        if s.sync_targets.is_empty() {
            if let Some(started) = s.sync_started.take() {
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(
                    records = s.acked_records,
                    duration_ms = ms,
                    "backlog delivered"
                );
                let ev = event_record(
                    "",
                    "sync.completed",
                    serde_json::json!({"records": s.acked_records, "duration_ms": ms}),
                );
                if let Err(e) = self.buffer.append(vec![ev]).await {
                    tracing::error!(error = %e, "could not record sync.completed");
                }
                crate::heap::release_free();
            }
        }
    }

    async fn publish_connection_states(
        &self,
        session: &Session,
        s: &mut SessionState,
    ) -> Result<(), String> {
        for (id, st) in self.board.connections() {
            let key = (st.state, st.reason.clone());
            if s.published_states.get(&id) == Some(&key) {
                continue;
            }
            let topic = self.topics.connection_status(&id);
            let payload = topics::connection_status_within(
                st.state.as_str(),
                st.since_ms,
                &st.reason,
                s.limit.for_topic(&topic),
            );
            self.publish_control(session, s, topic, true, payload, false)
                .await?;
            s.published_states.insert(id, key);
        }
        Ok(())
    }

    async fn heartbeat_payload(&self, s: &mut SessionState, limit: usize) -> Vec<u8> {
        let (records, bytes, oldest_ts_ms) = match self.buffer.stats().await {
            Ok(st) => (st.records, st.bytes, st.oldest_ts_ms),
            Err(_) => (0, 0, None),
        };
        let connections: Vec<(String, &'static str)> = self
            .board
            .connections()
            .into_iter()
            .map(|(id, st)| (id, st.state.as_str()))
            .collect();
        let (payload, omitted) = topics::heartbeat(
            &topics::Heartbeat {
                ts_ms: now_ms(),
                uptime_s: self.started.elapsed().as_secs(),
                records,
                bytes,
                oldest_ts_ms,
                connections: &connections,
                published_records_total: self.board.mqtt().published_records_total,
            },
            limit,
        );
        if omitted > 0 && s.quiet.check("heartbeat trimmed").is_some() {
            tracing::warn!(
                omitted,
                connections = connections.len(),
                limit,
                "heartbeat too large for one message; some connections left out (see /status)"
            );
        }
        payload
    }

    /// Clean shutdown: offline status for every connection and the agent
    /// (retained), then wait briefly for outstanding acknowledgements so the
    /// buffer does not resend what the broker already has.
    async fn shutdown(&self, session: &mut Session, s: &mut SessionState) {
        let now = now_ms();
        for (id, _) in self.board.connections() {
            let payload = topics::connection_status(ConnState::Offline.as_str(), now, "shutdown");
            let topic = self.topics.connection_status(&id);
            let _ = self
                .publish_control(session, s, topic, true, payload, false)
                .await;
        }
        let offline = topics::agent_offline(
            now,
            &self.settings.version,
            &self.settings.boot_id,
            "shutdown",
        );
        let _ = self
            .publish_control(session, s, self.topics.status(), true, offline, false)
            .await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        while s.outstanding() > 0 {
            match tokio::time::timeout_at(deadline, session.next()).await {
                Ok(Ok(ev)) => self.on_event(ev, s).await,
                _ => break,
            }
        }
        session.disconnect().await;
        // Let the DISCONNECT reach the broker so it discards the Last Will.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while session.next().await.is_ok() {}
        })
        .await;
        self.board.set_mqtt(false, "shutdown");
        tracing::info!(outstanding = s.outstanding(), "mqtt session closed");
    }
}

struct SessionState {
    /// Payload limit of this session (config and broker).
    limit: PayloadLimit,
    /// Streams held back after a refusal, until when.
    holds: HashMap<StreamKey, tokio::time::Instant>,
    /// Repeated warnings of this session.
    quiet: crate::throttle::Throttle,
    /// Submitted, not yet reported sent by rumqttc.
    fifo: VecDeque<Pending>,
    /// Sent, awaiting PUBACK, by packet id.
    inflight: HashMap<u16, Pending>,
    /// Last seq submitted per stream in this session.
    cursors: HashMap<StreamKey, u64>,
    /// Retained connection states published in this session.
    published_states: HashMap<String, (ConnState, String)>,
    /// Per stream, the seq the backlog reached at connect time.
    sync_targets: HashMap<StreamKey, u64>,
    sync_started: Option<Instant>,
    acked_records: u64,
    /// Rejections per message (keyed by its first row id) in this session.
    rejections: HashMap<i64, u32>,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            limit: PayloadLimit::new(usize::MAX, None),
            holds: HashMap::new(),
            quiet: crate::throttle::Throttle::new(Duration::from_secs(300)),
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            cursors: HashMap::new(),
            published_states: HashMap::new(),
            sync_targets: HashMap::new(),
            sync_started: None,
            acked_records: 0,
            rejections: HashMap::new(),
        }
    }
}

impl SessionState {
    fn outstanding(&self) -> usize {
        self.fifo.len() + self.inflight.len()
    }
}
