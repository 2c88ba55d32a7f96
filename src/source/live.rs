//! One OPC UA session of a plant connection, from connect to its end:
//! [`Live::open`] discovers the endpoint, connects, resolves namespaces and
//! subscribes; [`Live::run`] then watches it (events, keep-alive watchdog,
//! retries of bad tags) and performs the profile's reads. The reconnect loop
//! around it is `source::run_connection`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opcua::client::{Client, Session};
use opcua::types::{NodeId, ReadValueId, StatusCode, TimestampsToReturn};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backfill::reader;
use super::bad_tags::{self, BadTagReports, BadTags};
use super::feed::{Feed, FeedTx};
use super::reporter::ConnectionReporter;
use super::session::{
    self, AbortOnDrop, Item, LoopEvent, Monitored, Notices, PublishClock, SourceError,
    Subscriptions,
};
use super::tags::{Retag, TagTable};
use super::value;
use super::value::TagIndex;
use crate::config::{Backfill, ConnectionConfig};
use crate::profile::{NodeKey, ReadRequest};
use crate::record::now_ms;
use crate::status::ConnState;

/// How long a fresh session may take from TCP connect to activated.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the polite CloseSession at shutdown or before a rebuild.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest keep-alive window the watchdog accepts from a server.
pub(super) const MAX_KEEP_ALIVE: Duration = Duration::from_secs(3600);

/// What a session works with, owned by the connection.
pub(super) struct Ctx<'a> {
    pub conn: &'a ConnectionConfig,
    pub records: &'a FeedTx,
    pub reporter: &'a ConnectionReporter,
    pub cancel: &'a CancellationToken,
    pub notices: &'a Arc<Notices>,
}

/// Why a session ended.
pub(super) struct Failure {
    pub error: SourceError,
    /// How long the session had been online, if it got there.
    pub online_for: Option<Duration>,
}

impl From<SourceError> for Failure {
    fn from(error: SourceError) -> Self {
        Failure {
            error,
            online_for: None,
        }
    }
}

/// Runs one session until the cancel token fires (Ok) or the session fails
/// (Err). Every [`Feed::Connected`] it sends is paired with one
/// [`Feed::Disconnected`] when it fails, during setup or later.
pub(super) async fn run(
    ctx: &Ctx<'_>,
    tags: &mut TagTable,
    client: &mut Client,
    reads: &mut mpsc::UnboundedReceiver<ReadRequest>,
    reports: &mut BadTagReports,
) -> Result<(), Failure> {
    // Reads asked for on the previous session die with it; the profile asks
    // again after `on_connected`.
    while reads.try_recv().is_ok() {}
    let started = Instant::now();
    let mut told_connected = false;
    // Until online, cancellation simply drops whatever is in flight.
    let opened = tokio::select! {
        _ = ctx.cancel.cancelled() => return Ok(()),
        r = Live::open(ctx, tags, client, &mut told_connected) => r,
    };
    let result = match opened {
        Ok(live) => live.run(ctx, tags, reads, reports, started).await,
        Err(e) => Err(Failure::from(e)),
    };
    if result.is_err() && told_connected {
        let _ = ctx.records.send(Feed::Disconnected { at_ms: now_ms() });
    }
    result
}

struct Live {
    session: Arc<Session>,
    events: mpsc::UnboundedReceiver<LoopEvent>,
    clock: Arc<PublishClock>,
    _event_loop: AbortOnDrop,
    subscriptions: Subscriptions,
    /// Tags that cannot be monitored now.
    bad: BadTags,
    /// Monitored items, by tag index.
    items: HashMap<TagIndex, Item>,
    /// The profile's nodes as resolved on this session, for its reads.
    nodes: HashMap<NodeKey, NodeId>,
    /// The reader of gaps (docs/backfill.md), ended with the session.
    _backfill: Option<AbortOnDrop>,
}

