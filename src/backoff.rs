//! Exponential backoff with jitter, shared by every reconnecting loop so that
//! a plant full of gateways does not reconnect in lock-step after an outage.
//!
//! The sequence starts over only after a connection has stayed healthy for a
//! while (docs/guarantees.md, [`HEALTHY_AFTER`]): a fault that strikes right after
//! every connect (an oversized packet, a server that drops the session on its
//! first request) must meet a growing delay, not a fast reconnect loop.

use std::time::Duration;

use rand::Rng;

/// How long a connection must stay up before a failure counts as a new
/// incident rather than the next failure of the same one (docs/guarantees.md).
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    healthy_after: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(10));
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
            healthy_after: HEALTHY_AFTER,
        }
    }

    /// Overrides [`HEALTHY_AFTER`] (tests, or a loop with its own notion of
    /// "a while").
    pub fn with_healthy_after(mut self, healthy_after: Duration) -> Self {
        self.healthy_after = healthy_after;
        self
    }

    /// The delay to wait now: the current step with ±20 % jitter; the step
    /// doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.8..=1.2);
        base.mul_f64(jitter).min(self.max)
    }

    /// For failures that need an operator (rejected credentials, an
    /// untrusted certificate): always the longest delay, with jitter.
    pub fn slow(&mut self) -> Duration {
        let jitter = rand::thread_rng().gen_range(0.8..=1.2);
        self.max.mul_f64(jitter).clamp(self.initial, self.max)
    }

    /// Starts the sequence over unconditionally (an operator action, a
    /// configuration change). After a lost connection use
    /// [`Backoff::connection_ended`] instead.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// A connection that was up for `up_for` has ended. It starts the
    /// sequence over only if it stayed healthy at least `healthy_after`;
    /// otherwise the next delay keeps growing as if the connection had never
    /// come up. Returns whether it reset.
    pub fn connection_ended(&mut self, up_for: Duration) -> bool {
        let healthy = up_for >= self.healthy_after;
        if healthy {
            self.reset();
        }
        healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(d: Duration, base_ms: u64) -> bool {
        d >= Duration::from_millis(base_ms * 8 / 10)
            && d <= Duration::from_millis(base_ms * 12 / 10)
    }

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(within(d[0], 1000), "{d:?}");
        assert!(within(d[1], 2000), "{d:?}");
        assert!(d[3] >= Duration::from_millis(6400) && d[3] <= Duration::from_secs(8));
        assert!(d[5] <= Duration::from_secs(8) && d[5] >= Duration::from_millis(6400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }

    #[test]
    fn a_short_connection_does_not_reset() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..3 {
            b.next_delay();
        }
        // Up for a few seconds, then dropped: the fault is still there.
        assert!(!b.connection_ended(Duration::from_secs(5)));
        assert!(within(b.next_delay(), 8000));
        // Just under the rule, still no reset.
        assert!(!b.connection_ended(HEALTHY_AFTER - Duration::from_millis(1)));
        assert!(within(b.next_delay(), 16_000));
    }

    #[test]
    fn a_healthy_connection_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..5 {
            b.next_delay();
        }
        assert!(b.connection_ended(HEALTHY_AFTER));
        assert!(within(b.next_delay(), 1000));
    }

    #[test]
    fn connect_drop_loop_reaches_max() {
        // A connection that drops right after every connect: the delays
        // climb to the maximum and stay there, so a loop is slow, not fast.
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            b.connection_ended(Duration::from_millis(50));
            last = b.next_delay();
        }
        assert!(last >= Duration::from_secs(8), "{last:?}");
    }

    #[test]
    fn healthy_after_is_adjustable() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
            .with_healthy_after(Duration::from_secs(2));
        b.next_delay();
        b.next_delay();
        assert!(!b.connection_ended(Duration::from_secs(1)));
        assert!(b.connection_ended(Duration::from_secs(2)));
        assert!(within(b.next_delay(), 100));
    }

    #[test]
    fn slow_is_near_max() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..20 {
            let d = b.slow();
            assert!(
                d >= Duration::from_secs(24) && d <= Duration::from_secs(30),
                "{d:?}"
            );
        }
    }
}
