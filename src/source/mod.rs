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
//!   pushes one Vec per publish response into the feed queue (`feed`),
//!   bounded by a value budget. A driver task (`driver`) hands them to the
//!   reporter (which waits on the buffer's bounded outlet) and runs
//!   the profile, so the event loop never blocks and a value is only
//!   dropped, counted and announced, when a stalled buffer has filled both
//!   queues (docs/guarantees.md). The profile's reads go to the live session
//!   (`live`), and their answers come back through the same queue.
//!
//! Files: this one is the reconnect loop; `live` one session (open, watch,
//! reads); `tags` the tag table; `bad_tags` tags that cannot be monitored;
//! `session` the OPC UA building blocks (client, endpoint checks,
//! subscriptions, the callback); `feed` the queue to the driver;
//! `reporter` what the connection reports through (state, events, records
//! to the buffer's outlet); `value` OPC UA values as records and the tag's
//! identity; `pki` the agent's own certificate.
//! - States: `connecting` until the first subscription is up, `online` while
//!   subscribed, then `offline` / `auth_required` / `untrusted` with the
//!   status code name as reason. Retries while not online do not flap through
//!   `connecting` (one state change, one log line, one event per outage).

mod backfill;
mod bad_tags;
mod driver;
pub mod feed;
mod live;
pub mod open;
pub mod pki;
pub mod probe;
mod reporter;
mod session;
mod tags;
pub mod value;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opcua::client::Client;
use opcua::types::StatusCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::ConnectionConfig;
use crate::record::EventType;
use crate::status::ConnState;

use feed::Feed;
pub use reporter::{ConnectionReporter, IntakeLoss};
pub use session::SourceError;
pub use tags::ConfigUpdates;

/// How long the driver may take to hand over what it holds at the stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the buffer holds of a connection's last run: the profile
/// continues from its snapshot (`Store::profile_state`), backfill from its
/// tags' marks (`Store::tag_marks`); both empty for a fresh start.
#[derive(Debug, Default)]
pub struct Saved {
    pub profile: Option<String>,
    pub marks: Vec<crate::buffer::TagMark>,
}

/// Runs one plant connection until `cancel`: connect, subscribe, report,
/// reconnect with backoff forever. The profile and the backfill marks
/// continue from `saved`, or start fresh. `config` holds the connection's configuration; a
/// reload may send a new tag list through it, which changes the monitored
/// items of the running subscription (docs/cli.md, reload).
pub async fn run_connection(
    config: ConfigUpdates,
    pki_dir: PathBuf,
    reporter: ConnectionReporter,
    saved: Saved,
    cancel: CancellationToken,
) {
    let conn = config.borrow().clone();
    let profile = driver::restored_profile(&conn, saved.profile.as_deref());
    let backfill = backfill::Backfill::new(&conn, saved.marks, reporter.clone());
    let mut tags = tags::TagTable::new(config, profile.as_ref());
    let (records_tx, records_rx) = feed::channel(reporter.intake_loss());
    let (reads_tx, mut reads_rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(driver::drive(
        records_rx,
        reads_tx,
        reporter.clone(),
        profile,
        backfill,
    ));
    // Announcements due once per connection start or per tag (values too
    // large, a changed server certificate, a cleartext password).
    let notices = Arc::new(session::Notices::new(&reporter, &pki_dir));
    let ctx = live::Ctx {
        conn: &conn,
        records: &records_tx,
        reporter: &reporter,
        cancel: &cancel,
        notices: &notices,
    };
    reconnect(&ctx, &mut tags, &pki_dir, &mut reads_rx).await;
    let _ = records_tx.send(Feed::Stop);
    drop(records_tx);
    // Values already received are still delivered (the sessions, and with
    // them the callback's senders, are gone now).
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, driver).await;
}

