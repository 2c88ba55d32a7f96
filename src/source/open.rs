//! A session for a one-shot command (`plantgate browse`, `check --connect`):
//! the client, endpoint choice, certificate checks and identity of the
//! service (`live::connect`), without a subscription, and nothing written
//! to the plant.

use std::path::Path;
use std::sync::Arc;

use opcua::client::Session;
use opcua::types::NamespaceMap;

use super::live;
use super::session::AbortOnDrop;
use super::session::{self, Notices, SourceError};
use super::ConnectionReporter;
use crate::config::ConnectionConfig;

/// What the service would announce as events (a changed server
/// certificate, a cleartext password) is only logged by a one-shot
/// command: there is no buffer to take events.
pub(super) fn quiet_notices(conn: &ConnectionConfig, pki_dir: &Path) -> Arc<Notices> {
    let (outlet, _nowhere) = crate::buffer::Outlet::queue(16);
    let reporter = ConnectionReporter::new(
        &conn.id,
        crate::status::StatusBoard::new(),
        outlet,
        Vec::new(),
    );
    Arc::new(Notices::new(&reporter, pki_dir))
}

/// An open session; closed politely by [`OneShot::close`], cut when
/// dropped.
pub struct OneShot {
    session: Arc<Session>,
    namespaces: NamespaceMap,
    _event_loop: AbortOnDrop,
}

impl OneShot {
    /// Connects as the service would for `conn`, with the agent's own
    /// certificate in `pki_dir` (made there if missing).
    pub async fn open(conn: &ConnectionConfig, pki_dir: &Path) -> Result<OneShot, SourceError> {
        let (c, dir) = (conn.clone(), pki_dir.to_path_buf());
        let (mut client, _own) =
            tokio::task::spawn_blocking(move || session::build_client(&c, &dir))
                .await
                .map_err(|e| SourceError::Client(format!("client setup task failed: {e}")))??;
        let notices = quiet_notices(conn, pki_dir);
        let connected = live::connect(conn, &mut client, &notices).await?;
        let namespaces = session::read_namespaces(&connected.session).await?;
        Ok(OneShot {
            session: connected.session,
            namespaces,
            _event_loop: connected.guard,
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The server's namespace array, read when the session opened.
    pub fn namespaces(&self) -> &NamespaceMap {
        &self.namespaces
    }

    /// `node` as a NodeId of this server (its `nsu=` URI resolved).
    pub fn resolve(
        &self,
        node: &crate::nodeid::NodeRef,
    ) -> Result<opcua::types::NodeId, opcua::types::StatusCode> {
        session::resolve(node, &self.namespaces)
    }

    /// Closes the session (bounded: a server that does not answer is cut).
    pub async fn close(self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.session.disconnect())
            .await;
    }
}
