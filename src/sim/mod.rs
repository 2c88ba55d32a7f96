//! Simulated plant OPC UA servers (docs/cli.md) for `plantgate simulate`, the demo
//! and the tests. `server` is the generic layer (endpoints, security, users,
//! PKI, a namespace of string-id variables); each plant simulator builds on it.
//! `ns0` is the part of OPC UA namespace 0 every simulator serves.

pub mod batch;
pub mod broker;
pub mod deltav;
pub mod history;
pub mod load;
pub mod ns0;
pub mod optomes;
pub mod proxy;
pub mod server;
#[cfg(test)]
mod test_client;
pub mod timeline;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

pub use deltav::{start_deltav, DeltavUnits};
pub use load::{LoadStats, LoadTags};
pub use optomes::{start_optomes, OptomesWorkCenters};
pub use server::{SimBuilder, SimNamespace, SimServer, SimSpec, SimValue};

#[derive(Clone)]
pub struct SimOptions {
    /// Port 0 picks a free port.
    pub listen: SocketAddr,
    pub seed: u64,
    /// Time acceleration of the simulated process; 0 freezes it.
    pub speed: f64,
    /// Extra `LOAD/TAGnnnnn.CV` Double tags.
    pub tags: usize,
    /// Update rate of each load tag.
    pub rate_hz: f64,
    /// Require this username/password (anonymous refused) when set.
    pub user: Option<(String, String)>,
    /// Server certificate and trusted client certificates live here.
    pub pki_dir: PathBuf,
}

impl SimOptions {
    /// Loopback, free port, seed 1, real time, no load tags, anonymous.
    pub fn new(pki_dir: impl Into<PathBuf>) -> Self {
        SimOptions {
            listen: server::loopback_any_port(),
            seed: 1,
            speed: 1.0,
            tags: 0,
            rate_hz: 1.0,
            user: None,
            pki_dir: pki_dir.into(),
        }
    }
}

impl std::fmt::Debug for SimOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimOptions")
            .field("listen", &self.listen)
            .field("seed", &self.seed)
            .field("speed", &self.speed)
            .field("tags", &self.tags)
            .field("rate_hz", &self.rate_hz)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "***")))
            .field("pki_dir", &self.pki_dir)
            .finish()
    }
}

/// Options beyond [`SimOptions`], for tests and `plantgate simulate`
/// switches. Kept apart so that `SimOptions` literals elsewhere stay valid.
#[derive(Clone, Debug, Default)]
pub struct SimExtras {
    /// Offer only these (policy, mode) endpoints; None = all of docs/configuration.md
    /// (None/None and the three RSA policies with Sign and SignAndEncrypt).
    pub endpoints: Option<
        Vec<(
            opcua::crypto::SecurityPolicy,
            opcua::types::MessageSecurityMode,
        )>,
    >,
    /// Namespace URIs registered before the simulator's own: each shifts its
    /// index by one (`urn:plantgate:sim:deltav` is ns=2 without any).
    pub namespaces_before: Vec<String>,
    /// Cap on every monitored item's queue (the server revises larger
    /// requests down to it); None = 100 000, i.e. what the client asks for.
    /// A tiny cap (2 or so) makes the server discard values and set the
    /// `Overflow` info bit when publishing is much slower than sampling,
    /// for tests of docs/guarantees.md. (OPC UA sets no Overflow bit on a queue of 1.)
    pub max_queue_size: Option<usize>,
    /// Cap on subscriptions per session (None = the library's default), for
    /// tests of a server that refuses the agent's extra subscriptions.
    pub max_subscriptions: Option<usize>,
    /// The load tags start paused, and [`run_simulator`] speaks the
    /// line protocol of [`load`] on stdin/stdout (`simulate --load-control`,
    /// for benchmarks).
    pub load_control: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot prepare simulator PKI directory {0}: {1}")]
    Pki(String, String),
    #[error("cannot build simulator server: {0}")]
    Build(String),
    #[error("cannot set simulator value: {0}")]
    SetValue(String),
    #[error("unknown simulator {0:?} (expected deltav or optomes)")]
    UnknownKind(String),
    #[error("unknown simulated unit or work center {0:?}")]
    UnknownObject(String),
    #[error("invalid simulator script step: {0}")]
    Script(String),
}

/// Runs a simulator until `cancel` (`plantgate simulate`), with `extras`
/// (`SimExtras::default()` for none; e.g. the `--security` switches). Prints
/// the endpoint so a user can paste it into a config.
pub async fn run_simulator(
    kind: &str,
    opts: SimOptions,
    extras: SimExtras,
    cancel: CancellationToken,
) -> Result<(), SimError> {
    let load_control = extras.load_control;
    let server = match kind {
        "deltav" => start_deltav(opts, extras).await?,
        "optomes" => start_optomes(opts, extras).await?,
        other => return Err(SimError::UnknownKind(other.to_string())),
    };
    println!(
        "{kind} simulator listening on {} (namespace {} = ns={})",
        server.endpoint(),
        server.namespace_uri(),
        server.namespace_index()
    );
    if load_control {
        load::serve_control(
            server.load_tags().unwrap_or_default(),
            &server.endpoint(),
            server.namespace_uri(),
            cancel.clone(),
        );
    }
    cancel.cancelled().await;
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_simulator_knows_both_kinds_and_refuses_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        for kind in ["deltav", "optomes"] {
            let cancel = CancellationToken::new();
            // Cancelled up front: starts, prints its endpoint, stops.
            cancel.cancel();
            let opts = SimOptions::new(dir.path().join(kind));
            run_simulator(kind, opts, SimExtras::default(), cancel)
                .await
                .expect(kind);
        }
        let opts = SimOptions::new(dir.path().join("x"));
        let err = run_simulator(
            "scada",
            opts,
            SimExtras::default(),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(err, Err(SimError::UnknownKind(k)) if k == "scada"));
    }
}
