//! Exponential backoff with jitter, shared by every reconnecting loop so that
//! a plant full of gateways does not reconnect in lock-step after an outage.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(10));
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay to wait now: the current step with ±20 % jitter; the step
    /// doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.8..=1.2);
        base.mul_f64(jitter).min(self.max)
    }

    /// After a success: the next failure starts again at `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(800) && d[0] <= Duration::from_millis(1200));
        assert!(d[1] >= Duration::from_millis(1600) && d[1] <= Duration::from_millis(2400));
        assert!(d[3] >= Duration::from_millis(6400) && d[3] <= Duration::from_secs(8));
        assert!(d[5] <= Duration::from_secs(8) && d[5] >= Duration::from_millis(6400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
