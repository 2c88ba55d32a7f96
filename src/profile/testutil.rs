//! Test helpers: connection configs without going through the loader.

use std::time::Duration;

use crate::config::{
    ConnectionConfig, ConnectionKind, SecurityMode, SecurityPolicy, UnitConfig, WorkCenterConfig,
};

pub fn connection(kind: ConnectionKind) -> ConnectionConfig {
    ConnectionConfig {
        id: format!("{}-line1", kind.as_str()),
        kind,
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
        node_template: None,
        oee_window: Duration::from_secs(60),
        units: Vec::new(),
        work_centers: Vec::new(),
        tags: Vec::new(),
    }
}

pub fn deltav(units: &[(&str, &[&str])]) -> ConnectionConfig {
    let mut c = connection(ConnectionKind::Deltav);
    c.units = units
        .iter()
        .map(|(name, params)| UnitConfig {
            name: name.to_string(),
            recipe_parameters: params.iter().map(|p| p.to_string()).collect(),
        })
        .collect();
    c
}

pub fn optomes(work_centers: &[&str], window: Duration) -> ConnectionConfig {
    let mut c = connection(ConnectionKind::Optomes);
    c.oee_window = window;
    c.work_centers = work_centers
        .iter()
        .map(|n| WorkCenterConfig {
            name: n.to_string(),
        })
        .collect();
    c
}
