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

use crate::buffer::{BufferHandle, Store};
use crate::config::Config;
use crate::record::NewRecord;
use crate::status::{ConnectionReporter, StatusBoard};
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
    let store = Store::open(&data_dir.join("buffer.db"), config.buffer.synchronous)?;
    let (buffer, buffer_thread) = BufferHandle::spawn(store);
    tracing::info!(path = %data_dir.join("buffer.db").display(), epoch = %buffer.epoch(), "buffer open");
    let board = StatusBoard::new();

    let (sink, sink_rx) = mpsc::channel::<Vec<NewRecord>>(SINK_CAPACITY);
    let ingest = tokio::spawn(ingest(sink_rx, buffer.clone()));

    let sources_cancel = CancellationToken::new();
    let pki_dir = data_dir.join("pki");
    let mut sources = Vec::new();
    for conn in &config.connections {
        let reporter =
            ConnectionReporter::new(&conn.id, board.clone(), sink.clone(), conn.events.clone());
        sources.push(tokio::spawn(crate::source::run_connection(
            conn.clone(),
            pki_dir.clone(),
            reporter,
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
        if tokio::time::timeout(UPLINK_STOP, uplink_task)
            .await
            .is_err()
        {
            tracing::warn!("uplink did not stop in time");
        }
        buffer2.close().await;
        let _ = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
        tracing::info!("stopped");
    });
    Ok((Agent { board, buffer }, join))
}

/// Commits what sources hand over. While one commit runs, further batches
/// queue up and go into the next transaction together (few, large commits).
async fn ingest(mut rx: mpsc::Receiver<Vec<NewRecord>>, buffer: BufferHandle) {
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < 10_000 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        if let Err(e) = buffer.append(batch).await {
            // The buffer reports and handles its own faults (eviction, disk
            // full); what reaches here could not be stored at all.
            tracing::error!(error = %e, "records could not be stored");
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
