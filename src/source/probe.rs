//! The OPC UA half of `plantgate check --connect`: one connection tried
//! step by step as the service would connect it (`live::connect`), so that
//! each way it can fail is named on its own line with its fix. Reads only.

use std::path::Path;

use opcua::types::{ReadValueId, StatusCode, TimestampsToReturn};

use super::live;
use super::session::{self, SourceError, TagPlan};
use super::{classify_status, open};
use crate::config::ConnectionConfig;
use crate::probe::Check;
use crate::status::ConnState;

/// Nodes per Read.
const NODES_PER_READ: usize = 500;

/// Checks `conn`: endpoint reachable, security pair offered, server
/// certificate trusted, identity accepted, every configured node (tags and
/// the profile's) resolved and readable.
pub async fn connection(conn: &ConnectionConfig, pki_dir: &Path) -> Vec<Check> {
    let what = |step: &str| format!("opcua {}: {step}", conn.id);
    let mut out = Vec::new();
    let (c, dir) = (conn.clone(), pki_dir.to_path_buf());
    let built = tokio::task::spawn_blocking(move || session::build_client(&c, &dir)).await;
    let mut client = match built {
        Ok(Ok((client, _))) => client,
        Ok(Err(e)) => return vec![Check::fail(what("client"), e.to_string())],
        Err(e) => return vec![Check::fail(what("client"), e.to_string())],
    };
    let identity = session::identity(conn);
    match session::discover_endpoint(&client, conn, &identity).await {
        Ok(_) => {
            out.push(Check::ok(
                what("endpoint"),
                format!("{} answers", conn.endpoint),
            ));
            out.push(Check::ok(
                what("security"),
                format!(
                    "{:?}/{:?} offered",
                    conn.security_policy, conn.security_mode
                ),
            ));
        }
        Err(SourceError::NoEndpoint { offered, .. }) => {
            out.push(Check::ok(
                what("endpoint"),
                format!("{} answers", conn.endpoint),
            ));
            out.push(Check::fail(
                what("security"),
                format!(
                    "{:?}/{:?} is not offered; the server offers {offered}: set security_policy and security_mode to one of them",
                    conn.security_policy, conn.security_mode
                ),
            ));
            return out;
        }
        Err(e) => {
            out.push(Check::fail(
                what("endpoint"),
                format!(
                    "{} does not answer ({e}): check the address, the port and the firewall",
                    conn.endpoint
                ),
            ));
            return out;
        }
    }
    let notices = open::quiet_notices(conn, pki_dir);
    let connected = match live::connect(conn, &mut client, &notices).await {
        Ok(c) => c,
        Err(e) => {
            out.extend(refused(conn, pki_dir, &e));
            return out;
        }
    };
    out.push(Check::ok(what("server certificate"), "trusted"));
    out.push(Check::ok(
        what("identity"),
        match &conn.username {
            Some(user) => format!("user {user} accepted"),
            None => "anonymous accepted".into(),
        },
    ));
    out.extend(nodes(conn, &connected.session).await);
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        connected.session.disconnect(),
    )
    .await;
    out
}

/// The session was refused: by our side (the server's certificate) or by
/// the server (the identity), or something else.
fn refused(conn: &ConnectionConfig, pki_dir: &Path, e: &SourceError) -> Vec<Check> {
    let what = |step: &str| format!("opcua {}: {step}", conn.id);
    let state = e.status().map(classify_status);
    match (e, state) {
        (SourceError::CertificateChanged { .. }, _) => vec![Check::fail(
            what("server certificate"),
            format!("{e}: if the server's certificate was renewed on purpose, delete the pinned copy in {} and check again", pki_dir.join("trusted").display()),
        )],
        (_, Some(ConnState::Untrusted)) => vec![Check::fail(
            what("server certificate"),
            format!(
                "not trusted ({}): the rejected copy is in {}; compare its thumbprint with the server's, then move it to {} (or set trust_unknown_server_cert = true to trust it on first use)",
                e.reason(),
                pki_dir.join("rejected").display(),
                pki_dir.join("trusted").display()
            ),
        )],
        (_, Some(ConnState::AuthRequired)) => vec![
            Check::ok(what("server certificate"), "trusted"),
            Check::fail(
                what("identity"),
                format!(
                    "refused ({}): check {}",
                    e.reason(),
                    match &conn.username {
                        Some(user) => format!("the password of user {user}"),
                        None => "whether the server allows anonymous sessions (else set username and a password)".into(),
                    }
                ),
            ),
        ],
        _ => vec![Check::fail(what("session"), e.to_string())],
    }
}

/// Every configured node, and the profile's, resolved against the server's
/// namespaces and read once: one line for all good, one per bad node.
async fn nodes(conn: &ConnectionConfig, session: &opcua::client::Session) -> Vec<Check> {
    let what = |step: String| format!("opcua {}: {step}", conn.id);
    let mut plans: Vec<TagPlan> = session::plan_tags(conn);
    if let Some(p) = super::driver::restored_profile(conn, None) {
        plans.extend(session::plan_profile_nodes(conn, &p.nodes()));
    }
    let namespaces = match session::read_namespaces(session).await {
        Ok(n) => n,
        Err(e) => return vec![Check::fail(what("nodes".into()), e.to_string())],
    };
    let mut bad: Vec<(usize, StatusCode)> = Vec::new();
    let mut reads: Vec<(usize, ReadValueId)> = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        match plan.node.as_ref().map(|n| session::resolve(n, &namespaces)) {
            Some(Ok(id)) => reads.push((i, ReadValueId::from(id))),
            Some(Err(status)) => bad.push((i, status)),
            None => bad.push((i, StatusCode::BadNodeIdInvalid)),
        }
    }
    for chunk in reads.chunks(NODES_PER_READ) {
        let ids: Vec<ReadValueId> = chunk.iter().map(|(_, r)| r.clone()).collect();
        match session.read(&ids, TimestampsToReturn::Neither, 0.0).await {
            Ok(values) => {
                for ((i, _), v) in chunk.iter().zip(values.iter()) {
                    if v.status().is_bad() {
                        bad.push((*i, v.status()));
                    }
                }
            }
            Err(e) => return vec![Check::fail(what("nodes".into()), format!("Read: {e}"))],
        }
    }
    if bad.is_empty() {
        return vec![Check::ok(
            what("nodes".into()),
            format!("{} resolved and readable", plans.len()),
        )];
    }
    bad.sort_by_key(|(i, _)| *i);
    let mut out = vec![Check::fail(
        what("nodes".into()),
        format!("{} of {} not readable (below)", bad.len(), plans.len()),
    )];
    out.extend(bad.into_iter().map(|(i, status)| {
        let meta = &plans[i].meta;
        Check::fail(
            what(format!("node {}", meta.name)),
            format!(
                "{} {}: check the node id (plantgate browse lists the server's)",
                meta.node,
                super::value::status_name(status)
            ),
        )
    }));
    out
}