impl Live {
    /// Connects and subscribes. `told_connected` is set once the driver was
    /// sent [`Feed::Connected`].
    async fn open(
        ctx: &Ctx<'_>,
        tags: &TagTable,
        client: &mut Client,
        told_connected: &mut bool,
    ) -> Result<Live, SourceError> {
        let conn = ctx.conn;
        let Connected {
            session,
            events,
            events_tx,
            clock,
            guard,
        } = connect(conn, client, ctx.notices).await?;
        // Namespace indexes may differ after every server restart: `nsu=`
        // tags are resolved against the array of this session.
        let namespaces = session::read_namespaces(&session).await?;
        let (ok, mut bad) = tags.resolve(&namespaces);
        let nodes = tags.profile_nodes(&ok);
        let backfill = (conn.backfill == Backfill::History).then(|| {
            reader::spawn(
                session.clone(),
                namespaces.clone(),
                Arc::from(conn.id.as_str()),
                ctx.records.clone(),
            )
        });
        if tags.has_profile() || backfill.is_some() {
            // Before any monitored item exists, so the profile and the
            // backfill marks hear of the session before its first values.
            let _ = ctx.records.send(Feed::Connected {
                at_ms: now_ms(),
                backfill: backfill.as_ref().map(|(work, _)| work.clone()),
            });
            *told_connected = true;
        }
        let subscriptions = session::create_subscriptions(
            &session,
            conn.publishing_interval,
            tags.len(),
            tags.notifier(
                &conn.id,
                ctx.records,
                events_tx,
                ctx.notices,
                backfill.is_some(),
            ),
        )
        .await?;
        let Monitored { created, refused } = session::monitor_tags(
            &session,
            &subscriptions,
            &tags.plans,
            &ok,
            conn.publishing_interval,
        )
        .await?;
        bad_tags::merge(&mut bad, refused);
        Ok(Live {
            session,
            events,
            clock,
            _event_loop: guard,
            subscriptions,
            bad,
            items: created.into_iter().collect(),
            nodes,
            _backfill: backfill.map(|(_, guard)| guard),
        })
    }

    /// Watches the subscribed session until it fails or `cancel`.
    async fn run(
        mut self,
        ctx: &Ctx<'_>,
        tags: &mut TagTable,
        reads: &mut mpsc::UnboundedReceiver<ReadRequest>,
        reports: &mut BadTagReports,
        started: Instant,
    ) -> Result<(), Failure> {
        let conn = ctx.conn;
        let retry_every = conn
            .reconnect_max
            .clamp(Duration::from_secs(5), Duration::from_secs(60));
        if !self.bad.is_empty() {
            let _ = ctx.records.send(Feed::records(session::bad_records(
                &conn.id,
                &tags.plans,
                &self.bad,
            )));
        }
        self.report_bad(ctx, tags, reports, retry_every).await;
        // Without this the client may not send Publish requests on a new session.
        self.session.trigger_publish_now();
        self.clock.touch();
        ctx.reporter
            .set_state(ConnState::Online, "subscribed")
            .await;
        tracing::info!(
            connection = %conn.id,
            setup_ms = started.elapsed().as_millis() as u64,
            tags = self.items.len(),
            bad = self.bad.len(),
            subscriptions = self.subscriptions.len(),
            "OPC UA session subscribed"
        );
        // Subscribing thousands of items is the largest burst of a session.
        crate::heap::release_free();
        let online_at = Instant::now();
        let result = self.watch(ctx, tags, reads, reports, retry_every).await;
        result.map_err(|error| Failure {
            error,
            online_for: Some(online_at.elapsed()),
        })
    }

    /// The select loop of a subscribed session.
    async fn watch(
        &mut self,
        ctx: &Ctx<'_>,
        tags: &mut TagTable,
        reads: &mut mpsc::UnboundedReceiver<ReadRequest>,
        reports: &mut BadTagReports,
        retry_every: Duration,
    ) -> Result<(), SourceError> {
        let keep_alive = self.keep_alive(ctx.conn);
        let silent_limit = keep_alive * 3 + Duration::from_secs(1);
        let mut watchdog = tokio::time::interval((keep_alive / 2).max(Duration::from_millis(200)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval_at(Instant::now() + retry_every, retry_every);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => {
                    self.disconnect().await;
                    return Ok(());
                }
                ev = self.events.recv() => {
                    if self.on_event(ctx, tags, reports, ev, retry_every).await? {
                        // Not sooner than a full interval from now.
                        retry.reset();
                    }
                }
                Some(request) = reads.recv() => self.read(ctx.records, request),
                _ = watchdog.tick() => {
                    let silent = self.clock.silent_for();
                    if silent > silent_limit {
                        self.disconnect().await;
                        return Err(SourceError::Silent(silent));
                    }
                }
                _ = retry.tick(), if !self.bad.is_empty() => {
                    self.retry_bad(ctx, tags, reports, retry_every).await?;
                }
                update = tags.updated() => {
                    let retag = tags.retag(&update);
                    self.retagged(ctx, tags, retag, reports, retry_every).await?;
                }
            }
        }
    }

