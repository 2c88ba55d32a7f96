//! `plantgate run`: wires the long-lived tasks (one per connection, the
//! uplink, buffer expiry, the intake-loss announcer), each under a
//! supervisor (`supervise`, docs/guarantees.md), around the buffer's own
//! thread, and shuts them down in order on one cancellation token.
//!
//! Shutdown order matters for docs/guarantees.md: sources stop first, the
//! buffer then commits everything they handed over (nothing accepted is
//! dropped), and only then does the uplink publish `offline` and close.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferHandle, Limits, OpenMode, Store, StoreOptions};
use crate::config::{Config, ConnectionConfig};
use crate::record::{EventType, Kind, NewRecord};
use crate::source::ConnectionReporter;
use crate::sparkplug::DeviceSpec;
use crate::status::{ConnState, ReloadOutcome, StatusBoard};
use crate::supervise::supervise;
use crate::uplink::{Uplink, UplinkSettings};

mod reload;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent.data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the buffer: {0}")]
    Buffer(#[from] crate::buffer::BufferError),
    #[error("starting the buffer thread: {0}")]
    BufferThread(String),
    #[error("{0}")]
    Tls(#[from] crate::uplink::tls::TlsError),
    #[error("{0}")]
    Health(#[from] crate::health::BindError),
}

/// Bound on how long sources get to stop on shutdown.
const SOURCE_STOP: Duration = Duration::from_secs(3);
/// Bound on how long the buffer may keep retrying records it refuses at
/// shutdown; what it still holds then is counted as dropped.
const BUFFER_FLUSH: Duration = Duration::from_secs(3);
const UPLINK_STOP: Duration = Duration::from_secs(5);

/// Everything a running agent exposes to its embedder (demo, tests).
pub struct Agent {
    pub board: Arc<StatusBoard>,
    pub buffer: BufferHandle,
    /// Where the health endpoint listens (a reload may move it).
    health_addr: tokio::sync::watch::Receiver<std::net::SocketAddr>,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
}

/// A new configuration for the running agent, and where its outcome goes.
struct ReloadRequest {
    /// The new configuration, or why it could not be loaded (one line per
    /// problem, key path first).
    config: Result<Config, Vec<String>>,
    reply: tokio::sync::oneshot::Sender<ReloadOutcome>,
}

impl Agent {
    /// Where the health endpoint listens now (the bound port if 0 was
    /// configured).
    pub fn health_addr(&self) -> std::net::SocketAddr {
        *self.health_addr.borrow()
    }

    /// Applies `config` (loaded and validated as at start) to the running
    /// agent, or refuses it and keeps the one in force (SPEC 2, reload).
    /// The outcome is also on the status board (`/status` `config`).
    pub async fn reload(&self, config: Result<Config, Vec<String>>) -> ReloadOutcome {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let request = ReloadRequest { config, reply };
        let stopped = || ReloadOutcome {
            ts_ms: crate::record::now_ms(),
            applied: false,
            summary: String::new(),
            errors: vec!["the agent is stopping".into()],
        };
        if self.reloads.send(request).await.is_err() {
            return stopped();
        }
        outcome.await.unwrap_or_else(|_| stopped())
    }
}

/// Opens the buffer and starts every task; returns once the buffer is open
/// (the point at which systemd may be told READY). `cancel` stops it all;
/// await the returned join handle for a complete, clean stop.
pub async fn start(
    config: Config,
    cancel: CancellationToken,
) -> Result<(Agent, tokio::task::JoinHandle<()>), AgentError> {
    let data_dir = config.agent.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| AgentError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let tls_files = crate::uplink::tls::files_fingerprint(&config.mqtt);
    let tls = mqtt_tls(&config)?;
    let board = StatusBoard::new();
    board.set_buffer_budget(buffer_budget(&config));
    let (buffer, buffer_thread) = open_buffer(&config, &board)?;
    let health = match start_health(&config, &board, &buffer, std::time::Instant::now()).await {
        Ok(health) => health,
        Err(e) => {
            buffer.close().await;
            return Err(e.into());
        }
    };
    let (health_moved, health_addr) = tokio::sync::watch::channel(health.addr);
    let sources = start_sources(&config, &buffer, &board).await;
    let background = Background::start(&config, tls, &buffer, &board);
    let mut running = Running {
        config,
        tls_files,
        pki_dir: sources.pki_dir,
        sources_cancel: sources.cancel,
        connections: sources.tasks,
        background,
        health,
        health_moved,
        board: board.clone(),
        buffer: buffer.clone(),
        buffer_thread,
    };
    let (reloads, mut requests) = tokio::sync::mpsc::channel::<ReloadRequest>(1);
    running.report_reload();
    let join = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(r) = requests.recv() => {
                    let outcome = match r.config {
                        Ok(config) => running.reload(config).await,
                        Err(problems) => running.refused(problems),
                    };
                    running.board.reloaded(outcome.clone());
                    running.report_reload();
                    let _ = r.reply.send(outcome);
                }
            }
        }
        running.stop().await;
    });
    Ok((
        Agent {
            board,
            buffer,
            health_addr,
            reloads,
        },
        join,
    ))
}

