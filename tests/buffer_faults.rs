//! The buffer's bounds and faults on real SQLite files (docs/guarantees.md):
//! size limit with priority lanes, age limit, a really full disk, corrupt
//! files at start, dead letters (also from a second process's connection).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use plantgate::buffer::{
    Append, BufferError, Eviction, EvictionReason, Limits, OpenMode, Store, StoreOptions,
};
use plantgate::record::{Kind, NewRecord, RecordId, StoredRecord, StreamKey};
use serde_json::{json, Value};

/// The buffer as the service opens it: limits, full check, quarantine,
/// disk reserve.
fn open_service(path: &Path, limits: Limits) -> Result<Store, BufferError> {
    Store::open(
        path,
        StoreOptions {
            limits,
            mode: OpenMode::Service,
            ..StoreOptions::default()
        },
    )
}

/// A record of about `pad` bytes that does not compress: the buffer stores
/// segments compressed, so a repeated character would take no room at all
/// and no limit would ever be reached.
fn rec(connection: &str, kind: Kind, ts_ms: i64, pad: usize) -> NewRecord {
    NewRecord {
        connection: connection.into(),
        kind,
        ts_ms,
        data: json!({ "pad": noise(pad) }).to_string(),
    }
}

/// `len` characters of a 64-letter alphabet, different on every call.
fn noise(len: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x = STATE.fetch_add(0x6A09_E667_F3BC_C909, Ordering::Relaxed);
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ALPHABET[(r >> 58) as usize] as char
        })
        .collect()
}

fn all(store: &Store, stream: &StreamKey) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let rows = store
            .read_after(stream, after, 5_000, usize::MAX)
            .expect("read");
        let Some(last) = rows.last() else {
            return out;
        };
        after = last.seq;
        out.extend(rows);
    }
}

fn agent_events() -> StreamKey {
    StreamKey::new("", Kind::Event)
}

/// `buffer.evicted` events of the agent's event stream, as `Eviction`s
/// (bytes unknown to the event: 0).
fn announced(store: &Store) -> Vec<Eviction> {
    all(store, &agent_events())
        .iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_str(&r.data).expect("event json");
            if v["type"] != "buffer.evicted" {
                return None;
            }
            let d = &v["details"];
            Some(Eviction {
                connection: d["connection"].as_str().unwrap_or("").to_string(),
                kind: Kind::parse(d["kind"].as_str().expect("kind")).expect("kind"),
                first_seq: d["first_seq"].as_u64().expect("first"),
                last_seq: d["last_seq"].as_u64().expect("last"),
                count: d["count"].as_u64().expect("count"),
                bytes: 0,
                reason: match d["limit"]
                    .as_str()
                    .or(d["reason"].as_str())
                    .expect("reason")
                {
                    "max_size" => EvictionReason::MaxSize,
                    "max_age" => EvictionReason::MaxAge,
                    "disk_full" => EvictionReason::DiskFull,
                    other => panic!("unknown reason {other}"),
                },
                dead_letters: d["reason"] == "dead_letter",
            })
        })
        .collect()
}

