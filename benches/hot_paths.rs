//! Criterion micro-benchmarks of the per-value hot paths, each
//! reporting throughput in elements (values, records or profile steps) per
//! second:
//!
//! - `value`: an OPC UA Variant / DataValue -> the tag record's JSON value,
//!   the whole `tag` record, and that record as the compact JSON text the
//!   buffer stores;
//! - `buffer`: `Store` append / read / ack of 1 000 tag records on a real
//!   SQLite file (WAL, `synchronous = NORMAL`, the default) in a tempdir;
//!   `buffer_kept`: the ack when delivered records are kept for replay
//!   (`buffer.retain_delivered`), and a replay's read of 1 000 of them;
//! - `uplink`: encoding as many stored records as fit one 128 KiB MQTT
//!   message (the default `max_message_bytes`) into its payload;
//! - `profile`: one DeltaV PHASE change in a running batch (-> one `batch`
//!   record) and one second of an OptoMES work center (a GOOD_COUNT change
//!   and a tick; every 60th closes an OEE window).
//!
//! `cargo bench --bench hot_paths` (criterion's options after `--`, e.g.
//! `-- --warm-up-time 1 --measurement-time 3 value/`). The bench profile is
//! the release profile: fat LTO and `opt-level = "z"`, as shipped.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use opcua::types::{DataValue, DateTime, StatusCode, UAString, Variant};
use serde_json::{json, Value};

use plantgate::buffer::{Append, Limits, Store, StoreOptions};
use plantgate::config::ConnectionConfig;
use plantgate::profile::{NodeKey, Profile, Sample, UnitParam, WcParam};
use plantgate::record::{now_ms, Kind, NewRecord, RecordId, StoredRecord, StreamKey};
use plantgate::source::value::{tag_record, variant_to_json, TagMeta};
use plantgate::sparkplug::{DeviceSpec, EdgeNode};
use plantgate::uplink::payload::{encode_batch, fit};

/// 2026-11-28T10:00:00Z.
const T0: i64 = 1_795_860_000_000;
/// Records per buffer operation: what one busy coalesced transaction holds.
const BATCH: usize = 1_000;
/// Values per iteration of the `value` benches.
const VALUES: usize = 1_000;
/// The default `mqtt.max_message_bytes`.
const MAX_MESSAGE_BYTES: usize = 128 * 1024;

fn ua_time(ts_ms: i64) -> DateTime {
    DateTime::from(chrono::DateTime::from_timestamp_millis(ts_ms).expect("valid time"))
}

/// A Good Double as a load tag delivers it, 100 ms apart.
fn data_values() -> Vec<DataValue> {
    (0..VALUES)
        .map(|i| {
            let ts = ua_time(T0 + i as i64 * 100);
            DataValue {
                value: Some(Variant::Double((i as f64 * 0.1).sin() * 50.0)),
                status: Some(StatusCode::Good),
                source_timestamp: Some(ts),
                source_picoseconds: None,
                server_timestamp: Some(ts),
                server_picoseconds: None,
            }
        })
        .collect()
}

fn tag_metas() -> Vec<TagMeta> {
    (0..VALUES)
        .map(|i| {
            TagMeta::new(
                format!("FIC-{:03}/PV.CV", i % 250),
                format!("nsu=urn:plantgate:sim:deltav;s=FIC-{:03}/PV.CV", i % 250),
            )
        })
        .collect()
}

fn value_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("value");
    g.throughput(Throughput::Elements(VALUES as u64));
    let doubles: Vec<Variant> = data_values()
        .into_iter()
        .filter_map(|dv| dv.value)
        .collect();
    g.bench_function("variant_to_json/double", |b| {
        b.iter(|| {
            for v in &doubles {
                black_box(variant_to_json(black_box(v)));
            }
        })
    });
    let strings: Vec<Variant> = (0..VALUES)
        .map(|i| Variant::String(UAString::from(format!("B-2026-{i:05}"))))
        .collect();
    g.bench_function("variant_to_json/string", |b| {
        b.iter(|| {
            for v in &strings {
                black_box(variant_to_json(black_box(v)));
            }
        })
    });
    let dvs = data_values();
    let tags = tag_metas();
    // The record with its `data` already the JSON text the buffer stores.
    g.bench_function("tag_record", |b| {
        b.iter(|| {
            for (dv, tag) in dvs.iter().zip(&tags) {
                black_box(tag_record("deltav-line1", tag, black_box(dv)));
            }
        })
    });
    g.finish();
}

/// `n` tag records as the source makes them, the `i`-th from `from`.
fn new_records(from: u64, n: usize) -> Vec<NewRecord> {
    let dvs = data_values();
    let tags = tag_metas();
    (0..n)
        .map(|k| {
            let i = (from as usize + k) % VALUES;
            let mut r = tag_record("deltav-line1", &tags[i], &dvs[i]);
            r.ts_ms = T0 + (from as i64 + k as i64) * 10;
            r
        })
        .collect()
}

