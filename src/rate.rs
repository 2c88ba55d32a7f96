//! The intake rate: records and bytes the buffer accepted per second over
//! the last minute, for the headroom estimate of `/status` and `/metrics`
//! (how long the free buffer lasts if nothing were delivered). Pure: the
//! caller passes the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The span the rate is measured over.
const WINDOW: Duration = Duration::from_secs(60);
/// Totals are sampled at most this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// No rate before this much history: the first commits after a start say
/// little about the steady rate.
const MIN_SPAN: Duration = Duration::from_secs(5);

/// Records and bytes per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerSecond {
    pub records: f64,
    pub bytes: f64,
}

#[derive(Debug)]
pub struct IntakeRate {
    started: Instant,
    records: u64,
    bytes: u64,
    /// (when, records total, bytes total), oldest first, at least
    /// [`SAMPLE_EVERY`] apart, covering a little more than [`WINDOW`].
    samples: VecDeque<(Instant, u64, u64)>,
}

impl IntakeRate {
    pub fn new(now: Instant) -> Self {
        IntakeRate {
            started: now,
            records: 0,
            bytes: 0,
            samples: VecDeque::from([(now, 0, 0)]),
        }
    }

    /// The buffer accepted `records` taking `bytes` at `now`.
    pub fn add(&mut self, now: Instant, records: u64, bytes: u64) {
        self.records += records;
        self.bytes += bytes;
        self.sample(now);
    }

    fn sample(&mut self, now: Instant) {
        let due = self
            .samples
            .back()
            .map_or(true, |(t, _, _)| now.duration_since(*t) >= SAMPLE_EVERY);
        if due {
            self.samples.push_back((now, self.records, self.bytes));
        }
        // Keep one sample at or before the window's start.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _, _)| now.duration_since(*t) >= WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The rate over the last minute (less right after the start); None
    /// during the first seconds.
    pub fn per_second(&mut self, now: Instant) -> Option<PerSecond> {
        self.sample(now);
        if now.duration_since(self.started) < MIN_SPAN {
            return None;
        }
        let &(since, records, bytes) = self.samples.front()?;
        let span = now.duration_since(since).as_secs_f64();
        if span <= 0.0 {
            return None;
        }
        Some(PerSecond {
            records: (self.records - records) as f64 / span,
            bytes: (self.bytes - bytes) as f64 / span,
        })
    }
}

/// How long the free part of a buffer of `max_bytes` holding `bytes` lasts
/// at `rate` if nothing were delivered, in seconds; None while nothing
/// comes in (it would last for ever).
pub fn headroom_seconds(max_bytes: u64, bytes: u64, rate: Option<PerSecond>) -> Option<f64> {
    let rate = rate.filter(|r| r.bytes > 0.0)?;
    Some(max_bytes.saturating_sub(bytes) as f64 / rate.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_intake_is_measured_over_the_last_minute() {
        let t0 = Instant::now();
        let mut rate = IntakeRate::new(t0);
        for s in 1..=120 {
            rate.add(t0 + Duration::from_secs(s), 1_000, 200_000);
        }
        let r = rate
            .per_second(t0 + Duration::from_secs(120))
            .expect("a rate");
        assert!((r.records - 1_000.0).abs() < 20.0, "{r:?}");
        assert!((r.bytes - 200_000.0).abs() < 4_000.0, "{r:?}");
        assert!(rate.samples.len() <= 62, "{} samples", rate.samples.len());
    }

    #[test]
    fn no_rate_at_first_and_a_stopped_intake_falls_to_zero() {
        let t0 = Instant::now();
        let mut rate = IntakeRate::new(t0);
        rate.add(t0 + Duration::from_secs(1), 5_000, 1_000_000);
        assert_eq!(rate.per_second(t0 + Duration::from_secs(2)), None);
        // The intake stops: a minute later nothing came in the window.
        let later = rate
            .per_second(t0 + Duration::from_secs(200))
            .expect("a rate");
        assert_eq!(later.records, 0.0);
    }

    #[test]
    fn headroom_is_the_free_space_over_the_byte_rate() {
        let rate = |bytes| {
            Some(PerSecond {
                records: 1.0,
                bytes,
            })
        };
        // 1 GiB, a quarter used, 1 MiB/s in: 768 s.
        let gib = 1 << 30;
        assert_eq!(
            headroom_seconds(gib, gib / 4, rate(1_048_576.0)),
            Some(768.0)
        );
        assert_eq!(headroom_seconds(gib, gib + 5, rate(1.0)), Some(0.0));
        assert_eq!(headroom_seconds(gib, 0, rate(0.0)), None);
        assert_eq!(headroom_seconds(gib, 0, None), None);
    }

    #[test]
    fn bursts_within_a_second_are_summed_not_lost() {
        let t0 = Instant::now();
        let mut rate = IntakeRate::new(t0);
        for ms in (0..10_000).step_by(10) {
            rate.add(t0 + Duration::from_millis(ms), 10, 1_000);
        }
        let r = rate
            .per_second(t0 + Duration::from_secs(10))
            .expect("a rate");
        assert!((r.records - 1_000.0).abs() < 1.0, "{r:?}");
    }
}