fn without_bytes(e: &[Eviction]) -> Vec<Eviction> {
    e.iter()
        .map(|e| Eviction {
            bytes: 0,
            ..e.clone()
        })
        .collect()
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Everything the buffer takes on disk: the database, its WAL and the disk
/// reserve (all inside `max_size`).
fn on_disk(path: &Path) -> u64 {
    ["", "-wal", ".reserve"]
        .iter()
        .map(|s| {
            std::fs::metadata(sidecar(path, s))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn tiny_max_size_evicts_tags_first_and_never_grows_past_the_limit() {
    const MAX: u64 = 320 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let limits = Limits {
        max_size: MAX,
        max_age: Duration::MAX,
        retain_delivered: Duration::ZERO,
    };
    let mut store = open_service(&path, limits).expect("open");
    let tag = StreamKey::new("line1", Kind::Tag);
    let tag2 = StreamKey::new("line2", Kind::Tag);
    let batch = StreamKey::new("line1", Kind::Batch);
    let mut evicted = Vec::new();
    let mut batch_seqs = Vec::new();
    let mut peak = 0;
    // Phase 1: mostly tags; the batch records must all survive.
    for round in 0..400i64 {
        let mut records: Vec<NewRecord> = (0..19)
            .map(|i| {
                rec(
                    if i % 2 == 0 { "line1" } else { "line2" },
                    Kind::Tag,
                    round,
                    150,
                )
            })
            .collect();
        records.push(rec("line1", Kind::Batch, round, 60));
        let report = store.append(Append::records(&records)).expect("append");
        batch_seqs.push(report.seqs[19]);
        for e in &report.evicted {
            assert_eq!(
                e.kind,
                Kind::Tag,
                "round {round}: only tags while tags exist: {e:?}"
            );
            assert_eq!(e.reason, EvictionReason::MaxSize);
        }
        evicted.extend(report.evicted);
        peak = peak.max(on_disk(&path));
        assert!(
            on_disk(&path) <= MAX,
            "round {round}: {} bytes on disk",
            on_disk(&path)
        );
    }
    assert!(!evicted.is_empty(), "the flood must have forced evictions");
    let kept: Vec<u64> = all(&store, &batch).iter().map(|r| r.seq).collect();
    assert_eq!(kept, batch_seqs, "every batch record kept while tags exist");

    // Phase 2: batch records only, until they have to go too.
    let mut batch_evicted = false;
    for round in 0..2_000i64 {
        let records: Vec<NewRecord> = (0..10)
            .map(|_| rec("line1", Kind::Batch, round, 150))
            .collect();
        match store.append(Append::records(&records)) {
            Ok(report) => {
                for e in &report.evicted {
                    if e.kind != Kind::Tag {
                        let st = store.stats().expect("stats");
                        let tags_left: u64 = st
                            .streams
                            .iter()
                            .filter(|s| s.kind == Kind::Tag)
                            .map(|s| s.records)
                            .sum();
                        assert_eq!(tags_left, 0, "{e:?} while tags remain");
                        batch_evicted = true;
                    }
                }
                evicted.extend(report.evicted);
            }
            Err(e) => panic!("append failed although batch rows are evictable: {e}"),
        }
        assert!(
            on_disk(&path) <= MAX,
            "phase 2 round {round}: {} bytes",
            on_disk(&path)
        );
        if batch_evicted {
            break;
        }
    }
    assert!(batch_evicted, "batch rows are evicted once no tag is left");

    // Every eviction is announced exactly, in order, and counted. The agent's
    // event stream holds only these announcements here, so the event rows
    // that were evicted themselves are the first announcements.
    let events_gone: u64 = evicted
        .iter()
        .filter(|e| e.kind == Kind::Event)
        .map(|e| e.count)
        .sum();
    assert_eq!(
        announced(&store),
        without_bytes(&evicted[events_gone as usize..])
    );
    let stats = store.stats().expect("stats");
    let total: u64 = evicted.iter().map(|e| e.count).sum();
    assert_eq!(stats.evicted_total, total);
    for key in [&tag, &tag2, &batch] {
        let s = stats
            .streams
            .iter()
            .find(|s| &s.stream() == key)
            .expect("stream");
        let gone: u64 = evicted
            .iter()
            .filter(|e| &e.stream() == key)
            .map(|e| e.count)
            .sum();
        assert_eq!(s.evicted_total, gone, "{key:?}");
        // No acks here: assigned = pending + evicted, and the evicted ones
        // are exactly the seqs missing below the pending ones.
        assert_eq!(s.next_seq - 1, s.records + gone, "{key:?}");
        let mut seen: Vec<u64> = all(&store, key).iter().map(|r| r.seq).collect();
        for e in evicted.iter().filter(|e| &e.stream() == key) {
            assert_eq!(e.last_seq - e.first_seq + 1, e.count, "contiguous: {e:?}");
            seen.extend(e.first_seq..=e.last_seq);
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (1..s.next_seq).collect::<Vec<_>>(),
            "{key:?}: every seq accounted for"
        );
    }
    store.integrity_check().expect("integrity");
    eprintln!(
        "peak on disk {peak} of {MAX}; {} evictions, {total} rows",
        evicted.len()
    );
}

#[test]
fn max_age_evicts_expired_heads_of_every_kind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let hour = 3_600_000;
    let now = 1_800_000_000_000i64;
    let limits = Limits {
        max_size: u64::MAX,
        max_age: Duration::from_millis(hour as u64),
        ..Limits::NONE
    };
    let mut store = open_service(&path, limits).expect("open");
    store
        .append(Append::records(&[
            rec("line1", Kind::Tag, now - 3 * hour, 5),
            rec("line1", Kind::Tag, now - 2 * hour, 5),
            rec("line1", Kind::Tag, now - 10, 5),
            rec("line1", Kind::Batch, now - 2 * hour, 5),
            // A young head protects the old row behind it.
            rec("mes", Kind::Oee, now, 5),
            rec("mes", Kind::Oee, now - 5 * hour, 5),
        ]))
        .expect("append");
    let evicted = store.evict_expired(now).expect("evict");
    assert_eq!(
        evicted
            .iter()
            .map(|e| (e.stream(), e.first_seq, e.last_seq, e.count, e.reason))
            .collect::<Vec<_>>(),
        vec![
            (
                StreamKey::new("line1", Kind::Tag),
                1,
                2,
                2,
                EvictionReason::MaxAge
            ),
            (
                StreamKey::new("line1", Kind::Batch),
                1,
                1,
                1,
                EvictionReason::MaxAge
            ),
        ]
    );
    assert_eq!(announced(&store), without_bytes(&evicted));
    let tags: Vec<u64> = all(&store, &StreamKey::new("line1", Kind::Tag))
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(tags, vec![3]);
    assert_eq!(all(&store, &StreamKey::new("mes", Kind::Oee)).len(), 2);
    let stats = store.stats().expect("stats");
    assert_eq!(stats.evicted_total, 3);
    // Nothing more is expired, and the new events are not.
    assert!(store.evict_expired(now).expect("evict").is_empty());
    // Later everything old enough goes, the announcements included.
    let later = store.evict_expired(now + 2 * hour).expect("evict");
    assert!(later.iter().any(|e| e.kind == Kind::Event));
    assert_eq!(
        store.stats().expect("stats").evicted_total,
        3 + later.iter().map(|e| e.count).sum::<u64>()
    );
    store.integrity_check().expect("integrity");
}

// ---------------------------------------------------------------- disk full

const CHILD_ENV: &str = "PLANTGATE_DISKFULL_CHILD";
const CHILD_TEST: &str = "disk_full_child";

/// Child side of the disk-full tests: appends mixed batches until the
/// buffer reports Full, printing what it committed. A no-op in a normal run.
#[test]
fn disk_full_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    // "limits": the service's open (reserve file, limits above the disk's
    // size); otherwise the plain open without either.
    let mut store = if std::env::var("PLANTGATE_DISKFULL_MODE").as_deref() == Ok("limits") {
        let limits = Limits {
            max_size: 64 * 1024 * 1024,
            max_age: Duration::MAX,
            ..Limits::NONE
        };
        open_service(Path::new(&path), limits).expect("child: open")
    } else {
        Store::open(Path::new(&path), StoreOptions::default()).expect("child: open")
    };
    let mut errors = 0;
    for round in 0..20_000i64 {
        let mut records: Vec<NewRecord> = (0..20)
            .map(|_| rec("line1", Kind::Tag, round, 200))
            .collect();
        records.push(rec("line1", Kind::Batch, round, 200));
        match store.append(Append::records(&records)) {
            Ok(report) => {
                for e in &report.evicted {
                    println!("evicted {} {} {}", e.kind, e.count, e.reason);
                }
                println!("batch {}", report.seqs[20]);
                if report.evicted.iter().any(|e| e.kind == Kind::Batch) {
                    println!("done batch-evicted");
                    return;
                }
            }
            Err(e) if e.is_disk_full() => {
                println!("full {e}");
                return;
            }
            Err(e) => {
                // I/O errors must be clean errors too; keep going a little.
                println!("error {} {e}", if e.is_io_error() { "io" } else { "other" });
                errors += 1;
                if errors >= 20 {
                    println!("done errors");
                    return;
                }
            }
        }
    }
    println!("done rounds");
}

struct ChildRun {
    batches: Vec<u64>,
    lines: Vec<String>,
}

fn run_child(path: &Path, wrap: Option<&str>, mode: &str) -> ChildRun {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = match wrap {
        Some(script) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let out = cmd
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env("PLANTGATE_DISKFULL_MODE", mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("run child");
    let lines: Vec<String> = BufReader::new(&out.stdout[..])
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(
        out.status.success(),
        "child failed (panic?): {:?}\n{}",
        out.status,
        lines.join("\n")
    );
    let batches = lines
        .iter()
        .filter_map(|l| {
            l.split_once("batch ")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .collect();
    ChildRun { batches, lines }
}

fn check_after_disk_full(path: &Path, run: &ChildRun, evicts: bool) {
    let summary = run
        .lines
        .iter()
        .filter(|l| !l.contains("batch "))
        .cloned()
        .collect::<Vec<_>>();
    eprintln!(
        "child: {} commits; {:?}",
        run.batches.len(),
        summary.iter().take(12).collect::<Vec<_>>()
    );
    if evicts {
        assert!(
            run.lines
                .iter()
                .any(|l| l.contains("evicted tag") && l.contains("disk_full")),
            "the full disk was met with eviction: {summary:?}"
        );
    } else {
        assert!(
            run.lines
                .iter()
                .any(|l| l.starts_with("error io") || l.starts_with("full ")),
            "the file size limit was reached: {summary:?}"
        );
    }
    let mut store = Store::open(path, StoreOptions::default()).expect("reopen");
    store.integrity_check().expect("integrity after disk full");
    if evicts {
        // Operators are told: one system.error about the full disk.
        let told = all(&store, &agent_events()).iter().any(|r| {
            serde_json::from_str::<Value>(&r.data).is_ok_and(|v| {
                v["type"] == "system.error"
                    && v["details"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("disk full"))
            })
        });
        assert!(told, "no system.error about the full disk");
    }
    let batch = StreamKey::new("line1", Kind::Batch);
    let kept: Vec<u64> = all(&store, &batch).iter().map(|r| r.seq).collect();
    let evicted: Vec<Eviction> = announced(&store)
        .into_iter()
        .filter(|e| e.stream() == batch)
        .collect();
    for seq in &run.batches {
        assert!(
            kept.contains(seq)
                || evicted
                    .iter()
                    .any(|e| (e.first_seq..=e.last_seq).contains(seq)),
            "committed batch seq {seq} neither present nor announced as evicted"
        );
    }
    // Space is back (no limit in this process): appends work again.
    let next = store
        .append(Append::records(&[rec("line1", Kind::Batch, 0, 10)]))
        .expect("append after space freed")
        .seqs;
    assert_eq!(next, vec![run.batches.last().copied().unwrap_or(0) + 1]);
}

/// RLIMIT_FSIZE caps every file the child writes (the WAL and the database
/// alike). Writes starting at the limit fail with EFBIG, which SQLite
/// reports as SQLITE_IOERR_WRITE (only ENOSPC and short writes become
/// SQLITE_FULL): so this is the I/O-error test, needing no privileges. The
/// buffer must answer with clean errors, never a panic, and lose nothing
/// committed.
#[test]
fn file_size_limit_gives_clean_io_errors_and_loses_nothing() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    // ulimit -f counts 512-byte blocks: 2 MiB + a bit, deliberately not a
    // multiple of the page or WAL frame size.
    let run = run_child(
        &path,
        Some("trap '' XFSZ; ulimit -f 4099 && exec \"$0\" \"$@\""),
        "plain",
    );
    check_after_disk_full(&path, &run, false);
}

/// A real filesystem that fills up (ENOSPC): a 24 MiB tmpfs, the service's
/// open with a max_size larger than the disk.
#[test]
#[ignore = "needs root: mounts a tmpfs"]
fn disk_full_on_a_small_tmpfs_evicts_and_stays_consistent() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(status.success(), "mount tmpfs failed (needs root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let path = mnt.join("buffer.db");
    let run = run_child(&path, None, "limits");
    let summary: Vec<&String> = run.lines.iter().filter(|l| !l.contains("batch ")).collect();
    eprintln!(
        "child on tmpfs: {} commits; {:?}",
        run.batches.len(),
        summary.iter().take(20).collect::<Vec<_>>()
    );
    // Free space by moving the database to a roomy directory, as an
    // operator would after growing the disk.
    let roomy = dir.path().join("buffer.db");
    for s in ["", "-wal", "-shm"] {
        if sidecar(&path, s).exists() {
            std::fs::copy(sidecar(&path, s), sidecar(&roomy, s)).expect("copy out");
        }
    }
    {
        let store = Store::open(&path, StoreOptions::default()).expect("reopen on the full tmpfs");
        store
            .integrity_check()
            .expect("integrity on the full tmpfs");
    }
    check_after_disk_full(&roomy, &run, true);
}

// ---------------------------------------------------------------- corruption

fn populated(path: &Path) -> String {
    let mut store = Store::open(path, StoreOptions::default()).expect("open");
    for round in 0..50 {
        let records: Vec<NewRecord> = (0..40)
            .map(|_| rec("line1", Kind::Tag, round, 300))
            .collect();
        store.append(Append::records(&records)).expect("append");
    }
    store.epoch().to_string()
}

fn assert_quarantined(path: &Path, original: &[u8], old_epoch: Option<&str>) {
    let store = open_service(path, Limits::NONE).expect("open as the service");
    let q = store
        .quarantined()
        .cloned()
        .expect("file must be quarantined");
    assert!(
        q.moved_to
            .file_name()
            .expect("name")
            .to_string_lossy()
            .starts_with("buffer.db.corrupt-"),
        "{q:?}"
    );
    assert_eq!(
        std::fs::read(&q.moved_to).expect("read moved"),
        original,
        "original bytes kept"
    );
    if let Some(old) = old_epoch {
        assert_ne!(store.epoch(), old, "fresh file, new epoch");
    }
    let events = all(&store, &agent_events());
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, 1);
    let v: Value = serde_json::from_str(&events[0].data).expect("json");
    assert_eq!(v["type"], "system.error");
    assert_eq!(v["details"]["moved_to"], q.moved_to.display().to_string());
    assert_eq!(v["details"]["reason"], q.reason);
    assert_eq!(
        v["details"]["message"],
        "buffer database was corrupt and has been moved aside"
    );
    store.integrity_check().expect("fresh file is sound");
    // A second open finds nothing wrong.
    drop(store);
    let again = open_service(path, Limits::NONE).expect("reopen");
    assert!(again.quarantined().is_none());
}

#[test]
fn garbage_file_is_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &garbage).expect("write");
    assert_quarantined(&path, &garbage, None);
}

#[test]
fn truncated_database_is_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let epoch = populated(&path);
    let bytes = std::fs::read(&path).expect("read");
    assert!(bytes.len() > 40_000);
    let cut = &bytes[..bytes.len() / 2];
    std::fs::write(&path, cut).expect("truncate");
    assert_quarantined(&path, cut, Some(&epoch));
}

#[test]
fn damaged_page_is_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let epoch = populated(&path);
    // Scribble over the middle of the page that roots the segments table:
    // structure SQLite's own check must catch (damage inside a segment's
    // data is the segment checksum's job: see
    // `damaged_segment_is_dropped_and_announced`).
    let root: i64 = rusqlite::Connection::open(&path)
        .expect("open")
        .query_row(
            "SELECT rootpage FROM sqlite_schema WHERE name = 'segments'",
            [],
            |r| r.get(0),
        )
        .expect("root page");
    let mut bytes = std::fs::read(&path).expect("read");
    let page = 4096;
    let at = (root as usize - 1) * page + 100;
    for b in &mut bytes[at..at + 1000] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).expect("damage");
    assert_quarantined(&path, &bytes, Some(&epoch));
}

