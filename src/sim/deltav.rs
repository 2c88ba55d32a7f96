//! DeltaV simulator: continuous loop tags (`FIC-101/PV.CV`, ...) that move like
//! a plant does (PV follows SP with lag and noise, setpoints step now and then)
//! plus `LOAD/TAGnnnnn.CV` tags for load tests. Deterministic for a given seed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::server::{SimBuilder, SimNamespace, SimServer, SimSpec, SimValue};
use super::{SimError, SimExtras, SimOptions};

pub const NAMESPACE_URI: &str = "urn:plantgate:sim:deltav";

/// Real-time period of the continuous-tag simulation step.
const STEP: Duration = Duration::from_millis(200);

/// One PID loop: a setpoint, a process value lagging behind it, an output.
struct Loop {
    tag: &'static str,
    sp: f64,
    pv: f64,
    out: f64,
    /// Process time constant in simulated seconds.
    tau: f64,
    noise: f64,
    /// Setpoints step within this range.
    range: (f64, f64),
    /// Mean simulated seconds between setpoint steps.
    sp_every: f64,
}

fn loops() -> Vec<Loop> {
    vec![
        Loop {
            tag: "FIC-101",
            sp: 42.0,
            pv: 41.2,
            out: 38.0,
            tau: 4.0,
            noise: 0.3,
            range: (30.0, 60.0),
            sp_every: 120.0,
        },
        Loop {
            tag: "TIC-201",
            sp: 78.0,
            pv: 76.5,
            out: 55.0,
            tau: 30.0,
            noise: 0.05,
            range: (60.0, 95.0),
            sp_every: 300.0,
        },
        Loop {
            tag: "LIC-301",
            sp: 55.0,
            pv: 54.0,
            out: 47.0,
            tau: 20.0,
            noise: 0.1,
            range: (35.0, 75.0),
            sp_every: 240.0,
        },
        Loop {
            tag: "PIC-401",
            sp: 2.4,
            pv: 2.38,
            out: 61.0,
            tau: 6.0,
            noise: 0.01,
            range: (1.8, 3.2),
            sp_every: 180.0,
        },
    ]
}

/// Node ids of the continuous tags, for documentation and tests.
pub fn continuous_tags() -> Vec<String> {
    loops()
        .iter()
        .flat_map(|l| {
            ["PV", "SP", "OUT"]
                .iter()
                .map(move |p| format!("{}/{p}.CV", l.tag))
        })
        .collect()
}

pub fn load_tag(i: usize) -> String {
    format!("LOAD/TAG{i:05}.CV")
}

/// Starts the DeltaV simulator (see module doc).
pub async fn start_deltav(opts: SimOptions) -> Result<SimServer, SimError> {
    start_deltav_with(opts, SimExtras::default()).await
}

/// [`start_deltav`] with options beyond `SimOptions`.
pub async fn start_deltav_with(opts: SimOptions, extras: SimExtras) -> Result<SimServer, SimError> {
    let builder = SimBuilder::new_with(
        &opts,
        &extras,
        SimSpec {
            name: "deltav".into(),
            namespace_uri: NAMESPACE_URI.into(),
        },
    )
    .await?;
    let ns = builder.namespace().clone();
    let mut state = loops();
    ns.add_folder("DeltaV", "DeltaV", None);
    let vars = state
        .iter()
        .flat_map(|l| {
            [("PV", l.pv), ("SP", l.sp), ("OUT", l.out)]
                .into_iter()
                .map(move |(p, v)| {
                    let id = format!("{}/{p}.CV", l.tag);
                    (id.clone(), id, SimValue::Double(v))
                })
        })
        .collect();
    ns.add_variables("DeltaV", vars);
    if opts.tags > 0 {
        ns.add_folder("LOAD", "LOAD", None);
        let vars = (0..opts.tags)
            .map(|i| {
                let id = load_tag(i);
                (id.clone(), id, SimValue::Double(0.0))
            })
            .collect();
        ns.add_variables("LOAD", vars);
    }
    let token = builder.token();
    let server = builder.start();
    let pinned = server.pinned();

    if opts.speed > 0.0 && opts.speed.is_finite() {
        let rng = StdRng::seed_from_u64(opts.seed);
        let (ns, token, pinned, speed) = (ns.clone(), token.clone(), pinned.clone(), opts.speed);
        tokio::spawn(async move {
            run_loops(&mut state, rng, speed, ns, pinned, token).await;
        });
    }
    if opts.tags > 0 && opts.rate_hz > 0.0 && opts.rate_hz.is_finite() {
        let (tags, rate) = (opts.tags, opts.rate_hz);
        tokio::spawn(run_load(tags, rate, ns, pinned, token));
    }
    Ok(server)
}

async fn run_loops(
    state: &mut [Loop],
    mut rng: StdRng,
    speed: f64,
    ns: SimNamespace,
    pinned: Arc<Mutex<HashSet<String>>>,
    token: CancellationToken,
) {
    let dt = STEP.as_secs_f64() * speed;
    let mut ticker = tokio::time::interval(STEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut values = Vec::with_capacity(state.len() * 3);
        for l in state.iter_mut() {
            if rng.gen_bool((dt / l.sp_every).clamp(0.0, 1.0)) {
                l.sp = round2(rng.gen_range(l.range.0..l.range.1));
                values.push((format!("{}/SP.CV", l.tag), l.sp));
            }
            let alpha = (dt / l.tau).clamp(0.0, 1.0);
            let noise = (rng.gen::<f64>() - 0.5) * 2.0 * l.noise;
            l.pv += (l.sp - l.pv) * alpha + noise;
            l.out = (l.out + (l.sp - l.pv) * 0.5 * alpha).clamp(0.0, 100.0);
            values.push((format!("{}/PV.CV", l.tag), round3(l.pv)));
            values.push((format!("{}/OUT.CV", l.tag), round2(l.out)));
        }
        set_unpinned(&ns, &pinned, values);
    }
}

async fn run_load(
    tags: usize,
    rate_hz: f64,
    ns: SimNamespace,
    pinned: Arc<Mutex<HashSet<String>>>,
    token: CancellationToken,
) {
    let period = Duration::from_secs_f64(1.0 / rate_hz.max(0.001));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ids: Vec<String> = (0..tags).map(load_tag).collect();
    let mut tick: u64 = 0;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tick += 1;
        // Every tag changes on every tick (a load test counts notifications).
        let values = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let v = (tick as f64 * 0.1 + i as f64).sin() * 50.0 + tick as f64 * 1e-3;
                (id.clone(), v)
            })
            .collect();
        set_unpinned(&ns, &pinned, values);
    }
}

fn set_unpinned(ns: &SimNamespace, pinned: &Mutex<HashSet<String>>, values: Vec<(String, f64)>) {
    let values: Vec<(String, SimValue)> = {
        let pinned = pinned.lock().unwrap_or_else(|e| e.into_inner());
        values
            .into_iter()
            .filter(|(id, _)| !pinned.contains(id))
            .map(|(id, v)| (id, SimValue::Double(v)))
            .collect()
    };
    if values.is_empty() {
        return;
    }
    if let Err(e) = ns.set_many(values) {
        tracing::warn!(error = %e, "simulator update failed");
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
