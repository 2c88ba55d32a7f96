//! One OPC UA connection task run directly (no agent around it), with its
//! own status board, every record it hands over kept: for tests of the
//! source against real servers.

use std::path::PathBuf;
use std::sync::Arc;

use plantgate::config::ConnectionConfig;
use plantgate::record::{Kind, NewRecord};
use plantgate::source::run_connection;
use plantgate::source::ConnectionReporter;
use plantgate::status::{ConnState, DropReason, StatusBoard};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PATIENCE;

/// One connection task with its own status board; every record it hands
/// over is kept in `seen`.
pub struct Conn {
    pub id: String,
    pub board: Arc<StatusBoard>,
    pub rx: mpsc::UnboundedReceiver<plantgate::buffer::Submission>,
    pub seen: Vec<NewRecord>,
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Conn {
    pub fn start(conn: ConnectionConfig, pki: PathBuf) -> Conn {
        let board = StatusBoard::new();
        // The test reads the queue as it waits; the bound only caps memory.
        let (tx, rx) = plantgate::buffer::Outlet::queue(1_000_000);
        let reporter = ConnectionReporter::new(&conn.id, board.clone(), tx, conn.events.clone());
        let cancel = CancellationToken::new();
        let id = conn.id.clone();
        let task = tokio::spawn(run_connection(
            tokio::sync::watch::channel(conn).1,
            pki,
            reporter,
            Default::default(),
            cancel.clone(),
        ));
        Conn {
            id,
            board,
            rx,
            seen: Vec::new(),
            cancel,
            task,
        }
    }

    pub fn status(&self) -> plantgate::status::ConnStatus {
        self.board
            .connections()
            .into_iter()
            .find(|(id, _)| *id == self.id)
            .map(|(_, s)| s)
            .expect("registered")
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.status().dropped.get(&reason).copied().unwrap_or(0)
    }

    pub async fn wait_state(&mut self, want: ConnState) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut changes = self.board.subscribe();
        while self.status().state != want {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    let s = self.status();
                    panic!("no {want:?}; state {:?} ({})", s.state, s.reason)
                }
                _ = changes.changed() => {}
                Some(b) = self.rx.recv() => self.seen.extend(b),
            }
        }
    }

    /// Receives until `cond` holds over everything seen so far.
    pub async fn until(&mut self, what: &str, cond: impl Fn(&[NewRecord]) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !cond(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(b)) => self.seen.extend(b),
                _ => {
                    let s = self.status();
                    panic!(
                        "timed out waiting for {what}; state {:?} ({})",
                        s.state, s.reason
                    )
                }
            }
        }
    }

    /// The states of the `connection.status_changed` events seen so far.
    pub fn status_events(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|r| {
                r.kind == Kind::Event && r.data_json()["type"] == "connection.status_changed"
            })
            .filter_map(|r| {
                r.data_json()["details"]["state"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }

    /// Waits until `n` `connection.status_changed` events arrived (they may
    /// trail the first values of a new session: separate hand-overs).
    pub async fn wait_status_events(&mut self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.status_events().len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(b)) => self.seen.extend(b),
                _ => panic!("only {:?} status events", self.status_events()),
            }
        }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("stops")
            .expect("no panic");
    }
}
