//! A small, generic simulator server: one OPC UA server with one namespace of
//! string-id variables that simulator profiles (DeltaV, OptoMES, ...) create and
//! set. The profiles only deal with node names and values; everything about
//! endpoints, security, users, PKI and limits lives here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use opcua::crypto::SecurityPolicy;
use opcua::types::{
    BuildInfo, ByteString, DataValue, DateTime, MessageSecurityMode, NodeId, StatusCode, UAString,
    Variant,
};
use opcua_server::address_space::{AccessLevel, Variable};
use opcua_server::diagnostics::NamespaceMetadata;
use opcua_server::node_manager::memory::{simple_node_manager, InMemoryNodeManager};

use super::history::SimNodeManager;
use opcua_server::{
    ServerBuilder, ServerEndpoint, ServerHandle, ServerUserToken, SubscriptionCache,
    ANONYMOUS_USER_TOKEN_ID,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{SimError, SimExtras, SimOptions};

/// User token id of the single configured user (`SimOptions::user`).
const USER_TOKEN_ID: &str = "plantgate_sim_user";

/// A value a simulator can put into a variable. The data type a variable
/// announces is fixed by its first value, but like a misconfigured plant
/// server the simulator lets a test set any other type later (`Raw` takes
/// any Variant: arrays, ByteStrings, nested Variants, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum SimValue {
    Double(f64),
    Float(f32),
    Int32(i32),
    Int64(i64),
    UInt32(u32),
    UInt64(u64),
    Bool(bool),
    String(String),
    DoubleArray(Vec<f64>),
    StringArray(Vec<String>),
    Bytes(Vec<u8>),
    /// Milliseconds since the Unix epoch.
    DateTime(i64),
    /// No value (Variant::Empty).
    Empty,
    Raw(Variant),
}

impl From<f64> for SimValue {
    fn from(v: f64) -> Self {
        SimValue::Double(v)
    }
}
impl From<i32> for SimValue {
    fn from(v: i32) -> Self {
        SimValue::Int32(v)
    }
}
impl From<u32> for SimValue {
    fn from(v: u32) -> Self {
        SimValue::UInt32(v)
    }
}
impl From<u64> for SimValue {
    fn from(v: u64) -> Self {
        SimValue::UInt64(v)
    }
}
impl From<bool> for SimValue {
    fn from(v: bool) -> Self {
        SimValue::Bool(v)
    }
}
impl From<&str> for SimValue {
    fn from(v: &str) -> Self {
        SimValue::String(v.to_string())
    }
}
impl From<String> for SimValue {
    fn from(v: String) -> Self {
        SimValue::String(v)
    }
}

impl From<SimValue> for Variant {
    fn from(v: SimValue) -> Variant {
        match v {
            SimValue::Double(v) => Variant::Double(v),
            SimValue::Float(v) => Variant::Float(v),
            SimValue::Int32(v) => Variant::Int32(v),
            SimValue::Int64(v) => Variant::Int64(v),
            SimValue::UInt32(v) => Variant::UInt32(v),
            SimValue::UInt64(v) => Variant::UInt64(v),
            SimValue::Bool(v) => Variant::Boolean(v),
            SimValue::String(v) => Variant::String(UAString::from(v)),
            SimValue::DoubleArray(v) => Variant::from(v),
            SimValue::StringArray(v) => {
                Variant::from(v.into_iter().map(UAString::from).collect::<Vec<UAString>>())
            }
            SimValue::Bytes(v) => Variant::ByteString(ByteString::from(v)),
            SimValue::DateTime(ms) => Variant::DateTime(Box::new(datetime_from_ms(ms))),
            SimValue::Empty => Variant::Empty,
            SimValue::Raw(v) => v,
        }
    }
}

/// Timestamp in milliseconds since the Unix epoch -> OPC UA DateTime.
pub(crate) fn datetime_from_ms(ts_ms: i64) -> DateTime {
    match chrono::DateTime::from_timestamp_millis(ts_ms) {
        Some(dt) => DateTime::from(dt),
        None => DateTime::now(),
    }
}

/// The simulator's namespace: create folders and variables by string id, set
/// their values (subscribers are notified). Cheap to clone and `Send`, so
/// update tasks can own a copy.
#[derive(Clone)]
pub struct SimNamespace {
    manager: Arc<InMemoryNodeManager<SimNodeManager>>,
    subscriptions: Arc<SubscriptionCache>,
    index: u16,
    uri: Arc<str>,
}

