//! The headroom watch (docs/configuration.md, `buffer.headroom_warning`):
//! a `system.error` (`buffer_headroom_low`) when the free buffer would
//! last less than the threshold at the current intake rate, so operators
//! learn that an outage starting now would cost records before it happens.
//! The decision is [`Alarm`], pure; [`watch`] feeds it every few seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::buffer::BufferHandle;
use crate::rate::{headroom_seconds, PerSecond};
use crate::record::{EventType, NewRecord};
use crate::status::StatusBoard;

/// How often the headroom is checked.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// While the headroom stays low, the warning is repeated this often.
const REPEAT_EVERY: Duration = Duration::from_secs(3_600);

/// Whether to warn, given the headroom now. Low below the threshold; a low
/// episode ends when the headroom is back above twice the threshold (or
/// nothing comes in), so a rate hovering around the threshold warns once,
/// not at every check.
#[derive(Debug)]
pub struct Alarm {
    threshold: Duration,
    /// When the current low episode was last announced.
    warned: Option<Instant>,
}

impl Alarm {
    pub fn new(threshold: Duration) -> Self {
        Alarm {
            threshold,
            warned: None,
        }
    }

    /// True when a warning is due for `headroom` (seconds; None: nothing
    /// comes in) at `now`.
    pub fn check(&mut self, headroom: Option<f64>, now: Instant) -> bool {
        let threshold = self.threshold.as_secs_f64();
        if threshold <= 0.0 {
            return false;
        }
        match headroom {
            Some(h) if h < threshold => {
                let due = self
                    .warned
                    .map_or(true, |t| now.duration_since(t) >= REPEAT_EVERY);
                if due {
                    self.warned = Some(now);
                }
                due
            }
            Some(h) if h < 2.0 * threshold => false,
            _ => {
                self.warned = None;
                false
            }
        }
    }
}

/// Checks the headroom every [`CHECK_EVERY`] until `cancel`; a due warning
/// is logged and written as a `system.error` of the agent.
pub async fn watch(board: Arc<StatusBoard>, buffer: BufferHandle, cancel: CancellationToken) {
    let mut alarm = Alarm::new(board.buffer_budget().headroom_warning);
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = match buffer.stats().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::debug!(error = %e, "headroom check: buffer stats unavailable");
                continue;
            }
        };
        // A reload may have changed the limits.
        let budget = board.buffer_budget();
        let (max_bytes, threshold) = (budget.max_bytes, budget.headroom_warning);
        alarm.threshold = threshold;
        let rate = board.intake_rate();
        let headroom = headroom_seconds(max_bytes, stats.bytes, rate);
        if !alarm.check(headroom, Instant::now()) {
            continue;
        }
        let (Some(seconds), Some(rate)) = (headroom, rate) else {
            continue;
        };
        let free = max_bytes.saturating_sub(stats.bytes);
        tracing::warn!(
            headroom_s = seconds as u64,
            threshold_s = threshold.as_secs(),
            records_per_s = rate.records as u64,
            free_bytes = free,
            "the free buffer lasts less than buffer.headroom_warning at the current intake rate"
        );
        let event = low_headroom_event(seconds, threshold, rate, free);
        buffer.record_events(vec![event]);
    }
}

fn low_headroom_event(seconds: f64, threshold: Duration, rate: PerSecond, free: u64) -> NewRecord {
    NewRecord::event(
        "",
        EventType::SystemError,
        serde_json::json!({
            "error": "buffer_headroom_low",
            "headroom_s": seconds.round() as u64,
            "threshold_s": threshold.as_secs(),
            "records_per_s": rate.records.round() as u64,
            "free_bytes": free,
            "message": format!(
                "at {} records/s the free buffer ({} MiB) lasts about {} min if the broker became unreachable now, less than buffer.headroom_warning ({} min): raise buffer.max_size or lower the intake",
                rate.records.round() as u64,
                free / (1 << 20),
                (seconds / 60.0).round() as u64,
                threshold.as_secs() / 60
            ),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_once_per_low_episode_and_again_after_recovery_or_an_hour() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut alarm = Alarm::new(Duration::from_secs(3_600));
        assert!(!alarm.check(None, at(0)), "nothing comes in");
        assert!(!alarm.check(Some(10_000.0), at(10)), "plenty");
        assert!(alarm.check(Some(3_000.0), at(20)), "low: warn");
        assert!(!alarm.check(Some(2_000.0), at(30)), "still low: once");
        // Hovering just above the threshold does not end the episode.
        assert!(!alarm.check(Some(4_000.0), at(40)));
        assert!(!alarm.check(Some(3_000.0), at(50)));
        // Still low an hour after the warning: again.
        assert!(alarm.check(Some(3_000.0), at(20 + 3_600)));
        // Back above twice the threshold ends the episode.
        assert!(!alarm.check(Some(8_000.0), at(4_000)));
        assert!(alarm.check(Some(100.0), at(4_010)), "a new episode");
    }

    #[test]
    fn a_zero_threshold_never_warns() {
        let mut alarm = Alarm::new(Duration::ZERO);
        assert!(!alarm.check(Some(0.0), Instant::now()));
    }

    #[test]
    fn the_event_says_what_to_do() {
        let rate = PerSecond {
            records: 5_012.0,
            bytes: 1_300_000.0,
        };
        let ev = low_headroom_event(1_200.0, Duration::from_secs(3_600), rate, 1_560_000_000);
        let d = ev.data_json();
        assert_eq!(d["type"], "system.error");
        assert_eq!(d["details"]["error"], "buffer_headroom_low");
        assert_eq!(d["details"]["headroom_s"], 1_200);
        let message = d["details"]["message"].as_str().unwrap_or("");
        assert!(message.contains("at 5012 records/s"), "{message}");
        assert!(message.contains("about 20 min"), "{message}");
        assert!(message.contains("buffer.max_size"), "{message}");
    }
}
