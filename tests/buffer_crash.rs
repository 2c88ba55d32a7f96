//! Once an append has returned, the record survives `kill -9` at any
//! instant (docs/guarantees.md). A child process (this same test binary, re-executed) appends
//! in a loop and reports every commit; the parent SIGKILLs it mid-stream and
//! checks the file, three times on the same database.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use plantgate::buffer::{Append, BufferHandle, Store, StoreOptions};
use plantgate::config::Synchronous;
use plantgate::record::{Kind, NewRecord, StreamKey};

const CHILD_ENV: &str = "PLANTGATE_CRASH_CHILD";
const MODE_ENV: &str = "PLANTGATE_CRASH_MODE";
const CHILD_TEST: &str = "crash_child";
/// Failure bound only: nothing waits this long when things work.
const BOUND: Duration = Duration::from_secs(60);
/// Large batches keep the child inside a transaction most of the time, which
/// is where a kill is most interesting.
const BATCH: usize = 500;
const HANDLE_TASKS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Store(Synchronous),
    Handle,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Store(Synchronous::Normal) => "store-normal",
            Mode::Store(Synchronous::Full) => "store-full",
            Mode::Handle => "handle",
        }
    }

    fn parse(s: &str) -> Mode {
        match s {
            "store-full" => Mode::Store(Synchronous::Full),
            "handle" => Mode::Handle,
            _ => Mode::Store(Synchronous::Normal),
        }
    }
}

fn tag() -> StreamKey {
    StreamKey::new("line1", Kind::Tag)
}

fn batch_stream() -> StreamKey {
    StreamKey::new("line1", Kind::Batch)
}

/// Mostly tag records with some batch records interleaved, so two streams
/// share every transaction.
fn records(round: u64) -> Vec<NewRecord> {
    (0..BATCH)
        .map(|j| NewRecord {
            connection: "line1".into(),
            kind: if j % 7 == 0 { Kind::Batch } else { Kind::Tag },
            ts_ms: plantgate::record::now_ms(),
            data: serde_json::json!({ "round": round, "j": j, "pad": "x".repeat(100) }).to_string(),
        })
        .collect()
}

fn last_tag_seq(batch: &[NewRecord], seqs: &[u64]) -> u64 {
    batch
        .iter()
        .zip(seqs)
        .filter(|(r, _)| r.kind == Kind::Tag)
        .map(|(_, seq)| *seq)
        .max()
        .unwrap_or(0)
}

