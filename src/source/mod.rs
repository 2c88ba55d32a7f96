//! The OPC UA client side: one task per configured plant connection that
//! connects, subscribes to the configured tags, turns data changes into `tag`
//! records and heals itself (docs/guarantees.md).
//!
//! Design choices:
//! - Every (re)connect is a fresh session built by us: endpoints discovered
//!   again, namespace URIs re-resolved, subscription and monitored items
//!   re-created. The library's own reconnect loop is not used: it retries
//!   forever even on rejected credentials and its subscriptions can go silent
//!   after a reconnect.
//! - The subscription callback runs on the OPC UA event loop; it converts and
//!   pushes one Vec per publish response into the intake queue (`intake`),
//!   bounded by a value budget. A driver task hands them to the reporter
//!   (which waits on the bounded queue into the buffer), so the event loop
//!   never blocks and a value is only dropped, counted and announced, when a
//!   stalled buffer has filled both queues (docs/guarantees.md).
//! - States: `connecting` until the first subscription is up, `online` while
//!   subscribed, then `offline` / `auth_required` / `untrusted` with the
//!   status code name as reason. Retries while not online do not flap through
//!   `connecting` (one state change, one log line, one event per outage).

pub mod intake;
pub mod pki;
mod session;
pub mod value;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opcua::client::{Client, Session};
use opcua::types::{NodeId, ReadValueId, StatusCode, TimestampsToReturn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{ConnectionConfig, ConnectionKind};
use crate::profile::{NodeKey, Output, Profile, ReadRequest};
use crate::record::{now_ms, NewRecord};
use crate::status::{ConnState, ConnectionReporter};

use intake::Feed;
pub use session::SourceError;
use session::{Item, LoopEvent, Monitored, PublishClock, TagPlan};
use value::TagMeta;

/// How long a fresh session may take from TCP connect to activated.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the polite CloseSession at shutdown or before a rebuild.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Records handed to the reporter in one go when the forwarder is behind.
const FORWARD_BATCH: usize = 5_000;

/// How often the profile gets a clock tick (OEE windows close on ticks).
const TICK: Duration = Duration::from_secs(1);

/// Runs one plant connection until `cancel`: connect, subscribe, report,
/// reconnect with backoff forever. The profile starts fresh.
pub async fn run_connection(
    conn: ConnectionConfig,
    pki_dir: PathBuf,
    reporter: ConnectionReporter,
    cancel: CancellationToken,
) {
    run_connection_restored(conn, pki_dir, reporter, None, cancel).await
}

/// [`run_connection`] whose profile continues from `saved`, the snapshot
/// last committed for this connection (`Store::profile_state`).
pub async fn run_connection_restored(
    conn: ConnectionConfig,
    pki_dir: PathBuf,
    reporter: ConnectionReporter,
    saved: Option<String>,
    cancel: CancellationToken,
) {
    let profile = match conn.kind {
        // Tags only: nothing to derive, nothing to persist.
        ConnectionKind::Generic => None,
        ConnectionKind::Deltav | ConnectionKind::Optomes => {
            Some(restored_profile(&conn, saved.as_deref()))
        }
    };
    let mut all_plans = session::plan_tags(&conn);
    if let Some(p) = &profile {
        all_plans.extend(session::plan_profile_nodes(&conn, &p.nodes()));
    }
    let profile_keys: Arc<Vec<Option<NodeKey>>> =
        Arc::new(all_plans.iter().map(|p| p.profile).collect());
    let (records_tx, records_rx) = intake::channel(reporter.intake_loss());
    let forwarder = tokio::spawn(drive(records_rx, reporter.clone(), profile));
    let plans = Arc::new(all_plans);
    let metas: Arc<Vec<Arc<TagMeta>>> = Arc::new(plans.iter().map(|p| p.meta.clone()).collect());
    let mut backoff = Backoff::new(conn.reconnect_initial, conn.reconnect_max);
    let mut client: Option<Client> = None;
    let mut state = ConnState::Connecting;
    // Tags reported bad (system.error) and still bad: one event per tag and
    // status, not one per reconnect.
    let mut reported_bad: HashMap<usize, StatusCode> = HashMap::new();
    let mut expiry_watch: Option<AbortOnDrop> = None;
    // Announcements due once per connection start or per tag (values too
    // large, a changed server certificate, a cleartext password).
    let notices = Arc::new(session::Notices::new(&reporter, &pki_dir));

    reporter
        .set_state(ConnState::Connecting, "connecting")
        .await;
    loop {
        let failure = match ensure_client(&mut client, &conn, &pki_dir, &cancel).await {
            Err(e) => Failure::from(e),
            Ok(None) if cancel.is_cancelled() => break,
            Ok(new_own) => {
                if let (Some(own), None) = (new_own, &expiry_watch) {
                    expiry_watch = Some(AbortOnDrop(tokio::spawn(watch_expiry(
                        own,
                        reporter.clone(),
                    ))));
                }
                let ctx = SessionCtx {
                    conn: &conn,
                    plans: &plans,
                    metas: &metas,
                    profile_keys: &profile_keys,
                    records: &records_tx,
                    reporter: &reporter,
                    cancel: &cancel,
                    notices: &notices,
                };
                match client.as_mut() {
                    Some(client) => {
                        let mut told_connected = false;
                        let result = run_session(
                            ctx,
                            client,
                            &mut state,
                            &mut reported_bad,
                            &mut told_connected,
                        )
                        .await;
                        match result {
                            Ok(()) => break,
                            Err(f) => {
                                if told_connected {
                                    // Every `Connected` is paired with one
                                    // `Disconnected`, whether the session
                                    // failed during setup or later.
                                    let _ = records_tx.send(Feed::Disconnected { at_ms: now_ms() });
                                }
                                f
                            }
                        }
                    }
                    None => Failure::from(SourceError::Client("client missing".into())),
                }
            }
        };
        if cancel.is_cancelled() {
            break;
        }
        // Only a session that stayed up for a while proves the connection
        // healthy: one that comes up and dies at once (a value the decoder
        // cannot take, a server that drops us after subscribing) must not
        // reconnect at full speed forever (docs/guarantees.md).
        if let Some(up_for) = failure.online_for {
            backoff.connection_ended(up_for);
        }
        let next = classify(&failure.error);
        let reason = failure.error.reason();
        tracing::debug!(connection = %conn.id, error = %failure.error, "OPC UA session ended");
        reporter.set_state(next, &reason).await;
        if next == ConnState::AuthRequired && state != ConnState::AuthRequired {
            reporter
                .event(
                    "connection.auth_required",
                    serde_json::json!({ "status": reason, "endpoint": conn.endpoint }),
                )
                .await;
        }
        state = next;
        // Rejected credentials or certificates will not fix themselves
        // quickly: do not hammer the server.
        let delay = match next {
            ConnState::AuthRequired | ConnState::Untrusted => backoff.slow(),
            _ => backoff.next_delay(),
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    drop(expiry_watch);
    let _ = records_tx.send(Feed::Stop);
    drop(records_tx);
    drop(client);
    // Values already received are still delivered (the sessions, and with
    // them the callback's senders, are gone now).
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
}

/// Builds the connection's profile and restores its saved snapshot. A
/// snapshot that cannot be used is logged and ignored: the profile starts
/// fresh, which at worst repeats an event already reported (at-least-once).
fn restored_profile(conn: &ConnectionConfig, saved: Option<&str>) -> Profile {
    let mut profile = Profile::new(conn);
    if let Some(text) = saved {
        let result = serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| crate::profile::SnapshotError::Malformed(e.to_string()))
            .and_then(|snapshot| profile.restore(&snapshot));
        if let Err(e) = result {
            tracing::warn!(connection = %conn.id, error = %e, "saved profile state not usable; starting fresh");
            profile = Profile::new(conn);
        }
    }
    profile
}

/// The live session the profile's reads go to.
struct ReadTarget {
    session: Arc<Session>,
    nodes: HashMap<NodeKey, NodeId>,
}

/// The connection's driver: hands tag records to the reporter and runs the
/// profile (publishes, ticks, connection changes, reads). One task owns the
/// profile, so its inputs are applied in the order the session produced
/// them. Records and the snapshot after them go out together, so they
/// commit in one transaction.
async fn drive(mut rx: intake::FeedRx, reporter: ConnectionReporter, mut profile: Option<Profile>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut target: Option<ReadTarget> = None;
    let mut pending: Vec<NewRecord> = Vec::new();
    let mut stop = false;
    while !stop {
        // Whether the profile produced something since the last hand-over.
        let mut dirty = false;
        tokio::select! {
            feed = rx.recv() => {
                let mut next = feed;
                loop {
                    match next {
                        None | Some(Feed::Stop) => {
                            stop = true;
                            break;
                        }
                        Some(feed) => {
                            apply(feed, &mut profile, &mut target, &mut pending, &mut dirty, &reporter)
                                .await
                        }
                    }
                    // Coalesce what queued up while the buffer was busy:
                    // fewer, larger commits.
                    if pending.len() >= FORWARD_BATCH {
                        break;
                    }
                    match rx.try_recv() {
                        Some(feed) => next = Some(feed),
                        None => break,
                    }
                }
            }
            _ = tick.tick(), if profile.is_some() => {
                if let Some(p) = profile.as_mut() {
                    let out = p.on_tick(now_ms());
                    run_output(out, p, &target, &mut pending, &mut dirty, reporter.id()).await;
                }
            }
        }
        // At the stop, the snapshot goes out even when nothing changed: a
        // restart continues exactly where this run stopped.
        hand_over(&reporter, &profile, &mut pending, dirty || stop).await;
    }
    // Dropping the session here lets its subscription (and the senders it
    // holds) go.
    drop(target);
}

/// Sends the pending records, with the profile's snapshot when the profile
/// changed (or at shutdown).
async fn hand_over(
    reporter: &ConnectionReporter,
    profile: &Option<Profile>,
    pending: &mut Vec<NewRecord>,
    with_state: bool,
) {
    let records = std::mem::take(pending);
    match profile {
        Some(p) if with_state => {
            reporter
                .records_with_state(records, p.snapshot().to_string())
                .await
        }
        _ => reporter.records(records).await,
    }
}

async fn apply(
    feed: Feed,
    profile: &mut Option<Profile>,
    target: &mut Option<ReadTarget>,
    pending: &mut Vec<NewRecord>,
    dirty: &mut bool,
    reporter: &ConnectionReporter,
) {
    let id = reporter.id();
    match feed {
        Feed::Publish { records, samples } => {
            pending.extend(records);
            if let (Some(p), false) = (profile.as_mut(), samples.is_empty()) {
                let out = p.on_values(&samples);
                run_output(out, p, target, pending, dirty, id).await;
            }
        }
        Feed::Connected {
            session,
            nodes,
            at_ms,
        } => {
            *target = Some(ReadTarget { session, nodes });
            if let Some(p) = profile.as_mut() {
                let out = p.on_connected(at_ms);
                run_output(out, p, target, pending, dirty, id).await;
            }
        }
        // Handled by the caller (`drive`), which ends on it.
        Feed::Stop => {}
        Feed::Resolved(nodes) => {
            if let Some(t) = target.as_mut() {
                t.nodes.extend(nodes);
            }
        }
        Feed::Disconnected { at_ms } => {
            // Reads not yet performed are dropped with the session; the
            // profile asks again after the next `on_connected`.
            *target = None;
            if let Some(p) = profile.as_mut() {
                let out = p.on_disconnected(at_ms);
                run_output(out, p, target, pending, dirty, id).await;
            }
        }
    }
}

/// Takes an output's records and performs its reads (and the reads their
/// answers ask for), feeding the answers back to the profile.
async fn run_output(
    out: Output,
    profile: &mut Profile,
    target: &Option<ReadTarget>,
    pending: &mut Vec<NewRecord>,
    dirty: &mut bool,
    connection: &str,
) {
    let mut queue: VecDeque<Output> = VecDeque::from([out]);
    while let Some(out) = queue.pop_front() {
        if out.is_empty() {
            continue;
        }
        *dirty = true;
        pending.extend(out.records);
        for request in out.reads {
            let Some(target) = target else {
                tracing::debug!(
                    connection,
                    request = request.id,
                    "profile read dropped: no session"
                );
                continue;
            };
            match read(target, &request).await {
                Ok(results) => queue.push_back(profile.on_read(request.id, &results)),
                Err(e) => {
                    // The session is failing; the profile asks again after
                    // the next `on_connected`.
                    tracing::warn!(connection, error = %e, "profile read failed; dropped");
                }
            }
        }
    }
}

/// Performs one profile Read on the live session: one result per key, `good`
/// false for a Bad status or a node that does not resolve on this server.
async fn read(
    target: &ReadTarget,
    request: &ReadRequest,
) -> Result<Vec<(NodeKey, serde_json::Value, bool)>, SourceError> {
    let resolved: Vec<(NodeKey, NodeId)> = request
        .keys
        .iter()
        .filter_map(|k| target.nodes.get(k).map(|n| (*k, n.clone())))
        .collect();
    let ids: Vec<ReadValueId> = resolved
        .iter()
        .map(|(_, n)| ReadValueId::from(n.clone()))
        .collect();
    let values = if ids.is_empty() {
        Vec::new()
    } else {
        tokio::time::timeout(
            session::REQUEST_TIMEOUT,
            target.session.read(&ids, TimestampsToReturn::Both, 0.0),
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
                    let good = dv.status().is_good();
                    let v = dv
                        .value
                        .as_ref()
                        .map(value::variant_to_json)
                        .unwrap_or(serde_json::Value::Null);
                    (*key, v, good)
                }
                None => (*key, serde_json::Value::Null, false),
            }
        })
        .collect())
}

