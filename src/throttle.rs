//! Rate limiting of repeated log lines: a broker that stays down for a day
//! must not write a line per retry. The first occurrence of a message is
//! logged; repeats of the same message within `every` are counted and
//! summarised in the next line that gets through.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct Throttle {
    every: Duration,
    seen: HashMap<String, (Instant, u64)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle {
            every,
            seen: HashMap::new(),
        }
    }

    /// `Some(suppressed)` when `message` may be logged now (with how many
    /// repeats were held back since it last was), `None` to stay quiet.
    pub fn check(&mut self, message: &str) -> Option<u64> {
        self.check_at(message, Instant::now())
    }

    fn check_at(&mut self, message: &str, now: Instant) -> Option<u64> {
        // Bounded: a flood of distinct messages must not grow memory.
        if self.seen.len() > 256 {
            self.seen
                .retain(|_, (t, _)| now.duration_since(*t) < self.every);
        }
        match self.seen.get_mut(message) {
            Some((last, suppressed)) if now.duration_since(*last) < self.every => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                self.seen.insert(message.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// Forgets everything, e.g. after recovery, so the next fault is logged at once.
    pub fn reset(&mut self) {
        self.seen.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_and_counted() {
        let mut t = Throttle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(t.check_at("broker down", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.check_at("broker down", t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.check_at("other error", t0), Some(0));
        assert_eq!(
            t.check_at("broker down", t0 + Duration::from_secs(61)),
            Some(5)
        );
        assert_eq!(
            t.check_at("broker down", t0 + Duration::from_secs(62)),
            None
        );
        t.reset();
        assert_eq!(
            t.check_at("broker down", t0 + Duration::from_secs(63)),
            Some(0)
        );
    }
}
