//! The source driving the DeltaV and OptoMES profiles against the real
//! simulators: subscriptions, the recipe Read, and the profile snapshot
//! committed with its records in a real buffer file across a restart.

use super::*;
use crate::buffer::{BufferHandle, Outlet, Store, StoreOptions, Unobserved};
use crate::config::{DeltavConfig, UnitConfig};

const UNIT: &str = "REACTOR_101";

fn deltav_conn(endpoint: &str) -> ConnectionConfig {
    let mut conn = conn_config("deltav-line1", endpoint, vec![]);
    conn.profile = ProfileConfig::Deltav(DeltavConfig {
        node_template: Some(format!("nsu={NS};s={{unit}}/{{param}}.CV")),
        units: vec![UnitConfig {
            name: UNIT.into(),
            recipe_parameters: vec!["CHARGE_AMT".into(), "REACT_TEMP_SP".into()],
        }],
    });
    conn
}

/// One run of `run_connection` whose submissions are committed to a real
/// buffer (records and profile state in one transaction, as in the agent)
/// and copied to `seen` once committed.
struct Run {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pump: tokio::task::JoinHandle<()>,
    board: Arc<StatusBoard>,
}

impl Run {
    fn start(
        conn: ConnectionConfig,
        pki: std::path::PathBuf,
        buffer: BufferHandle,
        saved: Option<String>,
        seen: mpsc::UnboundedSender<NewRecord>,
    ) -> Run {
        let board = StatusBoard::new();
        let (tx, mut rx) = Outlet::queue(TEST_QUEUE);
        let reporter = ConnectionReporter::new(&conn.id, board.clone(), tx, conn.events.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_connection(
            tokio::sync::watch::channel(conn).1,
            pki,
            reporter,
            crate::source::Saved {
                profile: saved,
                marks: Vec::new(),
            },
            cancel.clone(),
        ));
        let pump = tokio::spawn(async move {
            let outlet = buffer.outlet();
            while let Some(batch) = rx.recv().await {
                let records = batch.records.clone();
                outlet.submit(batch).await.expect("submit");
                // Committed before the test sees it, as in the agent.
                buffer.flush(WAIT).await;
                for r in records {
                    let _ = seen.send(r);
                }
            }
        });
        Run {
            cancel,
            task,
            pump,
            board,
        }
    }

    async fn wait_online(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut changes = self.board.subscribe();
        loop {
            if self
                .board
                .connections()
                .iter()
                .any(|(_, s)| s.state == ConnState::Online)
            {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => panic!("not online in time"),
                _ = changes.changed() => {}
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("connection task");
        // The reporter (and with it the sink) is gone: the pump drains.
        self.pump.await.expect("pump");
    }
}

/// Collects batch/recipe records until `n` of them have arrived.
async fn derived(rx: &mut mpsc::UnboundedReceiver<NewRecord>, got: &mut Vec<NewRecord>, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r))
                if matches!(
                    r.kind,
                    Kind::Batch | Kind::Recipe | Kind::Oee | Kind::Downtime
                ) =>
            {
                got.push(r)
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("record channel closed; got {got:#?}"),
            Err(_) => panic!("timed out waiting for {n} derived records; got {got:#?}"),
        }
    }
}