/// The reconnect loop: one session after another, with backoff, until
/// cancelled. States: `connecting` until the first subscription is up,
/// `online` while subscribed, then `offline` / `auth_required` /
/// `untrusted` with the status code name as reason.
async fn reconnect(
    ctx: &live::Ctx<'_>,
    tags: &mut tags::TagTable,
    pki_dir: &std::path::Path,
    reads: &mut mpsc::UnboundedReceiver<crate::profile::ReadRequest>,
) {
    let (conn, reporter, cancel) = (ctx.conn, ctx.reporter, ctx.cancel);
    let mut backoff = Backoff::new(conn.reconnect_initial, conn.reconnect_max);
    let mut client: Option<Client> = None;
    let mut state = ConnState::Connecting;
    let mut reports = bad_tags::BadTagReports::default();
    let mut expiry_watch: Option<tokio::task::JoinHandle<()>> = None;
    reporter
        .set_state(ConnState::Connecting, "connecting")
        .await;
    loop {
        let failure = match ensure_client(&mut client, conn, pki_dir, cancel).await {
            Err(e) => live::Failure::from(e),
            Ok(Built::Cancelled) => break,
            Ok(built) => {
                if let (Built::New(own), None) = (built, &expiry_watch) {
                    let watch = watch_expiry(own, reporter.clone());
                    expiry_watch = Some(tokio::spawn(watch));
                }
                let Some(client) = client.as_mut() else {
                    continue;
                };
                // A tag list a reload sent while no session was up.
                if let Some(update) = tags.pending_update() {
                    let retag = tags.retag(&update);
                    reports.forget(&retag.retired);
                }
                match live::run(ctx, tags, client, reads, &mut reports).await {
                    Ok(()) => break,
                    Err(f) => f,
                }
            }
        };
        if cancel.is_cancelled() {
            break;
        }
        if failure.online_for.is_some() {
            state = ConnState::Online;
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
                    EventType::ConnectionAuthRequired,
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
    if let Some(watch) = expiry_watch {
        watch.abort();
    }
}

/// What [`ensure_client`] did.
enum Built {
    /// A client existed already.
    Existing,
    /// A client was built, with this own certificate.
    New(pki::OwnCertificate),
    /// The task was cancelled meanwhile.
    Cancelled,
}

/// Builds the client if there is none yet (first attempt, or after a PKI
/// error).
async fn ensure_client(
    slot: &mut Option<Client>,
    conn: &ConnectionConfig,
    pki_dir: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<Built, SourceError> {
    if slot.is_some() {
        return Ok(Built::Existing);
    }
    let (conn, pki_dir) = (conn.clone(), pki_dir.to_path_buf());
    // Creating the certificate generates an RSA key: seconds on a small box.
    let build = tokio::task::spawn_blocking(move || session::build_client(&conn, &pki_dir));
    let built = tokio::select! {
        _ = cancel.cancelled() => return Ok(Built::Cancelled),
        r = build => r.map_err(|e| SourceError::Client(format!("client setup task failed: {e}")))??,
    };
    let (client, own) = built;
    *slot = Some(client);
    Ok(Built::New(own))
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
                reporter.agent_event(EventType::SystemError, details).await;
            }
        }
        tokio::time::sleep(DAY).await;
    }
}

/// Which state a failure puts the connection in.
fn classify(error: &SourceError) -> ConnState {
    match error.status() {
        Some(status) => classify_status(status),
        None => ConnState::Offline,
    }
}

fn classify_status(status: StatusCode) -> ConnState {
    use opcua::types::SubStatusCode as S;
    match status.sub_code() {
        S::BadUserAccessDenied | S::BadIdentityTokenRejected | S::BadIdentityTokenInvalid => {
            ConnState::AuthRequired
        }
        S::BadSecurityChecksFailed
        | S::BadCertificateInvalid
        | S::BadCertificatePolicyCheckFailed
        | S::BadCertificateTimeInvalid
        | S::BadCertificateIssuerTimeInvalid
        | S::BadCertificateHostNameInvalid
        | S::BadCertificateUriInvalid
        | S::BadCertificateUseNotAllowed
        | S::BadCertificateIssuerUseNotAllowed
        | S::BadCertificateUntrusted
        | S::BadCertificateRevocationUnknown
        | S::BadCertificateIssuerRevocationUnknown
        | S::BadCertificateRevoked
        | S::BadCertificateIssuerRevoked
        | S::BadCertificateChainIncomplete => ConnState::Untrusted,
        _ => ConnState::Offline,
    }
}

#[cfg(test)]
mod tests;
