//! Test helpers: connection configs without going through the loader.

use std::time::Duration;

use crate::config::{
    Backfill, ConnectionConfig, ConnectionKind, DeltavConfig, OptomesConfig, ProfileConfig,
    SecurityMode, SecurityPolicy, UnitConfig, WorkCenterConfig,
};

/// A connection of `kind` with the loader's defaults and nothing to follow.
pub fn connection(kind: ConnectionKind) -> ConnectionConfig {
    let profile = match kind {
        ConnectionKind::Deltav => ProfileConfig::Deltav(deltav_config(&[])),
        ConnectionKind::Optomes => {
            ProfileConfig::Optomes(optomes_config(&[], Duration::from_secs(60)))
        }
        ConnectionKind::Generic => ProfileConfig::Generic,
    };
    ConnectionConfig {
        id: format!("{}-line1", kind.as_str()),
        endpoint: "opc.tcp://127.0.0.1:4840".into(),
        security_policy: SecurityPolicy::None,
        security_mode: SecurityMode::None,
        username: None,
        password: None,
        trust_unknown_server_cert: false,
        publishing_interval: Duration::from_millis(500),
        sampling_interval: Duration::from_millis(250),
        reconnect_initial: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(60),
        events: Vec::new(),
        backfill: Backfill::Off,
        backfill_max: Duration::from_secs(3600),
        tags: Vec::new(),
        profile,
    }
}

pub fn deltav_config(units: &[(&str, &[&str])]) -> DeltavConfig {
    DeltavConfig {
        node_template: None,
        units: units
            .iter()
            .map(|(name, params)| UnitConfig {
                name: name.to_string(),
                recipe_parameters: params.iter().map(|p| p.to_string()).collect(),
            })
            .collect(),
    }
}

pub fn optomes_config(work_centers: &[&str], window: Duration) -> OptomesConfig {
    OptomesConfig {
        node_template: None,
        oee_window: window,
        work_centers: work_centers
            .iter()
            .map(|n| WorkCenterConfig {
                name: n.to_string(),
            })
            .collect(),
    }
}

pub fn deltav(units: &[(&str, &[&str])]) -> ConnectionConfig {
    let mut c = connection(ConnectionKind::Deltav);
    c.profile = ProfileConfig::Deltav(deltav_config(units));
    c
}

pub fn optomes(work_centers: &[&str], window: Duration) -> ConnectionConfig {
    let mut c = connection(ConnectionKind::Optomes);
    c.profile = ProfileConfig::Optomes(optomes_config(work_centers, window));
    c
}

/// The DeltaV part of a connection made by [`deltav`].
pub fn deltav_of(conn: &ConnectionConfig) -> &DeltavConfig {
    match &conn.profile {
        ProfileConfig::Deltav(cfg) => cfg,
        other => panic!("not a DeltaV connection: {other:?}"),
    }
}
