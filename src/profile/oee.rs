//! The OEE arithmetic of docs/profiles.md, apart from any state machine so that it can
//! be checked by hand:
//!
//! - planned time = observed time − time in PLANNED_STOP (for a complete
//!   window the observed time is the whole window, so this is the documented
//!   "window minus time in PLANNED_STOP"; for a partial window the figures
//!   cover only the time observed);
//! - run time = time in RUNNING; downtime = time in DOWN;
//! - availability = run / planned; performance = ideal_cycle_time × total /
//!   run; quality = good / total; oee = A × P × Q;
//! - a ratio with a zero denominator is `None` (null), and so is oee when any
//!   factor is; performance is also `None` while IDEAL_CYCLE_TIME is unknown.
//!   Ratios are not clamped: a performance above 1 tells that the ideal cycle
//!   time is wrong, which is worth seeing.

/// Milliseconds of a window start for time `t` (epoch-aligned, so windows of
/// 60 s start on the minute and windows of 15 min on the quarter hour, UTC).
pub fn window_start(t_ms: i64, window_ms: i64) -> i64 {
    t_ms.div_euclid(window_ms.max(1)) * window_ms.max(1)
}

/// Increase of a cumulative counter. A decrease is a counter reset: the
/// parts counted since the reset are the new value. The first value seen
/// (`prev` None) is a baseline, not an increase.
pub fn count_increase(prev: Option<u64>, now: u64) -> u64 {
    match prev {
        None => 0,
        Some(p) if now >= p => now - p,
        Some(_) => now,
    }
}

/// What was observed in one window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Time during which the agent was connected and knew STATE.
    pub observed_ms: i64,
    pub run_ms: i64,
    pub down_ms: i64,
    pub planned_stop_ms: i64,
    pub good: u64,
    pub reject: u64,
}

/// The figures of one `oee` record.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub good_count: u64,
    pub reject_count: u64,
    pub total_count: u64,
    pub run_time_s: f64,
    pub planned_time_s: f64,
    pub downtime_s: f64,
    pub availability: Option<f64>,
    pub performance: Option<f64>,
    pub quality: Option<f64>,
    pub oee: Option<f64>,
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den != 0.0).then(|| num / den).filter(|r| r.is_finite())
}

pub fn figures(o: &Observed, ideal_cycle_time_s: Option<f64>) -> Figures {
    let total = o.good.saturating_add(o.reject);
    let planned_ms = (o.observed_ms - o.planned_stop_ms).max(0);
    let run_s = o.run_ms as f64 / 1000.0;
    let planned_s = planned_ms as f64 / 1000.0;
    let availability = ratio(run_s, planned_s);
    let performance = ideal_cycle_time_s.and_then(|ict| ratio(ict * total as f64, run_s));
    let quality = ratio(o.good as f64, total as f64);
    let oee = match (availability, performance, quality) {
        (Some(a), Some(p), Some(q)) => Some(a * p * q),
        _ => None,
    };
    Figures {
        good_count: o.good,
        reject_count: o.reject,
        total_count: total,
        run_time_s: run_s,
        planned_time_s: planned_s,
        downtime_s: o.down_ms as f64 / 1000.0,
        availability,
        performance,
        quality,
        oee,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn aligns_to_the_wall_clock() {
        // 2026-11-28T10:00:37.5Z -> 10:00:00 (60 s) and 10:00:00 (15 min).
        let t = 1_795_860_037_500;
        assert_eq!(window_start(t, 60_000), 1_795_860_000_000);
        assert_eq!(window_start(t, 900_000), 1_795_860_000_000);
        // 10:14:59.999 is still in the 10:00 quarter; 10:15:00 starts the next.
        assert_eq!(window_start(1_795_860_899_999, 900_000), 1_795_860_000_000);
        assert_eq!(window_start(1_795_860_900_000, 900_000), 1_795_860_900_000);
        assert_eq!(window_start(-1, 60_000), -60_000);
    }

    #[test]
    fn counter_increase_and_reset() {
        assert_eq!(count_increase(None, 500), 0);
        assert_eq!(count_increase(Some(500), 512), 12);
        assert_eq!(count_increase(Some(512), 512), 0);
        assert_eq!(count_increase(Some(512), 3), 3);
        assert_eq!(count_increase(Some(512), 0), 0);
    }

    #[test]
    fn hand_computed_window() {
        // 60 s window: 40 s RUNNING, 10 s DOWN, 10 s PLANNED_STOP; 30 good,
        // 2 rejects; ideal cycle time 1.0 s.
        // planned = 60 - 10 = 50; A = 40/50 = 0.8; P = 1.0*32/40 = 0.8;
        // Q = 30/32 = 0.9375; OEE = 0.8*0.8*0.9375 = 0.6.
        let o = Observed {
            observed_ms: 60_000,
            run_ms: 40_000,
            down_ms: 10_000,
            planned_stop_ms: 10_000,
            good: 30,
            reject: 2,
        };
        let f = figures(&o, Some(1.0));
        assert_eq!(f.total_count, 32);
        assert_eq!(f.run_time_s, 40.0);
        assert_eq!(f.planned_time_s, 50.0);
        assert_eq!(f.downtime_s, 10.0);
        assert!(close(f.availability, 0.8));
        assert!(close(f.performance, 0.8));
        assert!(close(f.quality, 0.9375));
        assert!(close(f.oee, 0.6));
    }

    #[test]
    fn zero_denominators_are_null() {
        // All PLANNED_STOP, nothing counted: every ratio null.
        let o = Observed {
            observed_ms: 60_000,
            planned_stop_ms: 60_000,
            ..Observed::default()
        };
        let f = figures(&o, Some(2.0));
        assert_eq!(f.planned_time_s, 0.0);
        assert_eq!(
            (f.availability, f.performance, f.quality, f.oee),
            (None, None, None, None)
        );

        // Running but nothing counted: A = 1, P = 0, Q null, so OEE null.
        let o = Observed {
            observed_ms: 60_000,
            run_ms: 60_000,
            ..Observed::default()
        };
        let f = figures(&o, Some(2.0));
        assert!(close(f.availability, 1.0));
        assert!(close(f.performance, 0.0));
        assert_eq!((f.quality, f.oee), (None, None));

        // Unknown ideal cycle time: performance and OEE null.
        let o = Observed {
            observed_ms: 60_000,
            run_ms: 60_000,
            good: 10,
            ..Observed::default()
        };
        let f = figures(&o, None);
        assert_eq!((f.performance, f.oee), (None, None));
        assert!(close(f.quality, 1.0));
    }
}