fn report(last: u64) {
    let mut out = std::io::stdout().lock();
    // A broken pipe means the parent is gone: stop rather than run on.
    if writeln!(out, "committed {last}")
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// The child side. A no-op in a normal test run; it does its work only when
/// re-executed by `committed_records_survive_sigkill`.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mode = Mode::parse(&std::env::var(MODE_ENV).unwrap_or_default());
    // Safety net: a child orphaned by a failing parent must not write forever.
    let deadline = Instant::now() + 2 * BOUND;
    match mode {
        Mode::Store(sync) => {
            let options = StoreOptions {
                synchronous: sync,
                ..StoreOptions::default()
            };
            let mut store = Store::open(Path::new(&path), options).expect("child: open");
            let mut round = 0;
            while Instant::now() < deadline {
                let batch = records(round);
                let seqs = store
                    .append(Append::records(&batch))
                    .expect("child: append")
                    .seqs;
                report(last_tag_seq(&batch, &seqs));
                round += 1;
            }
        }
        Mode::Handle => {
            let store =
                Store::open(Path::new(&path), StoreOptions::default()).expect("child: open");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("child: runtime");
            rt.block_on(async move {
                let (buffer, _thread) =
                    BufferHandle::spawn(store, std::sync::Arc::new(plantgate::buffer::Unobserved));
                // Several concurrent producers, so the kill can also land in
                // a coalesced transaction.
                let tasks: Vec<_> = (0..HANDLE_TASKS as u64)
                    .map(|t| {
                        let buffer = buffer.clone();
                        tokio::spawn(async move {
                            let mut round = t * 1_000_000;
                            while Instant::now() < deadline {
                                let batch = records(round);
                                let seqs =
                                    buffer.append(batch.clone()).await.expect("child: append");
                                report(last_tag_seq(&batch, &seqs));
                                round += 1;
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("child: task");
                }
            });
        }
    }
}

/// Kills the child if the parent fails half-way, so no writer is left behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one child until it has reported `commits` commits, SIGKILLs it and
/// returns the highest tag seq it reported as committed.
fn run_and_kill(path: &Path, mode: Mode, commits: usize) -> u64 {
    let exe = std::env::current_exe().expect("current_exe");
    let child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env(MODE_ENV, mode.name())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // libtest may print "test crash_child ... " on the same line first.
    let parse = |line: &str| -> Option<u64> {
        line.split_once("committed ")
            .map(|(_, n)| n.trim().parse().expect("child report"))
    };
    let mut last = 0;
    let mut seen = 0;
    while seen < commits {
        match rx.recv_timeout(BOUND) {
            Ok(line) => {
                if let Some(n) = parse(&line) {
                    last = last.max(n);
                    seen += 1;
                }
            }
            Err(e) => panic!("{mode:?}: child stopped reporting after {seen} commits: {e}"),
        }
    }
    child.0.kill().expect("SIGKILL child");
    let status = child.0.wait().expect("wait child");
    assert!(
        !status.success(),
        "{mode:?}: child was not killed: {status}"
    );
    // Commits printed after our last read but before the kill count too.
    reader.join().expect("reader thread");
    for line in rx.try_iter() {
        if let Some(n) = parse(&line) {
            last = last.max(n);
        }
    }
    last
}

/// Reads a whole stream in bounded pages and checks that seqs run 1..=n
/// without gaps and that every row is intact JSON. Returns n.
fn check_stream(store: &Store, stream: &StreamKey) -> u64 {
    let mut after = 0;
    loop {
        let rows = store
            .read_after(stream, after, 10_000, usize::MAX)
            .expect("read after crash");
        if rows.is_empty() {
            return after;
        }
        for row in rows {
            assert_eq!(row.seq, after + 1, "{stream:?}: gap after seq {after}");
            serde_json::from_str::<serde_json::Value>(&row.data)
                .unwrap_or_else(|e| panic!("{stream:?} seq {}: torn data: {e}", row.seq));
            after = row.seq;
        }
    }
}

#[test]
fn committed_records_survive_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let modes = [
        Mode::Store(Synchronous::Normal),
        Mode::Handle,
        Mode::Store(Synchronous::Full),
    ];
    let mut epoch = None;
    let mut floor = 0;
    for (round, mode) in modes.into_iter().enumerate() {
        let reported = run_and_kill(&path, mode, 3 + 2 * round);
        assert!(reported > floor, "{mode:?}: child reported no progress");

        let mut store = Store::open(&path, StoreOptions::default()).expect("reopen after kill");
        store.integrity_check().expect("integrity after kill");
        let epoch = epoch.get_or_insert_with(|| store.epoch().to_string());
        assert_eq!(store.epoch(), epoch.as_str(), "epoch changed across crash");

        let tags = check_stream(&store, &tag());
        let batches = check_stream(&store, &batch_stream());
        assert!(
            tags >= reported,
            "{mode:?}: reported seq {reported} committed, only {tags} survived"
        );
        assert!(batches > 0);
        eprintln!("{mode:?}: child reported tag seq {reported}, {tags} survived the kill");
        let stats = store.stats().expect("stats");
        assert_eq!(stats.records, tags + batches, "counters match the rows");

        let next = store
            .append(Append::records(&[NewRecord {
                connection: "line1".into(),
                kind: Kind::Tag,
                ts_ms: 0,
                data: serde_json::json!({ "after_crash": round }).to_string(),
            }]))
            .expect("append after crash")
            .seqs;
        assert_eq!(next, vec![tags + 1], "{mode:?}: seq continues after crash");
        floor = tags + 1;
    }
}