    /// The keep-alive window of what the server agreed to (it may have
    /// revised interval and count); the watchdog allows three.
    fn keep_alive(&self, conn: &ConnectionConfig) -> Duration {
        let (interval, count) = self
            .session
            .subscription_state()
            .lock()
            .get(self.subscriptions.first())
            .map(|s| (s.publishing_interval(), s.max_keep_alive_count()))
            .unwrap_or((conn.publishing_interval, session::KEEP_ALIVE_COUNT));
        let far_up = conn
            .publishing_interval
            .saturating_mul(10)
            .max(Duration::from_secs(10));
        if interval > far_up {
            tracing::warn!(connection = %conn.id, requested_ms = conn.publishing_interval.as_millis() as u64,
                revised_ms = interval.as_millis() as u64, "server revised the publishing interval far up");
        }
        keep_alive_window(interval, count)
    }

    /// Announces tags newly unavailable (and forgets those monitored again).
    async fn report_bad(
        &self,
        ctx: &Ctx<'_>,
        tags: &TagTable,
        reports: &mut BadTagReports,
        retry_every: Duration,
    ) {
        reports
            .report(
                ctx.reporter,
                &tags.plans,
                &self.bad,
                &self.items,
                retry_every,
            )
            .await;
    }

    async fn disconnect(&self) {
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, self.session.disconnect()).await;
    }

    /// Handles an event of the OPC UA event loop; Err ends the session, Ok
    /// (true) when a tag went bad (the retry timer restarts).
    async fn on_event(
        &mut self,
        ctx: &Ctx<'_>,
        tags: &TagTable,
        reports: &mut BadTagReports,
        ev: Option<LoopEvent>,
        retry_every: Duration,
    ) -> Result<bool, SourceError> {
        match ev {
            Some(LoopEvent::Connected) => self.session.trigger_publish_now(),
            Some(LoopEvent::Lost(code) | LoopEvent::ConnectFailed(code)) => {
                return Err(SourceError::ua(code, "connection lost"));
            }
            Some(LoopEvent::SubscriptionStatus(code)) => {
                self.disconnect().await;
                return Err(SourceError::ua(code, "subscription ended by the server"));
            }
            Some(LoopEvent::NodeGone(i, status)) => {
                // The bad tag record itself came with the notification. Drop
                // the dead item and let the retry timer re-create it once
                // the node exists again.
                if let Some(item) = self.items.remove(&i) {
                    session::unmonitor(&self.session, item).await;
                }
                let new = !self.bad.iter().any(|(j, _)| *j == i);
                if new {
                    bad_tags::merge(&mut self.bad, [(i, status)]);
                }
                self.report_bad(ctx, tags, reports, retry_every).await;
                return Ok(new);
            }
            None => {
                return Err(SourceError::ua(
                    StatusCode::BadConnectionClosed,
                    "event loop ended",
                ))
            }
        }
        Ok(false)
    }

    /// Tries the bad tags again: a node missing now may exist after a
    /// server download or restart.
    async fn retry_bad(
        &mut self,
        ctx: &Ctx<'_>,
        tags: &TagTable,
        reports: &mut BadTagReports,
        retry_every: Duration,
    ) -> Result<(), SourceError> {
        let namespaces = session::read_namespaces(&self.session).await?;
        let (retry, mut still_bad) = tags.resolve_some(&self.bad, &namespaces);
        if !retry.is_empty() {
            let monitored = session::monitor_tags(
                &self.session,
                &self.subscriptions,
                &tags.plans,
                &retry,
                ctx.conn.publishing_interval,
            )
            .await?;
            bad_tags::merge(&mut still_bad, monitored.refused);
            // Profile nodes that resolve now become readable too (a
            // namespace that appeared after a server download).
            let created: HashMap<TagIndex, Item> = monitored.created.into_iter().collect();
            let resolved = retry.iter().filter(|(i, _)| created.contains_key(i));
            self.nodes
                .extend(tags.profile_nodes(&resolved.cloned().collect::<Vec<_>>()));
            self.items.extend(created);
        }
        let changed: Vec<(TagIndex, StatusCode)> = still_bad
            .iter()
            .filter(|(i, s)| !self.bad.iter().any(|(j, t)| i == j && s == t))
            .copied()
            .collect();
        if !changed.is_empty() {
            let _ = ctx.records.send(Feed::records(session::bad_records(
                &ctx.conn.id,
                &tags.plans,
                &changed,
            )));
        }
        self.bad = still_bad;
        self.report_bad(ctx, tags, reports, retry_every).await;
        Ok(())
    }

    /// Changes the monitored items of this session to a reload's new tag
    /// list ([`TagTable::retag`]): the retired tags' items are deleted, the
    /// new ones created in the running subscriptions; the other tags and
    /// the session are not touched. A new tag the server does not have is
    /// bad like any other (a bad record, announced, retried).
    async fn retagged(
        &mut self,
        ctx: &Ctx<'_>,
        tags: &TagTable,
        retag: Retag,
        reports: &mut BadTagReports,
        retry_every: Duration,
    ) -> Result<(), SourceError> {
        if retag.is_empty() {
            return Ok(());
        }
        let mut gone: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
        for i in &retag.retired {
            if let Some(item) = self.items.remove(i) {
                gone.entry(item.subscription).or_default().push(item.id);
            }
        }
        self.bad.retain(|(i, _)| !retag.retired.contains(i));
        reports.forget(&retag.retired);
        for (subscription, ids) in gone {
            session::unmonitor_all(&self.session, subscription, &ids).await;
        }
        let namespaces = session::read_namespaces(&self.session).await?;
        let (ok, mut bad) = tags.resolve_indexes(retag.added.clone(), &namespaces);
        let monitored = session::monitor_tags(
            &self.session,
            &self.subscriptions,
            &tags.plans,
            &ok,
            ctx.conn.publishing_interval,
        )
        .await?;
        bad_tags::merge(&mut bad, monitored.refused);
        let created = monitored.created.len();
        self.items.extend(monitored.created);
        if !bad.is_empty() {
            let _ = ctx.records.send(Feed::records(session::bad_records(
                &ctx.conn.id,
                &tags.plans,
                &bad,
            )));
        }
        tracing::info!(
            connection = %ctx.conn.id,
            added = retag.added.len(),
            monitored = created,
            bad = bad.len(),
            removed = retag.retired.len(),
            "reload: tags changed in the running subscription"
        );
        bad_tags::merge(&mut self.bad, bad);
        self.report_bad(ctx, tags, reports, retry_every).await;
        Ok(())
    }

    /// Performs one profile read in its own task (the select loop keeps
    /// watching meanwhile); the answer goes to the driver in order with the
    /// values. A failed read is dropped: the profile asks again after the
    /// next `on_connected`.
    fn read(&self, records: &FeedTx, request: ReadRequest) {
        let session = self.session.clone();
        let records = records.clone();
        let resolved: Vec<(NodeKey, NodeId)> = request
            .keys
            .iter()
            .filter_map(|k| self.nodes.get(k).map(|n| (*k, n.clone())))
            .collect();
        tokio::spawn(async move {
            match read(&session, &request, &resolved).await {
                Ok(results) => {
                    let _ = records.send(Feed::ReadDone {
                        id: request.id,
                        results,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, request = request.id, "profile read failed; dropped")
                }
            }
        });
    }
}