impl SimNamespace {
    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn node_id(&self, id: &str) -> NodeId {
        NodeId::new(self.index, id)
    }

    /// Adds a folder under `parent` (None = the Objects folder).
    pub fn add_folder(&self, id: &str, name: &str, parent: Option<&str>) {
        let parent = match parent {
            Some(p) => self.node_id(p),
            None => NodeId::objects_folder_id(),
        };
        let mut space = self.manager.address_space().write();
        space.add_folder(&self.node_id(id), name, name, &parent);
    }

    /// Adds read-only variables `(id, browse name, initial value)` under the
    /// folder `parent`. The initial value fixes the data type.
    pub fn add_variables(&self, parent: &str, vars: Vec<(String, String, SimValue)>) {
        let parent = self.node_id(parent);
        let variables = vars
            .into_iter()
            .map(|(id, name, value)| {
                let mut v = Variable::new(
                    &self.node_id(&id),
                    name.as_str(),
                    name.as_str(),
                    Variant::from(value),
                );
                // Historized, as a DeltaV Continuous Historian tag is: the
                // values set are kept for HistoryRead (`sim::history`).
                let access = AccessLevel::CURRENT_READ | AccessLevel::HISTORY_READ;
                v.set_access_level(access);
                v.set_user_access_level(access);
                v.set_historizing(true);
                v
            })
            .collect();
        let mut space = self.manager.address_space().write();
        space.add_variables(variables, &parent);
    }

    /// Sets values with the given source timestamp (ms since the epoch) and
    /// notifies subscribers. Unknown ids are an error; nothing is set then.
    pub fn set_many_at(
        &self,
        values: Vec<(String, SimValue)>,
        source_ts_ms: i64,
    ) -> Result<(), SimError> {
        let source = datetime_from_ms(source_ts_ms);
        let now = DateTime::now();
        let items: Vec<(NodeId, DataValue)> = values
            .into_iter()
            .map(|(id, v)| {
                let dv = DataValue {
                    value: Some(Variant::from(v)),
                    status: Some(StatusCode::Good),
                    source_timestamp: Some(source),
                    source_picoseconds: None,
                    server_timestamp: Some(now),
                    server_picoseconds: None,
                };
                (self.node_id(&id), dv)
            })
            .collect();
        self.manager
            .set_values(
                &self.subscriptions,
                items.iter().map(|(id, dv)| (id, None, dv.clone())),
            )
            .map_err(|status| SimError::SetValue(status.to_string()))?;
        for (id, dv) in &items {
            self.manager.inner().record(id, dv);
        }
        Ok(())
    }

    /// Whether `id` keeps a history (all variables do at first): a server
    /// where some tags are not historized.
    pub fn set_historized(&self, id: &str, on: bool) {
        self.manager.inner().set_historized(&self.node_id(id), on);
    }

    /// Makes the simulated history slow or misbehave (tests of a hostile
    /// server).
    pub fn set_history_quirks(&self, quirks: super::history::HistoryQuirks) {
        self.manager.inner().set_quirks(quirks);
    }

    /// The source timestamps (ms) of every value of `id` the simulator
    /// keeps in its history, oldest first: what a test compares a backfill
    /// with.
    pub fn history_ts(&self, id: &str) -> Vec<i64> {
        self.manager.inner().history_ts(&self.node_id(id))
    }

    /// Sets a variable to `value` (None: no value) with `status` (Bad or
    /// Uncertain, for quality tests), source timestamp now.
    pub fn set_with_status(
        &self,
        id: &str,
        value: Option<SimValue>,
        status: StatusCode,
    ) -> Result<(), SimError> {
        let now = DateTime::now();
        let dv = DataValue {
            // async-opcua reports a stored status only together with a value
            // (Empty stands for "none"), and its default change filter looks
            // at the value alone: a status change needs a value change too.
            value: Some(value.map(Variant::from).unwrap_or(Variant::Empty)),
            status: Some(status),
            source_timestamp: Some(now),
            source_picoseconds: None,
            server_timestamp: Some(now),
            server_picoseconds: None,
        };
        let node = self.node_id(id);
        self.manager
            .set_values(&self.subscriptions, [(&node, None, dv.clone())].into_iter())
            .map_err(|status| SimError::SetValue(status.to_string()))?;
        self.manager.inner().record(&node, &dv);
        Ok(())
    }