/// Builds the client if there is none yet (first attempt, or after a PKI
/// error). Returns the own certificate when it built one; None when a client
/// existed or the task was cancelled meanwhile.
async fn ensure_client(
    slot: &mut Option<Client>,
    conn: &ConnectionConfig,
    pki_dir: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<Option<pki::OwnCertificate>, SourceError> {
    if slot.is_some() {
        return Ok(None);
    }
    let (conn, pki_dir) = (conn.clone(), pki_dir.to_path_buf());
    // Creating the certificate generates an RSA key: seconds on a small box.
    let build = tokio::task::spawn_blocking(move || session::build_client(&conn, &pki_dir));
    let built = tokio::select! {
        _ = cancel.cancelled() => return Ok(None),
        r = build => r.map_err(|e| SourceError::Client(format!("client setup task failed: {e}")))??,
    };
    let (client, own) = built;
    *slot = Some(client);
    Ok(Some(own))
}

/// Warns (agent-level `system.error`) at start and daily while the own
/// certificate expires within 30 days. The certificate is shared by all
/// connections of the process: `claim_expiry_warning` lets one speak.
async fn watch_expiry(own: pki::OwnCertificate, reporter: ConnectionReporter) {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let pki_dir = own
        .cert_path
        .parent()
        .and_then(|p| p.parent())
        .map(std::path::Path::to_path_buf);
    let mut own = own;
    loop {
        // Re-read: an operator may have replaced the certificate meanwhile.
        if let Some(Ok(current)) = pki_dir.as_deref().map(pki::read_own) {
            own = current;
        }
        if let Some(details) = pki::expiry_warning(&own, chrono::Utc::now()) {
            if pki::claim_expiry_warning(&own.cert_path) {
                tracing::warn!(certificate = %own.cert_path.display(), not_after = %own.not_after, "OPC UA application certificate expires soon");
                reporter.agent_event("system.error", details).await;
            }
        }
        tokio::time::sleep(DAY).await;
    }
}

struct SessionCtx<'a> {
    conn: &'a ConnectionConfig,
    plans: &'a Arc<Vec<TagPlan>>,
    metas: &'a Arc<Vec<Arc<TagMeta>>>,
    profile_keys: &'a Arc<Vec<Option<NodeKey>>>,
    records: &'a intake::FeedTx,
    reporter: &'a ConnectionReporter,
    cancel: &'a CancellationToken,
    notices: &'a Arc<session::Notices>,
}

