//! DeltaV simulator: continuous loop tags (`FIC-101/PV.CV`, ...) that move like
//! a plant does (PV follows SP with lag and noise, setpoints step now and then),
//! ISA-88 batch units `REACTOR_101`/`REACTOR_102` (`{unit}/{param}.CV`, see
//! `batch`) running batch after batch, plus `LOAD/TAGnnnnn.CV` tags for load
//! tests. Deterministic for a given seed.
//!
//! Tests drive a unit through an exact script with [`DeltavUnits`]
//! (`server.deltav_units()`); a scripted unit leaves the automatic cycle.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::batch::{self, UnitValues};
use super::load::LoadTags;
use super::server::{SimBuilder, SimNamespace, SimServer, SimSpec, SimValue};
use super::timeline::{self, pv, Merged, Objects};
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
pub async fn start_deltav(opts: SimOptions, extras: SimExtras) -> Result<SimServer, SimError> {
    let builder = SimBuilder::new(
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
    for unit in batch::UNITS {
        ns.add_folder(unit, unit, Some("DeltaV"));
        let vars = UnitValues::idle()
            .variables()
            .into_iter()
            .map(|(param, v)| {
                let id = batch::node_id(unit, &param);
                (id.clone(), id, v)
            })
            .collect();
        ns.add_variables(unit, vars);
    }
    add_load_tags(&ns, opts.tags);
    let token = builder.token();
    let mut server = builder.start();
    let pinned = server.pinned();
    let units = DeltavUnits {
        objects: Arc::new(Objects::new(
            ns.clone(),
            pinned.clone(),
            batch::UNITS
                .iter()
                .map(|u| (u.to_string(), UnitValues::idle()))
                .collect(),
            batch::node_id,
        )),
    };
    server.add_extension(units.clone());

    if opts.speed > 0.0 && opts.speed.is_finite() {
        let rng = StdRng::seed_from_u64(opts.seed);
        let (ns, token, pinned, speed) = (ns.clone(), token.clone(), pinned.clone(), opts.speed);
        tokio::spawn(async move {
            run_loops(&mut state, rng, speed, ns, pinned, token).await;
        });
    }
    if opts.speed > 0.0 && opts.speed.is_finite() {
        use chrono::Datelike;
        let cycles = batch::unit_cycles(opts.seed, chrono::Utc::now().year());
        tokio::spawn(timeline::play(
            Merged::new(cycles),
            opts.speed,
            units.objects.clone(),
            token.clone(),
        ));
    }
    start_load(&mut server, &opts, &extras, ns, token);
    Ok(server)
}

/// Adds the `LOAD/TAGnnnnn.CV` variables (`--tags N`).
pub(crate) fn add_load_tags(ns: &SimNamespace, tags: usize) {
    if tags == 0 {
        return;
    }
    ns.add_folder("LOAD", "LOAD", None);
    let vars = (0..tags)
        .map(|i| {
            let id = load_tag(i);
            (id.clone(), id, SimValue::Double(0.0))
        })
        .collect();
    ns.add_variables("LOAD", vars);
}

/// Starts changing the load tags at `--rate HZ`, if there are any (paused
/// at first with `extras.load_control`); attaches their [`LoadTags`] to the
/// server.
pub(crate) fn start_load(
    server: &mut SimServer,
    opts: &SimOptions,
    extras: &SimExtras,
    ns: SimNamespace,
    token: CancellationToken,
) {
    let load = LoadTags::new(extras.load_control);
    server.add_extension(load.clone());
    if opts.tags > 0 && opts.rate_hz > 0.0 && opts.rate_hz.is_finite() {
        let pinned = server.pinned();
        tokio::spawn(run_load(opts.tags, opts.rate_hz, ns, pinned, load, token));
    }
}

impl SimServer {
    /// The scripted-mode controls of the DeltaV batch units; None for other
    /// simulators.
    pub fn deltav_units(&self) -> Option<DeltavUnits> {
        self.extension::<DeltavUnits>()
    }
}

/// Drives the DeltaV batch units by hand (tests, demos). Every step writes
/// in the plant's order with source timestamp `ts_ms` (ms since the epoch;
/// None = now), a step of several writes 1 ms apart. The first step on a
/// unit takes it out of the automatic batch cycle for good (as does
/// [`DeltavUnits::take_over`]); the other unit keeps cycling.
///
/// Source timestamps matter to the server (async-opcua samples by them):
/// a change of a node stamped less than the subscriber's sampling interval
/// after that node's previous value - or before it - is held back and
/// delivered re-stamped, and only the latest such change survives. So give
/// each node increasing timestamps at least a sampling interval apart, later
/// than the server's start (the initial values carry that time). Changes of
/// different nodes never affect each other; within one publish they come in
/// monitored-item order, not write order.
#[derive(Clone)]
pub struct DeltavUnits {
    objects: Arc<Objects<UnitValues>>,
}

impl DeltavUnits {
    /// `REACTOR_101`, `REACTOR_102`.
    pub fn units(&self) -> Vec<String> {
        self.objects.names()
    }

    /// What the unit shows now.
    pub fn current(&self, unit: &str) -> Result<UnitValues, SimError> {
        self.objects.current(unit)
    }

    /// Whether a script owns the unit (the automatic cycle no longer runs it).
    pub fn is_scripted(&self, unit: &str) -> Result<bool, SimError> {
        self.objects.is_scripted(unit)
    }

    /// Stops the automatic cycle for this unit without writing anything; the
    /// unit keeps whatever it shows (possibly mid-batch).
    pub fn take_over(&self, unit: &str) -> Result<(), SimError> {
        self.objects.take_over(unit)
    }

    /// Starts a batch: RECIPE, the recipe `params` and FAIL_INDEX = 0 in one
    /// write at `ts_ms`, then BATCH_ID alone 1 ms later. Allowed while a
    /// batch is active (a batch id change without an empty value between).
    pub fn start_batch(
        &self,
        unit: &str,
        batch_id: &str,
        recipe: &str,
        params: &[(&str, f64)],
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        if batch_id.is_empty() {
            return Err(SimError::Script(
                "start_batch with an empty batch id".into(),
            ));
        }
        let params: Vec<(String, f64)> = params.iter().map(|(p, v)| (p.to_string(), *v)).collect();
        self.objects.script(unit, ts_ms, |_| {
            Ok(batch::start_batch_writes(batch_id, recipe, &params))
        })
    }

    /// Sets PHASE (one write).
    pub fn set_phase(&self, unit: &str, phase: &str, ts_ms: Option<i64>) -> Result<(), SimError> {
        self.objects
            .script(unit, ts_ms, |_| Ok(vec![vec![pv(batch::PHASE, phase)]]))
    }

    /// Sets BSTATUS to an ISA-88 state (one write).
    pub fn set_state(&self, unit: &str, state: &str, ts_ms: Option<i64>) -> Result<(), SimError> {
        batch::check_state(state)?;
        self.objects
            .script(unit, ts_ms, |_| Ok(vec![vec![pv(batch::BSTATUS, state)]]))
    }

    /// Sets FAIL_INDEX (one write).
    pub fn set_fail_index(
        &self,
        unit: &str,
        fail_index: i32,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        self.objects.script(unit, ts_ms, |_| {
            Ok(vec![vec![pv(batch::FAIL_INDEX, fail_index)]])
        })
    }

    /// Ends the batch: BSTATUS = `final_state` (skipped if already shown),
    /// then BATCH_ID cleared alone 1 ms later.
    pub fn end_batch(
        &self,
        unit: &str,
        final_state: &str,
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        batch::check_state(final_state)?;
        self.objects.script(unit, ts_ms, |current| {
            Ok(batch::end_batch_writes(current, final_state))
        })
    }

    /// Any values of the unit (`(param, value)`, e.g. `("PHASE", "HEAT".into())`)
    /// in ONE write with one source timestamp: they reach a subscriber in
    /// one publish, in no guaranteed order. For tests of order-independence.
    pub fn write(
        &self,
        unit: &str,
        values: &[(&str, SimValue)],
        ts_ms: Option<i64>,
    ) -> Result<(), SimError> {
        let write = values
            .iter()
            .map(|(p, v)| (p.to_string(), v.clone()))
            .collect();
        self.objects.script(unit, ts_ms, |_| Ok(vec![write]))
    }
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
    load: LoadTags,
    token: CancellationToken,
) {
    let period = Duration::from_secs_f64(1.0 / rate_hz.max(0.001));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ids: Vec<String> = (0..tags).map(load_tag).collect();
    let mut tick: u64 = 0;
    let mut previous: Option<tokio::time::Instant> = None;
    loop {
        let scheduled = tokio::select! {
            _ = token.cancelled() => return,
            at = ticker.tick() => at,
        };
        // Skip mode moves the schedule on by whole periods after an overrun.
        let late = previous.is_some_and(|p| scheduled - p > period + period / 2);
        previous = Some(scheduled);
        load.round(late, || {
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
            set_unpinned(&ns, &pinned, values)
        });
    }
}

/// Sets the values of nodes no test has pinned; returns how many it set.
fn set_unpinned(
    ns: &SimNamespace,
    pinned: &Mutex<HashSet<String>>,
    values: Vec<(String, f64)>,
) -> u64 {
    let values: Vec<(String, SimValue)> = {
        let pinned = pinned.lock().unwrap_or_else(|e| e.into_inner());
        values
            .into_iter()
            .filter(|(id, _)| !pinned.contains(id))
            .map(|(id, v)| (id, SimValue::Double(v)))
            .collect()
    };
    if values.is_empty() {
        return 0;
    }
    let n = values.len() as u64;
    match ns.set_many(values) {
        Ok(()) => n,
        Err(e) => {
            tracing::warn!(error = %e, "simulator update failed");
            0
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opcua::types::Variant;

    use super::*;
    use crate::sim::batch::{BATCH_ID, BSTATUS, FAIL_INDEX, PHASE, RECIPE, RECIPE_PARAMETERS};
    use crate::sim::test_client::{Change, TestClient};

    const WAIT: Duration = Duration::from_secs(30);

    fn unit_nodes(unit: &str) -> Vec<String> {
        [BATCH_ID, RECIPE, PHASE, BSTATUS, FAIL_INDEX]
            .iter()
            .chain(RECIPE_PARAMETERS.iter())
            .map(|p| batch::node_id(unit, p))
            .collect()
    }

    async fn server(dir: &std::path::Path, speed: f64, seed: u64) -> SimServer {
        let mut opts = SimOptions::new(dir.join("pki"));
        opts.speed = speed;
        opts.seed = seed;
        start_deltav(opts, SimExtras::default())
            .await
            .expect("simulator starts")
    }

    /// Collects changes until `done` says so (or panics after WAIT).
    async fn collect_until(
        client: &mut TestClient,
        seen: &mut Vec<Change>,
        what: &str,
        done: impl Fn(&[Change]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(seen) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next(left).await {
                Some(c) => seen.push(c),
                None => panic!("timed out waiting for {what}; seen {seen:#?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripted_batch_reaches_a_subscriber_in_plant_order() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 0.0, 1).await;
        let units = server.deltav_units().expect("deltav units");
        assert_eq!(units.units(), ["REACTOR_101", "REACTOR_102"]);
        let unit = "REACTOR_101";
        let nodes = unit_nodes(unit);
        let mut client =
            TestClient::connect(&server.endpoint(), server.namespace_index(), &nodes).await;
        // Initial values first: an idle unit.
        let mut seen = Vec::new();
        collect_until(&mut client, &mut seen, "initial values", |s| {
            s.len() >= nodes.len()
        })
        .await;
        let initial = |p: &str| {
            seen.iter()
                .find(|c| c.node == batch::node_id(unit, p))
                .map(|c| c.value.clone())
        };
        assert_eq!(initial(BATCH_ID), Some(Variant::from("")));
        assert_eq!(initial(BSTATUS), Some(Variant::from("IDLE")));
        assert_eq!(initial(FAIL_INDEX), Some(Variant::Int32(0)));
        assert_eq!(initial("CHARGE_AMT"), Some(Variant::Double(0.0)));

        // Source timestamps ahead of the initial values' (server start): the
        // server merges a change stamped before the node's previous value.
        let t0 = crate::record::now_ms() + 1000;
        let s = |k: i64| Some(t0 + k * 1000);
        let params = [
            ("CHARGE_AMT", 10_250.5),
            ("REACT_TEMP_SP", 57.2),
            ("REACT_TIME", 300.0),
        ];
        units
            .start_batch(unit, "B2026-000001", "PVC-S70", &params, s(0))
            .unwrap();
        units.set_state(unit, "RUNNING", s(1)).unwrap();
        units.set_phase(unit, "CHARGE", s(2)).unwrap();
        units.set_state(unit, "HOLDING", s(3)).unwrap();
        units.set_state(unit, "HELD", s(4)).unwrap();
        units.set_state(unit, "RESTARTING", s(5)).unwrap();
        units.set_state(unit, "RUNNING", s(6)).unwrap();
        units.set_phase(unit, "HEAT", s(7)).unwrap();
        units.set_fail_index(unit, 17, s(8)).unwrap();
        units.set_state(unit, "ABORTING", s(9)).unwrap();
        units.end_batch(unit, "ABORTED", s(10)).unwrap();
        assert!(
            units.set_state(unit, "RUNING", None).is_err(),
            "typo refused"
        );
        assert!(units.set_phase("REACTOR_999", "HEAT", None).is_err());
        assert!(units.is_scripted(unit).unwrap());
        assert!(!units.is_scripted("REACTOR_102").unwrap());
        let now = units.current(unit).unwrap();
        assert_eq!(
            (now.batch_id.as_str(), now.bstatus.as_str()),
            ("", "ABORTED")
        );
        assert_eq!(now.fail_index, 17);

        let start = seen.len();
        // Sixteen changes (FAIL_INDEX 0 -> 0 is none), then nothing more.
        collect_until(&mut client, &mut seen, "the script's changes", |s| {
            s.len() - start >= 16
        })
        .await;
        if let Some(extra) = client.next(Duration::from_millis(500)).await {
            seen.push(extra);
        }
        let mut got: Vec<(i64, String, Variant)> = seen[start..]
            .iter()
            .map(|c| {
                let param = c
                    .node
                    .trim_start_matches("REACTOR_101/")
                    .trim_end_matches(".CV");
                (c.source_ts_ms - t0, param.to_string(), c.value.clone())
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let want: Vec<(i64, &str, Variant)> = vec![
            (0, "CHARGE_AMT", Variant::Double(10_250.5)),
            (0, "REACT_TEMP_SP", Variant::Double(57.2)),
            (0, "REACT_TIME", Variant::Double(300.0)),
            (0, "RECIPE", Variant::from("PVC-S70")),
            // FAIL_INDEX 0 -> 0 is no change: not reported.
            (1, "BATCH_ID", Variant::from("B2026-000001")),
            (1000, "BSTATUS", Variant::from("RUNNING")),
            (2000, "PHASE", Variant::from("CHARGE")),
            (3000, "BSTATUS", Variant::from("HOLDING")),
            (4000, "BSTATUS", Variant::from("HELD")),
            (5000, "BSTATUS", Variant::from("RESTARTING")),
            (6000, "BSTATUS", Variant::from("RUNNING")),
            (7000, "PHASE", Variant::from("HEAT")),
            (8000, "FAIL_INDEX", Variant::Int32(17)),
            (9000, "BSTATUS", Variant::from("ABORTING")),
            (10_000, "BSTATUS", Variant::from("ABORTED")),
            (10_001, "BATCH_ID", Variant::from("")),
        ];
        let want: Vec<(i64, String, Variant)> = want
            .into_iter()
            .map(|(t, p, v)| (t, p.to_string(), v))
            .collect();
        assert_eq!(got, want);
        client.close().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn automatic_batches_run_at_speed_and_a_taken_over_unit_stays_still() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 50.0, 3).await;
        let units = server.deltav_units().expect("deltav units");
        // Frozen from the start (its first batch is planned a second or more
        // of simulated time, 20 ms, after the start).
        units.take_over("REACTOR_101").unwrap();
        let mut nodes = unit_nodes("REACTOR_101");
        nodes.extend(unit_nodes("REACTOR_102"));
        nodes.push("FIC-101/PV.CV".into());
        let mut client =
            TestClient::connect(&server.endpoint(), server.namespace_index(), &nodes).await;
        let mut seen = Vec::new();
        let id_node = batch::node_id("REACTOR_102", BATCH_ID);
        // One whole batch of REACTOR_102: BATCH_ID set, then cleared.
        collect_until(&mut client, &mut seen, "a whole batch", |s| {
            let set = s
                .iter()
                .position(|c| c.node == id_node && c.text().is_some_and(|t| !t.is_empty()));
            set.is_some_and(|i| {
                s[i..]
                    .iter()
                    .any(|c| c.node == id_node && c.text() == Some(""))
            })
        })
        .await;
        let of = |unit: &str, p: &str| batch::node_id(unit, p);
        // One publish lists its changes by monitored item, not in write
        // order: the source timestamps tell the order.
        let mut r2: Vec<&Change> = seen
            .iter()
            .filter(|c| c.node.starts_with("REACTOR_102/"))
            .collect();
        r2.sort_by_key(|c| c.source_ts_ms);
        let set = r2
            .iter()
            .position(|c| c.node == id_node && c.text().is_some_and(|t| !t.is_empty()))
            .expect("set");
        let cleared = r2[set..]
            .iter()
            .position(|c| c.node == id_node && c.text() == Some(""))
            .map(|i| i + set)
            .expect("cleared");
        let (set_ts, clear_ts) = (r2[set].source_ts_ms, r2[cleared].source_ts_ms);
        assert!(r2[set]
            .text()
            .is_some_and(|t| t.starts_with('B') && t.len() == 12));
        // Plant convention, by source timestamps: the recipe came first...
        let recipe = r2[..set]
            .iter()
            .rev()
            .find(|c| c.node == of("REACTOR_102", RECIPE))
            .expect("recipe written before BATCH_ID");
        assert!(recipe.source_ts_ms < set_ts);
        assert!(recipe.text().is_some_and(|t| t.starts_with("PVC-")));
        // ... and nothing of the batch after BATCH_ID was cleared.
        for c in &r2[set..cleared] {
            assert!(c.source_ts_ms <= clear_ts, "{c:?} after the clear");
        }
        let last_state = r2[set..cleared]
            .iter()
            .rev()
            .find(|c| c.node == of("REACTOR_102", BSTATUS))
            .and_then(|c| c.text())
            .expect("states during the batch");
        assert!(
            ["COMPLETE", "ABORTED", "STOPPED"].contains(&last_state),
            "{last_state}"
        );
        let phases: Vec<&str> = r2[set..cleared]
            .iter()
            .filter(|c| c.node == of("REACTOR_102", PHASE))
            .filter_map(|c| c.text())
            .collect();
        assert!(phases.first() == Some(&"CHARGE"), "{phases:?}");
        // The taken-over unit showed its initial values only.
        let r1 = seen
            .iter()
            .filter(|c| c.node.starts_with("REACTOR_101/"))
            .count();
        assert_eq!(r1, unit_nodes("REACTOR_101").len());
        // The continuous tags still move.
        let pv = seen.iter().filter(|c| c.node == "FIC-101/PV.CV").count();
        assert!(pv > 2, "FIC-101/PV.CV changed {pv} times");
        client.close().await;
        server.shutdown().await;
    }
}
