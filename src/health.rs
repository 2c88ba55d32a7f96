//! The local health endpoint (docs/health.md): `/healthz`, `/readyz`, `/status`,
//! `/metrics`. Read-only views of the status board and the buffer; it never
//! shows a secret because nothing it reads holds one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::{
    prometheus_text, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferHandle, Stats};
use crate::rate::{headroom_seconds, PerSecond};
use crate::record::{format_ts, now_ms};
use crate::status::StatusBoard;

pub mod listener;
pub use listener::{connection_stats, ConnectionStats, HealthLimits};

/// A loop silent for longer than this counts as dead for /healthz.
pub const LOOP_SILENCE: Duration = Duration::from_secs(15);
/// `/readyz` reports `dead_letters` while the broker refused a message
/// within this window and dead letters exist.
const REFUSING_WINDOW: Duration = Duration::from_secs(60);
/// The buffer thread must answer within this to count as alive/writable.
const BUFFER_PROBE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error("health.listen {addr}: cannot listen: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

pub struct HealthState {
    pub agent_id: String,
    pub version: &'static str,
    pub started: Instant,
    pub board: Arc<StatusBoard>,
    pub buffer: BufferHandle,
}

/// Binds `addr` now (so a bad address is a clear start-up error) and serves
/// until `cancel`, with the default [`HealthLimits`]. Returns the bound
/// address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    state: Arc<HealthState>,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BindError> {
    serve_with(addr, state, HealthLimits::default(), cancel).await
}

/// [`serve`] with explicit connection limits (docs/health.md, see [`listener`]).
pub async fn serve_with(
    addr: SocketAddr,
    state: Arc<HealthState>,
    limits: HealthLimits,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state);
    let task = tokio::spawn(listener::run(listener, app, limits, cancel));
    Ok((bound, task))
}

async fn buffer_stats(state: &HealthState) -> Result<Stats, String> {
    match tokio::time::timeout(BUFFER_PROBE, state.buffer.stats()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("buffer: {e}")),
        Err(_) => Err("buffer: not answering".into()),
    }
}

fn problem(code: StatusCode, reason: String) -> Response {
    (code, Json(json!({"status": "fail", "reason": reason}))).into_response()
}

/// Why the pipeline is not alive, if it is not: a long-lived loop that
/// stopped beating, or a buffer thread that does not answer. Shared by
/// `/healthz` and the systemd watchdog.
pub async fn pipeline_fault(
    board: &StatusBoard,
    buffer: &BufferHandle,
    max_silence: Duration,
) -> Option<String> {
    // A dead supervised task fails the check until it runs again
    // (docs/guarantees.md), so a task that cannot be restarted stops the
    // watchdog pings.
    let dead = board.dead_tasks();
    if !dead.is_empty() {
        let list: Vec<String> = dead
            .iter()
            .map(|(n, _, why)| format!("{n} ({why})"))
            .collect();
        return Some(format!("tasks dead, restarting: {}", list.join(", ")));
    }
    let stale = board.stale_loops(max_silence);
    if !stale.is_empty() {
        return Some(format!("loops not alive: {}", stale.join(", ")));
    }
    match tokio::time::timeout(BUFFER_PROBE, buffer.stats()).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("buffer: {e}")),
        Err(_) => Some("buffer: not answering".into()),
    }
}

async fn healthz(State(state): State<Arc<HealthState>>) -> Response {
    match pipeline_fault(&state.board, &state.buffer, LOOP_SILENCE).await {
        Some(why) => problem(StatusCode::SERVICE_UNAVAILABLE, why),
        None => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
    }
}

