//! plantgate: an edge gateway that reads batch, recipe, OEE and tag data from
//! DeltaV and OptoMES over OPC UA, makes every record durable in SQLite and
//! forwards it over TLS MQTT.
//!
//! Data path (one direction, one durable hand-off):
//! `source` (OPC UA, driving a `profile`; `source::feed` bounds what it
//! queues) → `buffer::Outlet` (the bounded queue into the buffer) → the
//! buffer worker (coalesces, commits, holds and retries; SQLite is the only
//! place a record is accepted) → `uplink` (MQTT, deletes on PUBACK).
//! `agent::start` wires it, every long-lived task under `supervise`;
//! `status` is the shared board the buffer reports its intake to and the
//! uplink, `announce` (intake loss) and `health` read.

pub mod agent;
pub mod announce;
pub mod backoff;
pub mod browse;
pub mod buffer;
pub mod config;
pub mod demo;
pub mod headroom;
pub mod health;
pub mod heap;
pub mod nodeid;
pub mod probe;
pub mod profile;
pub mod rate;
pub mod record;
pub mod reload;
pub mod reload_report;
pub mod replay;
pub mod replay_client;
pub mod secret;
pub mod sim;
pub mod source;
pub mod sparkplug;
pub mod status;
pub mod supervise;
pub mod systemd;
pub mod throttle;
pub mod uplink;

/// The version published in status messages.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
