//! Async face of the buffer: a cloneable handle that sends commands to the
//! one OS thread owning the [`Store`]. Keeping SQLite on its own thread means
//! an fsync stall delays buffer users only, never a tokio worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::intake::{IntakeObserver, Outlet, Submission, QUEUED_RECORDS};
use super::worker::{Command, Reply, Worker};
use super::{BufferError, DeadLetter, Eviction, Limits, RangeRead, Stats, Store, TagMark};
use crate::record::{NewRecord, RecordId, StoredRecord, StreamKey};

/// Bounded so callers feel back-pressure when the disk falls behind,
/// instead of queueing unbounded commands in RAM.
const QUEUE_DEPTH: usize = 1024;

#[derive(Clone)]
pub struct BufferHandle {
    tx: mpsc::Sender<Command>,
    outlet: Outlet,
    epoch: Arc<str>,
    appended: Arc<Notify>,
    commits: Arc<AtomicU64>,
}

impl BufferHandle {
    /// Moves `store` onto a dedicated thread named `plantgate-buffer`;
    /// `observer` hears how the intake fares (the agent's status board).
    ///
    /// # Panics
    /// If the OS refuses to create a thread, like [`std::thread::spawn`];
    /// use [`BufferHandle::try_spawn`] to handle that.
    pub fn spawn(
        store: Store,
        observer: Arc<dyn IntakeObserver>,
    ) -> (BufferHandle, std::thread::JoinHandle<()>) {
        match Self::try_spawn(store, observer) {
            Ok(spawned) => spawned,
            Err(e) => panic!("cannot start the buffer thread: {e}"),
        }
    }

    pub fn try_spawn(
        store: Store,
        observer: Arc<dyn IntakeObserver>,
    ) -> std::io::Result<(BufferHandle, std::thread::JoinHandle<()>)> {
        let (handle, worker) = Self::unstarted(store, observer);
        // The thread's own runtime serves only its timers (retry backoff,
        // the alive beat); the store's calls block it by design.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("plantgate-buffer".into())
            .spawn(move || worker.run(runtime))?;
        Ok((handle, thread))
    }