async fn readyz(State(state): State<Arc<HealthState>>) -> Response {
    let stats = match buffer_stats(&state).await {
        Ok(stats) => stats,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    if let Some((since, why)) = state.board.intake_blocked() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "buffer not accepting records since {}: {why}",
                format_ts(since)
            ),
        );
    }
    let mqtt = state.board.mqtt();
    if !mqtt.connected {
        let why = if mqtt.reason.is_empty() {
            "not connected yet".to_string()
        } else {
            mqtt.reason
        };
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("mqtt not connected: {why}"),
        );
    }
    // Connected but refusing: records pile up as dead letters (docs/guarantees.md).
    // Dead letters are the first the size limit takes, so their count may
    // be back to 0 for a moment while the broker still refuses everything:
    // records dead-lettered for refusals count too.
    let refusing = mqtt
        .last_rejected_ms
        .is_some_and(|t| now_ms() - t < REFUSING_WINDOW.as_millis() as i64);
    let refused_dead = mqtt
        .dead_lettered_by_cause
        .get(crate::status::DEAD_LETTER_REFUSED)
        .is_some_and(|n| *n > 0);
    if refusing && (stats.dead_letters > 0 || refused_dead) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "fail",
                "reason": "dead_letters",
                "message": format!(
                    "the broker keeps refusing records: {} dead letters, {} refusals so far",
                    stats.dead_letters, mqtt.rejected_total
                ),
            })),
        )
            .into_response();
    }
    (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
}

fn ts_or_null(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(format_ts(m)))
        .unwrap_or(Value::Null)
}

async fn status(State(state): State<Arc<HealthState>>) -> Response {
    let mqtt = state.board.mqtt();
    let rate = state.board.intake_rate();
    let buffer = match buffer_stats(&state).await {
        Ok(st) => json!({
            "records": st.records,
            "bytes": st.bytes,
            "oldest_ts": ts_or_null(st.oldest_ts_ms),
            "evicted_total": st.evicted_total,
            "dead_letters": st.dead_letters,
            "retained_records": st.retained_records,
            "retained_bytes": st.retained_bytes,
            "retained_from": ts_or_null(st.retained_from_ms),
            "retained_released_total": st.retained_released_total,
            "bytes_per_record": bytes_per_record(&st, rate),
            "headroom_s": headroom_seconds(state.board.buffer_budget().max_bytes, st.bytes, rate).map(|s| s.round() as u64),
        }),
        Err(e) => json!({"error": e}),
    };
    // The connections in force: a reload adds and removes them.
    let connections: Vec<Value> = state
        .board
        .current_connections()
        .into_iter()
        .map(|(id, st)| {
            json!({
                "id": id,
                "kind": st.kind,
                "state": st.state.as_str(),
                "since": ts_or_null(Some(st.since_ms)),
                "reason": st.reason,
                "records_total": st.records_total,
                "dropped_total": st.dropped_total(),
                "dropped": st.dropped,
                "last_value_ts": ts_or_null(st.last_value_ts_ms),
                "subscriptions": st.subscriptions,
                "backfill": st.backfill,
            })
        })
        .collect();
    Json(json!({
        "agent": state.agent_id,
        "version": state.version,
        "uptime_s": state.started.elapsed().as_secs(),
        "mqtt": {
            "state": if mqtt.connected { "connected" } else { "disconnected" },
            "since": ts_or_null((mqtt.since_ms > 0).then_some(mqtt.since_ms)),
            "reason": mqtt.reason,
            "rejected_total": mqtt.rejected_total,
            "dead_lettered_total": mqtt.dead_lettered_total(),
            "delete_retries_total": mqtt.delete_retries_total,
            "undeleted_records": mqtt.undeleted_records,
            "replay": {
                "commands_subscribed": mqtt.commands_subscribed,
                "queued": mqtt.replays_queued,
                "done_total": mqtt.replays_done_total,
                "refused_total": mqtt.replays_refused_total,
                "records_total": mqtt.replayed_records_total,
                "messages_refused_total": mqtt.replay_messages_refused_total,
            },
            "sparkplug": mqtt.sparkplug.as_ref().map(|sp| json!({
                "bd_seq": sp.bd_seq,
                "rebirths_total": sp.rebirths_total,
                "commands_refused_total": sp.commands_refused_total,
                "births_not_sent_total": sp.births_not_sent_total,
            })),
            "payload_limit_bytes": mqtt.payload_limit_bytes,
            "broker_max_packet_bytes": mqtt.broker_max_packet_bytes,
        },
        "buffer": buffer,
        "config": config_json(&state.board.config()),
        "intake": {
            "blocked_since": ts_or_null(state.board.intake_blocked().map(|b| b.0)),
            "blocked_reason": state.board.intake_blocked().map(|b| b.1),
            "agent_dropped": state.board.agent_dropped(),
            "records_per_s": rate.map(|r| r.records.round() as u64),
        },
        "tasks": {
            "dead": state.board.dead_tasks().into_iter().map(|(n, since, why)| json!({
                "task": n, "since": format_ts(since), "reason": why,
            })).collect::<Vec<_>>(),
            "restarts": state.board.task_restarts(),
        },
        "connections": connections,
    }))
    .into_response()
}

