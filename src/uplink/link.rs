//! One connected MQTT session of the uplink: the loop that reads the
//! buffer, sends messages, and executes what [`Delivery`] decides when the
//! broker answers. All bookkeeping lives in `Delivery` (pure, model-tested);
//! this file only performs I/O: buffer reads, acks and dead letters,
//! publishes, status and heartbeat messages, the clean shutdown.

mod replay;
mod sparkplug;
mod wire;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::delivery::{Action, Batch, Delivery, Message, SyncCompleted};
use super::mqtt::{MqttEvent, Session, SessionError};
use super::payload::{self, Heartbeat};
use super::replays::Replays;
use super::topics::PayloadLimit;
use super::{Uplink, MAX_RECORDS_PER_MESSAGE, SHUTDOWN_FLUSH, WINDOW};
use crate::buffer::BufferError;
use crate::record::{now_ms, EventType, Kind, NewRecord, RecordId, StoredRecord, StreamKey};
use crate::sparkplug::EdgeNode;
use crate::status::{ConnState, DEAD_LETTER_REFUSED, DEAD_LETTER_TOO_LARGE};
use crate::throttle::Throttle;

/// `details.message` of the `system.error` event announcing dead letters,
/// as the buffer writes it.
const DEAD_LETTER_NOTICE: &str = "records moved to dead letters";

/// How a connected session ended.
pub(super) enum LinkEnd {
    Shutdown,
    Lost(SessionError),
}

pub(super) struct Link<'a> {
    up: &'a Uplink,
    session: Session,
    delivery: Delivery,
    /// Payload limit of this session (config and broker).
    limit: PayloadLimit,
    /// Retained connection states published in this session.
    published_states: HashMap<String, (ConnState, String)>,
    /// Repeated warnings of this session.
    quiet: Throttle,
    /// The buffer's count of re-queues when last looked at.
    requeues: u64,
    /// Messages the broker acknowledged whose rows the buffer could not
    /// delete yet (a lock held by another process): retried every second,
    /// so a delivered backlog does not stay on disk until the next session.
    undeleted: Vec<Batch>,
    /// Replay requests, kept across sessions by the uplink.
    replays: &'a mut Replays,
    /// With `mqtt.format = "sparkplug_b"`: the edge node, kept across
    /// sessions by the uplink (docs/sparkplug.md).
    node: Option<&'a mut EdgeNode>,
}

impl<'a> Link<'a> {
    /// A session just connected. `backlog`: per stream with rows on disk,
    /// the seq of its newest row; `requeues`: the buffer's count of
    /// re-queues then.
    pub(super) fn new(
        up: &'a Uplink,
        session: Session,
        limit: PayloadLimit,
        backlog: HashMap<StreamKey, u64>,
        requeues: u64,
        replays: &'a mut Replays,
        node: Option<&'a mut EdgeNode>,
    ) -> Self {
        Link {
            up,
            session,
            delivery: Delivery::new(WINDOW, backlog, Instant::now()),
            limit,
            published_states: HashMap::new(),
            quiet: Throttle::new(Duration::from_secs(300)),
            requeues,
            undeleted: Vec::new(),
            replays,
            node,
        }
    }

    /// Sends until the session is lost or `cancel`; on `cancel`, closes the
    /// session cleanly.
    pub(super) async fn run(mut self, cancel: &CancellationToken) -> LinkEnd {
        let end = match self.serve(cancel).await {
            Ok(()) => LinkEnd::Shutdown,
            Err(e) => LinkEnd::Lost(e),
        };
        if matches!(end, LinkEnd::Shutdown) {
            self.shutdown().await;
        }
        end
    }