struct Failure {
    error: SourceError,
    /// How long the session had been online, if it got there.
    online_for: Option<Duration>,
}

impl From<SourceError> for Failure {
    fn from(error: SourceError) -> Self {
        Failure {
            error,
            online_for: None,
        }
    }
}

/// Aborts the event-loop task however the session ends: dropping the loop
/// closes the TCP connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs until the cancel token fires (Ok) or the session fails (Err).
async fn run_session(
    ctx: SessionCtx<'_>,
    client: &mut Client,
    state: &mut ConnState,
    reported_bad: &mut HashMap<usize, StatusCode>,
    told_connected: &mut bool,
) -> Result<(), Failure> {
    let conn = ctx.conn;
    let identity = session::identity(conn);
    let attempt_started = tokio::time::Instant::now();

    // Until online, cancellation simply drops whatever is in flight.
    let setup = async {
        let endpoint = session::discover_endpoint(client, conn, &identity).await?;
        session::vet_endpoint(&endpoint, conn, &identity, ctx.notices).await?;
        let (session, event_loop) = client
            .connect_to_endpoint_directly(endpoint, identity.clone())
            .map_err(|e| SourceError::ua(e.status(), format!("connect: {e}")))?;
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let clock = Arc::new(PublishClock::new());
        let guard = AbortOnDrop(session::spawn_event_loop(
            event_loop,
            events_tx.clone(),
            clock.clone(),
            ctx.notices.clone(),
        ));
        match tokio::time::timeout(CONNECT_TIMEOUT, events_rx.recv()).await {
            Ok(Some(LoopEvent::Connected)) => {}
            Ok(Some(
                LoopEvent::ConnectFailed(code)
                | LoopEvent::Lost(code)
                | LoopEvent::SubscriptionStatus(code)
                | LoopEvent::NodeGone(_, code),
            )) => {
                return Err(SourceError::ua(code, "connect"));
            }
            Ok(None) => {
                return Err(SourceError::ua(
                    StatusCode::BadConnectionClosed,
                    "event loop ended",
                ))
            }
            Err(_) => return Err(SourceError::ua(StatusCode::BadTimeout, "connect timed out")),
        }

        // Namespace indexes may differ after every server restart: `nsu=`
        // tags are resolved against the array of this session.
        let namespaces = session::read_namespaces(&session).await?;
        let (ok, mut bad) = resolve_all(ctx.plans, &namespaces);
        if ctx.profile_keys.iter().any(Option::is_some) {
            // Before any monitored item exists, so the profile hears of the
            // session before its first values.
            let nodes: HashMap<NodeKey, NodeId> = ok
                .iter()
                .filter_map(|(i, id)| ctx.plans[*i].profile.map(|k| (k, id.clone())))
                .collect();
            let _ = ctx.records.send(Feed::Connected {
                session: session.clone(),
                nodes,
                at_ms: now_ms(),
            });
            *told_connected = true;
        }
        let subscriptions = session::create_subscriptions(
            &session,
            conn.publishing_interval,
            ctx.plans.len(),
            session::Notifier {
                connection: Arc::from(conn.id.as_str()),
                tags: ctx.metas.clone(),
                profile: ctx.profile_keys.clone(),
                records: ctx.records.clone(),
                events: events_tx,
                notices: ctx.notices.clone(),
            },
        )
        .await?;
        let Monitored { created, refused } = session::monitor_tags(
            &session,
            &subscriptions,
            ctx.plans,
            &ok,
            conn.publishing_interval,
        )
        .await?;
        bad.extend(refused);
        bad.sort_by_key(|(i, _)| *i);
        let items: HashMap<usize, Item> = created.into_iter().collect();
        Ok::<_, SourceError>((session, events_rx, clock, guard, subscriptions, bad, items))
    };
    let (session, mut events_rx, clock, _guard, subscriptions, mut bad, mut items) = tokio::select! {
        _ = ctx.cancel.cancelled() => return Ok(()),
        r = setup => r?,
    };

    let retry_every = conn
        .reconnect_max
        .clamp(Duration::from_secs(5), Duration::from_secs(60));
    if !bad.is_empty() {
        let _ = ctx.records.send(Feed::records(session::bad_records(
            &conn.id, ctx.plans, &bad,
        )));
    }
    report_bad(&ctx, reported_bad, &bad, &items, retry_every).await;
    // Without this the client may not send Publish requests on a new session.
    session.trigger_publish_now();
    clock.touch();
    ctx.reporter
        .set_state(ConnState::Online, "subscribed")
        .await;
    *state = ConnState::Online;
    tracing::info!(
        connection = %conn.id,
        setup_ms = attempt_started.elapsed().as_millis() as u64,
        tags = items.len(),
        bad = bad.len(),
        subscriptions = subscriptions.len(),
        "OPC UA session subscribed"
    );
    // Subscribing thousands of items is the largest burst of a session.
    crate::heap::release_free();
    let online_at = tokio::time::Instant::now();
    let online = |error: SourceError| Failure {
        error,
        online_for: Some(online_at.elapsed()),
    };

    // The server may have revised interval and count: watch what it agreed to.
    let (interval, count) = session
        .subscription_state()
        .lock()
        .get(subscriptions.first())
        .map(|s| (s.publishing_interval(), s.max_keep_alive_count()))
        .unwrap_or((conn.publishing_interval, session::KEEP_ALIVE_COUNT));
    let keep_alive = keep_alive_window(interval, count);
    if interval
        > conn
            .publishing_interval
            .saturating_mul(10)
            .max(Duration::from_secs(10))
    {
        tracing::warn!(connection = %conn.id, requested_ms = conn.publishing_interval.as_millis() as u64,
            revised_ms = interval.as_millis() as u64, "server revised the publishing interval far up");
    }
    let silent_limit = keep_alive * 3 + Duration::from_secs(1);
    let mut watchdog = tokio::time::interval((keep_alive / 2).max(Duration::from_millis(200)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry =
        tokio::time::interval_at(tokio::time::Instant::now() + retry_every, retry_every);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => {
                let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, session.disconnect()).await;
                return Ok(());
            }
            ev = events_rx.recv() => match ev {
                Some(LoopEvent::Connected) => session.trigger_publish_now(),
                Some(LoopEvent::Lost(code) | LoopEvent::ConnectFailed(code)) => {
                    return Err(online(SourceError::ua(code, "connection lost")));
                }
                Some(LoopEvent::SubscriptionStatus(code)) => {
                    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, session.disconnect()).await;
                    return Err(online(SourceError::ua(code, "subscription ended by the server")));
                }
                Some(LoopEvent::NodeGone(i, status)) => {
                    // The bad tag record itself came with the notification.
                    // Drop the dead item and let the retry timer re-create it
                    // once the node exists again.
                    if let Some(item) = items.remove(&i) {
                        session::unmonitor(&session, item).await;
                    }
                    if !bad.iter().any(|(j, _)| *j == i) {
                        bad.push((i, status));
                        bad.sort_by_key(|(i, _)| *i);
                        // Not sooner than a full interval from now.
                        retry.reset();
                    }
                    report_bad(&ctx, reported_bad, &bad, &items, retry_every).await;
                }
                None => {
                    return Err(online(SourceError::ua(StatusCode::BadConnectionClosed, "event loop ended")));
                }
            },
            _ = watchdog.tick() => {
                let silent = clock.silent_for();
                if silent > silent_limit {
                    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, session.disconnect()).await;
                    return Err(online(SourceError::Silent(silent)));
                }
            }
            _ = retry.tick(), if !bad.is_empty() => {
                // A node missing now may exist after a server download/restart.
                match retry_bad(&session, &subscriptions, &ctx, &bad).await {
                    Ok((still_bad, created, resolved_ids)) => {
                        let changed: Vec<(usize, StatusCode)> = still_bad
                            .iter()
                            .filter(|(i, s)| !bad.iter().any(|(j, t)| i == j && s == t))
                            .copied()
                            .collect();
                        if !changed.is_empty() {
                            let _ = ctx.records.send(Feed::records(session::bad_records(&conn.id, ctx.plans, &changed)));
                        }
                        // Profile nodes that resolve now become readable too
                        // (a namespace that appeared after a server download).
                        let resolved: Vec<(NodeKey, NodeId)> = created
                            .iter()
                            .filter_map(|(i, _)| ctx.plans[*i].profile.zip(resolved_ids.get(i).cloned()))
                            .collect();
                        if !resolved.is_empty() {
                            let _ = ctx.records.send(Feed::Resolved(resolved));
                        }
                        items.extend(created);
                        bad = still_bad;
                        report_bad(&ctx, reported_bad, &bad, &items, retry_every).await;
                    }
                    Err(e) => return Err(online(e)),
                }
            }
        }
    }
}