fn summary(records: &[NewRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| match r.kind {
            Kind::Batch => format!(
                "batch {} {} phase={} state={}",
                r.data_json()["event"].as_str().unwrap_or("?"),
                r.data_json()["batch_id"].as_str().unwrap_or("?"),
                r.data_json()["phase"].as_str().unwrap_or("-"),
                r.data_json()["state"].as_str().unwrap_or("-"),
            ),
            Kind::Recipe => format!(
                "recipe {} {} {}",
                r.data_json()["batch_id"].as_str().unwrap_or("?"),
                r.data_json()["recipe"].as_str().unwrap_or("?"),
                r.data_json()["parameters"]
            ),
            other => format!("{} {}", other.as_str(), r.data),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltav_batch_across_a_restart_has_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = sim(&dir.path().join("sim"), |_| {}).await;
    let units = server.deltav_units().expect("deltav units");
    units.take_over(UNIT).unwrap();
    let pki = client_pki(dir.path()).await;
    let db = dir.path().join("buffer.db");
    let store = Store::open(&db, StoreOptions::default()).expect("open buffer");
    let (buffer, thread) = BufferHandle::spawn(store, std::sync::Arc::new(Unobserved));
    let conn = deltav_conn(&server.endpoint());
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut got = Vec::new();

    let run = Run::start(
        conn.clone(),
        pki.clone(),
        buffer.clone(),
        None,
        seen_tx.clone(),
    );
    run.wait_online().await;
    units
        .start_batch(
            UNIT,
            "B-0001",
            "PVC-STD",
            &[("CHARGE_AMT", 1200.0), ("REACT_TEMP_SP", 85.5)],
            None,
        )
        .unwrap();
    derived(&mut seen, &mut got, 2).await;
    units.set_state(UNIT, "RUNNING", None).unwrap();
    derived(&mut seen, &mut got, 3).await;
    units.set_phase(UNIT, "CHARGE", None).unwrap();
    derived(&mut seen, &mut got, 4).await;
    run.stop().await;

    // Restart from the state committed in the buffer file.
    let saved = buffer
        .profile_state(&conn.id)
        .await
        .expect("read state")
        .expect("a state was stored");
    let run = Run::start(
        conn.clone(),
        pki.clone(),
        buffer.clone(),
        Some(saved),
        seen_tx,
    );
    run.wait_online().await;
    units.set_phase(UNIT, "HEAT", None).unwrap();
    derived(&mut seen, &mut got, 5).await;
    units.set_state(UNIT, "HELD", None).unwrap();
    derived(&mut seen, &mut got, 6).await;
    units.set_state(UNIT, "RUNNING", None).unwrap();
    derived(&mut seen, &mut got, 7).await;
    units.end_batch(UNIT, "COMPLETE", None).unwrap();
    derived(&mut seen, &mut got, 9).await;
    run.stop().await;

    let want = vec![
        "batch batch_started B-0001 phase= state=IDLE".to_string(),
        r#"recipe B-0001 PVC-STD {"CHARGE_AMT":1200.0,"REACT_TEMP_SP":85.5}"#.to_string(),
        "batch state_changed B-0001 phase= state=RUNNING".to_string(),
        "batch phase_changed B-0001 phase=CHARGE state=RUNNING".to_string(),
        "batch phase_changed B-0001 phase=HEAT state=RUNNING".to_string(),
        "batch state_changed B-0001 phase=HEAT state=HELD".to_string(),
        "batch state_changed B-0001 phase=HEAT state=RUNNING".to_string(),
        "batch state_changed B-0001 phase=HEAT state=COMPLETE".to_string(),
        "batch batch_ended B-0001 phase=HEAT state=COMPLETE".to_string(),
    ];
    assert_eq!(summary(&got), want);
    // Nothing else trickled in after the end (no late duplicate).
    while let Ok(r) = seen.try_recv() {
        assert!(
            !matches!(r.kind, Kind::Batch | Kind::Recipe),
            "unexpected record {r:?}"
        );
    }
    buffer.close().await;
    let _ = thread.join();
    server.shutdown().await;
}

const WC: &str = "LINE_A_FILLER";
const WINDOW_MS: i64 = 4_000;

/// Sleeps until the wall clock reaches `t_ms` (ms since the epoch).
async fn sleep_until_ms(t_ms: i64) {
    let wait = t_ms - crate::record::now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optomes_run_produces_oee_windows_and_downtime() {
    let dir = tempfile::tempdir().unwrap();
    init_tracing();
    copy_keys("server", &dir.path().join("server-pki")).await;
    let mut opts = SimOptions::new(dir.path().join("server-pki"));
    opts.speed = 0.0;
    let server = crate::sim::start_optomes(opts, crate::sim::SimExtras::default())
        .await
        .expect("simulator");
    let wcs = server.optomes_work_centers().expect("work centers");
    wcs.take_over(WC).unwrap();
    let pki = client_pki(dir.path()).await;
    let db = dir.path().join("buffer.db");
    let (buffer, thread) = BufferHandle::spawn(
        Store::open(&db, StoreOptions::default()).expect("open buffer"),
        std::sync::Arc::new(Unobserved),
    );

    let mut conn = conn_config("optomes-line1", &server.endpoint(), vec![]);
    conn.profile = ProfileConfig::Optomes(crate::config::OptomesConfig {
        node_template: Some("nsu=urn:plantgate:sim:optomes;s={work_center}.{param}".into()),
        oee_window: Duration::from_millis(WINDOW_MS as u64),
        work_centers: vec![crate::config::WorkCenterConfig { name: WC.into() }],
    });
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let run = Run::start(conn, pki, buffer.clone(), None, seen_tx);
    run.wait_online().await;
    wcs.set_state(WC, "RUNNING", None).unwrap();

    // The first whole window after the script starts, with a margin for
    // the RUNNING value to arrive first.
    let now = crate::record::now_ms();
    let start = (now + 1_000).div_euclid(WINDOW_MS) * WINDOW_MS + WINDOW_MS;
    sleep_until_ms(start + 300).await;
    wcs.add_counts(WC, 10, 2, None).unwrap();
    sleep_until_ms(start + 1_000).await;
    wcs.set_down(WC, "JAM", None).unwrap();
    sleep_until_ms(start + 2_000).await;
    wcs.set_state(WC, "RUNNING", None).unwrap();
    sleep_until_ms(start + 3_000).await;
    wcs.add_counts(WC, 5, 0, None).unwrap();

    // Wait for the window's record; the downtime record comes before it.
    let window_start = crate::record::format_ts(start);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !got.iter().any(|r: &NewRecord| {
        r.kind == Kind::Oee && r.data_json()["window_start"] == window_start.as_str()
    }) {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(r)) if matches!(r.kind, Kind::Oee | Kind::Downtime) => got.push(r),
            Ok(Some(_)) => {}
            _ => panic!("no OEE record for the window at {window_start}; got {got:#?}"),
        }
    }
    run.stop().await;

    let downtime: Vec<&NewRecord> = got.iter().filter(|r| r.kind == Kind::Downtime).collect();
    assert_eq!(downtime.len(), 1, "{got:#?}");
    let d = &downtime[0].data_json();
    assert_eq!(d["work_center"], WC);
    assert_eq!(d["reason"], "JAM");
    let secs = d["duration_s"].as_f64().expect("duration");
    assert!((0.7..=1.5).contains(&secs), "downtime {secs}s: {d}");

    let windows: Vec<&NewRecord> = got.iter().filter(|r| r.kind == Kind::Oee).collect();
    // One record per window, in order, none twice.
    let starts: Vec<String> = windows
        .iter()
        .filter_map(|r| r.data_json()["window_start"].as_str().map(String::from))
        .collect();
    let mut sorted = starts.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(starts, sorted, "{got:#?}");
    let w = &windows.last().expect("window").data_json();
    assert_eq!(w["work_center"], WC);
    assert_eq!(w["good_count"], 15, "{w}");
    assert_eq!(w["reject_count"], 2, "{w}");
    assert_eq!(w["total_count"], 17, "{w}");
    assert_eq!(w["state"], "RUNNING", "{w}");
    assert_eq!(w["complete"], true, "{w}");
    let down = w["downtime_s"].as_f64().expect("downtime_s");
    assert!((0.7..=1.5).contains(&down), "{w}");
    let run_s = w["run_time_s"].as_f64().expect("run_time_s");
    assert!((2.5..=3.3).contains(&run_s), "{w}");

    buffer.close().await;
    let _ = thread.join();
    server.shutdown().await;
}