#[test]
fn the_cli_open_never_quarantines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    std::fs::write(&path, vec![0x42u8; 8192]).expect("write");
    assert!(matches!(
        Store::open(&path, StoreOptions::default()),
        Err(BufferError::Corrupt { .. })
    ));
    assert_eq!(std::fs::read(&path).expect("read"), vec![0x42u8; 8192]);
}

// ---------------------------------------------------------------- dead letters

#[test]
fn dead_letters_move_list_and_retry_from_a_second_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let mut service = open_service(&path, Limits::NONE).expect("open");
    let records: Vec<NewRecord> = (0..10).map(|i| rec("line1", Kind::Batch, i, 10)).collect();
    service.append(Append::records(&records)).expect("append");
    let batch = StreamKey::new("line1", Kind::Batch);
    let rows = all(&service, &batch);
    let rejected: Vec<RecordId> = rows[2..5].iter().map(|r| r.id).collect();
    assert_eq!(
        service
            .dead_letter(&rejected, "PUBACK 0x97 payload too large")
            .expect("dead letter"),
        3
    );
    assert_eq!(
        service.dead_letter(&rejected, "again").expect("repeat"),
        0,
        "already moved"
    );

    let pending: Vec<u64> = all(&service, &batch).iter().map(|r| r.seq).collect();
    assert_eq!(pending, vec![1, 2, 6, 7, 8, 9, 10]);
    let events = all(&service, &agent_events());
    assert_eq!(events.len(), 1);
    let v: Value = serde_json::from_str(&events[0].data).expect("json");
    assert_eq!(v["type"], "system.error");
    assert_eq!(
        v["details"],
        json!({"message": "records moved to dead letters", "connection": "line1", "kind": "batch",
               "first_seq": 3, "last_seq": 5, "count": 3, "reason": "PUBACK 0x97 payload too large"})
    );
    let stats = service.stats().expect("stats");
    assert_eq!((stats.dead_letters, stats.records), (3, 8));
    assert_eq!(stats.requeues, 0);

    // `plantgate buffer dead-letters|retry` opens the same file while the
    // service keeps its connection open.
    let mut cli = Store::open(&path, StoreOptions::default()).expect("second open");
    let listed = cli.dead_letters().expect("list");
    assert_eq!(listed.len(), 1);
    let dl = &listed[0];
    assert_eq!(
        (
            dl.connection.as_str(),
            dl.kind,
            dl.first_seq,
            dl.last_seq,
            dl.count
        ),
        ("line1", Kind::Batch, 3, 5, 3)
    );
    assert_eq!(dl.reason, "PUBACK 0x97 payload too large");
    assert!(dl.dead_at_ms > 1_600_000_000_000);
    assert_eq!(cli.retry_dead_letters().expect("retry"), 3);
    assert_eq!(cli.retry_dead_letters().expect("retry again"), 0);
    drop(cli);

    // The service sees them pending again with their original seqs and ids.
    let back = all(&service, &batch);
    assert_eq!(
        back.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        back[2..5].iter().map(|r| r.id).collect::<Vec<_>>(),
        rejected
    );
    let stats = service.stats().expect("stats");
    assert_eq!((stats.dead_letters, stats.records), (0, 11));
    // Counted in the file, so the running service can tell rows were put
    // back under its cursors; the empty second retry does not count.
    assert_eq!(stats.requeues, 1);
    let s = stats
        .streams
        .iter()
        .find(|s| s.stream() == batch)
        .expect("stream");
    assert_eq!((s.records, s.first_seq, s.next_seq), (10, Some(1), 11));
    // And they can be acked like any row.
    assert_eq!(service.ack(&rejected).expect("ack"), 3);
    // New appends continue the seq, never reusing the retried ones.
    assert_eq!(
        service
            .append(Append::records(&[rec("line1", Kind::Batch, 0, 1)]))
            .expect("append")
            .seqs,
        vec![11]
    );
    service.integrity_check().expect("integrity");
}

