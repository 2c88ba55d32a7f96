//! The health server's connection handling (docs/health.md): a bounded number of
//! connections, each with a header-read timeout, so that a flood of idle
//! clients can neither take the endpoint down nor eat the agent's file
//! descriptors (which the MQTT and OPC UA connections need too).
//!
//! `axum::serve` has no connection limit nor header-read timeout, so the
//! accept loop is ours and each connection is a hyper HTTP/1 connection
//! with a timer. The policy:
//!
//! - Up to `max_connections` are served. A new connection beyond that is
//!   still served and the *oldest* one is told to close: idle it closes at
//!   once, mid-request it finishes that request first. A local client that
//!   connects and sends its request (curl, Prometheus, a load balancer) is
//!   therefore answered however many idle sockets someone else holds.
//! - A connection told to close gets `close_grace` to finish, then it is
//!   dropped. From `2 × max_connections` on (slow senders that do not close
//!   when told), each newcomer makes the oldest one be dropped at once. At
//!   `3 × max_connections` (dropped ones whose tasks have not run yet) a
//!   newcomer is closed without being served, so the health server never
//!   holds more descriptors than that.
//! - A connection that sends no complete request header within
//!   `header_read_timeout` is closed (also between keep-alive requests), and
//!   none lives longer than `max_connection_age`.
//!
//! Everything shed is counted ([`connection_stats`]) and logged, throttled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The health server's limits (docs/health.md). The defaults suit a local endpoint
/// read by a monitoring agent, an operator's curl and Prometheus.
#[derive(Clone, Copy, Debug)]
pub struct HealthLimits {
    /// Connections served at once; beyond it the oldest is told to close.
    pub max_connections: usize,
    /// A request header must be complete within this after the connection
    /// opened or its previous response was sent.
    pub header_read_timeout: Duration,
    /// Bound on any connection's life, keep-alive or slow reader.
    pub max_connection_age: Duration,
    /// How long a connection told to close may take to finish its request.
    pub close_grace: Duration,
}

impl Default for HealthLimits {
    fn default() -> Self {
        HealthLimits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(60),
            close_grace: Duration::from_secs(2),
        }
    }
}

/// Counters of the health server's connections, process-wide (one agent per
/// process in production; several in-process agents in tests share them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: u64,
    pub accepted_total: u64,
    /// Closed because no complete request header came within
    /// `header_read_timeout` (idle sockets, slow senders). A keep-alive
    /// connection that served requests and then idled is not counted.
    pub shed_header_timeout_total: u64,
    /// Told to close (or dropped) to make room under `max_connections`.
    pub shed_over_limit_total: u64,
    /// Closed at accept without being served (the hard bound was reached).
    pub refused_total: u64,
}

impl ConnectionStats {
    /// Every connection the server closed on its own initiative.
    pub fn shed_total(&self) -> u64 {
        self.shed_header_timeout_total + self.shed_over_limit_total + self.refused_total
    }
}

struct Counters {
    open: AtomicU64,
    accepted: AtomicU64,
    header_timeout: AtomicU64,
    over_limit: AtomicU64,
    refused: AtomicU64,
}

static COUNTERS: Counters = Counters {
    open: AtomicU64::new(0),
    accepted: AtomicU64::new(0),
    header_timeout: AtomicU64::new(0),
    over_limit: AtomicU64::new(0),
    refused: AtomicU64::new(0),
};

/// A snapshot of the health server's connection counters, for `/metrics`.
pub fn connection_stats() -> ConnectionStats {
    let c = &COUNTERS;
    ConnectionStats {
        open: c.open.load(Ordering::Relaxed),
        accepted_total: c.accepted.load(Ordering::Relaxed),
        shed_header_timeout_total: c.header_timeout.load(Ordering::Relaxed),
        shed_over_limit_total: c.over_limit.load(Ordering::Relaxed),
        refused_total: c.refused.load(Ordering::Relaxed),
    }
}

/// How often a shedding health server may say so in the log.
const SHED_LOG_EVERY: Duration = Duration::from_secs(60);
/// A failing accept (out of descriptors, most likely) is retried after this,
/// not in a tight loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One line per `SHED_LOG_EVERY` at most, with the totals: shedding is
/// announced without a flood of idle sockets becoming a flood of log lines.
fn note_shed(limits: &HealthLimits) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let Ok(mut last) = LAST.lock() else { return };
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < SHED_LOG_EVERY) {
        return;
    }
    *last = Some(now);
    let s = connection_stats();
    tracing::warn!(
        open = s.open,
        header_timeout_total = s.shed_header_timeout_total,
        over_limit_total = s.shed_over_limit_total,
        refused_total = s.refused_total,
        max_connections = limits.max_connections,
        header_read_timeout_s = limits.header_read_timeout.as_secs_f64(),
        "health endpoint is shedding connections (idle or too many clients); totals so far"
    );
}

/// What the accept loop may do to a connection.
struct Handle {
    /// Finish the current request, then close.
    close: CancellationToken,
    /// Close now.
    abort: CancellationToken,
}