    /// Deletes a variable at runtime, like a configuration download that
    /// drops a tag. Subscribers first get a `BadNodeIdUnknown` notification
    /// for it (what servers report for a monitored node that went away; the
    /// in-memory node manager would otherwise just go quiet). False if the
    /// node did not exist.
    pub fn delete_variable(&self, id: &str) -> bool {
        let node = self.node_id(id);
        if !self.manager.address_space().read().node_exists(&node) {
            return false;
        }
        let now = DateTime::now();
        let gone = DataValue {
            // See `set_with_status` for why not None.
            value: Some(Variant::Empty),
            status: Some(StatusCode::BadNodeIdUnknown),
            source_timestamp: Some(now),
            source_picoseconds: None,
            server_timestamp: Some(now),
            server_picoseconds: None,
        };
        if let Err(e) = self
            .manager
            .set_values(&self.subscriptions, [(&node, None, gone)].into_iter())
        {
            tracing::debug!(node = id, error = %e, "simulator: notifying the deletion failed");
        }
        self.manager
            .address_space()
            .write()
            .delete(&node, true)
            .is_some()
    }

    /// Sets values with source timestamp now.
    pub fn set_many(&self, values: Vec<(String, SimValue)>) -> Result<(), SimError> {
        self.set_many_at(values, crate::record::now_ms())
    }

    pub fn set(&self, id: &str, value: impl Into<SimValue>) -> Result<(), SimError> {
        self.set_many(vec![(id.to_string(), value.into())])
    }
}

/// What distinguishes one simulator from another at the server level.
pub struct SimSpec {
    /// Short name, used in the application name/URI and logs ("deltav").
    pub name: String,
    pub namespace_uri: String,
}

/// First phase of a simulator: socket bound, address space being populated,
/// not yet serving. Populating before serving means no client ever sees a
/// half-built namespace.
pub struct SimBuilder {
    server: opcua_server::Server,
    handle: ServerHandle,
    listener: TcpListener,
    namespace: SimNamespace,
    endpoint: String,
    cancel: CancellationToken,
}

impl SimBuilder {
    /// Binds `opts.listen` and builds (but does not start) the server of
    /// `spec`; `extras` (`SimExtras::default()` for none) narrow what it
    /// offers.
    pub async fn new(
        opts: &SimOptions,
        extras: &SimExtras,
        spec: SimSpec,
    ) -> Result<SimBuilder, SimError> {
        let (listener, host_text, port) = bind(opts.listen).await?;
        let endpoint = format!("opc.tcp://{host_text}:{port}/");
        std::fs::create_dir_all(&opts.pki_dir)
            .map_err(|e| SimError::Pki(opts.pki_dir.display().to_string(), e.to_string()))?;
        let builder = base_builder(opts, &spec, &host_text, port);
        let builder = with_namespaces(builder, extras, &spec);
        let mut builder = with_endpoints(builder, opts, extras)?;
        set_limits(&mut builder, extras);
        let (server, handle) = builder.build().map_err(SimError::Build)?;
        let namespace = sim_namespace(&handle, &spec)?;
        let cancel = handle.token().clone();
        Ok(SimBuilder {
            server,
            handle,
            listener,
            namespace,
            endpoint,
            cancel,
        })
    }

    pub fn namespace(&self) -> &SimNamespace {
        &self.namespace
    }

    /// Cancelled when the server shuts down: simulation tasks select on it.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Starts serving.
    pub fn start(self) -> SimServer {
        let SimBuilder {
            server,
            handle,
            listener,
            namespace,
            endpoint,
            cancel,
        } = self;
        let task = tokio::spawn(async move {
            if let Err(e) = server.run_with(listener).await {
                tracing::warn!(error = %e, "simulator server stopped with an error");
            }
        });
        tracing::info!(endpoint = %endpoint, namespace = namespace.uri(), "simulator listening");
        SimServer {
            handle,
            namespace,
            endpoint,
            cancel,
            task,
            pinned: Arc::default(),
            extensions: Vec::new(),
        }
    }
}

/// Binds `listen`; returns the listener and the host (bracketed if IPv6)
/// and port to advertise.
async fn bind(listen: SocketAddr) -> Result<(TcpListener, String, u16), SimError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| SimError::Bind(listen, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| SimError::Bind(listen, e))?;
    // Clients connect to what we advertise; a wildcard address is not
    // connectable, loopback is the useful default for a simulator.
    let host: IpAddr = if local.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        local.ip()
    };
    let host_text = match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok((listener, host_text, local.port()))
}

