//! The status board: shared, cheap-to-read state of the agent (connection
//! states, MQTT state, counters, task health). Connections write through
//! their `source::ConnectionReporter`, the buffer reports its intake
//! (`buffer::IntakeObserver`), the uplink its session; the uplink (retained
//! status, heartbeat), `announce` and the health endpoint read it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::watch;

use crate::buffer::IntakeObserver;
use crate::rate::{IntakeRate, PerSecond};
use crate::record::now_ms;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Connecting,
    Online,
    Offline,
    AuthRequired,
    Untrusted,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Online => "online",
            ConnState::Offline => "offline",
            ConnState::AuthRequired => "auth_required",
            ConnState::Untrusted => "untrusted",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnStatus {
    pub state: ConnState,
    pub since_ms: i64,
    pub reason: String,
    pub records_total: u64,
    pub last_value_ts_ms: Option<i64>,
    /// Values that reached the agent but were not accepted (docs/guarantees.md), by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// OPC UA subscriptions of the current (or last) session: how many the
    /// agent asked for and how many the server allowed (fewer means fewer
    /// publish requests in flight, docs/performance.md).
    pub subscriptions: Option<Subscriptions>,
    /// Reading gaps back from the server's history (docs/backfill.md);
    /// None while the connection has `backfill = "off"`.
    pub backfill: Option<BackfillStatus>,
    /// The connection's kind (`deltav`, `optomes`, `generic`; empty when
    /// not registered by the agent).
    pub kind: &'static str,
    /// Whether it announces intake loss (`source.dropped` in its `events`).
    #[serde(skip)]
    pub announces_drops: bool,
    /// Removed by a reload: its `offline` status (reason `removed`) is
    /// still published; it is left out of `/status` and the heartbeat.
    #[serde(skip)]
    pub removed: bool,
    /// Registration order: configuration order at start, then reloads.
    #[serde(skip)]
    order: u64,
}

/// A connection's backfill (docs/backfill.md): what the runs read back and
/// what they had to skip, so a gap that was not closed is never silent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackfillStatus {
    /// Runs completed (one per gap, or per gaps found together).
    pub runs_total: u64,
    /// Values read back and accepted (`"backfill": true` records).
    pub records_total: u64,
    /// Tags a run could not read: no history on the server for them, or
    /// no HistoryRead service at all.
    pub tags_without_history_total: u64,
    /// Values the server returned that were not asked for (outside the gap,
    /// out of order, or more than the chunk asked for); never emitted.
    pub values_skipped_total: u64,
    /// Continuation points the server no longer knew; the read went on from
    /// the last value taken.
    pub continuation_restarts_total: u64,
    /// Milliseconds of gaps older than `backfill_max`, not read back.
    pub not_read_ms_total: u64,
    /// Whether a run is going on now.
    pub running: bool,
    /// How far back the oldest part still to be read lies (ms); 0 when idle.
    pub behind_ms: u64,
    /// Gaps (per tag) still to be read back.
    pub gaps_pending: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Subscriptions {
    pub wanted: usize,
    pub created: usize,
}

impl ConnStatus {
    fn new(reason: &str) -> Self {
        ConnStatus {
            state: ConnState::Connecting,
            since_ms: now_ms(),
            reason: reason.to_string(),
            records_total: 0,
            last_value_ts_ms: None,
            dropped: BTreeMap::new(),
            subscriptions: None,
            backfill: None,
            kind: "",
            announces_drops: true,
            removed: false,
            order: 0,
        }
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// Why a value that reached the agent was not accepted (docs/guarantees.md): the
/// `reason` label of `plantgate_intake_dropped_total` and of `source.dropped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The OPC UA server discarded values from a full monitored-item queue
    /// (the `Overflow` info bit): at least one value per flag.
    #[serde(rename = "opcua_queue_overflow")]
    ServerOverflow,
    /// The agent's own queue between the OPC UA session and the buffer was
    /// full because the buffer did not keep up.
    QueueFull,
    /// The buffer refused the records (full of records it may not evict,
    /// or failing for longer than the agent could hold them).
    BufferRefused,
    /// A value too large for the decoder or for a message: the tag got a
    /// `bad` record instead.
    ValueTooLarge,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ServerOverflow => "opcua_queue_overflow",
            DropReason::QueueFull => "queue_full",
            DropReason::BufferRefused => "buffer_refused",
            DropReason::ValueTooLarge => "value_too_large",
        }
    }
}