#[derive(Default)]
struct Registry {
    /// By accept order: the first entry is the oldest.
    live: BTreeMap<u64, Handle>,
    next_id: u64,
}

enum Admission {
    Serve {
        id: u64,
        close: CancellationToken,
        abort: CancellationToken,
        /// Another connection was told to close to make room.
        shed: bool,
    },
    Refuse,
}

impl Registry {
    fn admit(&mut self, limits: &HealthLimits) -> Admission {
        let live = self.live.len();
        let mut shed = false;
        if live >= limits.max_connections {
            if let Some(h) = self.live.values().find(|h| !h.close.is_cancelled()) {
                h.close.cancel();
                COUNTERS.over_limit.fetch_add(1, Ordering::Relaxed);
                shed = true;
            }
        }
        if live >= limits.max_connections.saturating_mul(2) {
            if let Some(h) = self.live.values().find(|h| !h.abort.is_cancelled()) {
                h.abort.cancel();
            }
        }
        // Connections just dropped leave the registry when their task next
        // runs; should those tasks lag behind, newcomers wait their turn
        // rather than grow the descriptor count.
        if live >= limits.max_connections.saturating_mul(3) {
            return Admission::Refuse;
        }
        let id = self.next_id;
        self.next_id += 1;
        let handle = Handle {
            close: CancellationToken::new(),
            abort: CancellationToken::new(),
        };
        let admission = Admission::Serve {
            id,
            close: handle.close.clone(),
            abort: handle.abort.clone(),
            shed,
        };
        self.live.insert(id, handle);
        admission
    }
}

/// Takes a connection off the registry and the open gauge when its task
/// ends, however it ends.
struct Slot {
    registry: Arc<Mutex<Registry>>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .live
            .remove(&self.id);
        COUNTERS.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `cancel`, under `limits`.
pub async fn run(
    listener: TcpListener,
    app: axum::Router,
    limits: HealthLimits,
    cancel: CancellationToken,
) {
    let registry = Arc::new(Mutex::new(Registry::default()));
    let tasks = TaskTracker::new();
    let mut accept_errors = crate::throttle::Throttle::new(SHED_LOG_EVERY);
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    if let Some(suppressed) = accept_errors.check(&e.to_string()) {
                        tracing::error!(error = %e, suppressed, "health endpoint cannot accept connections");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        COUNTERS.accepted.fetch_add(1, Ordering::Relaxed);
        // Nothing panics while holding the lock; were it poisoned anyway,
        // the map is still whole (each change is one insert or remove).
        let admission = registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(&limits);
        match admission {
            Admission::Refuse => {
                drop(stream);
                COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                note_shed(&limits);
            }
            Admission::Serve {
                id,
                close,
                abort,
                shed,
            } => {
                COUNTERS.open.fetch_add(1, Ordering::Relaxed);
                let slot = Slot {
                    registry: registry.clone(),
                    id,
                };
                if shed {
                    note_shed(&limits);
                }
                tasks.spawn(connection(
                    stream,
                    app.clone(),
                    limits,
                    Signals {
                        close,
                        abort,
                        shutdown: cancel.clone(),
                    },
                    slot,
                ));
            }
        }
    }
    tasks.close();
    // Each connection got the shutdown signal through `cancel` and has
    // `close_grace` to finish its request.
    let _ = tokio::time::timeout(limits.close_grace, tasks.wait()).await;
}

struct Signals {
    close: CancellationToken,
    abort: CancellationToken,
    shutdown: CancellationToken,
}

async fn connection(
    stream: TcpStream,
    app: axum::Router,
    limits: HealthLimits,
    signals: Signals,
    _slot: Slot,
) {
    // Whether this connection ever delivered a request: a header timeout
    // after one is a keep-alive client going quiet, not an idle socket.
    let served = Arc::new(AtomicBool::new(false));
    let inner = TowerToHyperService::new(app);
    let service = {
        let served = served.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            served.store(true, Ordering::Relaxed);
            inner.call(req)
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let age = tokio::time::sleep(limits.max_connection_age);
    tokio::pin!(age);

    // `biased`, the connection first: a request already waiting in the
    // socket is read (and then answered) before a close signal is looked at.
    let finished = tokio::select! {
        biased;
        result = conn.as_mut() => Some(result),
        _ = signals.abort.cancelled() => return,
        _ = signals.close.cancelled() => None,
        _ = signals.shutdown.cancelled() => None,
        _ = &mut age => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                biased;
                result = conn.as_mut() => result,
                _ = signals.abort.cancelled() => return,
                _ = tokio::time::sleep(limits.close_grace) => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            if !served.load(Ordering::Relaxed) {
                COUNTERS.header_timeout.fetch_add(1, Ordering::Relaxed);
                note_shed(&limits);
            }
        } else {
            // Clients that hang up mid-response and the like: theirs to see.
            tracing::debug!(error = %e, "health endpoint connection ended with an error");
        }
    }
}
