//! The replay requests the uplink has accepted and not yet answered
//! (docs/mqtt.md, replay): a bounded queue served one request at a time,
//! and the token bucket that paces them. It outlives MQTT sessions, so a
//! request cut by a lost connection goes on in the next one from where it
//! stood. What a request is and how it is checked lives in
//! [`crate::replay`]; the session loop that reads and sends is
//! `link/replay.rs`.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::replay::{Bucket, Gaps, Outcome, Request};

/// Requests waiting at most; one more is answered "busy" (never dropped
/// unanswered).
pub const MAX_QUEUED: usize = 16;
/// Records per second a replay may send, and the burst it may start with:
/// well below what the link carries (hundreds of thousands per second), so
/// live data and a backlog keep flowing while a replay runs.
pub const RECORDS_PER_S: u64 = 20_000;
const BURST: u64 = 4_000;
/// Replay messages outstanding at most, apart from the live window.
pub const WINDOW: usize = 8;

/// Where a request's result goes.
#[derive(Clone, Debug)]
pub struct ReplyTo {
    pub topic: String,
    /// MQTT 5 correlation data of the request, sent back with the result.
    pub correlation: Option<Vec<u8>>,
}

/// One accepted request and how far it got.
#[derive(Debug)]
pub struct Job {
    pub request: Request,
    pub reply: ReplyTo,
    pub gaps: Gaps,
    pub received: Instant,
}

pub struct Replays {
    queue: VecDeque<Job>,
    bucket: Bucket,
}

impl Replays {
    pub fn new() -> Replays {
        Replays {
            queue: VecDeque::new(),
            bucket: Bucket::new(RECORDS_PER_S, BURST, std::time::Instant::now()),
        }
    }

    /// Queues a valid request; `Err` with the answer to send when the
    /// queue is full.
    pub fn push(&mut self, request: Request, reply: ReplyTo) -> Result<usize, Outcome> {
        if self.queue.len() >= MAX_QUEUED {
            return Err(Outcome {
                request_id: Some(request.request_id),
                replayed: 0,
                missing: Vec::new(),
                error: Some(format!(
                    "busy: {MAX_QUEUED} replay requests are waiting; ask again later"
                )),
            });
        }
        let gaps = Gaps::new(request.from_seq, request.to_seq);
        self.queue.push_back(Job {
            request,
            reply,
            gaps,
            received: Instant::now(),
        });
        Ok(self.queue.len())
    }

    /// The request being served.
    pub fn current(&mut self) -> Option<&mut Job> {
        self.queue.front_mut()
    }

    /// The request being served is answered.
    pub fn finish(&mut self) -> Option<Job> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Records the bucket lets go now.
    pub fn allowance(&mut self) -> u64 {
        self.bucket.available(std::time::Instant::now())
    }

    pub fn spend(&mut self, records: u64) {
        self.bucket.take(records);
    }

    /// When the bucket holds `records` again.
    pub fn ready_at(&self, records: u64) -> Instant {
        let now = std::time::Instant::now();
        Instant::from_std(self.bucket.ready_at(records, now))
    }
}