/// Drops of one connection and reason not yet announced by a
/// `source.dropped` event.
#[derive(Clone, Debug, PartialEq)]
pub struct DropReport {
    pub connection: String,
    pub reason: DropReason,
    pub count: u64,
    /// A few tag names that lost values, for the operator to look at.
    pub samples: Vec<String>,
}

/// Tag names kept per unannounced report.
const DROP_SAMPLES: usize = 5;

#[derive(Clone, Debug, Default)]
pub struct MqttStatus {
    pub connected: bool,
    pub since_ms: i64,
    pub reason: String,
    pub published_records_total: u64,
    pub reconnects_total: u64,
    /// MQTT messages submitted and not yet acknowledged.
    pub inflight: usize,
    /// Submit-to-PUBACK time of record messages.
    pub publish_latency: Histogram,
    /// Records acknowledged by the broker, per stream (connection, kind).
    pub published_by_stream: BTreeMap<(String, &'static str), u64>,
    /// Messages the broker refused (MQTT 5 PUBACK reason >= 0x80), every
    /// attempt counted: a message refused three times counts three.
    pub rejected_total: u64,
    /// When the broker last refused a message (ms since the Unix epoch).
    pub last_rejected_ms: Option<i64>,
    /// Records the uplink moved to the dead letters, by cause
    /// ([`DEAD_LETTER_REFUSED`], [`DEAD_LETTER_TOO_LARGE`]).
    pub dead_lettered_by_cause: BTreeMap<&'static str, u64>,
    /// Maximum Packet Size the broker announced in its MQTT 5 CONNACK for
    /// the current (or last) session; None when it set no limit or speaks
    /// MQTT 3.1.1.
    pub broker_max_packet_bytes: Option<u32>,
    /// The largest payload the uplink sends on a data topic in the current
    /// session: `max_message_bytes`, or less when the broker's limit binds.
    pub payload_limit_bytes: usize,
    /// Deletes of acknowledged records the buffer refused (a lock held by
    /// another process), every try counted; they are retried every second.
    pub delete_retries_total: u64,
    /// Records the broker acknowledged that are still waiting for their
    /// delete (sent again if the session ends first).
    pub undeleted_records: u64,
    /// Replay requests answered, by outcome: done (`error` null) or
    /// refused (bad request, busy, unreadable buffer).
    pub replays_done_total: u64,
    pub replays_refused_total: u64,
    /// Records sent again for replay requests.
    pub replayed_records_total: u64,
    /// Replay messages the broker refused (MQTT 5 reason >= 0x80).
    pub replay_messages_refused_total: u64,
    /// Requests waiting or running now.
    pub replays_queued: usize,
    /// Whether the broker granted the subscription to the commands topic
    /// (None before the first SUBACK).
    pub commands_subscribed: Option<bool>,
    /// Sparkplug B only (docs/sparkplug.md): None in the JSON format.
    pub sparkplug: Option<SparkplugStatus>,
}

/// The edge node's side of Sparkplug B in `/status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparkplugStatus {
    /// `bdSeq` of the current (or last) session's Will and NBIRTH.
    pub bd_seq: Option<u8>,
    /// Rebirths a host application asked for (NCMD `Node Control/Rebirth`).
    pub rebirths_total: u64,
    /// Commands refused: any other NCMD, every DCMD (the agent never writes
    /// to the plant).
    pub commands_refused_total: u64,
    /// BIRTH certificates too large for one message, not sent (their
    /// device's data goes out without it).
    pub births_not_sent_total: u64,
}

/// Cause of a dead letter: the broker kept refusing the message.
pub const DEAD_LETTER_REFUSED: &str = "refused";
/// Cause of a dead letter: the record cannot fit one message
/// (`max_message_bytes` or the broker's Maximum Packet Size).
pub const DEAD_LETTER_TOO_LARGE: &str = "too_large";

