//! What the load tags (`--tags N --rate HZ`) have done, a switch that pauses
//! them, and the line protocol `plantgate simulate --load-control` speaks
//! with a benchmark (as benches/node-opcua/load-server.js does, which adds a
//! fourth total: the values it sent in subscription notifications):
//!
//! - stdout: `READY <endpoint> <namespace-uri>` once serving, then once a
//!   second `STATS <changes> <ticks> <late ticks>` (totals so far);
//! - stdin: `start` resumes the load (answer `STARTED`), `stop` pauses it
//!   (answer `STOPPED <changes> <ticks> <late ticks>`, the final totals: no
//!   round is under way when it is printed). The load starts paused, so a
//!   client can subscribe first and count every change from the start.

use std::io::BufRead;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Totals since the simulator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Values written (every load tag once per round).
    pub changes: u64,
    /// Rounds done.
    pub ticks: u64,
    /// Rounds that came later than one period after the previous one
    /// (the simulator could not keep the rate and skipped ahead).
    pub late: u64,
}

impl std::fmt::Display for LoadStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.changes, self.ticks, self.late)
    }
}

#[derive(Debug, Default)]
struct State {
    paused: bool,
    stats: LoadStats,
}

/// Shared by the task that changes the load tags and whoever watches or
/// drives it (found with [`super::SimServer::load_tags`]).
#[derive(Debug, Clone, Default)]
pub struct LoadTags(Arc<Mutex<State>>);

impl LoadTags {
    pub(crate) fn new(paused: bool) -> LoadTags {
        LoadTags(Arc::new(Mutex::new(State {
            paused,
            stats: LoadStats::default(),
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one round unless paused; `round` writes the values and returns
    /// how many it wrote. The lock is held meanwhile, so [`LoadTags::pause`]
    /// never returns in the middle of a round.
    pub(crate) fn round(&self, late: bool, round: impl FnOnce() -> u64) {
        let mut st = self.state();
        if st.paused {
            return;
        }
        let n = round();
        st.stats.changes += n;
        st.stats.ticks += 1;
        st.stats.late += u64::from(late);
    }

    pub fn stats(&self) -> LoadStats {
        self.state().stats
    }

    /// Stops changing the tags (after the round under way, if any); returns
    /// the final totals.
    pub fn pause(&self) -> LoadStats {
        let mut st = self.state();
        st.paused = true;
        st.stats
    }

    pub fn resume(&self) {
        self.state().paused = false;
    }
}

impl super::SimServer {
    /// The counters and pause switch of the load tags (every simulator has
    /// them, counting zero without `--tags`).
    pub fn load_tags(&self) -> Option<LoadTags> {
        self.extension::<LoadTags>()
    }
}

/// Speaks the protocol of the module doc until `cancel`: prints `READY`,
/// then `STATS` every second, and obeys `start` / `stop` on stdin.
pub(crate) fn serve_control(
    load: LoadTags,
    endpoint: &str,
    namespace_uri: &str,
    cancel: CancellationToken,
) {
    println!("READY {endpoint} {namespace_uri}");
    let stats = load.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => println!("STATS {}", stats.stats()),
            }
        }
    });
    // Blocking stdin reads on a thread of their own; it ends at EOF and
    // does not hold the process when it exits.
    let spawned = std::thread::Builder::new()
        .name("load-control".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                match line.trim() {
                    "start" => {
                        load.resume();
                        println!("STARTED");
                    }
                    "stop" => println!("STOPPED {}", load.pause()),
                    "" => {}
                    other => eprintln!("load control: unknown command {other:?} (start, stop)"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "load control: cannot read stdin");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rounds_only_while_running() {
        let load = LoadTags::new(true);
        load.round(false, || 10);
        assert_eq!(load.stats(), LoadStats::default());
        load.resume();
        load.round(false, || 10);
        load.round(true, || 10);
        let stopped = load.pause();
        assert_eq!(
            stopped,
            LoadStats {
                changes: 20,
                ticks: 2,
                late: 1
            }
        );
        load.round(false, || 10);
        assert_eq!(load.stats(), stopped);
        assert_eq!(stopped.to_string(), "20 2 1");
    }
}