    fn unstarted(store: Store, observer: Arc<dyn IntakeObserver>) -> (BufferHandle, Worker) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (outlet, intake) = Outlet::queue(QUEUED_RECORDS);
        let appended = Arc::new(Notify::new());
        let commits = Arc::new(AtomicU64::new(0));
        let handle = BufferHandle {
            tx,
            outlet,
            epoch: Arc::from(store.epoch()),
            appended: appended.clone(),
            commits: commits.clone(),
        };
        let worker = Worker::new(store, rx, intake, observer, appended, commits);
        (handle, worker)
    }

    pub fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, BufferError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| BufferError::Closed)?;
        answer.await.map_err(|_| BufferError::Closed)?
    }

    /// Resolves once the records are committed (accepted), with their seqs in
    /// input order, or with the store's error (nothing held or retried:
    /// for the agent's own events, whose callers log a failure). Submissions
    /// queued at the time join the same transaction. Dropping the future
    /// after it was queued does not withdraw the records.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<u64>, BufferError> {
        self.request(|reply| Command::Append { records, reply })
            .await
    }

    /// Hands events of the agent itself over the way connections hand over
    /// their records: held and retried while the store refuses for a
    /// passing reason (another process holding the write lock: exactly
    /// when some of these events are raised), reported if they never can
    /// be stored. Returns at once: the caller (the uplink, a monitor) must
    /// not wait for the disk.
    pub fn record_events(&self, events: Vec<NewRecord>) {
        let outlet = self.outlet.clone();
        tokio::spawn(async move {
            let n = events.len();
            if outlet.submit(Submission::records(events)).await.is_err() {
                tracing::warn!(events = n, "buffer closed; events not recorded");
            }
        });
    }

    /// Where connections submit their records (the one hand-off,
    /// [`Outlet`]): committed in coalesced transactions, held and retried
    /// while the store refuses for a passing reason, and reported to the
    /// observer either way.
    pub fn outlet(&self) -> Outlet {
        self.outlet.clone()
    }

    /// Waits until everything submitted before the call is committed; what
    /// the store still refuses after `within` is dropped and reported.
    /// For shutdown, once the connections have stopped.
    pub async fn flush(&self, within: Duration) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Flush { within, reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    /// See [`Store::profile_state`].
    pub async fn profile_state(&self, connection: &str) -> Result<Option<String>, BufferError> {
        let connection = connection.to_string();
        self.request(|reply| Command::ProfileState { connection, reply })
            .await
    }

    /// See [`Store::tag_marks`].
    pub async fn tag_marks(&self, connection: &str) -> Result<Vec<TagMark>, BufferError> {
        let connection = connection.to_string();
        self.request(|reply| Command::TagMarks { connection, reply })
            .await
    }

    /// See [`Store::next_bd_seq`].
    pub async fn next_bd_seq(&self) -> Result<u8, BufferError> {
        self.request(|reply| Command::NextBdSeq { reply }).await
    }

    pub async fn streams(&self) -> Result<Vec<StreamKey>, BufferError> {
        self.request(|reply| Command::Streams { reply }).await
    }

    /// See [`Store::read_after`].
    pub async fn read_after(
        &self,
        stream: StreamKey,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, BufferError> {
        self.request(|reply| Command::ReadAfter {
            stream,
            after_seq,
            max_records,
            max_bytes,
            reply,
        })
        .await
    }

    /// See [`Store::read_range`].
    pub async fn read_range(
        &self,
        stream: StreamKey,
        seqs: std::ops::RangeInclusive<u64>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<RangeRead, BufferError> {
        self.request(|reply| Command::ReadRange {
            stream,
            seqs,
            max_records,
            max_bytes,
            reply,
        })
        .await
    }

    /// See [`Store::ack`].
    pub async fn ack(&self, ids: Vec<RecordId>) -> Result<usize, BufferError> {
        self.request(|reply| Command::Ack { ids, reply }).await
    }

    pub async fn stats(&self) -> Result<Stats, BufferError> {
        self.request(|reply| Command::Stats { reply }).await
    }

    /// See [`Store::evict_expired`]; the agent calls it periodically. The
    /// `buffer.evicted` events it writes wake [`BufferHandle::appended`].
    pub async fn evict_expired(&self, now_ms: i64) -> Result<Vec<Eviction>, BufferError> {
        self.request(|reply| Command::EvictExpired { now_ms, reply })
            .await
    }

    /// See [`Store::dead_letter`]: for records the broker rejected
    /// repeatedly.
    pub async fn dead_letter(
        &self,
        ids: Vec<RecordId>,
        reason: String,
    ) -> Result<usize, BufferError> {
        self.request(|reply| Command::DeadLetter { ids, reason, reply })
            .await
    }

    /// See [`Store::dead_letters`].
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BufferError> {
        self.request(|reply| Command::DeadLetters { reply }).await
    }

    /// See [`Store::retry_dead_letters`]. Wakes [`BufferHandle::appended`]
    /// when rows came back.
    pub async fn retry_dead_letters(&self) -> Result<usize, BufferError> {
        self.request(|reply| Command::RetryDeadLetters { reply })
            .await
    }

    /// See [`Store::set_limits`].
    pub async fn set_limits(&self, limits: Limits) -> Result<(), BufferError> {
        self.request(|reply| Command::SetLimits { limits, reply })
            .await
    }

    /// Signalled after every commit that added records. Both current waiters
    /// are woken and a permit is stored, so a single consumer that was busy
    /// when the commit happened still sees it on its next `notified().await`.
    /// Wake-ups can be spurious: re-check the buffer after each one.
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    /// Append transactions committed so far (a coalesced group counts once);
    /// with the record count it shows how well batching works.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Finishes everything queued before this call (submissions the store
    /// refuses now are dropped and reported), closes the database and
    /// stops the thread. Later calls on any clone fail with
    /// [`BufferError::Closed`]. Idempotent.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Limits, ProfileState, StoreOptions, Submission, TagMark, Unobserved};
    use crate::record::Kind;
    use serde_json::json;
    use std::time::Duration;

    fn rec(connection: &str, n: i64) -> NewRecord {
        NewRecord {
            connection: connection.into(),
            kind: Kind::Tag,
            ts_ms: n,
            data: json!({ "n": n }).to_string(),
        }
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("buffer.db"), StoreOptions::default()).expect("open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_distinct_continuous_seqs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, thread) = BufferHandle::spawn(open(&dir), Arc::new(Unobserved));
        let tasks: Vec<_> = (0..50)
            .map(|t| {
                let buffer = buffer.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..10 {
                        let batch = (0..3).map(|j| rec("line1", t * 100 + i * 3 + j)).collect();
                        let got = buffer.append(batch).await.expect("append");
                        assert_eq!(got.len(), 3);
                        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
                        seqs.extend(got);
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("task"));
        }
        all.sort_unstable();
        assert_eq!(all, (1..=1500).collect::<Vec<u64>>());
        let stats = buffer.stats().await.expect("stats");
        assert_eq!(stats.records, 1500);
        buffer.close().await;
        thread.join().expect("thread");
    }

    /// What the worker reported, in order.
    #[derive(Default)]
    struct Log(std::sync::Mutex<Vec<String>>);

    impl Log {
        fn push(&self, line: String) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    impl IntakeObserver for Log {
        fn accepted(&self, c: &str, n: u64, _: u64, _: i64) {
            self.push(format!("accepted {c} {n}"));
        }
        fn dropped(&self, c: &str, n: u64, _: Option<&str>) {
            self.push(format!("dropped {c} {n}"));
        }
        fn blocked(&self, reason: Option<&str>) {
            self.push(format!("blocked {}", reason.is_some()));
        }
        fn alive(&self) {}
    }

    fn start(worker: Worker) -> std::thread::JoinHandle<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        std::thread::spawn(move || worker.run(runtime))
    }

    #[tokio::test]
    async fn queued_submissions_commit_in_one_transaction_and_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(Log::default());
        let (buffer, worker) = BufferHandle::unstarted(open(&dir), log.clone());
        let outlet = buffer.outlet();
        for t in 0..100 {
            outlet
                .submit(Submission::records(vec![rec("a", t), rec("b", t)]))
                .await
                .expect("queued");
        }
        let thread = start(worker);
        buffer.flush(Duration::from_secs(30)).await;
        assert_eq!(
            buffer.commits(),
            1,
            "100 queued submissions, one transaction"
        );
        assert_eq!(buffer.stats().await.expect("stats").records, 200);
        assert_eq!(log.lines(), vec!["accepted a 100", "accepted b 100"]);
        // Seqs follow the submission order within each stream.
        let rows = buffer
            .read_after(StreamKey::new("a", Kind::Tag), 0, 1000, usize::MAX)
            .await
            .expect("read");
        let order: Vec<i64> = rows.iter().map(|r| r.ts_ms).collect();
        assert_eq!(order, (0..100).collect::<Vec<i64>>());
        drop((buffer, outlet));
        thread
            .join()
            .expect("thread ends when all handles are dropped");
    }

    #[tokio::test]
    async fn coalesced_submissions_keep_the_last_state_per_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, worker) = BufferHandle::unstarted(open(&dir), Arc::new(Unobserved));
        let state = |c: &str, n: i64| ProfileState {
            connection: c.into(),
            snapshot: format!("{{\"n\":{n}}}"),
        };
        // Queued in order before the thread runs: one transaction.
        let outlet = buffer.outlet();
        for n in 1..=3 {
            let s = Submission::with_state(vec![rec("a", n)], state("a", n));
            outlet.submit(s).await.expect("queued");
        }
        let s = Submission::with_state(Vec::new(), state("b", 9));
        outlet.submit(s).await.expect("queued");
        let thread = start(worker);
        buffer.flush(Duration::from_secs(30)).await;
        assert_eq!(buffer.commits(), 1, "one transaction for the group");
        assert_eq!(
            buffer.profile_state("a").await.expect("state").as_deref(),
            Some("{\"n\":3}")
        );
        assert_eq!(
            buffer.profile_state("b").await.expect("state").as_deref(),
            Some("{\"n\":9}")
        );
        assert_eq!(buffer.profile_state("c").await.expect("state"), None);
        buffer.close().await;
        thread.join().expect("thread");
    }

    fn mark(connection: &str, tag: &str, last_ms: i64, gaps: &[(i64, i64)]) -> TagMark {
        TagMark {
            connection: connection.into(),
            tag: tag.into(),
            last_ms,
            gaps: gaps.to_vec(),
        }
    }

    #[tokio::test]
    async fn coalesced_submissions_keep_the_last_mark_per_tag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, worker) = BufferHandle::unstarted(open(&dir), Arc::new(Unobserved));
        // Queued in order before the thread runs: one transaction.
        let outlet = buffer.outlet();
        for n in 1..=3 {
            let s = Submission::with_marks(
                vec![rec("a", n)],
                None,
                vec![
                    mark("a", "T1", n, &[(0, n)]),
                    mark("a", &format!("U{n}"), n, &[]),
                ],
            );
            outlet.submit(s).await.expect("queued");
        }
        let s = Submission::with_marks(Vec::new(), None, vec![mark("b", "T1", 9, &[])]);
        outlet.submit(s).await.expect("queued");
        let thread = start(worker);
        buffer.flush(Duration::from_secs(30)).await;
        assert_eq!(buffer.commits(), 1, "one transaction for the group");
        assert_eq!(buffer.stats().await.expect("stats").records, 3);
        assert_eq!(
            buffer.tag_marks("a").await.expect("marks"),
            vec![
                mark("a", "T1", 3, &[(0, 3)]),
                mark("a", "U1", 1, &[]),
                mark("a", "U2", 2, &[]),
                mark("a", "U3", 3, &[]),
            ]
        );
        assert_eq!(
            buffer.tag_marks("b").await.expect("marks"),
            vec![mark("b", "T1", 9, &[])]
        );

        // Marks alone, on their own, are committed too.
        outlet
            .submit(Submission::with_marks(
                Vec::new(),
                None,
                vec![mark("b", "T1", 10, &[(9, 10)])],
            ))
            .await
            .expect("queued");
        buffer.flush(Duration::from_secs(30)).await;
        assert_eq!(
            buffer.tag_marks("b").await.expect("marks"),
            vec![mark("b", "T1", 10, &[(9, 10)])]
        );
        buffer.close().await;
        thread.join().expect("thread");
    }

    /// Another connection to the file takes the write lock, as
    /// `sqlite3 buffer.db` or `plantgate buffer retry` would.
    fn lock(dir: &tempfile::TempDir) -> rusqlite::Connection {
        let other = rusqlite::Connection::open(dir.path().join("buffer.db")).expect("open");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        other
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_refused_under_a_lock_are_held_while_reads_go_on_then_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(Log::default());
        let (buffer, thread) = BufferHandle::spawn(open(&dir), log.clone());
        let other = lock(&dir);
        let outlet = buffer.outlet();
        outlet
            .submit(Submission::records(vec![rec("a", 1), rec("a", 2)]))
            .await
            .expect("queued");
        while !log.lines().contains(&"blocked true".to_string()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Held, not dropped; the worker still answers reads.
        assert_eq!(buffer.stats().await.expect("stats").records, 0);
        outlet
            .submit(Submission::records(vec![rec("a", 3)]))
            .await
            .expect("queued behind the held ones");
        other.execute_batch("ROLLBACK").expect("unlock");
        buffer.flush(Duration::from_secs(60)).await;
        let rows = buffer
            .read_after(StreamKey::new("a", Kind::Tag), 0, 10, usize::MAX)
            .await
            .expect("read");
        assert_eq!(
            rows.iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let lines = log.lines();
        assert!(!lines.iter().any(|l| l.starts_with("dropped")), "{lines:?}");
        assert_eq!(
            lines.last().map(String::as_str),
            Some("accepted a 1"),
            "{lines:?}"
        );
        assert!(lines.contains(&"blocked false".to_string()), "{lines:?}");
        buffer.close().await;
        thread.join().expect("thread");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_that_cannot_wait_longer_drops_and_reports_what_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(Log::default());
        let (buffer, thread) = BufferHandle::spawn(open(&dir), log.clone());
        let other = lock(&dir);
        buffer
            .outlet()
            .submit(Submission::records(vec![rec("a", 1), rec("a", 2)]))
            .await
            .expect("queued");
        buffer.flush(Duration::from_millis(100)).await;
        let lines = log.lines();
        assert!(lines.contains(&"dropped a 2".to_string()), "{lines:?}");
        assert!(
            !lines.iter().any(|l| l.starts_with("accepted")),
            "{lines:?}"
        );
        drop(other);
        assert_eq!(buffer.stats().await.expect("stats").records, 0);
        buffer.close().await;
        thread.join().expect("thread");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_marks_wait_with_their_records_and_the_newest_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(Log::default());
        let (buffer, worker) = BufferHandle::unstarted(open(&dir), log.clone());
        let other = lock(&dir);
        // Two submissions gathered into one transaction that the lock
        // refuses: both are held, their marks merged.
        let outlet = buffer.outlet();
        for n in 1..=2 {
            let s = Submission::with_marks(
                vec![rec("a", n)],
                None,
                vec![mark("a", "T1", n, &[(0, n)])],
            );
            outlet.submit(s).await.expect("queued");
        }
        let thread = start(worker);
        while !log.lines().contains(&"blocked true".to_string()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Neither the records nor their marks are stored meanwhile.
        assert_eq!(buffer.stats().await.expect("stats").records, 0);
        assert_eq!(
            buffer.tag_marks("a").await.expect("marks"),
            Vec::<TagMark>::new()
        );
        other.execute_batch("ROLLBACK").expect("unlock");
        buffer.flush(Duration::from_secs(60)).await;
        assert_eq!(buffer.stats().await.expect("stats").records, 2);
        assert_eq!(
            buffer.tag_marks("a").await.expect("marks"),
            vec![mark("a", "T1", 2, &[(0, 2)])]
        );
        let lines = log.lines();
        assert!(!lines.iter().any(|l| l.starts_with("dropped")), "{lines:?}");
        buffer.close().await;
        thread.join().expect("thread");
    }

    use crate::buffer::store::replay_tests::noise;

    #[tokio::test]
    async fn a_submission_the_store_can_never_take_is_dropped_with_its_marks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            limits: Limits {
                max_size: 320 * 1024,
                ..Limits::NONE
            },
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("buffer.db"), options).expect("open");
        let log = Arc::new(Log::default());
        let (buffer, thread) = BufferHandle::spawn(store, log.clone());
        let outlet = buffer.outlet();
        outlet
            .submit(Submission::with_marks(
                vec![rec("a", 1)],
                None,
                vec![mark("a", "T1", 1, &[])],
            ))
            .await
            .expect("queued");
        buffer.flush(Duration::from_secs(30)).await;
        // Larger than the whole buffer.
        let big = (0..1000)
            .map(|i| NewRecord {
                data: noise(i, 1000),
                ..rec("a", 1000 + i as i64)
            })
            .collect();
        outlet
            .submit(Submission::with_marks(
                big,
                None,
                vec![
                    mark("a", "T1", 1999, &[(1, 1000)]),
                    mark("a", "T2", 1999, &[]),
                ],
            ))
            .await
            .expect("queued");
        buffer.flush(Duration::from_secs(30)).await;
        let lines = log.lines();
        assert!(lines.contains(&"dropped a 1000".to_string()), "{lines:?}");
        assert_eq!(
            buffer.tag_marks("a").await.expect("marks"),
            vec![mark("a", "T1", 1, &[])],
            "the marks went with their records"
        );
        buffer.close().await;
        thread.join().expect("thread");
    }

    #[tokio::test]
    async fn appended_wakes_a_waiter_and_remembers_a_missed_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, _thread) = BufferHandle::spawn(open(&dir), Arc::new(Unobserved));
        let notify = buffer.appended();

        let waiter = tokio::spawn({
            let notify = notify.clone();
            async move { notify.notified().await }
        });
        // Give the waiter a chance to register; correctness does not depend
        // on it because of the stored permit.
        tokio::task::yield_now().await;
        buffer.append(vec![rec("line1", 1)]).await.expect("append");
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("waiter woken")
            .expect("task");

        // Nobody waiting during this commit: the permit makes the next wait
        // return at once.
        buffer.append(vec![rec("line1", 2)]).await.expect("append");
        tokio::time::timeout(Duration::from_secs(30), notify.notified())
            .await
            .expect("missed commit remembered");
        buffer.close().await;
    }

    #[tokio::test]
    async fn handle_round_trips_reads_acks_and_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let epoch = store.epoch().to_string();
        let (buffer, thread) = BufferHandle::spawn(store, Arc::new(Unobserved));
        assert_eq!(&*buffer.epoch(), epoch);
        assert_eq!(
            buffer.append(vec![]).await.expect("append"),
            Vec::<u64>::new()
        );
        buffer
            .append((1..=5).map(|n| rec("line1", n)).collect())
            .await
            .expect("append");
        let key = StreamKey::new("line1", Kind::Tag);
        assert_eq!(buffer.streams().await.expect("streams"), vec![key.clone()]);
        let rows = buffer
            .read_after(key.clone(), 2, 2, usize::MAX)
            .await
            .expect("read");
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(
            buffer
                .ack(rows.iter().map(|r| r.id).collect())
                .await
                .expect("ack"),
            2
        );
        assert_eq!(buffer.stats().await.expect("stats").records, 3);

        let other = buffer.clone();
        buffer.close().await;
        thread.join().expect("thread");
        assert!(matches!(other.stats().await, Err(BufferError::Closed)));
        assert!(matches!(
            other.append(vec![rec("x", 1)]).await,
            Err(BufferError::Closed)
        ));
        other.close().await;

        // Closed means the file is released and consistent for the next owner.
        let store = open(&dir);
        assert_eq!(store.epoch(), epoch);
        assert_eq!(store.stats().expect("stats").records, 3);
    }
}
