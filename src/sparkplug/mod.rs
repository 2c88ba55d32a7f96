//! Sparkplug B 3.0 (`mqtt.format = "sparkplug_b"`, docs/sparkplug.md): the
//! same records as the JSON format, as protobuf payloads on the `spBv1.0`
//! topics, with the agent as edge node and each plant connection as a
//! device. Pure: the uplink publishes what this builds.
//!
//! - [`proto`]: the payload messages (prost).
//! - [`topics`]: the topic names.
//! - [`metric`]: records as metrics (datatypes, values, properties).
//! - [`node`]: the edge node's certificates, aliases and sequence numbers.

pub mod metric;
pub mod node;
pub mod proto;
pub mod topics;

pub use node::{Command, DeviceSpec, Draft, EdgeNode, MessageType, NodeStatus};