/// Identity, address, PKI and message sizes of the simulator of `spec`,
/// and namespace 0 (`ServerBuilder::new()` brings none: see `ns0`).
fn base_builder(opts: &SimOptions, spec: &SimSpec, host_text: &str, port: u16) -> ServerBuilder {
    let product_name = format!("plantgate {} simulator", spec.name);
    ServerBuilder::new()
        .with_node_manager(super::ns0::node_manager())
        .build_info(BuildInfo {
            product_uri: "urn:plantgate:sim".into(),
            manufacturer_name: "plantgate".into(),
            product_name: product_name.as_str().into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            build_number: UAString::null(),
            build_date: DateTime::null(),
        })
        .application_name(product_name)
        .application_uri(format!("urn:plantgate:sim:{}:server", spec.name))
        .product_uri("urn:plantgate:sim")
        .create_sample_keypair(true)
        .pki_dir(&opts.pki_dir)
        // A simulator: accept any client certificate.
        .trust_client_certs(true)
        .host(host_text.trim_matches(['[', ']']).to_string())
        .port(port)
        .discovery_urls(vec!["/".to_string()])
        // Faster than the 100 ms default so short intervals behave as asked.
        .subscription_poll_interval_ms(10)
        .max_array_length(1_000_000)
        .max_message_size(256 * 1024 * 1024)
        .max_chunk_count(4096)
}

/// The node managers: `extras.namespaces_before`, then the simulator's own
/// (named `spec.name`, which `sim_namespace` looks up).
fn with_namespaces(
    mut builder: ServerBuilder,
    extras: &SimExtras,
    spec: &SimSpec,
) -> ServerBuilder {
    // Registered first, these push the simulator's namespace to a higher
    // index: what a server restart with a changed configuration does.
    for (i, uri) in extras.namespaces_before.iter().enumerate() {
        builder = builder.with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: uri.clone(),
                ..Default::default()
            },
            &format!("{}-extra-{i}", spec.name),
        ));
    }
    builder.with_node_manager(super::history::node_manager(
        NamespaceMetadata {
            namespace_uri: spec.namespace_uri.clone(),
            ..Default::default()
        },
        &spec.name,
    ))
}

/// The endpoints offered (all, or `extras.endpoints`), each accepting either
/// anonymous or the one configured user, never both.
fn with_endpoints(
    mut builder: ServerBuilder,
    opts: &SimOptions,
    extras: &SimExtras,
) -> Result<ServerBuilder, SimError> {
    let token_ids: Vec<String> = match &opts.user {
        Some(_) => vec![USER_TOKEN_ID.to_string()],
        None => vec![ANONYMOUS_USER_TOKEN_ID.to_string()],
    };
    let endpoints = sim_endpoints(&token_ids, extras.endpoints.as_deref());
    let Some((default_endpoint, _)) = endpoints.first().cloned() else {
        return Err(SimError::Build("no endpoint left to offer".into()));
    };
    for (id, endpoint) in endpoints {
        builder = builder.add_endpoint(id, endpoint);
    }
    builder = builder.default_endpoint(default_endpoint);
    if let Some((user, pass)) = &opts.user {
        builder = builder.add_user_token(
            USER_TOKEN_ID,
            ServerUserToken::user_pass(user.clone(), pass.clone()),
        );
    }
    Ok(builder)
}

/// Limits generous enough for the load tests (docs/performance.md), except
/// the monitored-item queue when `extras.max_queue_size` caps it.
fn set_limits(builder: &mut ServerBuilder, extras: &SimExtras) {
    let limits = builder.limits_mut();
    limits.subscriptions.max_monitored_items_per_sub = 0;
    limits.subscriptions.max_monitored_item_queue_size =
        extras.max_queue_size.unwrap_or(100_000).max(1);
    if let Some(n) = extras.max_subscriptions {
        limits.subscriptions.max_subscriptions_per_session = n.max(1);
    }
    limits.subscriptions.min_sampling_interval_ms = 10.0;
    limits.subscriptions.min_publishing_interval_ms = 10.0;
    limits.subscriptions.max_notifications_per_publish = 20_000;
    // Not "0 = unlimited" as documented: 0 keeps one message only.
    limits.subscriptions.max_queued_notifications = 10_000;
    limits.operational.max_monitored_items_per_call = 100_000;
    limits.operational.max_nodes_per_read = 100_000;
}

