//! The local health endpoint (docs/health.md): `/healthz`, `/readyz`, `/status`,
//! `/metrics`. Read-only views of the status board and the buffer; it never
//! shows a secret because nothing it reads holds one.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferHandle, Stats};
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
    /// (id, kind) of every configured connection, in config order.
    pub connections: Vec<(String, String)>,
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
    let buffer = match buffer_stats(&state).await {
        Ok(st) => json!({
            "records": st.records,
            "bytes": st.bytes,
            "oldest_ts": ts_or_null(st.oldest_ts_ms),
            "evicted_total": st.evicted_total,
            "dead_letters": st.dead_letters,
        }),
        Err(e) => json!({"error": e}),
    };
    let board = state.board.connections();
    let connections: Vec<Value> = state
        .connections
        .iter()
        .map(|(id, kind)| {
            let st = board.iter().find(|(c, _)| c == id).map(|(_, s)| s);
            json!({
                "id": id,
                "kind": kind,
                "state": st.map(|s| s.state.as_str()).unwrap_or("connecting"),
                "since": ts_or_null(st.map(|s| s.since_ms)),
                "reason": st.map(|s| s.reason.as_str()).unwrap_or(""),
                "records_total": st.map(|s| s.records_total).unwrap_or(0),
                "dropped_total": st.map(|s| s.dropped_total()).unwrap_or(0),
                "dropped": st.map(|s| json!(s.dropped)).unwrap_or_else(|| json!({})),
                "last_value_ts": ts_or_null(st.and_then(|s| s.last_value_ts_ms)),
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
            "payload_limit_bytes": mqtt.payload_limit_bytes,
            "broker_max_packet_bytes": mqtt.broker_max_packet_bytes,
        },
        "buffer": buffer,
        "intake": {
            "blocked_since": ts_or_null(state.board.intake_blocked().map(|b| b.0)),
            "blocked_reason": state.board.intake_blocked().map(|b| b.1),
            "agent_dropped": state.board.agent_dropped(),
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

/// Prometheus label value escaping (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(state): State<Arc<HealthState>>) -> Response {
    let mut out = String::with_capacity(4096);
    let mqtt = state.board.mqtt();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP plantgate_{name} {help}");
        let _ = writeln!(out, "# TYPE plantgate_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "plantgate_{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    metric("up", "gauge", "The agent process is running.", &one(1.0));
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        &one(state.started.elapsed().as_secs_f64()),
    );
    metric(
        "mqtt_connected",
        "gauge",
        "1 while the MQTT session is up.",
        &one(if mqtt.connected { 1.0 } else { 0.0 }),
    );
    metric(
        "mqtt_connects_total",
        "counter",
        "MQTT sessions established.",
        &one(mqtt.reconnects_total as f64),
    );
    metric(
        "mqtt_inflight_messages",
        "gauge",
        "MQTT messages submitted and not yet acknowledged.",
        &one(mqtt.inflight as f64),
    );
    metric(
        "mqtt_rejected_total",
        "counter",
        "Publishes the broker refused (MQTT 5 PUBACK reason >= 0x80).",
        &one(mqtt.rejected_total as f64),
    );
    let dead_lettered: Vec<(String, f64)> = mqtt
        .dead_lettered_by_cause
        .iter()
        .map(|(c, n)| (format!("{{cause=\"{c}\"}}"), *n as f64))
        .collect();
    metric(
        "mqtt_dead_lettered_total",
        "counter",
        "Records moved to dead letters by the uplink, by cause.",
        &dead_lettered,
    );
    metric(
        "mqtt_payload_limit_bytes",
        "gauge",
        "Largest payload the uplink sends: max_message_bytes or the broker's Maximum Packet Size, whichever is smaller.",
        &one(mqtt.payload_limit_bytes as f64),
    );
    metric(
        "published_records_total",
        "counter",
        "Records acknowledged by the broker and deleted from the buffer.",
        &one(mqtt.published_records_total as f64),
    );
    {
        // Histogram series: the suffix (_bucket, _sum, _count) travels in
        // the sample's label part, which `metric` prints right after the name.
        let h = &mqtt.publish_latency;
        let mut samples = Vec::new();
        let mut cumulative = 0;
        for (i, bound) in crate::status::LATENCY_BUCKETS.iter().enumerate() {
            cumulative += h.counts[i];
            samples.push((format!("_bucket{{le=\"{bound}\"}}"), cumulative as f64));
        }
        samples.push(("_bucket{le=\"+Inf\"}".to_string(), h.count as f64));
        samples.push(("_sum".to_string(), h.sum));
        samples.push(("_count".to_string(), h.count as f64));
        metric(
            "publish_latency_seconds",
            "histogram",
            "Time from submitting a record message to its PUBACK.",
            &samples,
        );
    }
    let published: Vec<(String, f64)> = mqtt
        .published_by_stream
        .iter()
        .map(|((c, k), n)| {
            (
                format!("{{connection=\"{}\",kind=\"{k}\"}}", label(c)),
                *n as f64,
            )
        })
        .collect();
    metric(
        "records_published_total",
        "counter",
        "Records acknowledged by the broker, per stream.",
        &published,
    );
    let board = state.board.connections();
    let states = [
        "connecting",
        "online",
        "offline",
        "auth_required",
        "untrusted",
    ];
    let mut conn_state = Vec::new();
    let mut conn_records = Vec::new();
    for (id, st) in &board {
        for s in states {
            conn_state.push((
                format!("{{connection=\"{}\",state=\"{s}\"}}", label(id)),
                if st.state.as_str() == s { 1.0 } else { 0.0 },
            ));
        }
        conn_records.push((
            format!("{{connection=\"{}\"}}", label(id)),
            st.records_total as f64,
        ));
    }
    metric(
        "connection_state",
        "gauge",
        "1 for the current state of each plant connection.",
        &conn_state,
    );
    let mut dropped = Vec::new();
    for (id, st) in &board {
        for (reason, n) in &st.dropped {
            dropped.push((
                format!(
                    "{{connection=\"{}\",reason=\"{}\"}}",
                    label(id),
                    reason.as_str()
                ),
                *n as f64,
            ));
        }
    }
    for (reason, n) in state.board.agent_dropped() {
        dropped.push((
            format!("{{connection=\"\",reason=\"{}\"}}", reason.as_str()),
            n as f64,
        ));
    }
    metric(
        "intake_dropped_total",
        "counter",
        "Values that reached the agent but were not accepted, per connection and reason.",
        &dropped,
    );
    let restarts: Vec<(String, f64)> = state
        .board
        .task_restarts()
        .into_iter()
        .map(|(t, n)| (format!("{{task=\"{}\"}}", label(&t)), n as f64))
        .collect();
    metric(
        "intake_queued_values",
        "gauge",
        "Values waiting between the OPC UA sessions and the buffer (bounded, docs/guarantees.md).",
        &one(crate::source::intake::queued_values() as f64),
    );
    metric(
        "values_truncated_total",
        "counter",
        "Strings and arrays cut to the value limits (the record says so with a trailing marker).",
        &one(crate::source::value::truncated_total() as f64),
    );
    let conns = connection_stats();
    metric(
        "health_connections_open",
        "gauge",
        "Connections the health endpoint holds now.",
        &one(conns.open as f64),
    );
    metric(
        "health_connections_shed_total",
        "counter",
        "Health endpoint connections closed to protect it (docs/health.md), by reason.",
        &[
            (
                "{reason=\"header_timeout\"}".to_string(),
                conns.shed_header_timeout_total as f64,
            ),
            (
                "{reason=\"over_limit\"}".to_string(),
                conns.shed_over_limit_total as f64,
            ),
            (
                "{reason=\"refused\"}".to_string(),
                conns.refused_total as f64,
            ),
        ],
    );
    metric(
        "task_restarts_total",
        "counter",
        "Supervised tasks that died (panicked or ended) and were restarted.",
        &restarts,
    );
    metric(
        "opcua_notifications_total",
        "counter",
        "Values and events received from each plant connection (records handed to the buffer).",
        &conn_records,
    );
    if let Ok(st) = buffer_stats(&state).await {
        metric(
            "buffer_records",
            "gauge",
            "Records waiting in the buffer.",
            &one(st.records as f64),
        );
        metric(
            "buffer_bytes",
            "gauge",
            "Bytes of records waiting in the buffer.",
            &one(st.bytes as f64),
        );
        let age = st
            .oldest_ts_ms
            .map(|t| ((now_ms() - t).max(0) as f64) / 1000.0)
            .unwrap_or(0.0);
        metric(
            "buffer_oldest_age_seconds",
            "gauge",
            "Age of the oldest waiting record.",
            &one(age),
        );
        metric(
            "buffer_dead_letters",
            "gauge",
            "Records moved to dead letters after repeated broker rejection.",
            &one(st.dead_letters as f64),
        );
        let per = |f: &dyn Fn(&crate::buffer::StreamStats) -> f64| -> Vec<(String, f64)> {
            st.streams
                .iter()
                .map(|s| {
                    (
                        format!(
                            "{{connection=\"{}\",kind=\"{}\"}}",
                            label(&s.connection),
                            s.kind
                        ),
                        f(s),
                    )
                })
                .collect()
        };
        metric(
            "buffer_stream_records",
            "gauge",
            "Records waiting, per stream.",
            &per(&|s| s.records as f64),
        );
        metric(
            "records_accepted_total",
            "counter",
            "Records committed to the buffer, per stream (next seq - 1).",
            &per(&|s| s.next_seq.saturating_sub(1) as f64),
        );
        metric(
            "records_evicted_total",
            "counter",
            "Records dropped by the buffer limits, per stream.",
            &per(&|s| s.evicted_total as f64),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
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
        let (buffer, thread) = BufferHandle::spawn(store);
        let board = StatusBoard::new();
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