fn buffer_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store =
        Store::open(&dir.path().join("buffer.db"), StoreOptions::default()).expect("store");
    let stream = StreamKey::new("deltav-line1", Kind::Tag);
    let batch = new_records(0, BATCH);
    // Each timed operation leaves the buffer as it found it (the untimed
    // rest of the cycle undoes it), so the file does not grow run to run.
    let read_all = |store: &Store| -> Vec<RecordId> {
        store
            .read_after(&stream, 0, usize::MAX, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|r| r.id)
            .collect()
    };

    let mut g = c.benchmark_group("buffer");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("append_1000", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                black_box(
                    store
                        .append(Append::records(black_box(&batch)))
                        .expect("append"),
                );
                spent += t.elapsed();
                let ids = read_all(&store);
                store.ack(&ids).expect("ack");
            }
            spent
        })
    });
    store.append(Append::records(&batch)).expect("prefill");
    g.bench_function("read_1000", |b| {
        b.iter(|| {
            let rows = store
                .read_after(black_box(&stream), 0, BATCH, MAX_MESSAGE_BYTES * 16)
                .expect("read");
            assert_eq!(rows.len(), BATCH);
            black_box(rows)
        })
    });
    let ids = read_all(&store);
    store.ack(&ids).expect("ack");
    g.bench_function("ack_1000", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                store.append(Append::records(&batch)).expect("append");
                let ids = read_all(&store);
                let t = Instant::now();
                let n = store.ack(black_box(&ids)).expect("ack");
                spent += t.elapsed();
                assert_eq!(n, BATCH);
            }
            spent
        })
    });
    g.finish();

    // The same ack with delivered records kept for replay
    // (`buffer.retain_delivered`): the segment is kept, not deleted. The
    // untimed rest lets the kept history go, so the file stays as it was.
    let kept_dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        limits: Limits {
            retain_delivered: Duration::from_secs(86_400),
            ..Limits::NONE
        },
        ..StoreOptions::default()
    };
    let mut kept = Store::open(&kept_dir.path().join("buffer.db"), options).expect("store");
    let later = now_ms() + 3 * 86_400_000;
    let mut g = c.benchmark_group("buffer_kept");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ack_1000", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                kept.append(Append::records(&batch)).expect("append");
                let ids = read_all(&kept);
                let t = Instant::now();
                let n = kept.ack(black_box(&ids)).expect("ack");
                spent += t.elapsed();
                assert_eq!(n, BATCH);
                kept.evict_expired(later).expect("let the history go");
            }
            spent
        })
    });
    // A replay's read of 1 000 delivered records.
    kept.append(Append::records(&batch)).expect("prefill");
    let ids = read_all(&kept);
    kept.ack(&ids).expect("ack");
    let first = ids.first().map_or(1, |id| id.seq as u64);
    g.bench_function("read_range_1000", |b| {
        b.iter(|| {
            let read = kept
                .read_range(
                    black_box(&stream),
                    first,
                    first + BATCH as u64 - 1,
                    BATCH,
                    MAX_MESSAGE_BYTES * 16,
                )
                .expect("read");
            assert_eq!(read.records.len(), BATCH);
            black_box(read)
        })
    });
    g.finish();
}

fn uplink_benches(c: &mut Criterion) {
    let stored: Vec<StoredRecord> = new_records(0, 4 * BATCH)
        .into_iter()
        .enumerate()
        .map(|(i, r)| StoredRecord {
            id: RecordId {
                stream: 1,
                seq: i as i64 + 1,
            },
            connection: r.connection,
            kind: r.kind,
            seq: i as u64 + 1,
            ts_ms: r.ts_ms,
            data: r.data,
        })
        .collect();
    let agent = "plant1-gw";
    let epoch = "6f1c0b7e2d4a4c51a9e3b0d2c8f71a55";
    let n = fit(&stored, MAX_MESSAGE_BYTES, agent.len() + epoch.len() + 32);
    let records = &stored[..n];
    let mut g = c.benchmark_group("uplink");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("encode_batch/{n}_records_128KiB"), |b| {
        b.iter(|| black_box(encode_batch(agent, epoch, black_box(records))))
    });
    // The same records as one Sparkplug DDATA (docs/sparkplug.md): each
    // record's JSON read back into a typed metric, then protobuf.
    let mut node = EdgeNode::new(
        "plant1",
        agent,
        &[DeviceSpec {
            id: "deltav-line1".into(),
            derived: vec![Kind::Batch, Kind::Recipe],
        }],
    );
    node.start_session(0);
    g.bench_function(format!("sparkplug_ddata/{n}_records"), |b| {
        b.iter(|| {
            let draft = node.ddata("deltav-line1", black_box(records), epoch, 0, false, T0);
            black_box(node.seal(draft))
        })
    });
    g.finish();
}