#[test]
fn dead_lettered_agent_events_do_not_announce_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let mut store = Store::open(&path, StoreOptions::default()).expect("open");
    store
        .append(Append::records(&[rec("", Kind::Event, 0, 5)]))
        .expect("append");
    let ids: Vec<RecordId> = all(&store, &agent_events()).iter().map(|r| r.id).collect();
    assert_eq!(store.dead_letter(&ids, "rejected").expect("dead letter"), 1);
    assert!(
        all(&store, &agent_events()).is_empty(),
        "no self-perpetuating notice"
    );
    assert_eq!(store.stats().expect("stats").dead_letters, 1);
}

/// A buffer whose records were all refused by the broker (dead letters)
/// must still take new records: dead letters count against
/// `max_size` and are evicted along the same lanes, tags first, announced
/// with reason `dead_letter`; `max_age` expires them too.
#[test]
fn dead_letters_are_evicted_by_the_same_limits_and_announced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let limits = Limits {
        max_size: 512 * 1024,
        max_age: Duration::from_secs(3600),
        ..Limits::NONE
    };
    let mut store = open_service(&path, limits).expect("open");
    let tags = StreamKey::new("line1", Kind::Tag);
    let batches = StreamKey::new("line1", Kind::Batch);
    // What a broker that refuses everything leaves behind: every record a
    // dead letter.
    let mut ts = 1_000;
    // Until the file is full of them (moving more fails for want of room).
    for _ in 0..1_000 {
        let records: Vec<NewRecord> = (0..50)
            .map(|i| {
                ts += 1;
                rec(
                    "line1",
                    if i == 0 { Kind::Batch } else { Kind::Tag },
                    ts,
                    200,
                )
            })
            .collect();
        store
            .append(Append::records(&records))
            .expect("append while room");
        let ids: Vec<RecordId> = all(&store, &tags)
            .iter()
            .chain(all(&store, &batches).iter())
            .map(|r| r.id)
            .collect();
        match store.dead_letter(&ids, "broker refused (0x87)") {
            Ok(_) => {}
            Err(e) if e.is_disk_full() => break,
            Err(e) => panic!("dead letter: {e}"),
        }
        if announced(&store).iter().any(|e| e.dead_letters) {
            break;
        }
    }
    let dead = store.stats().expect("stats").dead_letters;
    assert!(dead > 500, "the file is full of dead letters: {dead}");

    // New records keep being accepted, far past what the file could hold.
    for _ in 0..200 {
        let records: Vec<NewRecord> = (0..50)
            .map(|_| {
                ts += 1;
                rec("line1", Kind::Tag, ts, 200)
            })
            .collect();
        store
            .append(Append::records(&records))
            .expect("appends never fail because of dead letters");
    }
    assert!(
        on_disk(&path) <= limits.max_size,
        "{} bytes",
        on_disk(&path)
    );
    let evicted = announced(&store);
    let of_dead: Vec<&Eviction> = evicted.iter().filter(|e| e.dead_letters).collect();
    assert!(
        !of_dead.is_empty(),
        "dead letters were evicted: {evicted:?}"
    );
    // Tags first: the batch dead letters go only once no tag row is left,
    // and in this run pending tags always remain.
    assert!(of_dead.iter().all(|e| e.kind == Kind::Tag), "{of_dead:?}");
    // Within the tag lane, dead letters before pending rows: no pending
    // tag was evicted while a tag dead letter remained.
    let first_pending = evicted.iter().position(|e| !e.dead_letters);
    let last_dead = evicted.iter().rposition(|e| e.dead_letters);
    if let (Some(p), Some(d)) = (first_pending, last_dead) {
        assert!(d < p, "dead letters go first: {evicted:?}");
    }
    let stats = store.stats().expect("stats");
    let tag_stream = stats
        .streams
        .iter()
        .find(|s| s.stream() == tags)
        .expect("tag stream");
    assert_eq!(
        tag_stream.evicted_total,
        evicted
            .iter()
            .filter(|e| e.kind == Kind::Tag)
            .map(|e| e.count)
            .sum::<u64>(),
        "every eviction counted"
    );
    // The events say dead_letter and name the limit.
    let raw: Vec<Value> = all(&store, &agent_events())
        .iter()
        .map(|r| serde_json::from_str(&r.data).expect("json"))
        .filter(|v: &Value| {
            v["type"] == "buffer.evicted" && v["details"]["reason"] == "dead_letter"
        })
        .collect();
    assert!(!raw.is_empty());
    assert!(raw.iter().all(|v| v["details"]["limit"] == "max_size"));

    // max_age takes the remaining dead letters (the batch ones) too.
    let remaining = store.stats().expect("stats").dead_letters;
    assert!(remaining > 0, "batch dead letters are still there");
    let expired = store.evict_expired(ts + 3_600_000 + 1).expect("expire");
    assert!(
        expired
            .iter()
            .any(|e| e.dead_letters && e.kind == Kind::Batch),
        "{expired:?}"
    );
    assert_eq!(store.stats().expect("stats").dead_letters, 0);
    store.integrity_check().expect("integrity");
}