impl MqttStatus {
    /// Records the uplink moved to the dead letters, all causes.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered_by_cause.values().sum()
    }
}

/// Upper bounds (seconds) of the publish-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus-style cumulative histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Count per bucket of `LATENCY_BUCKETS` (not cumulative), then +Inf.
    pub counts: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

struct Inner {
    connections: BTreeMap<String, ConnStatus>,
    /// The next connection's registration order.
    next_order: u64,
    /// The buffer limits in force that the health views use.
    buffer_budget: BufferBudget,
    mqtt: MqttStatus,
    /// Last sign of life of each long-lived loop, for /healthz and the watchdog.
    beats: BTreeMap<&'static str, std::time::Instant>,
    /// Drops counted but not announced yet, by (connection, reason).
    unannounced: BTreeMap<(String, DropReason), DropReport>,
    /// Drops of records that belong to no configured connection (the
    /// agent's own events), by reason.
    agent_dropped: BTreeMap<DropReason, u64>,
    /// Supervised tasks that died and are not running again yet: name →
    /// (since, why). `/healthz` fails while any is listed (docs/guarantees.md).
    dead_tasks: BTreeMap<String, (i64, String)>,
    /// Task deaths since start, by task name.
    task_restarts: BTreeMap<String, u64>,
    /// Set while the buffer refuses submitted records and holds them:
    /// since when, and the buffer's error.
    intake_blocked: Option<(i64, String)>,
    /// Records and bytes the buffer accepted per second (the headroom).
    intake_rate: IntakeRate,
    /// The configuration in force and the last reload (docs/health.md).
    config: ConfigStatus,
}

/// `buffer.max_size` and `buffer.headroom_warning` in force (a reload may
/// change them): what the headroom estimate and its warning use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BufferBudget {
    pub max_bytes: u64,
    pub headroom_warning: std::time::Duration,
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget {
            max_bytes: u64::MAX,
            headroom_warning: std::time::Duration::ZERO,
        }
    }
}

/// Which configuration is in force: generation 1 at start, one more per
/// reload applied; and how the last reload went.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigStatus {
    pub generation: u64,
    pub last_reload: Option<ReloadOutcome>,
    /// Reloads by outcome since start.
    pub reloads_applied: u64,
    pub reloads_refused: u64,
}

impl Default for ConfigStatus {
    fn default() -> Self {
        ConfigStatus {
            generation: 1,
            last_reload: None,
            reloads_applied: 0,
            reloads_refused: 0,
        }
    }
}

/// One reload: applied (what changed) or refused (why, one line per
/// problem, key paths first). Never holds a secret.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadOutcome {
    pub ts_ms: i64,
    pub applied: bool,
    pub summary: String,
    pub errors: Vec<String>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            connections: BTreeMap::new(),
            next_order: 0,
            buffer_budget: BufferBudget::default(),
            mqtt: MqttStatus::default(),
            beats: BTreeMap::new(),
            unannounced: BTreeMap::new(),
            agent_dropped: BTreeMap::new(),
            dead_tasks: BTreeMap::new(),
            task_restarts: BTreeMap::new(),
            intake_blocked: None,
            intake_rate: IntakeRate::new(std::time::Instant::now()),
            config: ConfigStatus::default(),
        }
    }
}

