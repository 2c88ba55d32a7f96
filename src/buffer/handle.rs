//! Async face of the buffer: a cloneable handle that sends commands to the
//! one OS thread owning the [`Store`]. Keeping SQLite on its own thread means
//! an fsync stall delays buffer users only, never a tokio worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{Append, BufferError, DeadLetter, Eviction, Limits, ProfileState, Stats, Store};
use crate::record::{NewRecord, StoredRecord, StreamKey};

/// Upper bound on records merged into one coalesced transaction, so a burst
/// cannot hold the write lock (and delay acks and reads) for long. A single
/// larger append is still committed whole: its atomicity is the contract.
pub const MAX_COALESCED_RECORDS: usize = 10_000;

/// Bounded so producers feel back-pressure when the disk falls behind,
/// instead of queueing unbounded batches in RAM.
const QUEUE_DEPTH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, BufferError>>;

/// One queued append: its records, the profile states that go with them, and
/// where to send the seqs.
type AppendJob = (Vec<NewRecord>, Vec<ProfileState>, AppendReply);

/// An append the buffer did not accept, with what it was given, so the
/// caller can hold and retry it without having kept a copy.
#[derive(Debug)]
pub struct Refused {
    pub error: BufferError,
    pub records: Vec<NewRecord>,
    pub states: Vec<ProfileState>,
}

type AppendReply = oneshot::Sender<Result<Vec<u64>, Refused>>;

enum Command {
    Append {
        records: Vec<NewRecord>,
        states: Vec<ProfileState>,
        reply: AppendReply,
    },
    ProfileState {
        connection: String,
        reply: Reply<Option<String>>,
    },
    Streams {
        reply: Reply<Vec<StreamKey>>,
    },
    ReadAfter {
        stream: StreamKey,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
        reply: Reply<Vec<StoredRecord>>,
    },
    Ack {
        ids: Vec<i64>,
        reply: Reply<usize>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    EvictExpired {
        now_ms: i64,
        reply: Reply<Vec<Eviction>>,
    },
    DeadLetter {
        ids: Vec<i64>,
        reason: String,
        reply: Reply<usize>,
    },
    DeadLetters {
        reply: Reply<Vec<DeadLetter>>,
    },
    RetryDeadLetters {
        reply: Reply<usize>,
    },
    SetLimits {
        limits: Limits,
        reply: Reply<()>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Clone)]
pub struct BufferHandle {
    tx: mpsc::Sender<Command>,
    epoch: Arc<str>,
    appended: Arc<Notify>,
    commits: Arc<AtomicU64>,
}

/// The thread side, split from [`BufferHandle::spawn`] so tests can queue
/// work before the thread starts.
struct Worker {
    store: Store,
    rx: mpsc::Receiver<Command>,
    appended: Arc<Notify>,
    commits: Arc<AtomicU64>,
}

impl BufferHandle {
    /// Moves `store` onto a dedicated thread named `plantgate-buffer`.
    ///
    /// # Panics
    /// If the OS refuses to create a thread, like [`std::thread::spawn`];
    /// use [`BufferHandle::try_spawn`] to handle that.
    pub fn spawn(store: Store) -> (BufferHandle, std::thread::JoinHandle<()>) {
        match Self::try_spawn(store) {
            Ok(spawned) => spawned,
            Err(e) => panic!("cannot start the buffer thread: {e}"),
        }
    }

    pub fn try_spawn(store: Store) -> std::io::Result<(BufferHandle, std::thread::JoinHandle<()>)> {
        let (handle, worker) = Self::unstarted(store);
        let thread = std::thread::Builder::new()
            .name("plantgate-buffer".into())
            .spawn(move || worker.run())?;
        Ok((handle, thread))
    }

    fn unstarted(store: Store) -> (BufferHandle, Worker) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let appended = Arc::new(Notify::new());
        let commits = Arc::new(AtomicU64::new(0));
        let handle = BufferHandle {
            tx,
            epoch: Arc::from(store.epoch()),
            appended: appended.clone(),
            commits: commits.clone(),
        };
        let worker = Worker {
            store,
            rx,
            appended,
            commits,
        };
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
    /// input order. Appends queued while another commit runs are merged into
    /// one transaction. Dropping the future after it was queued does not
    /// withdraw the records: they are still committed.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<u64>, BufferError> {
        self.try_append(records, Vec::new())
            .await
            .map_err(|r| r.error)
    }