/// Opens the buffer in service mode (full check, quarantine of a corrupt
/// file, disk reserve) on its own thread.
fn open_buffer(
    config: &Config,
    board: &Arc<StatusBoard>,
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), AgentError> {
    let path = config.agent.data_dir.join(crate::buffer::DB_FILE_NAME);
    let store = Store::open(
        &path,
        StoreOptions {
            synchronous: config.buffer.synchronous,
            limits: Limits::from_config(&config.buffer),
            mode: OpenMode::Service,
        },
    )?;
    if let Some(q) = store.quarantined() {
        // The store has already recorded a system.error event for it.
        tracing::error!(moved_to = %q.moved_to.display(), reason = %q.reason, "buffer database was corrupt; moved aside, started a fresh one");
    }
    let (buffer, thread) = BufferHandle::try_spawn(store, board.clone())
        .map_err(|e| AgentError::BufferThread(e.to_string()))?;
    tracing::info!(path = %path.display(), epoch = %buffer.epoch(), "buffer open");
    Ok((buffer, thread))
}

/// The health endpoint, listening and supervised.
struct Health {
    addr: std::net::SocketAddr,
    started: std::time::Instant,
    task: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

/// The health endpoint on `health.listen`; `started` is the agent's start
/// (the uptime it reports, kept when a reload moves it).
async fn start_health(
    config: &Config,
    board: &Arc<StatusBoard>,
    buffer: &BufferHandle,
    started: std::time::Instant,
) -> Result<Health, crate::health::BindError> {
    let cancel = CancellationToken::new();
    let state = Arc::new(crate::health::HealthState {
        agent_id: config.agent.id.clone(),
        version: crate::VERSION,
        started,
        board: board.clone(),
        buffer: buffer.clone(),
    });
    let (addr, first) =
        crate::health::serve(config.health.listen, state.clone(), cancel.clone()).await?;
    tracing::info!(%addr, "health endpoint listening");
    let task = supervise_health(
        addr,
        state,
        first,
        board.clone(),
        buffer.clone(),
        cancel.clone(),
    );
    Ok(Health {
        addr,
        task,
        cancel,
        started,
    })
}

/// One plant connection's task, stopped alone on a reload.
struct ConnTask {
    /// Its configuration in force; a new tag list sent here changes the
    /// running subscription (a restart by the supervisor takes it too).
    config: tokio::sync::watch::Sender<ConnectionConfig>,
    reporter: ConnectionReporter,
    cancel: CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

/// The plant connections, each under its supervisor.
struct Sources {
    tasks: std::collections::BTreeMap<String, ConnTask>,
    cancel: CancellationToken,
    pki_dir: PathBuf,
}

async fn start_sources(
    config: &Config,
    buffer: &BufferHandle,
    board: &Arc<StatusBoard>,
) -> Sources {
    let pki_dir = config.agent.data_dir.join("pki");
    if !config.connections.is_empty() {
        ensure_own_certificate(&pki_dir, &config.agent.id).await;
    }
    let cancel = CancellationToken::new();
    let mut tasks = std::collections::BTreeMap::new();
    for conn in &config.connections {
        let task = start_connection(conn, &pki_dir, buffer, board, &cancel);
        tasks.insert(conn.id.clone(), task);
    }
    Sources {
        tasks,
        cancel,
        pki_dir,
    }
}

/// Starts one connection under its supervisor, stopped by its own token
/// (a child of `sources`, so a shutdown stops it too).
fn start_connection(
    conn: &ConnectionConfig,
    pki_dir: &std::path::Path,
    buffer: &BufferHandle,
    board: &Arc<StatusBoard>,
    sources: &CancellationToken,
) -> ConnTask {
    let reporter = ConnectionReporter::new(
        &conn.id,
        board.clone(),
        buffer.outlet(),
        conn.events.clone(),
    );
    // On the board, the connection lists of `/status`, the heartbeat and
    // the intake-loss announcer follow reloads.
    board.add_connection(
        &conn.id,
        conn.kind().as_str(),
        reporter.wants_event(EventType::SourceDropped),
    );
    let cancel = sources.child_token();
    let (config, updates) = tokio::sync::watch::channel(conn.clone());
    let join = tokio::spawn(supervise_connection(
        updates,
        pki_dir.to_path_buf(),
        reporter.clone(),
        buffer.clone(),
        board.clone(),
        cancel.clone(),
    ));
    ConnTask {
        config,
        reporter,
        cancel,
        join,
    }
}

/// One OPC UA application certificate for all connections, named after the
/// agent. A failure is logged; the connections report it as their offline
/// reason and retry.
async fn ensure_own_certificate(pki_dir: &std::path::Path, agent_id: &str) {
    let (dir, id) = (pki_dir.to_path_buf(), agent_id.to_string());
    let made = tokio::task::spawn_blocking(move || {
        crate::source::pki::ensure_own_certificate(&dir, Some(&id))
    })
    .await;
    match made {
        Ok(Ok(own)) => {
            tracing::info!(application_uri = %own.application_uri, not_after = %own.not_after, "OPC UA application certificate")
        }
        Ok(Err(e)) => tracing::error!(error = %e, "OPC UA application certificate"),
        Err(e) => tracing::error!(error = %e, "OPC UA certificate setup failed"),
    }
}

/// The tasks that stop after the buffer has taken what the sources handed over: the uplink, buffer
/// expiry, heap trimming and the intake-loss announcer.
struct Background {
    cancel: CancellationToken,
    /// The uplink's own token (a child of `cancel`): a reload of `[mqtt]`
    /// replaces the uplink alone.
    uplink_cancel: CancellationToken,
    uplink: tokio::task::JoinHandle<()>,
    /// The running uplink, told when a reload replaces it.
    uplink_now: Arc<Uplink>,
    /// Stopped before the uplink, so their last events still go out.
    others: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn start(
        config: &Config,
        tls: Option<Arc<rustls::ClientConfig>>,
        buffer: &BufferHandle,
        board: &Arc<StatusBoard>,
    ) -> Background {
        let cancel = CancellationToken::new();
        let uplink_cancel = cancel.child_token();
        let (uplink, uplink_now) = spawn_uplink(config, tls, buffer, board, &uplink_cancel);
        let (b, c) = (buffer.clone(), cancel.clone());
        let expiry = spawn_agent_task("expiry", board, buffer, cancel.clone(), move || {
            expire_old_records(b.clone(), c.clone())
        });
        let c = cancel.clone();
        let heap = spawn_agent_task("heap", board, buffer, cancel.clone(), move || {
            crate::heap::release_periodically(c.clone())
        });
        let (b, board2, c) = (buffer.clone(), board.clone(), cancel.clone());
        let announcer = spawn_agent_task("announcer", board, buffer, cancel.clone(), move || {
            crate::announce::run(board2.clone(), b.clone(), c.clone())
        });
        let (b, board2, c) = (buffer.clone(), board.clone(), cancel.clone());
        let headroom = spawn_agent_task("headroom", board, buffer, cancel.clone(), move || {
            crate::headroom::watch(board2.clone(), b.clone(), c.clone())
        });
        Background {
            cancel,
            uplink_cancel,
            uplink,
            uplink_now,
            others: vec![expiry, heap, announcer, headroom],
        }
    }
}

/// The uplink for `config`'s `[mqtt]` and connections, supervised, until
/// `cancel`.
fn spawn_uplink(
    config: &Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    buffer: &BufferHandle,
    board: &Arc<StatusBoard>,
    cancel: &CancellationToken,
) -> (tokio::task::JoinHandle<()>, Arc<Uplink>) {
    let uplink = Arc::new(Uplink::new(
        UplinkSettings {
            mqtt: config.mqtt.clone(),
            agent_id: config.agent.id.clone(),
            site: config.agent.site.clone(),
            version: crate::VERSION.to_string(),
            boot_id: uuid::Uuid::new_v4().to_string(),
            tls,
            devices: sparkplug_devices(&config.connections),
        },
        buffer.clone(),
        board.clone(),
    ));
    let (c, now) = (cancel.clone(), uplink.clone());
    let task = spawn_agent_task("uplink", board, buffer, cancel.clone(), move || {
        let (uplink, cancel) = (uplink.clone(), c.clone());
        async move { uplink.run(cancel).await }
    });
    (task, now)
}

/// The buffer limits the health views and the headroom warning use.
fn buffer_budget(config: &Config) -> crate::status::BufferBudget {
    crate::status::BufferBudget {
        max_bytes: config.buffer.max_size,
        headroom_warning: config.buffer.headroom_warning,
    }
}

/// The uplink's TLS settings from `[mqtt]` (None for plaintext).
fn mqtt_tls(
    config: &Config,
) -> Result<Option<Arc<rustls::ClientConfig>>, crate::uplink::tls::TlsError> {
    if !config.mqtt.tls {
        return Ok(None);
    }
    crate::uplink::tls::client_config(
        config.mqtt.ca_file.as_deref(),
        config.mqtt.client_cert_file.as_deref(),
        config.mqtt.client_key_file.as_deref(),
    )
    .map(Some)
}

/// Runs an agent-level task under its supervisor until `stop`; a death is
/// announced by a `system.error` of the agent.
fn spawn_agent_task<S, F>(
    name: &'static str,
    board: &Arc<StatusBoard>,
    buffer: &BufferHandle,
    stop: CancellationToken,
    start: S,
) -> tokio::task::JoinHandle<()>
where
    S: FnMut() -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(supervise(
        name.into(),
        board.clone(),
        stop,
        start,
        agent_error(buffer.clone(), name),
    ))
}

/// A started agent, stopped in order by [`Running::stop`], changed by
/// [`Running::reload`].
struct Running {
    /// The configuration in force.
    config: Config,
    /// What the files behind `[mqtt]`'s TLS settings held when last read
    /// ([`crate::uplink::tls::files_fingerprint`]).
    tls_files: u64,
    pki_dir: PathBuf,
    sources_cancel: CancellationToken,
    connections: std::collections::BTreeMap<String, ConnTask>,
    background: Background,
    health: Health,
    /// Tells the embedder where the health endpoint moved.
    health_moved: tokio::sync::watch::Sender<std::net::SocketAddr>,
    board: Arc<StatusBoard>,
    buffer: BufferHandle,
    buffer_thread: std::thread::JoinHandle<()>,
}

impl Running {
    /// Writes where `plantgate reload` reads it (the unit's `ExecReload=`)
    /// which configuration is in force and how the last reload went.
    fn report_reload(&self) {
        let report = crate::reload_report::Report::new(std::process::id(), &self.board.config());
        if let Err(e) = crate::reload_report::write(&self.config.agent.data_dir, &report) {
            tracing::warn!(error = %e, "cannot write the reload report; `plantgate reload` will not see the outcome");
        }
    }