/// The board. Writers bump a watch counter so readers (the uplink publishing
/// retained connection status) wake on change instead of polling.
pub struct StatusBoard {
    inner: RwLock<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            inner: RwLock::new(Inner::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl StatusBoard {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters in a state
        // worse than stale, so poisoning is ignored.
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Registers a connection in state `connecting` (before its task
    /// starts), unless [`StatusBoard::add_connection`] did.
    pub fn register_connection(&self, id: &str) {
        let mut inner = self.write();
        let order = inner.next_order;
        let mut added = false;
        inner.connections.entry(id.to_string()).or_insert_with(|| {
            added = true;
            ConnStatus {
                order,
                ..ConnStatus::new("starting")
            }
        });
        if added {
            inner.next_order += 1;
        }
        drop(inner);
        self.bump();
    }

    /// Adds a configured connection (at start, in configuration order, or
    /// by a reload). One restarted by a reload keeps its counters; one a
    /// reload removed before starts afresh.
    pub fn add_connection(&self, id: &str, kind: &'static str, announces_drops: bool) {
        let mut inner = self.write();
        match inner.connections.get_mut(id) {
            Some(c) if !c.removed => {
                c.kind = kind;
                c.announces_drops = announces_drops;
            }
            _ => {
                let order = inner.next_order;
                inner.next_order += 1;
                inner.connections.insert(
                    id.to_string(),
                    ConnStatus {
                        kind,
                        announces_drops,
                        order,
                        ..ConnStatus::new("starting")
                    },
                );
            }
        }
        drop(inner);
        self.bump();
    }

    /// A connection a reload removed (its task stopped, its state set).
    pub fn remove_connection(&self, id: &str) {
        if let Some(c) = self.write().connections.get_mut(id) {
            c.removed = true;
        }
        self.bump();
    }

    /// The buffer limits in force (at start and after each reload).
    pub fn set_buffer_budget(&self, budget: BufferBudget) {
        self.write().buffer_budget = budget;
    }

    pub fn buffer_budget(&self) -> BufferBudget {
        self.read().buffer_budget
    }

    /// Sets a connection's state; returns the previous state when it changed.
    pub fn set_connection_state(
        &self,
        id: &str,
        state: ConnState,
        reason: &str,
    ) -> Option<ConnState> {
        let previous = {
            let mut inner = self.write();
            let entry = inner
                .connections
                .entry(id.to_string())
                .or_insert_with(|| ConnStatus::new(""));
            if entry.state == state && entry.reason == reason {
                return None;
            }
            let previous = entry.state;
            if entry.state != state {
                entry.since_ms = now_ms();
            }
            entry.state = state;
            entry.reason = reason.to_string();
            previous
        };
        self.bump();
        Some(previous)
    }

    /// `count` records of connection `id` were committed to the buffer.
    pub fn add_records(&self, id: &str, count: u64, newest_ts_ms: i64) {
        let mut inner = self.write();
        if let Some(c) = inner.connections.get_mut(id) {
            c.records_total += count;
            c.last_value_ts_ms = Some(
                c.last_value_ts_ms
                    .map_or(newest_ts_ms, |t| t.max(newest_ts_ms)),
            );
        }
    }

    /// Changes connection `id`'s backfill figures (and turns them on in
    /// `/status`).
    pub fn backfill(&self, id: &str, change: impl FnOnce(&mut BackfillStatus)) {
        if let Some(c) = self.write().connections.get_mut(id) {
            change(c.backfill.get_or_insert_with(Default::default));
        }
        self.bump();
    }

    /// The subscriptions a session of connection `id` set up.
    pub fn set_subscriptions(&self, id: &str, subscriptions: Subscriptions) {
        if let Some(c) = self.write().connections.get_mut(id) {
            c.subscriptions = Some(subscriptions);
        }
    }

    /// Counts values of `connection` that were not accepted (docs/guarantees.md) and
    /// queues them for the next `source.dropped` announcement. Cheap and
    /// synchronous: callable from the OPC UA callback.
    pub fn add_dropped(
        &self,
        connection: &str,
        reason: DropReason,
        count: u64,
        sample: Option<&str>,
    ) {
        if count == 0 {
            return;
        }
        let mut inner = self.write();
        match inner.connections.get_mut(connection) {
            Some(c) => *c.dropped.entry(reason).or_insert(0) += count,
            None => *inner.agent_dropped.entry(reason).or_insert(0) += count,
        }
        let report = inner
            .unannounced
            .entry((connection.to_string(), reason))
            .or_insert_with(|| DropReport {
                connection: connection.to_string(),
                reason,
                count: 0,
                samples: Vec::new(),
            });
        report.count += count;
        if let Some(tag) = sample {
            if report.samples.len() < DROP_SAMPLES && !report.samples.iter().any(|s| s == tag) {
                report.samples.push(tag.to_string());
            }
        }
    }

    /// Drops of records of no configured connection (agent events), by reason.
    pub fn agent_dropped(&self) -> BTreeMap<DropReason, u64> {
        self.read().agent_dropped.clone()
    }

    /// A supervised task died (panicked or ended unexpectedly).
    pub fn task_died(&self, task: &str, why: &str) {
        {
            let mut inner = self.write();
            inner
                .dead_tasks
                .insert(task.to_string(), (now_ms(), why.to_string()));
            *inner.task_restarts.entry(task.to_string()).or_insert(0) += 1;
        }
        self.bump();
    }

    /// A supervised task runs again.
    pub fn task_running(&self, task: &str) {
        if self.write().dead_tasks.remove(task).is_some() {
            self.bump();
        }
    }

    /// Dead tasks: (name, since ms, why).
    pub fn dead_tasks(&self) -> Vec<(String, i64, String)> {
        self.read()
            .dead_tasks
            .iter()
            .map(|(n, (t, w))| (n.clone(), *t, w.clone()))
            .collect()
    }

    /// Deaths per supervised task since start.
    pub fn task_restarts(&self) -> BTreeMap<String, u64> {
        self.read().task_restarts.clone()
    }

    /// The buffer refuses records (`Some(error)`) or takes them again (`None`).
    pub fn set_intake_blocked(&self, error: Option<&str>) {
        let mut inner = self.write();
        match error {
            Some(e) => {
                let since = inner.intake_blocked.as_ref().map_or(now_ms(), |b| b.0);
                inner.intake_blocked = Some((since, e.to_string()));
            }
            None => inner.intake_blocked = None,
        }
    }

    /// Records and bytes the buffer accepted per second over the last
    /// minute (None in the first seconds).
    pub fn intake_rate(&self) -> Option<PerSecond> {
        self.write()
            .intake_rate
            .per_second(std::time::Instant::now())
    }

    /// Since when and why the buffer refuses appends, if it does.
    pub fn intake_blocked(&self) -> Option<(i64, String)> {
        self.read().intake_blocked.clone()
    }

    /// Takes the drops counted since the last call, one report per
    /// connection and reason, for the `source.dropped` announcer.
    pub fn take_drop_reports(&self) -> Vec<DropReport> {
        std::mem::take(&mut self.write().unannounced)
            .into_values()
            .collect()
    }

    /// Puts reports back that could not be announced (the buffer refused
    /// the event), so the next announcement includes them.
    pub fn restore_drop_reports(&self, reports: Vec<DropReport>) {
        let mut inner = self.write();
        for r in reports {
            let slot = inner
                .unannounced
                .entry((r.connection.clone(), r.reason))
                .or_insert_with(|| DropReport {
                    connection: r.connection.clone(),
                    reason: r.reason,
                    count: 0,
                    samples: Vec::new(),
                });
            slot.count += r.count;
            for s in r.samples {
                if slot.samples.len() < DROP_SAMPLES && !slot.samples.contains(&s) {
                    slot.samples.push(s);
                }
            }
        }
    }

    /// Every connection registered, removed ones included, in
    /// registration order.
    pub fn connections(&self) -> Vec<(String, ConnStatus)> {
        let mut all: Vec<(String, ConnStatus)> = self
            .read()
            .connections
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by_key(|(_, c)| c.order);
        all
    }

    /// The connections in force (removed ones left out), in registration
    /// order.
    pub fn current_connections(&self) -> Vec<(String, ConnStatus)> {
        let mut all = self.connections();
        all.retain(|(_, c)| !c.removed);
        all
    }

    pub fn set_mqtt(&self, connected: bool, reason: &str) {
        {
            let mut inner = self.write();
            if inner.mqtt.connected != connected {
                inner.mqtt.since_ms = now_ms();
                if connected {
                    inner.mqtt.reconnects_total += 1;
                }
            }
            inner.mqtt.connected = connected;
            inner.mqtt.reason = reason.to_string();
            if !connected {
                // A new session subscribes again.
                inner.mqtt.commands_subscribed = None;
            }
        }
        self.bump();
    }

    pub fn add_published(
        &self,
        stream: &crate::record::StreamKey,
        records: u64,
        latency: std::time::Duration,
    ) {
        let mut inner = self.write();
        inner.mqtt.published_records_total += records;
        *inner
            .mqtt
            .published_by_stream
            .entry((stream.connection.clone(), stream.kind.as_str()))
            .or_insert(0) += records;
        inner.mqtt.publish_latency.observe(latency.as_secs_f64());
    }

    /// A delete of acknowledged records failed; `undeleted` records now
    /// wait for the next try.
    pub fn delete_failed(&self, undeleted: u64) {
        let mut inner = self.write();
        inner.mqtt.delete_retries_total += 1;
        inner.mqtt.undeleted_records = undeleted;
    }

    /// A replay request was answered: done, or refused with an error.
    pub fn replay_answered(&self, refused: bool) {
        let mut inner = self.write();
        if refused {
            inner.mqtt.replays_refused_total += 1;
        } else {
            inner.mqtt.replays_done_total += 1;
        }
    }

    /// Records sent again for a replay.
    pub fn add_replayed(&self, records: u64) {
        self.write().mqtt.replayed_records_total += records;
    }

    /// The broker refused a message of a replay.
    pub fn replay_message_refused(&self) {
        self.write().mqtt.replay_messages_refused_total += 1;
    }

    pub fn set_replays_queued(&self, queued: usize) {
        self.write().mqtt.replays_queued = queued;
    }

    /// Changes the Sparkplug counters (and turns them on in `/status`).
    pub fn sparkplug(&self, change: impl FnOnce(&mut SparkplugStatus)) {
        change(
            self.write()
                .mqtt
                .sparkplug
                .get_or_insert_with(Default::default),
        );
    }

    pub fn set_commands_subscribed(&self, granted: bool) {
        self.write().mqtt.commands_subscribed = Some(granted);
    }

    /// Every acknowledged record is deleted again.
    pub fn deletes_caught_up(&self) {
        self.write().mqtt.undeleted_records = 0;
    }

    /// The broker refused one message (one attempt).
    pub fn record_rejected(&self) {
        let mut inner = self.write();
        inner.mqtt.rejected_total += 1;
        inner.mqtt.last_rejected_ms = Some(now_ms());
    }

    /// The uplink moved `records` to the dead letters for `cause`
    /// ([`DEAD_LETTER_REFUSED`] or [`DEAD_LETTER_TOO_LARGE`]).
    pub fn add_dead_lettered(&self, cause: &'static str, records: u64) {
        *self
            .write()
            .mqtt
            .dead_lettered_by_cause
            .entry(cause)
            .or_insert(0) += records;
    }

    /// The message size limits of the session that just connected.
    pub fn set_mqtt_limits(
        &self,
        broker_max_packet_bytes: Option<u32>,
        payload_limit_bytes: usize,
    ) {
        let mut inner = self.write();
        inner.mqtt.broker_max_packet_bytes = broker_max_packet_bytes;
        inner.mqtt.payload_limit_bytes = payload_limit_bytes;
    }

    pub fn mqtt(&self) -> MqttStatus {
        self.read().mqtt.clone()
    }

    pub fn config(&self) -> ConfigStatus {
        self.read().config.clone()
    }

    /// A reload ended: applied (a new generation is in force) or refused
    /// (the running configuration stays).
    pub fn reloaded(&self, outcome: ReloadOutcome) {
        {
            let mut inner = self.write();
            let c = &mut inner.config;
            if outcome.applied {
                c.generation += 1;
                c.reloads_applied += 1;
            } else {
                c.reloads_refused += 1;
            }
            c.last_reload = Some(outcome);
        }
        self.bump();
    }

    /// A long-lived loop says it is alive (cheap; call it every iteration).
    pub fn beat(&self, name: &'static str) {
        self.write().beats.insert(name, std::time::Instant::now());
    }

    /// Loops that have not beaten within `max_silence`.
    pub fn stale_loops(&self, max_silence: std::time::Duration) -> Vec<&'static str> {
        self.read()
            .beats
            .iter()
            .filter(|(_, t)| t.elapsed() > max_silence)
            .map(|(n, _)| *n)
            .collect()
    }

    pub fn set_inflight(&self, messages: usize) {
        self.write().mqtt.inflight = messages;
    }
}

/// The buffer reports how its intake fares here: what it committed
/// (`records_total`), what it had to drop (`buffer_refused`, announced by
/// `source.dropped`), whether it is holding records (`/status` `intake`)
/// and that its worker is alive (the watchdog's `buffer` loop).
impl IntakeObserver for StatusBoard {
    fn accepted(&self, connection: &str, records: u64, bytes: u64, newest_ts_ms: i64) {
        self.add_records(connection, records, newest_ts_ms);
        self.write()
            .intake_rate
            .add(std::time::Instant::now(), records, bytes);
    }

    fn dropped(&self, connection: &str, records: u64, sample_tag: Option<&str>) {
        self.add_dropped(connection, DropReason::BufferRefused, records, sample_tag);
    }

    fn blocked(&self, reason: Option<&str>) {
        self.set_intake_blocked(reason);
    }

    fn alive(&self) {
        self.beat("buffer");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reload_applied_is_a_new_generation_a_refused_one_is_not() {
        let board = super::StatusBoard::new();
        assert_eq!(board.config().generation, 1);
        assert_eq!(board.config().last_reload, None);
        let refused = super::ReloadOutcome {
            ts_ms: 5,
            applied: false,
            summary: String::new(),
            errors: vec!["connections[0].endpoint: not an opc.tcp:// URL".into()],
        };
        board.reloaded(refused.clone());
        let c = board.config();
        assert_eq!(
            (c.generation, c.reloads_refused, c.reloads_applied),
            (1, 1, 0)
        );
        assert_eq!(c.last_reload, Some(refused));
        board.reloaded(super::ReloadOutcome {
            ts_ms: 6,
            applied: true,
            summary: "connection b added".into(),
            errors: Vec::new(),
        });
        let c = board.config();
        assert_eq!(
            (c.generation, c.reloads_refused, c.reloads_applied),
            (2, 1, 1)
        );
    }

    use super::*;

    #[test]
    fn drop_reasons_have_one_name_in_status_metrics_and_events() {
        for reason in [
            DropReason::ServerOverflow,
            DropReason::QueueFull,
            DropReason::BufferRefused,
            DropReason::ValueTooLarge,
        ] {
            // `/status` serializes the reason, `/metrics` and `source.dropped`
            // use `as_str`.
            assert_eq!(serde_json::json!(reason), reason.as_str());
        }
    }

    #[test]
    fn drops_are_counted_per_reason_and_announced_once() {
        let board = StatusBoard::new();
        board.register_connection("c1");
        board.add_dropped("c1", DropReason::QueueFull, 3, Some("T1"));
        board.add_dropped("c1", DropReason::QueueFull, 2, Some("T2"));
        board.add_dropped("c1", DropReason::ServerOverflow, 1, Some("T1"));
        board.add_dropped("c1", DropReason::QueueFull, 0, Some("ignored"));
        let c1 = &board.connections()[0].1;
        assert_eq!(c1.dropped_total(), 6);
        assert_eq!(c1.dropped[&DropReason::QueueFull], 5);

        let reports = board.take_drop_reports();
        assert_eq!(reports.len(), 2);
        let q = reports
            .iter()
            .find(|r| r.reason == DropReason::QueueFull)
            .expect("queue_full report");
        assert_eq!(
            (q.count, q.samples.clone()),
            (5, vec!["T1".into(), "T2".into()])
        );
        assert!(board.take_drop_reports().is_empty(), "announced once");

        // Not announced (buffer refused the event): the next report adds up.
        board.restore_drop_reports(reports);
        board.add_dropped("c1", DropReason::QueueFull, 1, Some("T3"));
        let again = board.take_drop_reports();
        let q = again
            .iter()
            .find(|r| r.reason == DropReason::QueueFull)
            .expect("queue_full report");
        assert_eq!(q.count, 6);
        assert_eq!(q.samples.len(), 3);
        // The totals are not counted twice by the restore.
        assert_eq!(board.connections()[0].1.dropped_total(), 7);
    }
}