    /// Appends records with profile snapshots committed in the same
    /// transaction (see [`Store::append`]; when appends are coalesced, the
    /// last state of each connection wins), and hands the records and
    /// states back when they were not accepted, for callers that hold and
    /// retry them (the ingest: nothing offered to the buffer is dropped
    /// silently, docs/guarantees.md).
    pub async fn try_append(
        &self,
        records: Vec<NewRecord>,
        states: Vec<ProfileState>,
    ) -> Result<Vec<u64>, Refused> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(command)) = self
            .tx
            .send(Command::Append {
                records,
                states,
                reply,
            })
            .await
        {
            let (records, states) = match command {
                Command::Append {
                    records, states, ..
                } => (records, states),
                _ => (Vec::new(), Vec::new()),
            };
            return Err(Refused {
                error: BufferError::Closed,
                records,
                states,
            });
        }
        match answer.await {
            Ok(result) => result,
            // The worker dropped the command unanswered: it is closing.
            Err(_) => Err(Refused {
                error: BufferError::Closed,
                records: Vec::new(),
                states: Vec::new(),
            }),
        }
    }

    /// See [`Store::profile_state`].
    pub async fn profile_state(&self, connection: &str) -> Result<Option<String>, BufferError> {
        let connection = connection.to_string();
        self.request(|reply| Command::ProfileState { connection, reply })
            .await
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

    /// See [`Store::ack`].
    pub async fn ack(&self, ids: Vec<i64>) -> Result<usize, BufferError> {
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
    pub async fn dead_letter(&self, ids: Vec<i64>, reason: String) -> Result<usize, BufferError> {
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

    /// Finishes everything queued before this call, closes the database and
    /// stops the thread. Later calls on any clone fail with
    /// [`BufferError::Closed`]. Idempotent.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
    }
}

impl Worker {
    fn run(mut self) {
        let mut held: Option<Command> = None;
        let mut close_reply = None;
        loop {
            let command = match held.take() {
                Some(command) => command,
                None => match self.rx.blocking_recv() {
                    Some(command) => command,
                    // Every handle is gone.
                    None => break,
                },
            };
            match command {
                Command::Append {
                    records,
                    states,
                    reply,
                } => {
                    let mut group = vec![(records, states, reply)];
                    held = self.gather_appends(&mut group);
                    self.commit_group(group);
                }
                Command::Close { reply } => {
                    close_reply = Some(reply);
                    break;
                }
                other => self.answer(other),
            }
        }
        // Close the connection before answering `close()`, so the caller may
        // reopen or remove the file as soon as it returns. Commands still
        // queued are dropped here, which answers them with `Closed`.
        let Worker { store, rx, .. } = self;
        drop(rx);
        drop(store);
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    /// Runs one read or maintenance command and sends its answer.
    fn answer(&mut self, command: Command) {
        match command {
            Command::ProfileState { connection, reply } => {
                let _ = reply.send(self.store.profile_state(&connection));
            }
            Command::Streams { reply } => {
                let _ = reply.send(self.store.streams());
            }
            Command::ReadAfter {
                stream,
                after_seq,
                max_records,
                max_bytes,
                reply,
            } => {
                let result = self
                    .store
                    .read_after(&stream, after_seq, max_records, max_bytes);
                let _ = reply.send(result);
            }
            Command::Ack { ids, reply } => {
                let _ = reply.send(self.store.ack(&ids));
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.store.stats());
            }
            Command::EvictExpired { now_ms, reply } => {
                let result = self.store.evict_expired(now_ms);
                if matches!(&result, Ok(e) if !e.is_empty()) {
                    self.wake();
                }
                let _ = reply.send(result);
            }
            Command::DeadLetter { ids, reason, reply } => {
                let result = self.store.dead_letter(&ids, &reason);
                if matches!(result, Ok(n) if n > 0) {
                    // Its system.error event is a new record.
                    self.wake();
                }
                let _ = reply.send(result);
            }
            Command::DeadLetters { reply } => {
                let _ = reply.send(self.store.dead_letters());
            }
            Command::RetryDeadLetters { reply } => {
                let result = self.store.retry_dead_letters();
                if matches!(result, Ok(n) if n > 0) {
                    self.wake();
                }
                let _ = reply.send(result);
            }
            Command::SetLimits { limits, reply } => {
                let _ = reply.send(self.store.set_limits(limits));
            }
            // `run` handles these itself (coalescing, shutdown).
            Command::Append { .. } | Command::Close { .. } => {}
        }
    }

    /// Pulls the appends that are already queued into `group`, up to
    /// [`MAX_COALESCED_RECORDS`]. Returns the first command that could not
    /// join, to be processed next so the queue order is kept.
    fn gather_appends(&mut self, group: &mut Vec<AppendJob>) -> Option<Command> {
        let mut total: usize = group.iter().map(|(r, _, _)| r.len()).sum();
        while total < MAX_COALESCED_RECORDS {
            match self.rx.try_recv() {
                Ok(Command::Append {
                    records,
                    states,
                    reply,
                }) if total + records.len() <= MAX_COALESCED_RECORDS => {
                    total += records.len();
                    group.push((records, states, reply));
                }
                Ok(other) => return Some(other),
                Err(_) => return None,
            }
        }
        None
    }

    fn commit_group(&mut self, group: Vec<AppendJob>) {
        let mut lens = Vec::with_capacity(group.len());
        let mut replies: Vec<AppendReply> = Vec::with_capacity(group.len());
        let mut all = Vec::new();
        // Kept per append for the one-by-one retry below.
        let mut states_per_append: Vec<Vec<ProfileState>> = Vec::with_capacity(group.len());
        for (records, states, reply) in group {
            lens.push(records.len());
            replies.push(reply);
            all.extend(records);
            states_per_append.push(states);
        }
        // Queue order is production order: a later snapshot of a connection
        // supersedes an earlier one, and committing only the last is exact
        // because all the records of the group commit with it.
        let mut merged: Vec<ProfileState> = Vec::new();
        for state in states_per_append.iter().flatten() {
            match merged.iter_mut().find(|s| s.connection == state.connection) {
                Some(slot) => *slot = state.clone(),
                None => merged.push(state.clone()),
            }
        }
        match self.store.append(Append {
            records: &all,
            states: &merged,
        }) {
            Ok(report) => {
                self.committed(all.len());
                let mut seqs = report.seqs.into_iter();
                for (len, reply) in lens.into_iter().zip(replies) {
                    let _ = reply.send(Ok(seqs.by_ref().take(len).collect()));
                }
            }
            Err(error) if replies.len() == 1 => {
                if let Some(reply) = replies.pop() {
                    let _ = reply.send(Err(Refused {
                        error,
                        records: all,
                        states: merged,
                    }));
                }
            }
            Err(e) => {
                // Retry one by one so each caller gets its own verdict: a
                // disk that is nearly full may still take the smaller ones.
                tracing::warn!(error = %e, appends = replies.len(),
                    "coalesced buffer append failed; retrying individually");
                let mut start = 0;
                for ((len, reply), states) in lens.into_iter().zip(replies).zip(states_per_append) {
                    let part = all.get(start..start + len).unwrap_or_default();
                    start += len;
                    let result = match self.store.append(Append {
                        records: part,
                        states: &states,
                    }) {
                        Ok(report) => {
                            self.committed(part.len());
                            Ok(report.seqs)
                        }
                        Err(error) => Err(Refused {
                            error,
                            records: part.to_vec(),
                            states,
                        }),
                    };
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn committed(&self, records: usize) {
        if records == 0 {
            return;
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.wake();
    }

    /// New rows to publish: wake current waiters and leave a permit.
    fn wake(&self) {
        self.appended.notify_waiters();
        self.appended.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::StoreOptions;
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
        let (buffer, thread) = BufferHandle::spawn(open(&dir));
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

    #[tokio::test]
    async fn queued_appends_commit_in_one_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, worker) = BufferHandle::unstarted(open(&dir));
        let tasks: Vec<_> = (0..100)
            .map(|t| {
                let buffer = buffer.clone();
                tokio::spawn(async move { buffer.append(vec![rec("a", t), rec("b", t)]).await })
            })
            .collect();
        while buffer.tx.max_capacity() - buffer.tx.capacity() < 100 {
            tokio::task::yield_now().await;
        }
        let thread = std::thread::spawn(move || worker.run());
        let mut a_seqs = Vec::new();
        for task in tasks {
            let seqs = task.await.expect("task").expect("append");
            assert_eq!(seqs[0], seqs[1], "streams a and b advance together");
            a_seqs.push(seqs[0]);
        }
        a_seqs.sort_unstable();
        assert_eq!(a_seqs, (1..=100).collect::<Vec<u64>>());
        assert_eq!(buffer.commits(), 1, "100 queued appends, one transaction");
        drop(buffer);
        thread
            .join()
            .expect("thread ends when all handles are dropped");
    }

    #[tokio::test]
    async fn coalesced_appends_keep_the_last_state_per_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, worker) = BufferHandle::unstarted(open(&dir));
        let state = |c: &str, n: i64| ProfileState {
            connection: c.into(),
            snapshot: format!("{{\"n\":{n}}}"),
        };
        // Queued in order before the thread runs: one transaction.
        let mut tasks = Vec::new();
        for n in 1..=3 {
            let b = buffer.clone();
            tasks.push(tokio::spawn(async move {
                b.try_append(vec![rec("a", n)], vec![state("a", n)]).await
            }));
            while buffer_len(&buffer) < n as usize {
                tokio::task::yield_now().await;
            }
        }
        let b = buffer.clone();
        tasks.push(tokio::spawn(async move {
            b.try_append(Vec::new(), vec![state("b", 9)]).await
        }));
        while buffer_len(&buffer) < 4 {
            tokio::task::yield_now().await;
        }
        let thread = std::thread::spawn(move || worker.run());
        for task in tasks {
            task.await.expect("task").expect("append");
        }
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

    fn buffer_len(buffer: &BufferHandle) -> usize {
        buffer.tx.max_capacity() - buffer.tx.capacity()
    }

    #[tokio::test]
    async fn appended_wakes_a_waiter_and_remembers_a_missed_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (buffer, _thread) = BufferHandle::spawn(open(&dir));
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
        let (buffer, thread) = BufferHandle::spawn(store);
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
