//! systemd integration (docs/deployment.md): `READY=1` once the buffer is open and the
//! health endpoint listens, and `WATCHDOG=1` pings only while the pipeline is
//! really alive — a wedged uplink or buffer thread stops the pings, so
//! systemd restarts the service instead of leaving it hanging. Outside
//! systemd (no `NOTIFY_SOCKET`) everything here is a no-op.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::buffer::BufferHandle;
use crate::status::StatusBoard;

pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "sd_notify READY failed");
    }
}

/// Before a reload: systemd (`Type=notify-reload` or `ExecReload=`) waits
/// for the `READY=1` that follows.
pub fn notify_reloading() {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    let _ = sd_notify::notify(&states);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Pings the systemd watchdog at half its interval while the pipeline is
/// alive; logs once when it stops pinging and once when it resumes.
pub fn spawn_watchdog(board: Arc<StatusBoard>, buffer: BufferHandle, cancel: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(100));
    // A loop beats at least every second; allow a few missed beats, but stay
    // well inside the watchdog timeout so systemd acts on a real hang.
    let max_silence = (timeout / 2).max(Duration::from_secs(3));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match crate::health::pipeline_fault(&board, &buffer, max_silence).await {
                None => {
                    if failing {
                        tracing::info!("pipeline alive again; watchdog pings resumed");
                        failing = false;
                    }
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                Some(why) => {
                    if !failing {
                        tracing::error!(reason = %why, "pipeline not alive; withholding watchdog pings");
                        failing = true;
                    }
                }
            }
        }
    });
}