// /metrics (docs/health.md#metrics): each scrape reads a snapshot of the
// status board, the buffer and the process counters into a fresh
// prometheus-client registry of constant metrics, which the library encodes
// (names, types, label escaping, histogram series). The values are counted
// where they happen; here they are only reported.

/// Labels of the per-stream series.
#[derive(Debug, EncodeLabelSet)]
struct StreamLabels {
    connection: String,
    kind: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct ConnectionLabels {
    connection: String,
}

#[derive(Debug, EncodeLabelSet)]
struct ConnectionStateLabels {
    connection: String,
    state: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct DroppedLabels {
    connection: String,
    reason: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

/// A metric family read from a snapshot: one constant per label set, in
/// the order given (configuration order, then label order). The library's
/// `Family` holds live metrics in a hash map, which would shuffle the
/// series on every scrape.
#[derive(Debug)]
struct Series<L, M>(Vec<(L, M)>);

impl<L: EncodeLabelSet, M: EncodeMetric + TypedMetric> EncodeMetric for Series<L, M> {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for (labels, metric) in &self.0 {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// The publish-latency histogram as the status board counted it
/// (`LATENCY_BUCKETS`, not cumulative, then +Inf).
#[derive(Debug)]
struct Latency(crate::status::Histogram);

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        // The +Inf bucket is the total count, which the encoder adds.
        let buckets: Vec<(f64, u64)> = crate::status::LATENCY_BUCKETS
            .iter()
            .copied()
            .zip(self.0.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn counter(n: u64) -> ConstCounter {
    ConstCounter::new(n)
}

fn gauge(n: u64) -> ConstGauge<u64> {
    ConstGauge::new(n)
}

/// One series per buffer stream, in the buffer's order.
fn per_stream<M>(
    streams: &[crate::buffer::StreamStats],
    metric: impl Fn(&crate::buffer::StreamStats) -> M,
) -> Series<StreamLabels, M> {
    Series(
        streams
            .iter()
            .map(|s| {
                let labels = StreamLabels {
                    connection: s.connection.clone(),
                    kind: s.kind.as_str(),
                };
                (labels, metric(s))
            })
            .collect(),
    )
}

async fn metrics(State(state): State<Arc<HealthState>>) -> Response {
    // Names are written out whole (the prefix aside) so that a metric found
    // on a dashboard is found here by grep: no `Unit` suffixes. Counters are
    // registered without `_total`, which the encoder appends. The library
    // ends each help text with a period.
    let mut r = Registry::with_prefix("plantgate");
    r.register("up", "The agent process is running", gauge(1));
    r.register(
        "uptime_seconds",
        "Seconds since the agent started",
        ConstGauge::new(state.started.elapsed().as_secs_f64()),
    );
    register_mqtt(&mut r, &state.board.mqtt());
    register_config(&mut r, &state.board.config());
    let board = state.board.current_connections();
    register_intake(&mut r, &state.board, &board);
    register_process(&mut r, &state.board);
    r.register(
        "opcua_notifications",
        "Values and events received from each plant connection (records committed to the buffer)",
        Series(
            board
                .iter()
                .map(|(id, st)| {
                    let labels = ConnectionLabels {
                        connection: id.clone(),
                    };
                    (labels, counter(st.records_total))
                })
                .collect(),
        ),
    );
    if let Ok(st) = buffer_stats(&state).await {
        register_buffer(&mut r, &st);
        register_headroom(
            &mut r,
            &st,
            state.board.buffer_budget().max_bytes,
            state.board.intake_rate(),
        );
    }
    let mut out = String::with_capacity(4096);
    if let Err(e) = prometheus_text::encode(&mut out, &r) {
        // Writing to a String fails only if a value's formatting does.
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}")).into_response();
    }
    ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], out).into_response()
}

/// The uplink's figures.
fn register_mqtt(r: &mut Registry, mqtt: &crate::status::MqttStatus) {
    r.register(
        "mqtt_connected",
        "1 while the MQTT session is up",
        gauge(u64::from(mqtt.connected)),
    );
    r.register(
        "mqtt_connects",
        "MQTT sessions established",
        counter(mqtt.reconnects_total),
    );
    r.register(
        "mqtt_inflight_messages",
        "MQTT messages submitted and not yet acknowledged",
        gauge(mqtt.inflight as u64),
    );
    r.register(
        "mqtt_rejected",
        "Publishes the broker refused (MQTT 5 PUBACK reason >= 0x80)",
        counter(mqtt.rejected_total),
    );
    r.register(
        "mqtt_dead_lettered",
        "Records moved to dead letters by the uplink, by cause",
        Series(
            mqtt.dead_lettered_by_cause
                .iter()
                .map(|(cause, n)| (CauseLabels { cause }, counter(*n)))
                .collect(),
        ),
    );
    r.register(
        "mqtt_delete_retries",
        "Deletes of acknowledged records the buffer refused (retried every second)",
        counter(mqtt.delete_retries_total),
    );
    r.register(
        "mqtt_undeleted_records",
        "Records acknowledged by the broker still waiting for their delete",
        gauge(mqtt.undeleted_records),
    );
    r.register(
        "replay_requests",
        "Replay requests answered, by outcome (done, refused)",
        Series(vec![
            (
                OutcomeLabels { outcome: "done" },
                counter(mqtt.replays_done_total),
            ),
            (
                OutcomeLabels { outcome: "refused" },
                counter(mqtt.replays_refused_total),
            ),
        ]),
    );
    r.register(
        "replay_records",
        "Records sent again for replay requests",
        counter(mqtt.replayed_records_total),
    );
    r.register(
        "replay_messages_refused",
        "Replay messages the broker refused (MQTT 5 PUBACK reason >= 0x80)",
        counter(mqtt.replay_messages_refused_total),
    );
    r.register(
        "replay_queued",
        "Replay requests waiting or running",
        gauge(mqtt.replays_queued as u64),
    );
    if let Some(sp) = &mqtt.sparkplug {
        r.register(
            "sparkplug_rebirths",
            "Sparkplug rebirths a host application asked for (NCMD Node Control/Rebirth)",
            counter(sp.rebirths_total),
        );
        r.register(
            "sparkplug_commands_refused",
            "Sparkplug commands refused (any other NCMD, every DCMD: the agent never writes to the plant)",
            counter(sp.commands_refused_total),
        );
        r.register(
            "sparkplug_births_not_sent",
            "Sparkplug BIRTH certificates too large for one message, not sent",
            counter(sp.births_not_sent_total),
        );
    }
    r.register(
        "mqtt_payload_limit_bytes",
        "Largest payload the uplink sends: max_message_bytes or the broker's Maximum Packet Size, whichever is smaller",
        gauge(mqtt.payload_limit_bytes as u64),
    );
    r.register(
        "published_records",
        "Records acknowledged by the broker and deleted from the buffer",
        counter(mqtt.published_records_total),
    );
    r.register(
        "publish_latency_seconds",
        "Time from submitting a record message to its PUBACK",
        Latency(mqtt.publish_latency.clone()),
    );
    r.register(
        "records_published",
        "Records acknowledged by the broker, per stream",
        Series(
            mqtt.published_by_stream
                .iter()
                .map(|((connection, kind), n)| {
                    let labels = StreamLabels {
                        connection: connection.clone(),
                        kind,
                    };
                    (labels, counter(*n))
                })
                .collect(),
        ),
    );
}

/// Each connection's OPC UA subscriptions: asked for and created.
/// The configuration in force and the reloads (docs/health.md).
fn register_config(r: &mut Registry, config: &crate::status::ConfigStatus) {
    r.register(
        "config_generation",
        "The configuration in force: 1 at start, one more per reload applied",
        gauge(config.generation),
    );
    r.register(
        "config_reloads",
        "Reloads (SIGHUP, systemctl reload) by outcome (applied, refused)",
        Series(vec![
            (
                OutcomeLabels { outcome: "applied" },
                counter(config.reloads_applied),
            ),
            (
                OutcomeLabels { outcome: "refused" },
                counter(config.reloads_refused),
            ),
        ]),
    );
}

fn register_subscriptions(r: &mut Registry, board: &[(String, crate::status::ConnStatus)]) {
    let subscriptions = |pick: fn(&crate::status::Subscriptions) -> usize| {
        Series(
            board
                .iter()
                .filter_map(|(id, st)| {
                    let s = st.subscriptions.as_ref()?;
                    let labels = ConnectionLabels {
                        connection: id.clone(),
                    };
                    Some((labels, gauge(pick(s) as u64)))
                })
                .collect(),
        )
    };
    r.register(
        "opcua_subscriptions",
        "OPC UA subscriptions of each connection's current session",
        subscriptions(|s| s.created),
    );
    r.register(
        "opcua_subscriptions_wanted",
        "OPC UA subscriptions each connection asked for (more than it has: the server limits them)",
        subscriptions(|s| s.wanted),
    );
}

/// Backfill figures of the connections that have it on (docs/backfill.md).
fn register_backfill(r: &mut Registry, board: &[(String, crate::status::ConnStatus)]) {
    use crate::status::BackfillStatus;
    let series = |pick: fn(&BackfillStatus) -> u64| {
        board
            .iter()
            .filter_map(|(id, st)| {
                let b = st.backfill.as_ref()?;
                let labels = ConnectionLabels {
                    connection: id.clone(),
                };
                Some((labels, pick(b)))
            })
            .collect::<Vec<_>>()
    };
    let counters = |pick| {
        Series(
            series(pick)
                .into_iter()
                .map(|(l, n)| (l, counter(n)))
                .collect(),
        )
    };
    let gauges = |pick| {
        Series(
            series(pick)
                .into_iter()
                .map(|(l, n)| (l, gauge(n)))
                .collect(),
        )
    };
    r.register(
        "backfill_runs",
        "Backfill runs completed, per connection",
        counters(|b| b.runs_total),
    );
    r.register(
        "backfill_records",
        "Values read back from the server's history and accepted, per connection",
        counters(|b| b.records_total),
    );
    r.register(
        "backfill_tags_without_history",
        "Tags a backfill run could not read (no history, or no HistoryRead service), per connection",
        counters(|b| b.tags_without_history_total),
    );
    r.register(
        "backfill_values_skipped",
        "Values a server returned that were not asked for, never emitted, per connection",
        counters(|b| b.values_skipped_total),
    );
    r.register(
        "backfill_continuation_restarts",
        "History reads resumed because the server no longer knew its continuation point",
        counters(|b| b.continuation_restarts_total),
    );
    r.register(
        "backfill_not_read_seconds",
        "Seconds of gaps older than backfill_max, not read back, per connection",
        counters(|b| b.not_read_ms_total / 1000),
    );
    r.register(
        "backfill_behind_seconds",
        "How far back the oldest part a running backfill still has to read lies (0 when idle)",
        gauges(|b| b.behind_ms / 1000),
    );
    r.register(
        "backfill_gaps_pending",
        "Per-tag gaps still to be read back, per connection",
        gauges(|b| b.gaps_pending),
    );
}

/// The plant connections' states and what the intake could not accept.
fn register_intake(
    r: &mut Registry,
    status: &StatusBoard,
    board: &[(String, crate::status::ConnStatus)],
) {
    let states = [
        "connecting",
        "online",
        "offline",
        "auth_required",
        "untrusted",
    ];
    r.register(
        "connection_state",
        "1 for the current state of each plant connection",
        Series(
            board
                .iter()
                .flat_map(|(id, st)| {
                    states.into_iter().map(move |s| {
                        let labels = ConnectionStateLabels {
                            connection: id.clone(),
                            state: s,
                        };
                        (labels, gauge(u64::from(st.state.as_str() == s)))
                    })
                })
                .collect(),
        ),
    );
    register_subscriptions(r, board);
    register_backfill(r, board);
    let mut dropped = Vec::new();
    for (id, st) in board {
        for (reason, n) in &st.dropped {
            let labels = DroppedLabels {
                connection: id.clone(),
                reason: reason.as_str(),
            };
            dropped.push((labels, counter(*n)));
        }
    }
    // The agent's own losses belong to no connection.
    for (reason, n) in status.agent_dropped() {
        let labels = DroppedLabels {
            connection: String::new(),
            reason: reason.as_str(),
        };
        dropped.push((labels, counter(n)));
    }
    r.register(
        "intake_dropped",
        "Values that reached the agent but were not accepted, per connection and reason",
        Series(dropped),
    );
    r.register(
        "intake_queued_values",
        "Values waiting between the OPC UA sessions and the buffer (bounded, docs/guarantees.md)",
        gauge(crate::source::feed::queued_values() as u64),
    );
    r.register(
        "values_truncated",
        "Strings and arrays cut to the value limits (the record says so with a trailing marker)",
        counter(crate::source::value::truncated_total()),
    );
}

/// The health endpoint's own connections and the supervised tasks.
fn register_process(r: &mut Registry, status: &StatusBoard) {
    let conns = connection_stats();
    r.register(
        "health_connections_open",
        "Connections the health endpoint holds now",
        gauge(conns.open),
    );
    r.register(
        "health_connections_shed",
        "Health endpoint connections closed to protect it (docs/health.md), by reason",
        Series(vec![
            (
                ReasonLabels {
                    reason: "header_timeout",
                },
                counter(conns.shed_header_timeout_total),
            ),
            (
                ReasonLabels {
                    reason: "over_limit",
                },
                counter(conns.shed_over_limit_total),
            ),
            (
                ReasonLabels { reason: "refused" },
                counter(conns.refused_total),
            ),
        ]),
    );
    r.register(
        "task_restarts",
        "Supervised tasks that died (panicked or ended) and were restarted",
        Series(
            status
                .task_restarts()
                .into_iter()
                .map(|(task, n)| (TaskLabels { task }, counter(n)))
                .collect(),
        ),
    );
}

/// The intake rate and how long the free buffer lasts at it; each only
/// once it is known (a few seconds after the start, and while records
/// come in).
fn register_headroom(r: &mut Registry, st: &Stats, max_bytes: u64, rate: Option<PerSecond>) {
    if let Some(rate) = rate {
        r.register(
            "intake_records_per_second",
            "Records the buffer accepted per second over the last minute",
            ConstGauge::new(rate.records),
        );
    }
    if let Some(b) = bytes_per_record(st, rate) {
        r.register(
            "buffer_bytes_per_record",
            "What a record takes of buffer.max_size, on average",
            ConstGauge::new(b),
        );
    }
    if let Some(s) = headroom_seconds(max_bytes, st.bytes, rate) {
        r.register(
            "buffer_headroom_seconds",
            "How long the free buffer lasts at the current intake rate if nothing were delivered",
            ConstGauge::new(s),
        );
    }
}

/// Bytes per record: of the records waiting, or else of those coming in.
fn bytes_per_record(st: &Stats, rate: Option<PerSecond>) -> Option<f64> {
    if st.records > 0 {
        return Some((st.bytes as f64 / st.records as f64).round());
    }
    rate.filter(|r| r.records > 0.0)
        .map(|r| (r.bytes / r.records).round())
}

/// What the buffer holds.
fn register_buffer(r: &mut Registry, st: &Stats) {
    r.register(
        "buffer_records",
        "Records waiting in the buffer",
        gauge(st.records),
    );
    r.register(
        "buffer_bytes",
        "Bytes of records waiting in the buffer",
        gauge(st.bytes),
    );
    let age = st
        .oldest_ts_ms
        .map(|t| ((now_ms() - t).max(0) as f64) / 1000.0)
        .unwrap_or(0.0);
    r.register(
        "buffer_oldest_age_seconds",
        "Age of the oldest waiting record",
        ConstGauge::new(age),
    );
    r.register(
        "buffer_dead_letters",
        "Records moved to dead letters after repeated broker rejection",
        gauge(st.dead_letters),
    );
    r.register(
        "buffer_stream_records",
        "Records waiting, per stream",
        per_stream(&st.streams, |s| gauge(s.records)),
    );
    r.register(
        "records_accepted",
        "Records committed to the buffer, per stream (next seq - 1)",
        per_stream(&st.streams, |s| counter(s.next_seq.saturating_sub(1))),
    );
    r.register(
        "records_evicted",
        "Records dropped by the buffer limits, per stream",
        per_stream(&st.streams, |s| counter(s.evicted_total)),
    );
    r.register(
        "buffer_retained_records",
        "Delivered records kept for replay (buffer.retain_delivered), per stream",
        per_stream(&st.streams, |s| gauge(s.retained_records)),
    );
    r.register(
        "buffer_retained_bytes",
        "Bytes of delivered records kept for replay",
        gauge(st.retained_bytes),
    );
    let kept_age = st
        .retained_from_ms
        .map(|t| ((now_ms() - t).max(0) as f64) / 1000.0)
        .unwrap_or(0.0);
    r.register(
        "buffer_retained_age_seconds",
        "Age of the oldest record kept for replay (how far back a replay reaches)",
        ConstGauge::new(kept_age),
    );
    r.register(
        "buffer_retained_released",
        "Kept records let go for room or past retain_delivered (not a loss: they were delivered), per stream",
        per_stream(&st.streams, |s| counter(s.retained_released_total)),
    );
}

/// `/status` `config`: the generation in force and the last reload.
fn config_json(c: &crate::status::ConfigStatus) -> serde_json::Value {
    json!({
        "generation": c.generation,
        "last_reload": c.last_reload.as_ref().map(|r| json!({
            "ts": format_ts(r.ts_ms),
            "result": if r.applied { "applied" } else { "refused" },
            "summary": r.summary,
            "errors": r.errors,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Store, StoreOptions};

    #[tokio::test]
    async fn a_dead_task_fails_the_pipeline_until_it_runs_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open(&dir.path().join("buffer.db"), StoreOptions::default()).expect("open");
        let board = StatusBoard::new();
        let (buffer, thread) = BufferHandle::spawn(store, board.clone());
        board.beat("uplink");
        assert_eq!(pipeline_fault(&board, &buffer, LOOP_SILENCE).await, None);
        board.task_died("connection line1", "panicked: overflow");
        let why = pipeline_fault(&board, &buffer, LOOP_SILENCE)
            .await
            .expect("a dead task is a fault");
        assert!(
            why.contains("connection line1 (panicked: overflow)"),
            "{why}"
        );
        board.task_running("connection line1");
        assert_eq!(pipeline_fault(&board, &buffer, LOOP_SILENCE).await, None);
        // A buffer thread that is gone is a fault too.
        buffer.close().await;
        let why = pipeline_fault(&board, &buffer, LOOP_SILENCE)
            .await
            .expect("a closed buffer is a fault");
        assert!(why.starts_with("buffer:"), "{why}");
        thread.join().expect("buffer thread");
    }
}