/// A session activated, not subscribed yet.
pub(super) struct Connected {
    pub session: Arc<Session>,
    pub events: mpsc::UnboundedReceiver<LoopEvent>,
    /// For the subscription callbacks' word to the session (a node gone).
    pub events_tx: mpsc::UnboundedSender<LoopEvent>,
    pub clock: Arc<PublishClock>,
    pub guard: AbortOnDrop,
}

/// The first half of every session, the service's and the one-shot
/// commands' (`source::open`): the configured endpoint and security pair
/// found among those the server offers, its certificate checked, the
/// session created and activated with the configured identity.
pub(super) async fn connect(
    conn: &ConnectionConfig,
    client: &mut Client,
    notices: &Arc<Notices>,
) -> Result<Connected, SourceError> {
    let identity = session::identity(conn);
    let endpoint = session::discover_endpoint(client, conn, &identity).await?;
    session::vet_endpoint(&endpoint, conn, &identity, notices).await?;
    let (session, event_loop) = client
        .connect_to_endpoint_directly(endpoint, identity)
        .map_err(|e| SourceError::ua(e.status(), format!("connect: {e}")))?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let clock = Arc::new(PublishClock::new());
    let guard = AbortOnDrop::new(session::spawn_event_loop(
        event_loop,
        events_tx.clone(),
        clock.clone(),
        notices.clone(),
    ));
    await_connected(&mut events).await?;
    Ok(Connected {
        session,
        events,
        events_tx,
        clock,
        guard,
    })
}