    /// Sources first, then the buffer commits what they handed over, then
    /// the uplink publishes `offline` and closes, then the buffer closes.
    async fn stop(self) {
        tracing::info!("shutting down");
        self.sources_cancel.cancel();
        // All connections stop at once, under one deadline.
        let sources = futures::future::join_all(self.connections.into_values().map(|c| c.join));
        if tokio::time::timeout(SOURCE_STOP, sources).await.is_err() {
            tracing::warn!("a connection did not stop in time");
        }
        // A buffer that refuses gets BUFFER_FLUSH, then what it holds is
        // counted as dropped.
        self.buffer.flush(BUFFER_FLUSH).await;
        let bg = self.background;
        bg.cancel.cancel();
        // The last counts go out with the events the uplink still sends.
        futures::future::join_all(bg.others).await;
        if tokio::time::timeout(UPLINK_STOP, bg.uplink).await.is_err() {
            tracing::warn!("uplink did not stop in time");
        }
        self.health.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.health.task).await;
        self.buffer.close().await;
        let thread = self.buffer_thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        tracing::info!("stopped");
    }
}

/// Runs one connection under its supervisor: a panic or an unexpected end
/// sets the connection `offline` with the reason, writes a `system.error`
/// and starts it again; the profile continues from its last committed
/// snapshot each time.
async fn supervise_connection(
    config: crate::source::ConfigUpdates,
    pki_dir: PathBuf,
    reporter: ConnectionReporter,
    buffer: BufferHandle,
    board: Arc<StatusBoard>,
    cancel: CancellationToken,
) {
    let name = format!("connection {}", config.borrow().id);
    let stop = cancel.clone();
    let on_death = {
        let reporter = reporter.clone();
        move |death: crate::supervise::Death| {
            let reporter = reporter.clone();
            async move {
                let reason = format!("connection task {death}");
                reporter.set_state(ConnState::Offline, &reason).await;
                reporter
                    .system_error(serde_json::json!({
                        "error": "task_died",
                        "message": format!("{reason}; restarting it"),
                    }))
                    .await;
            }
        }
    };
    let start = move || {
        let (config, pki_dir, reporter, buffer, cancel) = (
            config.clone(),
            pki_dir.clone(),
            reporter.clone(),
            buffer.clone(),
            cancel.clone(),
        );
        async move {
            // The profile and the backfill marks continue from what was
            // committed with the last records; an unreadable state only
            // risks a repeated event, unreadable marks a gap not read back.
            let id = config.borrow().id.clone();
            let profile = match buffer.profile_state(&id).await {
                Ok(saved) => saved,
                Err(e) => {
                    tracing::error!(connection = %id, error = %e, "reading the saved profile state failed; starting fresh");
                    None
                }
            };
            let marks = match buffer.tag_marks(&id).await {
                Ok(marks) => marks,
                Err(e) => {
                    tracing::error!(connection = %id, error = %e, "reading the backfill marks failed; gaps before this start are not read back");
                    Vec::new()
                }
            };
            let saved = crate::source::Saved { profile, marks };
            crate::source::run_connection(config, pki_dir, reporter, saved, cancel).await
        }
    };
    supervise(name, board, stop, start, on_death).await
}

