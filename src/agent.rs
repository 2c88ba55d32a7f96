//! `plantgate run`: wires the long-lived tasks (one per connection, the
//! ingest, the uplink) and shuts them down in order on one cancellation token.
//!
//! Shutdown order matters for SPEC 1.1: sources stop first, the ingest then
//! commits everything they handed over (nothing accepted is dropped), and
//! only then does the uplink publish `offline` and close.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferHandle, Limits, ProfileState, Store};
use crate::config::Config;
use crate::status::{Batch, ConnectionReporter, StatusBoard};
use crate::uplink::{Uplink, UplinkSettings};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent.data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the buffer: {0}")]
    Buffer(#[from] crate::buffer::BufferError),
    #[error("{0}")]
    Tls(#[from] crate::uplink::tls::TlsError),
    #[error("{0}")]
    Health(#[from] crate::health::BindError),
}

/// Room for batches between sources and the ingest; sources wait when full
/// (back-pressure) rather than dropping.
const SINK_CAPACITY: usize = 1024;
/// Bound on how long sources get to stop on shutdown.
const SOURCE_STOP: Duration = Duration::from_secs(3);
const UPLINK_STOP: Duration = Duration::from_secs(5);

/// Everything a running agent exposes to its embedder (demo, tests).
pub struct Agent {
    pub board: Arc<StatusBoard>,
    pub buffer: BufferHandle,
    /// Where the health endpoint listens (the bound port if 0 was configured).
    pub health_addr: std::net::SocketAddr,
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
    let tls = if config.mqtt.tls {
        Some(crate::uplink::tls::client_config(
            config.mqtt.ca_file.as_deref(),
            config.mqtt.client_cert_file.as_deref(),
            config.mqtt.client_key_file.as_deref(),
        )?)
    } else {
        None
    };
    let opened = Store::open_with(
        &data_dir.join(crate::buffer::DB_FILE_NAME),
        config.buffer.synchronous,
        Limits::from_config(&config.buffer),
    )?;
    if let Some(q) = &opened.quarantined {
        // The store has already recorded a system.error event for it.
        tracing::error!(moved_to = %q.moved_to.display(), reason = %q.reason, "buffer database was corrupt; moved aside, started a fresh one");
    }
    let (buffer, buffer_thread) = BufferHandle::spawn(opened.store);
    tracing::info!(path = %data_dir.join("buffer.db").display(), epoch = %buffer.epoch(), "buffer open");
    let board = StatusBoard::new();
    let health_cancel = CancellationToken::new();
    let health_state = Arc::new(crate::health::HealthState {
        agent_id: config.agent.id.clone(),
        version: crate::VERSION,
        started: std::time::Instant::now(),
        board: board.clone(),
        buffer: buffer.clone(),
        connections: config
            .connections
            .iter()
            .map(|c| (c.id.clone(), c.kind.as_str().to_string()))
            .collect(),
    });
    let (health_addr, health_task) =
        match crate::health::serve(config.health.listen, health_state, health_cancel.clone()).await
        {
            Ok(v) => v,
            Err(e) => {
                buffer.close().await;
                return Err(e.into());
            }
        };
    tracing::info!(addr = %health_addr, "health endpoint listening");

    let (sink, sink_rx) = mpsc::channel::<Batch>(SINK_CAPACITY);
    let ingest = tokio::spawn(ingest(sink_rx, buffer.clone(), board.clone()));

    let sources_cancel = CancellationToken::new();
    let pki_dir = data_dir.join("pki");
    if !config.connections.is_empty() {
        // One OPC UA application certificate for all connections, named after the agent.
        let (dir, id) = (pki_dir.clone(), config.agent.id.clone());
        match tokio::task::spawn_blocking(move || {
            crate::source::pki::ensure_own_certificate(&dir, Some(&id))
        })
        .await
        {
            Ok(Ok(own)) => {
                tracing::info!(application_uri = %own.application_uri, not_after = %own.not_after, "OPC UA application certificate")
            }
            // The connections report it as their offline reason and retry.
            Ok(Err(e)) => tracing::error!(error = %e, "OPC UA application certificate"),
            Err(e) => tracing::error!(error = %e, "OPC UA certificate setup failed"),
        }
    }
    let mut sources = Vec::new();
    for conn in &config.connections {
        let reporter =
            ConnectionReporter::new(&conn.id, board.clone(), sink.clone(), conn.events.clone());
        // The profile continues from what was committed with its last
        // records; an unreadable state only risks a repeated event.
        let saved = match buffer.profile_state(&conn.id).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(connection = %conn.id, error = %e, "reading the saved profile state failed; starting fresh");
                None
            }
        };
        sources.push(tokio::spawn(crate::source::run_connection_restored(
            conn.clone(),
            pki_dir.clone(),
            reporter,
            saved,
            sources_cancel.clone(),
        )));
    }
    drop(sink);

    let uplink_cancel = CancellationToken::new();
    let uplink = Uplink::new(
        UplinkSettings {
            mqtt: config.mqtt.clone(),
            agent_id: config.agent.id.clone(),
            site: config.agent.site.clone(),
            version: crate::VERSION.to_string(),
            boot_id: uuid::Uuid::new_v4().to_string(),
            tls,
        },
        buffer.clone(),
        board.clone(),
    );
    let uplink_task = tokio::spawn(uplink.run(uplink_cancel.clone()));

    let expiry = tokio::spawn(expire_old_records(buffer.clone(), uplink_cancel.clone()));
    let buffer2 = buffer.clone();
    let join = tokio::spawn(async move {
        cancel.cancelled().await;
        tracing::info!("shutting down");
        sources_cancel.cancel();
        for s in sources {
            if tokio::time::timeout(SOURCE_STOP, s).await.is_err() {
                tracing::warn!("a connection did not stop in time");
            }
        }
        // Every sender is gone now, so the ingest drains and ends.
        if let Err(e) = ingest.await {
            tracing::error!(error = %e, "ingest task failed");
        }
        uplink_cancel.cancel();
        let _ = expiry.await;
        if tokio::time::timeout(UPLINK_STOP, uplink_task)
            .await
            .is_err()
        {
            tracing::warn!("uplink did not stop in time");
        }
        health_cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), health_task).await;
        buffer2.close().await;
        let _ = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
        tracing::info!("stopped");
    });
    Ok((
        Agent {
            board,
            buffer,
            health_addr,
        },
        join,
    ))
}