/// The simulator's namespace in a built server: its node manager and index.
fn sim_namespace(handle: &ServerHandle, spec: &SimSpec) -> Result<SimNamespace, SimError> {
    let manager = handle
        .node_managers()
        .get_by_name::<InMemoryNodeManager<SimNodeManager>>(&spec.name)
        .ok_or_else(|| SimError::Build("simple node manager missing".into()))?;
    let index = handle
        .get_namespace_index(&spec.namespace_uri)
        .ok_or_else(|| SimError::Build("namespace not registered".into()))?;
    Ok(SimNamespace {
        manager,
        subscriptions: handle.subscriptions().clone(),
        index,
        uri: Arc::from(spec.namespace_uri.as_str()),
    })
}

/// All policies the product supports, with every mode each allows, or only
/// the `only` pairs.
fn sim_endpoints(
    token_ids: &[String],
    only: Option<&[(SecurityPolicy, MessageSecurityMode)]>,
) -> Vec<(String, ServerEndpoint)> {
    let wanted = |p: SecurityPolicy, m: MessageSecurityMode| {
        only.map_or(true, |pairs| {
            pairs.iter().any(|(op, om)| *op == p && *om == m)
        })
    };
    let mut out = Vec::new();
    // Note: async-opcua 0.19 advertises no token security policy for
    // username/password, so on this endpoint passwords travel in clear.
    if wanted(SecurityPolicy::None, MessageSecurityMode::None) {
        out.push((
            "none".to_string(),
            ServerEndpoint::new(
                "/",
                SecurityPolicy::None,
                MessageSecurityMode::None,
                token_ids,
            ),
        ));
    }
    for policy in [
        SecurityPolicy::Basic256Sha256,
        SecurityPolicy::Aes128Sha256RsaOaep,
        SecurityPolicy::Aes256Sha256RsaPss,
    ] {
        for mode in [
            MessageSecurityMode::Sign,
            MessageSecurityMode::SignAndEncrypt,
        ] {
            if !wanted(policy, mode) {
                continue;
            }
            out.push((
                format!("{policy}_{mode}").to_lowercase(),
                ServerEndpoint::new("/", policy, mode, token_ids),
            ));
        }
    }
    out
}

/// A running simulator.
pub struct SimServer {
    handle: ServerHandle,
    namespace: SimNamespace,
    endpoint: String,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    /// Nodes a test has set by hand: the simulation leaves them alone so the
    /// value a test drives is the value a client sees.
    pinned: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Simulator-specific handles (e.g. the scripted-mode controls of the
    /// DeltaV units), found by type: the generic layer need not know them.
    extensions: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

impl SimServer {
    /// Attaches a simulator-specific handle (see [`SimServer::extension`]).
    pub(crate) fn add_extension<T: std::any::Any + Send + Sync>(&mut self, ext: T) {
        self.extensions.push(Arc::new(ext));
    }

    /// The attached handle of type `T`, if this simulator has one.
    pub fn extension<T: std::any::Any + Send + Sync + Clone>(&self) -> Option<T> {
        self.extensions
            .iter()
            .find_map(|e| e.downcast_ref::<T>())
            .cloned()
    }

    /// `opc.tcp://HOST:PORT/`, directly usable by a client.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    pub fn namespace_uri(&self) -> &str {
        self.namespace.uri()
    }

    pub fn namespace_index(&self) -> u16 {
        self.namespace.index()
    }

    pub fn namespace(&self) -> &SimNamespace {
        &self.namespace
    }

    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// The set of pinned node ids, shared with simulation tasks.
    pub(crate) fn pinned(&self) -> Arc<std::sync::Mutex<std::collections::HashSet<String>>> {
        self.pinned.clone()
    }

    /// Sets a node by its string identifier (e.g. `FIC-101/PV.CV`), source
    /// timestamp now, and pins it: the simulation no longer changes it.
    pub fn set_value(&self, node: &str, value: impl Into<SimValue>) {
        self.pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string());
        if let Err(e) = self.namespace.set(node, value) {
            tracing::warn!(node, error = %e, "simulator set_value failed");
        }
    }

    /// Deletes a variable at runtime (see `SimNamespace::delete_variable`).
    /// It stays pinned, so the simulation does not try to update it; add it
    /// again with `namespace().add_variables` and `set_value`.
    pub fn delete_variable(&self, node: &str) -> bool {
        self.pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string());
        self.namespace.delete_variable(node)
    }

    /// Stops listening, closes all sessions and waits until the port is free.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        // A dropped simulator must not keep serving in the background.
        self.cancel.cancel();
    }
}

/// `SocketAddr` for "any free port on loopback".
pub fn loopback_any_port() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}