/// Emits one `system.error` per tag that became bad (or bad with another
/// status) and forgets tags that are monitored again, so an outage of a node
/// is one event, not one per reconnect or retry.
async fn report_bad(
    ctx: &SessionCtx<'_>,
    reported: &mut HashMap<usize, StatusCode>,
    bad: &[(usize, StatusCode)],
    monitored: &HashMap<usize, Item>,
    retry_every: Duration,
) {
    for (i, status) in bad {
        if reported.get(i) == Some(status) {
            continue;
        }
        reported.insert(*i, *status);
        let tag = &ctx.plans[*i].meta;
        let status = value::status_name(*status);
        tracing::warn!(connection = %ctx.conn.id, tag = %tag.name, node = %tag.node, %status, "tag unavailable");
        ctx.reporter
            .system_error(serde_json::json!({
                "error": "tag_unavailable",
                "tag": tag.name,
                "node": tag.node,
                "status": status,
                "message": format!(
                    "tag {} (node {}) is unavailable: {status}; retried every {}s, the other tags are not affected",
                    tag.name, tag.node, retry_every.as_secs()
                ),
            }))
            .await;
    }
    for i in monitored.keys() {
        if reported.remove(i).is_some() {
            let tag = &ctx.plans[*i].meta;
            tracing::info!(connection = %ctx.conn.id, tag = %tag.name, node = %tag.node, "tag available again");
        }
    }
}