/// Commits what sources hand over. While one commit runs, further batches
/// queue up and go into the next transaction together (few, large commits).
async fn ingest(mut rx: mpsc::Receiver<Batch>, buffer: BufferHandle, board: Arc<StatusBoard>) {
    let mut quiet = crate::throttle::Throttle::new(Duration::from_secs(60));
    loop {
        // Beat while idle too: a silent ingest then means a commit that
        // hangs (a wedged disk or a locked database), which the watchdog
        // and /healthz must see.
        board.beat("ingest");
        let first = match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(_) => continue,
        };
        let mut records = first.records;
        let mut states: Vec<ProfileState> = first.state.into_iter().collect();
        while records.len() < 10_000 {
            match rx.try_recv() {
                Ok(more) => {
                    records.extend(more.records);
                    // Later snapshots of a connection supersede earlier
                    // ones; all their records commit together anyway.
                    if let Some(state) = more.state {
                        match states.iter_mut().find(|s| s.connection == state.connection) {
                            Some(slot) => *slot = state,
                            None => states.push(state),
                        }
                    }
                }
                Err(_) => break,
            }
        }
        let n = records.len();
        match buffer.append_with_states(records, states).await {
            Ok(_) => quiet.reset(),
            Err(e) => {
                // The buffer handles its own faults (eviction, disk full);
                // what reaches here could not be stored at all.
                if let Some(repeats) = quiet.check(&e.to_string()) {
                    tracing::error!(error = %e, records = n, repeats, "records could not be stored");
                }
            }
        }
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

/// `plantgate run`: starts, waits for `cancel`, stops cleanly.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AgentError> {
    let (_agent, join) = start(config, cancel).await?;
    if let Err(e) = join.await {
        tracing::error!(error = %e, "shutdown task failed");
    }
    Ok(())
}
