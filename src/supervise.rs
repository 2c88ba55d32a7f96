//! Supervision of the long-lived tasks (docs/guarantees.md: no silent death).
//!
//! Each supervised job runs in its own tokio task, so a panic unwinds that
//! task only. The supervisor sees it end, logs it, records it on the status
//! board (`/healthz` answers 503 while the task is dead, which the systemd
//! watchdog follows), announces it with a `system.error` event and starts
//! it again after a backoff. Only the cancellation token ends a job for
//! good; any other end is a fault.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::status::StatusBoard;

/// First and longest wait before a dead task is started again.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A run at least this long counts as healthy: the next death starts the
/// backoff from the beginning again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// How a job ended, when it should not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Death {
    Panicked(String),
    Returned,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Panicked(msg) => write!(f, "panicked: {msg}"),
            Death::Returned => f.write_str("ended unexpectedly"),
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> Death {
    match e.try_into_panic() {
        Ok(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_string());
            Death::Panicked(msg)
        }
        // Cancelled from outside: only happens at runtime shutdown.
        Err(_) => Death::Returned,
    }
}

/// Runs `start()` as a task and starts it again whenever it ends before
/// `cancel`; `on_death` is awaited after each death (to set a connection
/// offline, write the event) before the backoff. Returns when `cancel`
/// fires and the current run has ended.
pub async fn supervise<S, F, D, DF>(
    name: String,
    board: Arc<StatusBoard>,
    cancel: CancellationToken,
    mut start: S,
    mut on_death: D,
) where
    S: FnMut() -> F,
    F: Future<Output = ()> + Send + 'static,
    D: FnMut(Death) -> DF,
    DF: Future<Output = ()>,
{
    let mut backoff = Backoff::new(RESTART_INITIAL, RESTART_MAX);
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::spawn(start()).await;
        if cancel.is_cancelled() {
            return;
        }
        let death = match result {
            Ok(()) => Death::Returned,
            Err(e) => panic_message(e),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::error!(task = %name, error = %death, restart_in_ms = delay.as_millis() as u64, "task died; restarting");
        board.task_died(&name, &death.to_string());
        on_death(death).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        board.task_running(&name);
        tracing::info!(task = %name, "task restarted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_task_is_reported_and_restarted() {
        let board = StatusBoard::new();
        let cancel = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let deaths = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, d) = (runs.clone(), deaths.clone());
        let c = cancel.clone();
        let sup = tokio::spawn(supervise(
            "conn:x".into(),
            board.clone(),
            cancel.clone(),
            move || {
                let n = r.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                async move {
                    if n == 0 {
                        panic!("interval overflow");
                    }
                    c.cancelled().await;
                }
            },
            move |death| {
                d.lock().unwrap_or_else(|e| e.into_inner()).push(death);
                async {}
            },
        ));
        // Dead until the backoff has passed.
        while board.dead_tasks().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(board.dead_tasks()[0].0, "conn:x");
        assert!(board.dead_tasks()[0].2.contains("interval overflow"));
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(board.dead_tasks().is_empty(), "running again");
        assert_eq!(board.task_restarts()["conn:x"], 1);
        assert_eq!(
            deaths.lock().unwrap_or_else(|e| e.into_inner()).as_slice(),
            &[Death::Panicked("interval overflow".into())]
        );
        cancel.cancel();
        sup.await.expect("supervisor ends on cancel");
    }
}