/// Supervises the health server already listening on `addr` (its first
/// run is `first`); a restart binds the same address again.
fn supervise_health(
    addr: std::net::SocketAddr,
    state: Arc<crate::health::HealthState>,
    first: tokio::task::JoinHandle<()>,
    board: Arc<StatusBoard>,
    buffer: BufferHandle,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let first = Arc::new(std::sync::Mutex::new(Some(first)));
    let stop = cancel.clone();
    tokio::spawn(supervise(
        "health".into(),
        board,
        stop,
        move || {
            let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            let (state, cancel) = (state.clone(), cancel.clone());
            async move {
                let task = match first {
                    Some(task) => task,
                    None => match crate::health::serve(addr, state, cancel).await {
                        Ok((_, task)) => task,
                        Err(e) => {
                            tracing::error!(error = %e, "health endpoint cannot listen again");
                            return;
                        }
                    },
                };
                // A panic of the server task is this run's panic.
                if let Err(e) = task.await {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        },
        agent_error(buffer, "health"),
    ))
}

/// What the supervisor of an agent-level task does on a death: a
/// `system.error` of the agent.
fn agent_error(
    buffer: BufferHandle,
    task: &'static str,
) -> impl FnMut(crate::supervise::Death) -> futures::future::BoxFuture<'static, ()> {
    move |death| {
        let buffer = buffer.clone();
        Box::pin(async move {
            let ev = NewRecord::event(
                "",
                EventType::SystemError,
                serde_json::json!({
                    "error": "task_died",
                    "task": task,
                    "message": format!("{task} task {death}; restarting it"),
                }),
            );
            buffer.record_events(vec![ev]);
        })
    }
}

/// How often records past `buffer.max_age` are dropped (and announced).
const EXPIRY_EVERY: Duration = Duration::from_secs(60);

/// Drops records older than `buffer.max_age`; the buffer records a
/// `buffer.evicted` event for each affected stream itself.
async fn expire_old_records(buffer: BufferHandle, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match buffer.evict_expired(crate::record::now_ms()).await {
            Ok(evicted) => {
                for e in evicted {
                    tracing::warn!(connection = %e.connection, kind = %e.kind, first_seq = e.first_seq, last_seq = e.last_seq, count = e.count, "records older than buffer.max_age dropped");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiring old records failed"),
        }
    }
}

/// The connections as Sparkplug devices (docs/sparkplug.md): each with the
/// derived records its profile makes.
fn sparkplug_devices(connections: &[ConnectionConfig]) -> Vec<DeviceSpec> {
    use crate::config::ConnectionKind;
    connections
        .iter()
        .map(|c| DeviceSpec {
            id: c.id.clone(),
            derived: match c.profile.kind() {
                ConnectionKind::Deltav => vec![Kind::Batch, Kind::Recipe],
                ConnectionKind::Optomes => vec![Kind::Oee, Kind::Downtime],
                ConnectionKind::Generic => Vec::new(),
            },
        })
        .collect()
}