/// A connection of `kind` with `extra` TOML, through the real loader.
fn connection(kind: &str, extra: &str) -> ConnectionConfig {
    let toml = format!(
        r#"
[agent]
id = "bench-gw"
site = "bench"
data_dir = "/nonexistent/plantgate-bench"

[mqtt]
url = "mqtt://127.0.0.1:1883"
allow_plaintext = true

[[connections]]
id = "{kind}-line1"
kind = "{kind}"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "None"
security_mode = "None"
{extra}
"#
    );
    let loaded = plantgate::config::load_from(&toml, &HashMap::new())
        .unwrap_or_else(|e| panic!("bench config does not load: {e}\n{toml}"));
    loaded
        .config
        .connections
        .into_iter()
        .next()
        .expect("one connection")
}

fn unit(param: UnitParam, value: Value, ts_ms: i64) -> Sample {
    Sample {
        key: NodeKey::Unit { unit: 0, param },
        value,
        good: true,
        ts_ms,
    }
}

fn work_center(param: WcParam, value: Value, ts_ms: i64) -> Sample {
    Sample {
        key: NodeKey::WorkCenter {
            work_center: 0,
            param,
        },
        value,
        good: true,
        ts_ms,
    }
}

fn profile_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("profile");
    g.throughput(Throughput::Elements(1));

    // DeltaV: a batch running on REACTOR_101; each step is one PHASE change.
    let mut deltav = Profile::new(&connection(
        "deltav",
        "[[connections.units]]\nname = \"REACTOR_101\"\n\
         recipe_parameters = [\"CHARGE_AMT\", \"REACT_TEMP_SP\", \"REACT_TIME\"]\n\
         [[connections.units]]\nname = \"REACTOR_102\"\n",
    ))
    .expect("a DeltaV connection has a profile");
    deltav.on_connected(T0);
    let start = deltav.on_values(&[
        unit(UnitParam::Recipe, json!("PVC-STD"), T0),
        unit(UnitParam::Phase, json!("CHARGE"), T0),
        unit(UnitParam::Bstatus, json!("RUNNING"), T0),
        unit(UnitParam::FailIndex, json!(0), T0),
        unit(UnitParam::BatchId, json!("B-2026-00001"), T0),
    ]);
    assert!(
        start.records.iter().any(|r| r.kind == Kind::Batch),
        "batch started"
    );
    for read in start.reads {
        let answers: Vec<(NodeKey, Value, bool)> =
            read.keys.iter().map(|k| (*k, json!(42.0), true)).collect();
        deltav.on_read(read.id, &answers);
    }
    const PHASES: [&str; 4] = ["HEAT", "REACT", "COOL", "DISCHARGE"];
    let mut step: i64 = 0;
    g.bench_function("deltav/phase_change", |b| {
        b.iter(|| {
            step += 1;
            let phase = PHASES[step as usize % PHASES.len()];
            let out = deltav.on_values(&[unit(UnitParam::Phase, json!(phase), T0 + step * 1_000)]);
            debug_assert_eq!(out.records.len(), 1);
            black_box(out)
        })
    });

    // OptoMES: LINE_A_FILLER running, 60 s OEE windows; each step is one
    // second of it: a GOOD_COUNT change and the tick.
    let mut optomes = Profile::new(&connection(
        "optomes",
        "oee_window = \"60s\"\n\
         [[connections.work_centers]]\nname = \"LINE_A_FILLER\"\n\
         [[connections.work_centers]]\nname = \"LINE_A_CAPPER\"\n",
    ))
    .expect("an OptoMES connection has a profile");
    optomes.on_connected(T0);
    optomes.on_values(&[
        work_center(WcParam::State, json!("RUNNING"), T0),
        work_center(WcParam::WorkOrder, json!("WO-1"), T0),
        work_center(WcParam::Product, json!("P-1"), T0),
        work_center(WcParam::GoodCount, json!(1000), T0),
        work_center(WcParam::RejectCount, json!(10), T0),
        work_center(WcParam::IdealCycleTime, json!(2.0), T0),
        work_center(WcParam::DowntimeReason, json!(""), T0),
    ]);
    let mut second: i64 = 0;
    g.bench_function("optomes/count_change_and_tick", |b| {
        b.iter(|| {
            second += 1;
            let now = T0 + second * 1_000;
            let mut out = optomes.on_values(&[work_center(
                WcParam::GoodCount,
                json!(1000 + second),
                now - 500,
            )]);
            out.append(optomes.on_tick(now));
            black_box(out)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    value_benches,
    buffer_benches,
    uplink_benches,
    profile_benches
);
criterion_main!(benches);
