//! A session's part in replays (docs/mqtt.md, replay): requests taken from
//! the commands topic, records read back and sent again with
//! `"replay":true`, results answered. Pacing: live messages keep their own
//! window; a replay has [`replays::WINDOW`] messages of its own and the
//! token bucket of [`Replays`](super::super::replays::Replays).

use tokio::time::Instant;

use super::super::delivery::Message;
use super::super::mqtt::SessionError;
use super::super::replays::{self, Job, ReplyTo};
use super::super::MAX_RECORDS_PER_MESSAGE;
use super::Link;
use crate::record::{StoredRecord, StreamKey};
use crate::replay::{self, Outcome, Scope};

/// A response topic longer than this is not used (the default result
/// topic is).
const MAX_RESPONSE_TOPIC: usize = 1024;

/// What one replay message covered.
struct Sent {
    /// Seqs sent, in order.
    seqs: Vec<u64>,
    /// Every seq up to here was dealt with (sent, or skipped as unsendable).
    covered_to: u64,
}

impl Link<'_> {
    /// A message arrived on a subscribed topic.
    pub(in super::super) async fn on_command(
        &mut self,
        topic: String,
        body: Vec<u8>,
        response_topic: Option<String>,
        correlation: Option<Vec<u8>>,
    ) -> Result<(), SessionError> {
        let up = self.up;
        if topic != up.topics.replay_commands() {
            tracing::debug!(%topic, "message on a topic the agent does not serve; ignored");
            return Ok(());
        }
        let reply = ReplyTo {
            topic: match response_topic {
                Some(t) if usable_response_topic(&t) => t,
                Some(_) => {
                    tracing::warn!("replay request with an unusable response topic; answering on the result topic");
                    up.topics.replay_results()
                }
                None => up.topics.replay_results(),
            },
            correlation,
        };
        let epoch = up.buffer.epoch();
        // Every connection since start: a reload may have removed one whose
        // records are still kept.
        let known: Vec<String> = up
            .board
            .connections()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let scope = Scope {
            epoch: &epoch,
            connections: &known,
            max_records: up.settings.mqtt.replay_max_records,
        };
        let request = match replay::parse(&body, &scope) {
            Ok(request) => request,
            Err(refusal) => {
                tracing::warn!(request_id = refusal.request_id.as_deref().unwrap_or(""),
                    error = %refusal.error, "replay request refused");
                let outcome = Outcome::refused(&refusal);
                if self.delivery.has_replay_room(2 * replays::WINDOW) {
                    self.answer(&reply, &outcome).await?;
                } else {
                    // A flood of bad requests is not answered one by one.
                    tracing::warn!("too many replay requests at once; this refusal is not sent");
                    self.up.board.replay_answered(true);
                }
                return Ok(());
            }
        };
        let (id, s) = (request.request_id.clone(), request.stream.clone());
        let (from, to) = (request.from_seq, request.to_seq);
        match self.replays.push(request, reply.clone()) {
            Ok(queued) => {
                tracing::info!(request_id = %id, connection = %s.connection, kind = %s.kind,
                    from_seq = from, to_seq = to, queued, "replay request accepted");
                up.board.set_replays_queued(queued);
            }
            Err(busy) => {
                tracing::warn!(request_id = %id, "replay request refused: queue full");
                self.answer(&reply, &busy).await?;
            }
        }
        Ok(())
    }

    /// Sends what the current replay may send now. Returns when to come
    /// back if the bucket is empty; None when there is nothing to do or
    /// the replay window is full (an acknowledgement wakes the loop).
    pub(in super::super) async fn replay_step(&mut self) -> Result<Option<Instant>, SessionError> {
        loop {
            if !self.delivery.has_replay_room(replays::WINDOW) {
                return Ok(None);
            }
            let Some(job) = self.replays.current() else {
                return Ok(None);
            };
            if job.gaps.done() {
                if let Some(job) = self.replays.finish() {
                    self.finish(job, None).await?;
                }
                continue;
            }
            let stream = job.request.stream.clone();
            let (from, to) = (job.gaps.next(), job.request.to_seq);
            let request_id = job.request.request_id.clone();
            let allowance = self.replays.allowance();
            if allowance == 0 {
                return Ok(Some(self.replays.ready_at(1_000)));
            }
            let max = (allowance as usize).min(MAX_RECORDS_PER_MESSAGE);
            let max_bytes = self.read_limit(&stream);
            let read = match self
                .up
                .buffer
                .read_range(stream.clone(), from..=to, max, max_bytes)
                .await
            {
                Ok(read) => read,
                Err(e) => {
                    if let Some(job) = self.replays.finish() {
                        let error = format!("the buffer could not be read: {e}");
                        self.finish(job, Some(error)).await?;
                    }
                    continue;
                }
            };
            let covered = match read.records.last() {
                None => read.scanned_to,
                Some(last) => {
                    let last = last.seq;
                    let sent = self.send_again(&stream, read.records, &request_id).await?;
                    let n = sent.seqs.len() as u64;
                    self.replays.spend(n.max(1));
                    self.up.board.add_replayed(n);
                    let Some(job) = self.replays.current() else {
                        return Ok(None);
                    };
                    for seq in sent.seqs {
                        job.gaps.found(seq);
                    }
                    // All of the read went out: everything it looked at is
                    // dealt with.
                    if sent.covered_to >= last {
                        read.scanned_to
                    } else {
                        sent.covered_to
                    }
                }
            };
            if let Some(job) = self.replays.current() {
                job.gaps.looked_up_to(covered);
            }
        }
    }

    /// Sends one message of records read for a replay (a prefix of
    /// `records` that fits; events one per message).
    async fn send_again(
        &mut self,
        stream: &StreamKey,
        mut records: Vec<StoredRecord>,
        request_id: &str,
    ) -> Result<Sent, SessionError> {
        let encoded = self.encode(stream, &records, true);
        records.truncate(encoded.n);
        let covered_to = records.last().map_or(0, |r| r.seq);
        if let Some(why) = self.limit.exceeded(&encoded.topic, encoded.len()) {
            // The record was dead-lettered for this when it was live; it
            // cannot be sent now either: reported missing.
            tracing::warn!(request_id, connection = %stream.connection, kind = %stream.kind,
                seq = covered_to, %why, "a replayed record is too large for one message; reported missing");
            return Ok(Sent {
                seqs: Vec::new(),
                covered_to,
            });
        }
        self.publish_encoded(encoded).await?;
        self.delivery.submitted(Message::Replay {
            request_id: request_id.to_string(),
        });
        Ok(Sent {
            seqs: records.iter().map(|r| r.seq).collect(),
            covered_to,
        })
    }

    /// Answers a finished (or failed) request.
    async fn finish(&mut self, job: Job, error: Option<String>) -> Result<(), SessionError> {
        let Job {
            request,
            reply,
            gaps,
            received,
        } = job;
        let (replayed, missing) = gaps.finish();
        let outcome = Outcome {
            request_id: Some(request.request_id.clone()),
            replayed,
            missing,
            error,
        };
        let s = &request.stream;
        tracing::info!(request_id = %request.request_id, connection = %s.connection, kind = %s.kind,
            from_seq = request.from_seq, to_seq = request.to_seq, replayed,
            missing_ranges = outcome.missing.len(), error = outcome.error.as_deref().unwrap_or(""),
            duration_ms = received.elapsed().as_millis() as u64, "replay request answered");
        self.up.board.set_replays_queued(self.replays.len());
        self.answer(&reply, &outcome).await
    }

    /// Publishes a result (QoS 1), with the request's correlation data.
    async fn answer(&mut self, reply: &ReplyTo, outcome: &Outcome) -> Result<(), SessionError> {
        let body = outcome.encode();
        if let Some(why) = self.limit.exceeded(&reply.topic, body.len()) {
            tracing::error!(topic = %reply.topic, %why, "replay result too large for the broker; not sent");
            return Ok(());
        }
        self.session
            .respond(reply.topic.clone(), body, reply.correlation.clone())
            .await?;
        self.delivery.submitted(Message::Replay {
            request_id: outcome.request_id.clone().unwrap_or_default(),
        });
        self.up.board.replay_answered(outcome.error.is_some());
        Ok(())
    }
}

/// A response topic the agent may publish to: a plain topic name.
fn usable_response_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_RESPONSE_TOPIC && !topic.contains(['+', '#', '\0'])
}