    /// The select loop: Ok on `cancel`, Err when the session is lost.
    async fn serve(&mut self, cancel: &CancellationToken) -> Result<(), SessionError> {
        let up = self.up;
        if let Some(node) = self.node.as_deref() {
            // Commands before the BIRTHs, as Sparkplug asks: a rebirth
            // request right after them is not missed.
            let mut topics = vec![up.topics.replay_commands()];
            topics.extend(node.topics().commands());
            self.session.subscribe(topics).await?;
            self.sp_birth(false).await?;
        } else {
            let online =
                payload::agent_online(now_ms(), &up.settings.version, &up.settings.boot_id);
            self.publish_control(up.topics.status(), true, online, false)
                .await?;
            // Replay requests (docs/mqtt.md): the only topic the agent
            // listens to.
            self.session
                .subscribe(vec![up.topics.replay_commands()])
                .await?;
        }
        let mut status_rx = up.board.subscribe();
        status_rx.mark_changed();
        let hb_every = up
            .settings
            .mqtt
            .heartbeat_interval
            .max(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + hb_every, hb_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let appended = up.buffer.appended();
        // A slow safety net in case a wake-up is missed (the notify does the
        // real work), and the check for rows re-queued by another process.
        let mut rescan = tokio::time::interval(Duration::from_secs(1));
        loop {
            up.board.beat("uplink");
            up.board.set_inflight(self.delivery.outstanding());
            // Register interest before reading, so an append that lands
            // between our read and the select still wakes us.
            let notified = appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.delivery.has_room() {
                self.fill().await?;
            }
            // Replays after live data, in their own share of the window.
            let replay_wake = self.replay_step().await?;
            let release = self.delivery.next_release();
            let room = self.delivery.has_room();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                ev = self.session.next() => self.on_event(ev?).await?,
                _ = status_rx.changed() => self.publish_connection_states().await?,
                _ = heartbeat.tick() => self.publish_heartbeat().await?,
                _ = &mut notified, if room => {}
                // A stream held back after a refusal may go again.
                _ = tokio::time::sleep_until(release.unwrap_or_else(Instant::now)), if release.is_some() => {}
                // The replay's token bucket has refilled.
                _ = tokio::time::sleep_until(replay_wake.unwrap_or_else(Instant::now)), if replay_wake.is_some() => {}
                _ = rescan.tick() => {
                    self.delete_acknowledged().await;
                    self.rewind_requeued().await;
                }
            }
        }
    }

    /// Deletes the rows of acknowledged messages that the buffer could not
    /// delete when their PUBACK came, all in one try (a lock makes each
    /// try wait the busy timeout); kept for the next second if it fails.
    async fn delete_acknowledged(&mut self) {
        if self.undeleted.is_empty() {
            return;
        }
        let up = self.up;
        let ids: Vec<RecordId> = self.undeleted.iter().flat_map(|b| b.ids.clone()).collect();
        let records = ids.len() as u64;
        if up.buffer.ack(ids).await.is_err() {
            up.board.delete_failed(records);
            return;
        }
        for batch in std::mem::take(&mut self.undeleted) {
            let n = batch.ids.len() as u64;
            up.board
                .add_published(&batch.stream, n, batch.submitted.elapsed());
        }
        up.board.deletes_caught_up();
        tracing::info!(
            records,
            "acknowledged records deleted after the buffer took deletes again"
        );
    }

    /// The first delete that fails after all were done: said in an event,
    /// which the buffer stores once it takes writes again.
    fn announce_undeleted(&self, records: u64, error: &BufferError) {
        let ev = NewRecord::event(
            "",
            EventType::SystemError,
            serde_json::json!({
                "message": "acknowledged records cannot be deleted from the buffer yet; \
                            retrying every second (they are sent again if the session ends first)",
                "records": records,
                "error": error.to_string(),
            }),
        );
        self.up.buffer.record_events(vec![ev]);
    }

    /// Rows put back into the buffer (dead letters re-queued by `plantgate
    /// buffer retry`, possibly from another process) may lie below a
    /// stream's cursor and would never be read again in this session: when
    /// the buffer's count of re-queues moves, read every stream again from
    /// its oldest row.
    async fn rewind_requeued(&mut self) {
        let Ok(stats) = self.up.buffer.stats().await else {
            return;
        };
        if stats.requeues == self.requeues {
            return;
        }
        self.requeues = stats.requeues;
        for st in stats.streams {
            let Some(first) = st.first_seq else { continue };
            let stream = st.stream();
            if self.delivery.rewind(&stream, first) {
                tracing::info!(connection = %stream.connection, kind = %stream.kind, from_seq = first, "re-queued records found; sending them again");
            }
        }
    }