/// Longest keep-alive window the watchdog accepts from a server.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(3600);

/// The subscription's keep-alive window from what the server agreed to.
/// The values are the server's: checked arithmetic and a clamp, because an
/// absurd revision must not panic the connection task (docs/guarantees.md).
fn keep_alive_window(interval: Duration, count: u32) -> Duration {
    interval
        .max(Duration::from_millis(1))
        .checked_mul(count.max(1))
        .unwrap_or(MAX_KEEP_ALIVE)
        .min(MAX_KEEP_ALIVE)
}

/// Tags that cannot be monitored now: (index into the plans, why).
type BadTags = Vec<(usize, StatusCode)>;

/// Splits the tags into resolvable (with their NodeId) and bad (with status).
/// Unparseable node ids are bad for good; unknown namespaces are retried.
fn resolve_all(
    plans: &[TagPlan],
    namespaces: &opcua::types::NamespaceMap,
) -> (Vec<(usize, NodeId)>, BadTags) {
    let mut ok = Vec::with_capacity(plans.len());
    let mut bad = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        match &plan.node {
            None => bad.push((i, StatusCode::BadNodeIdInvalid)),
            Some(node) => match session::resolve(node, namespaces) {
                Ok(id) => ok.push((i, id)),
                Err(status) => bad.push((i, status)),
            },
        }
    }
    (ok, bad)
}