#[test]
fn damaged_segment_is_dropped_and_announced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let tag = StreamKey::new("line1", Kind::Tag);
    let batch = StreamKey::new("line1", Kind::Batch);
    {
        let mut store = Store::open(&path, StoreOptions::default()).expect("open");
        // Three appends: three tag segments of 40 records (seq 1-40, 41-80,
        // 81-120) and three batch segments.
        for round in 0..3 {
            let mut records: Vec<NewRecord> = (0..40)
                .map(|_| rec("line1", Kind::Tag, round, 300))
                .collect();
            records.push(rec("line1", Kind::Batch, round, 50));
            store.append(Append::records(&records)).expect("append");
        }
    }
    // Flip bytes inside the middle tag segment's data, on disk: SQLite's
    // checks do not read blob contents, so only the segment's own checksum
    // can tell.
    let blob: Vec<u8> = rusqlite::Connection::open(&path)
        .expect("open")
        .query_row(
            "SELECT d.blob FROM segment_data d JOIN segments g ON g.id = d.id \
             WHERE g.first_seq = 41 AND g.stream = \
             (SELECT id FROM streams WHERE kind = 'tag')",
            [],
            |r| r.get(0),
        )
        .expect("the middle segment");
    let mut file = std::fs::read(&path).expect("read");
    let probe = &blob[blob.len() / 2..blob.len() / 2 + 32];
    let at = file
        .windows(probe.len())
        .position(|w| w == probe)
        .expect("the segment's bytes in the file");
    for b in &mut file[at..at + 16] {
        *b ^= 0x5A;
    }
    std::fs::write(&path, &file).expect("damage");

    // A tool reports it and changes nothing.
    let tool = Store::open(&path, StoreOptions::default()).expect("tool open");
    match tool.read_after(&tag, 0, 1_000, usize::MAX) {
        Err(BufferError::Damaged { detail, .. }) => assert!(!detail.is_empty()),
        other => panic!("a tool must report the damage, got {other:?}"),
    }
    drop(tool);

    // The service drops the segment, announces exactly its records, and
    // everything else is read as it was.
    let store = open_service(&path, Limits::NONE).expect("service open");
    let tags: Vec<u64> = all(&store, &tag).iter().map(|r| r.seq).collect();
    assert_eq!(tags, (1..=40).chain(81..=120).collect::<Vec<_>>());
    assert_eq!(all(&store, &batch).len(), 3);
    let events = all(&store, &StreamKey::new("", Kind::Event));
    let announced: Vec<Value> = events
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.data).expect("json"))
        .filter(|v| v["type"] == "buffer.evicted")
        .collect();
    assert_eq!(announced.len(), 1, "{announced:?}");
    let d = &announced[0]["details"];
    assert_eq!(
        (
            &d["connection"],
            &d["kind"],
            &d["first_seq"],
            &d["last_seq"],
            &d["count"],
            &d["reason"]
        ),
        (
            &json!("line1"),
            &json!("tag"),
            &json!(41),
            &json!(80),
            &json!(40),
            &json!("damaged")
        )
    );
    let stats = store.stats().expect("stats");
    let s = stats
        .streams
        .iter()
        .find(|s| s.stream() == tag)
        .expect("tag stream");
    assert_eq!((s.records, s.evicted_total), (80, 40));
    store.integrity_check().expect("integrity");
}