    /// Reads the next messages from the buffer, round-robin over streams,
    /// until the window is full or nothing is left to send.
    async fn fill(&mut self) -> Result<(), SessionError> {
        let streams = match self.up.buffer.streams().await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "buffer read failed");
                return Ok(());
            }
        };
        // Connections with records read (or held back) in this fill.
        let mut busy = HashSet::new();
        let mut progressed = true;
        while progressed && self.delivery.has_room() {
            progressed = false;
            for stream in &streams {
                if !self.delivery.has_room() {
                    break;
                }
                if self.delivery.held(stream, Instant::now()) {
                    busy.insert(stream.connection.clone());
                    continue;
                }
                let Some(records) = self.read(stream).await else {
                    continue;
                };
                progressed = true;
                busy.insert(stream.connection.clone());
                if stream.kind == Kind::Event {
                    // Events go one per message to their own topic.
                    for r in records {
                        self.send_event(r).await?;
                    }
                } else {
                    self.send_batch(stream, records).await?;
                }
            }
        }
        // Every stream was read to its end: what is not busy has nothing
        // left to send.
        if !progressed && self.node.is_some() {
            self.sp_deaths(&busy).await?;
        }
        Ok(())
    }

    /// The most `data` one read of `stream` may return: what fills one
    /// message.
    fn read_limit(&self, stream: &StreamKey) -> usize {
        let up = self.up;
        // Events go one per message, so any one may fill a message.
        if stream.kind == Kind::Event {
            up.settings.mqtt.max_message_bytes
        } else {
            self.limit.for_topic(&self.topic_of(stream))
        }
    }

    /// The records after the stream's cursor that may fill one message;
    /// None when there are none (or the read failed).
    async fn read(&mut self, stream: &StreamKey) -> Option<Vec<StoredRecord>> {
        let up = self.up;
        let max_bytes = self.read_limit(stream);
        let after = self.delivery.cursor(stream);
        let read = up
            .buffer
            .read_after(stream.clone(), after, MAX_RECORDS_PER_MESSAGE, max_bytes)
            .await;
        match read {
            Ok(records) if records.is_empty() => {
                let done = self.delivery.caught_up(stream, Instant::now());
                self.announce_sync(done).await;
                None
            }
            Ok(records) => Some(records),
            Err(e) => {
                tracing::error!(error = %e, "buffer read failed");
                None
            }
        }
    }

    async fn send_batch(
        &mut self,
        stream: &StreamKey,
        mut records: Vec<StoredRecord>,
    ) -> Result<(), SessionError> {
        let encoded = self.encode(stream, &records, false);
        records.truncate(encoded.n);
        let batch = Batch {
            stream: stream.clone(),
            ids: records.iter().map(|r| r.id).collect(),
            first_seq: records.first().map_or(0, |r| r.seq),
            last_seq: records.last().map_or(0, |r| r.seq),
            submitted: Instant::now(),
        };
        if let Some(why) = self.limit.exceeded(&encoded.topic, encoded.len()) {
            // A single record too large for any message: it can never be
            // sent within the contract, so it goes to the dead letters
            // (announced by a system.error event) instead of blocking its
            // stream or, sent anyway, making the broker drop the connection.
            self.dead_letter_too_large(batch, why, false).await;
            return Ok(());
        }
        self.publish_encoded(encoded).await?;
        self.delivery.submitted(Message::Records(batch));
        Ok(())
    }

    async fn send_event(&mut self, record: StoredRecord) -> Result<(), SessionError> {
        let stream = record.stream();
        let encoded = self.encode(&stream, std::slice::from_ref(&record), false);
        let batch = Batch {
            stream,
            ids: vec![record.id],
            first_seq: record.seq,
            last_seq: record.seq,
            submitted: Instant::now(),
        };
        if let Some(why) = self.limit.exceeded(&encoded.topic, encoded.len()) {
            // Same rule as a data record: the event's own stream moves on;
            // the announcement is a small system.error that fits.
            let is_notice = serde_json::from_str::<serde_json::Value>(&record.data)
                .is_ok_and(|v| v["details"]["message"] == DEAD_LETTER_NOTICE);
            self.dead_letter_too_large(batch, why, is_notice).await;
            return Ok(());
        }
        self.publish_encoded(encoded).await?;
        self.delivery.submitted(Message::Records(batch));
        Ok(())
    }

    /// Moves records that cannot fit one message to the dead letters (the
    /// buffer logs it and announces it with a `system.error` event).
    ///
    /// The buffer does not announce dead letters of the agent's own event
    /// stream: a notice refused like the event it announces would feed
    /// itself. A size limit cannot loop that way (the notice is small and
    /// the limit is at least [`super::topics::MIN_PAYLOAD_BYTES`]), so an
    /// oversized agent event is announced here, unless it is itself such a
    /// notice.
    async fn dead_letter_too_large(&mut self, batch: Batch, why: String, is_notice: bool) {
        let up = self.up;
        let Batch {
            stream,
            ids,
            first_seq: seq,
            last_seq,
            ..
        } = batch;
        let reason = format!("too large for one MQTT message: {why}");
        let count = ids.len() as u64;
        // Dealt with, as far as this session's reading goes, even if the
        // move fails (the rows then stay and are tried in the next session).
        self.delivery.skipped(&stream, last_seq);
        if let Err(e) = up.buffer.dead_letter(ids, reason.clone()).await {
            tracing::error!(connection = %stream.connection, kind = %stream.kind, seq, error = %e, "could not move an oversized record to dead letters; it stays in the buffer");
            return;
        }
        up.board.add_dead_lettered(DEAD_LETTER_TOO_LARGE, count);
        if stream.connection.is_empty() && stream.kind == Kind::Event && !is_notice {
            let notice = NewRecord::event(
                "",
                EventType::SystemError,
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
            up.buffer.record_events(vec![notice]);
        }
        let done = self.delivery.dead_lettered(&stream, Instant::now());
        self.announce_sync(done).await;
    }

    /// Publishes a status or heartbeat message. The callers trim their
    /// payloads to the limit; one still over it is not sent (the broker
    /// would drop the connection for it) but logged.
    async fn publish_control(
        &mut self,
        topic: String,
        retain: bool,
        body: Vec<u8>,
        qos0: bool,
    ) -> Result<(), SessionError> {
        if let Some(why) = self.limit.exceeded(&topic, body.len()) {
            tracing::error!(%topic, %why, "control message too large for the broker; not sent");
            return Ok(());
        }
        self.session
            .publish(topic.clone(), qos0, retain, body)
            .await?;
        // QoS 0 too: rumqttc reports every publish sent, with pkid 0.
        self.delivery.submitted(Message::Control { topic });
        Ok(())
    }

    async fn on_event(&mut self, ev: MqttEvent) -> Result<(), SessionError> {
        let action = match ev {
            MqttEvent::Sent(pkid) => self.delivery.sent(pkid),
            MqttEvent::Acked { pkid, rejected } => {
                if rejected.is_some() {
                    self.up.board.record_rejected();
                }
                self.delivery.acked(pkid, rejected, Instant::now())
            }
            MqttEvent::Command {
                topic,
                payload,
                response_topic,
                correlation,
            } => {
                if self.node.is_some() && topic != self.up.topics.replay_commands() {
                    return self.sp_command(&topic, &payload).await;
                }
                return self
                    .on_command(topic, payload, response_topic, correlation)
                    .await;
            }
            MqttEvent::Subscribed { refused } => {
                self.commands_subscribed(refused);
                None
            }
            MqttEvent::Connected { .. } | MqttEvent::Other => None,
        };
        if let Some(action) = action {
            self.execute(action).await;
        }
        Ok(())
    }

    /// The broker's answer to the commands subscription: shown in
    /// `/status`; a refusal (an ACL) is logged and announced by a
    /// `system.error` once, since consumers' replay requests can no longer
    /// reach the agent.
    fn commands_subscribed(&self, refused: Option<String>) {
        use std::sync::atomic::Ordering;
        let up = self.up;
        up.board.set_commands_subscribed(refused.is_none());
        let Some(why) = refused else {
            up.commands_refusal_announced
                .store(false, Ordering::Relaxed);
            return;
        };
        let topic = up.topics.replay_commands();
        tracing::warn!(%topic, %why, "replay requests cannot reach the agent");
        if up.commands_refusal_announced.swap(true, Ordering::Relaxed) {
            return;
        }
        let ev = NewRecord::event(
            "",
            EventType::SystemError,
            serde_json::json!({
                "message": "the broker refused the subscription to the replay commands topic; \
                            replay requests cannot reach the agent (check the broker ACL)",
                "topic": topic,
                "reason": why,
            }),
        );
        up.buffer.record_events(vec![ev]);
    }

    async fn execute(&mut self, action: Action) {
        let up = self.up;
        match action {
            Action::Delete(batch) => {
                let n = batch.ids.len() as u64;
                match up.buffer.ack(batch.ids.clone()).await {
                    Ok(_) => up
                        .board
                        .add_published(&batch.stream, n, batch.submitted.elapsed()),
                    Err(e) => {
                        if let Some(repeats) = self.quiet.check("buffer ack failed") {
                            tracing::error!(error = %e, repeats, "buffer ack failed; retrying the delete every second (the records are resent only if the session ends first)");
                        }
                        if self.undeleted.is_empty() {
                            self.announce_undeleted(n, &e);
                        }
                        self.undeleted.push(batch.clone());
                        let waiting = self.undeleted.iter().map(|b| b.ids.len() as u64).sum();
                        up.board.delete_failed(waiting);
                    }
                }
                let done = self.delivery.delivered(&batch, Instant::now());
                self.announce_sync(done).await;
            }
            Action::Retry {
                batch,
                attempt,
                retry_in,
                reason,
            } => {
                let s = &batch.stream;
                tracing::warn!(connection = %s.connection, kind = %s.kind, seq = batch.first_seq, %reason, attempt, retry_in_ms = retry_in.as_millis() as u64, "broker refused a message; its stream waits, then retries");
            }
            Action::DeadLetter { batch, reason } => {
                let s = &batch.stream;
                let count = batch.ids.len() as u64;
                tracing::error!(connection = %s.connection, kind = %s.kind, seq = batch.first_seq, count, %reason, "records moved to dead letters");
                match up.buffer.dead_letter(batch.ids.clone(), reason).await {
                    Ok(_) => {
                        up.board.add_dead_lettered(DEAD_LETTER_REFUSED, count);
                        let done = self.delivery.dead_lettered(s, Instant::now());
                        self.announce_sync(done).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not move refused records to dead letters; they will be resent")
                    }
                }
            }
            Action::ControlRefused { topic, reason } => {
                if let Some(repeats) = self.quiet.check(&topic) {
                    tracing::warn!(%topic, %reason, repeats, "broker refused a status message");
                }
            }
            Action::ReplayRefused { request_id, reason } => {
                up.board.replay_message_refused();
                if let Some(repeats) = self.quiet.check("replay refused") {
                    tracing::warn!(%request_id, %reason, repeats, "broker refused a replay message; it is not sent again");
                }
            }
            Action::UnknownSent { pkid } => {
                tracing::warn!(pkid, "mqtt publish sent that we did not submit");
            }
        }
    }

    /// Records `sync.completed` when the backlog found at connect time has
    /// been delivered (or dead-lettered).
    async fn announce_sync(&self, done: Option<SyncCompleted>) {
        let Some(done) = done else { return };
        let ms = done.duration.as_millis() as u64;
        tracing::info!(
            records = done.records,
            duration_ms = ms,
            "backlog delivered"
        );
        let ev = NewRecord::event(
            "",
            EventType::SyncCompleted,
            serde_json::json!({"records": done.records, "duration_ms": ms}),
        );
        self.up.buffer.record_events(vec![ev]);
        crate::heap::release_free();
    }

    async fn publish_connection_states(&mut self) -> Result<(), SessionError> {
        if self.node.is_some() {
            return self.sp_states().await;
        }
        let up = self.up;
        for (id, st) in up.board.connections() {
            let key = (st.state, st.reason.clone());
            if self.published_states.get(&id) == Some(&key) {
                continue;
            }
            let topic = up.topics.connection_status(&id);
            let body = payload::connection_status_within(
                st.state.as_str(),
                st.since_ms,
                &st.reason,
                self.limit.for_topic(&topic),
            );
            self.publish_control(topic, true, body, false).await?;
            self.published_states.insert(id, key);
        }
        Ok(())
    }

    async fn publish_heartbeat(&mut self) -> Result<(), SessionError> {
        if self.node.is_some() {
            return self.sp_heartbeat().await;
        }
        let up = self.up;
        let topic = up.topics.heartbeat();
        let limit = self.limit.for_topic(&topic);
        let (records, bytes, oldest_ts_ms) = match up.buffer.stats().await {
            Ok(st) => (st.records, st.bytes, st.oldest_ts_ms),
            Err(_) => (0, 0, None),
        };
        let connections: Vec<(String, &'static str)> = up
            .board
            .current_connections()
            .into_iter()
            .map(|(id, st)| (id, st.state.as_str()))
            .collect();
        let (body, omitted) = payload::heartbeat(
            &Heartbeat {
                ts_ms: now_ms(),
                uptime_s: up.started.elapsed().as_secs(),
                records,
                bytes,
                oldest_ts_ms,
                connections: &connections,
                published_records_total: up.board.mqtt().published_records_total,
            },
            limit,
        );
        if omitted > 0 && self.quiet.check("heartbeat trimmed").is_some() {
            tracing::warn!(
                omitted,
                connections = connections.len(),
                limit,
                "heartbeat too large for one message; some connections left out (see /status)"
            );
        }
        self.publish_control(topic, false, body, true).await
    }

    /// Clean shutdown: offline status for every connection and the agent
    /// (retained), then wait briefly for outstanding acknowledgements so the
    /// buffer does not resend what the broker already has. Replaced by a
    /// reload, the agent goes `offline` with reason `reload` until the new
    /// uplink says `online`, and the connections, which keep running, are
    /// left as they are.
    async fn shutdown(&mut self) {
        let up = self.up;
        let now = now_ms();
        let replaced = up.is_replaced();
        let why = if replaced { "reload" } else { "shutdown" };
        if self.node.is_some() {
            self.sp_farewell().await;
        } else {
            if !replaced {
                for (id, _) in up.board.current_connections() {
                    let body = payload::connection_status(ConnState::Offline.as_str(), now, why);
                    let topic = up.topics.connection_status(&id);
                    let _ = self.publish_control(topic, true, body, false).await;
                }
            }
            let offline =
                payload::agent_offline(now, &up.settings.version, &up.settings.boot_id, why);
            let _ = self
                .publish_control(up.topics.status(), true, offline, false)
                .await;
        }
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        while self.delivery.outstanding() > 0 {
            match tokio::time::timeout_at(deadline, self.session.next()).await {
                Ok(Ok(ev)) => {
                    if self.on_event(ev).await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.session.disconnect().await;
        // Let the DISCONNECT reach the broker so it discards the Last Will.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while self.session.next().await.is_ok() {}
        })
        .await;
        up.board.set_mqtt(false, why);
        tracing::info!(
            outstanding = self.delivery.outstanding(),
            "mqtt session closed"
        );
    }
}