/// Tries the bad tags again: returns those still bad and the monitored items
/// created for the others.
async fn retry_bad(
    session: &opcua::client::Session,
    subscriptions: &session::Subscriptions,
    ctx: &SessionCtx<'_>,
    bad: &[(usize, StatusCode)],
) -> Result<(BadTags, Vec<(usize, Item)>, HashMap<usize, NodeId>), SourceError> {
    let namespaces = session::read_namespaces(session).await?;
    let mut still_bad = Vec::new();
    let mut retry = Vec::new();
    for (i, status) in bad {
        match ctx.plans[*i].node.as_ref() {
            None => still_bad.push((*i, *status)),
            Some(node) => match session::resolve(node, &namespaces) {
                Ok(id) => retry.push((*i, id)),
                Err(s) => still_bad.push((*i, s)),
            },
        }
    }
    let mut created = Vec::new();
    if !retry.is_empty() {
        let monitored = session::monitor_tags(
            session,
            subscriptions,
            ctx.plans,
            &retry,
            ctx.conn.publishing_interval,
        )
        .await?;
        still_bad.extend(monitored.refused);
        created = monitored.created;
    }
    still_bad.sort_by_key(|(i, _)| *i);
    let resolved = retry.into_iter().collect();
    Ok((still_bad, created, resolved))
}

/// Which state a failure puts the connection in.
fn classify(error: &SourceError) -> ConnState {
    match error.status() {
        Some(status) => classify_status(status),
        None => ConnState::Offline,
    }
}

fn classify_status(status: StatusCode) -> ConnState {
    let name = value::status_name(status);
    match name.as_str() {
        "BadUserAccessDenied" | "BadIdentityTokenRejected" | "BadIdentityTokenInvalid" => {
            ConnState::AuthRequired
        }
        "BadSecurityChecksFailed" => ConnState::Untrusted,
        n if n.starts_with("BadCertificate") => ConnState::Untrusted,
        _ => ConnState::Offline,
    }
}

#[cfg(test)]
mod tests;