/// Waits for the event loop's first word on a new session.
async fn await_connected(
    events: &mut mpsc::UnboundedReceiver<LoopEvent>,
) -> Result<(), SourceError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, events.recv()).await {
        Ok(Some(LoopEvent::Connected)) => Ok(()),
        Ok(Some(
            LoopEvent::ConnectFailed(code)
            | LoopEvent::Lost(code)
            | LoopEvent::SubscriptionStatus(code)
            | LoopEvent::NodeGone(_, code),
        )) => Err(SourceError::ua(code, "connect")),
        Ok(None) => Err(SourceError::ua(
            StatusCode::BadConnectionClosed,
            "event loop ended",
        )),
        Err(_) => Err(SourceError::ua(StatusCode::BadTimeout, "connect timed out")),
    }
}

/// One profile Read: one result per key, `good` false for a Bad status or a
/// node that does not resolve on this server.
async fn read(
    session: &Session,
    request: &ReadRequest,
    resolved: &[(NodeKey, NodeId)],
) -> Result<Vec<(NodeKey, serde_json::Value, bool)>, SourceError> {
    let ids: Vec<ReadValueId> = resolved
        .iter()
        .map(|(_, n)| ReadValueId::from(n.clone()))
        .collect();
    let values = if ids.is_empty() {
        Vec::new()
    } else {
        tokio::time::timeout(
            session::REQUEST_TIMEOUT,
            session.read(&ids, TimestampsToReturn::Both, 0.0),
        )
        .await
        .map_err(|_| SourceError::ua(StatusCode::BadTimeout, "Read timed out"))?
        .map_err(|e| SourceError::ua(e.status(), format!("Read: {e}")))?
    };
    Ok(request
        .keys
        .iter()
        .map(|key| {
            let value = resolved
                .iter()
                .position(|(k, _)| k == key)
                .and_then(|i| values.get(i));
            match value {
                Some(dv) => {
                    let v = dv
                        .value
                        .as_ref()
                        .map(value::variant_to_json)
                        .unwrap_or(serde_json::Value::Null);
                    (*key, v, dv.status().is_good())
                }
                None => (*key, serde_json::Value::Null, false),
            }
        })
        .collect())
}

/// The subscription's keep-alive window from what the server agreed to.
/// The values are the server's: checked arithmetic and a clamp, because an
/// absurd revision must not panic the connection task (docs/guarantees.md).
pub(super) fn keep_alive_window(interval: Duration, count: u32) -> Duration {
    interval
        .max(Duration::from_millis(1))
        .checked_mul(count.max(1))
        .unwrap_or(MAX_KEEP_ALIVE)
        .min(MAX_KEEP_ALIVE)
}
