use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use opcua::client::{DataChangeCallback, Session};
use opcua::types::{
    BrowseDescription, BrowseDirection, BrowseResultMask, DataTypeId, MonitoredItemCreateRequest,
    MonitoringParameters, NodeClass, ObjectId, ObjectTypeId, QualifiedName, ReadValueId,
    ServerState, VariableId, VariableTypeId,
};

use super::nodes::*;
use super::*;
use crate::sim::test_client::open_session;
use crate::sim::{batch, deltav, optomes, SimExtras, SimOptions, SimServer};

/// The name async-opcua's generated enums give `row`'s id.
fn generated_name(row: &Row) -> Option<String> {
    let id = row.id;
    let name = |x: &dyn std::fmt::Debug| format!("{x:?}");
    match row.kind {
        Kind::Object(_) => ObjectId::try_from(id).ok().map(|x| name(&x)),
        Kind::Variable(..) => VariableId::try_from(id).ok().map(|x| name(&x)),
        Kind::ObjectType(_) => ObjectTypeId::try_from(id).ok().map(|x| name(&x)),
        Kind::VariableType(..) => VariableTypeId::try_from(id).ok().map(|x| name(&x)),
        Kind::DataType(_) => DataTypeId::try_from(id).ok().map(|x| name(&x)),
        Kind::ReferenceType(..) => ReferenceTypeId::try_from(id).ok().map(|x| name(&x)),
    }
}

#[test]
fn table_ids_are_the_specifications_and_every_target_is_in_it() {
    let ids: HashSet<u32> = NODES.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), NODES.len(), "an id twice");
    for row in NODES {
        let generated = generated_name(row)
            .unwrap_or_else(|| panic!("{} ({}) is no such node", row.name, row.id));
        // The generated names of objects are paths ("Server_ServerStatus")
        // and folders are named "...Folder".
        assert!(
            generated.trim_end_matches("Folder").ends_with(row.name),
            "{} is i={}, which is {generated}",
            row.name,
            row.id
        );
        let mut targets = vec![row.via];
        if row.parent != 0 {
            targets.push(row.parent);
        }
        match row.kind {
            Kind::Object(type_def) => targets.push(type_def),
            Kind::Variable(data_type, _, type_def) => targets.extend([data_type, type_def]),
            Kind::VariableType(data_type, ..) => targets.push(data_type),
            _ => {}
        }
        for t in targets {
            assert!(ids.contains(&t), "{} points at i={t}, not served", row.name);
        }
    }
}

/// Every node reached from Objects over forward hierarchical references
/// (subtypes included), as a `plantgate browse` walks it: at most
/// `max_refs` references per result (0: the server's choice),
/// continuation points followed.
async fn walk_objects(session: &Session, max_refs: u32) -> HashMap<NodeId, NodeClass> {
    let mut seen = HashMap::new();
    let mut queue = VecDeque::from([NodeId::objects_folder_id()]);
    while let Some(node) = queue.pop_front() {
        let browse = BrowseDescription {
            node_id: node.clone(),
            browse_direction: BrowseDirection::Forward,
            reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
            include_subtypes: true,
            node_class_mask: 0,
            result_mask: BrowseResultMask::All as u32,
        };
        let mut results = session.browse(&[browse], max_refs, None).await;
        loop {
            let mut result = results.expect("browse").pop().expect("a result per node");
            assert!(
                result.status_code.is_good(),
                "{node}: {}",
                result.status_code
            );
            for r in result.references.take().unwrap_or_default() {
                let target = r.node_id.node_id;
                if seen.insert(target.clone(), r.node_class).is_none() {
                    queue.push_back(target);
                }
            }
            if result.continuation_point.is_null_or_empty() {
                break;
            }
            let point = [result.continuation_point];
            results = session.browse_next(false, &point).await;
        }
    }
    seen
}

/// The string ids of the variables a simulator creates (its own
/// construction, from the same public pieces), with `tags` load tags.
fn simulator_variables(kind: &str, seed: u64, tags: usize) -> HashSet<String> {
    let mut want: HashSet<String> = (0..tags).map(deltav::load_tag).collect();
    if kind == "deltav" {
        want.extend(deltav::continuous_tags());
        for unit in batch::UNITS {
            let params = batch::UnitValues::idle().variables();
            want.extend(params.iter().map(|(p, _)| batch::node_id(unit, p)));
        }
    } else {
        let cycles = optomes::work_center_cycles(seed);
        for (wc, cycle) in optomes::WORK_CENTERS.iter().zip(&cycles) {
            let params = cycle.initial_values().variables();
            want.extend(params.iter().map(|(p, _)| optomes::node_id(wc, p)));
        }
    }
    want
}

async fn start(kind: &str, dir: &std::path::Path, tags: usize) -> SimServer {
    let mut opts = SimOptions::new(dir.join(kind));
    opts.tags = tags;
    // Frozen: browsing does not need changing values.
    opts.speed = 0.0;
    let started = match kind {
        "deltav" => deltav::start_deltav(opts, SimExtras::default()).await,
        _ => optomes::start_optomes(opts, SimExtras::default()).await,
    };
    started.expect("simulator starts")
}

async fn close(session: Arc<Session>, event_loop: tokio::task::JoinHandle<StatusCode>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), session.disconnect()).await;
    event_loop.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_from_objects_reaches_every_simulator_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    for kind in ["deltav", "optomes"] {
        let server = start(kind, dir.path(), 3).await;
        let (session, event_loop) =
            open_session(&server.endpoint(), &dir.path().join("client")).await;
        let found = walk_objects(&session, 0).await;
        let variables: HashSet<String> = found
            .iter()
            .filter(|(id, class)| {
                **class == NodeClass::Variable && id.namespace == server.namespace_index()
            })
            .map(|(id, _)| match &id.identifier {
                Identifier::String(s) => s.as_ref().to_string(),
                other => other.to_string(),
            })
            .collect();
        assert_eq!(variables, simulator_variables(kind, 1, 3), "{kind}");
        // The Server object is there too, down to its limits.
        for id in [2253, 2256, 2258, 2268, 11704, 11714] {
            assert!(found.contains_key(&NodeId::new(0, id)), "{kind}: i={id}");
        }
        // One reference per result: the same nodes through continuation
        // points, across node managers (ns0's Server, then the
        // simulator's folders under Objects).
        assert_eq!(walk_objects(&session, 1).await, found, "{kind}");
        close(session, event_loop).await;
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_object_answers_namespace_array_and_server_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start("deltav", dir.path(), 0).await;
    let (session, event_loop) = open_session(&server.endpoint(), &dir.path().join("client")).await;

    // Every variable of the table reads Good with a value.
    let variables: Vec<u32> = NODES
        .iter()
        .filter(|r| matches!(r.kind, Kind::Variable(..)))
        .map(|r| r.id)
        .collect();
    let reads: Vec<ReadValueId> = variables
        .iter()
        .map(|id| ReadValueId::from(NodeId::new(0, *id)))
        .collect();
    let values = session
        .read(&reads, TimestampsToReturn::Both, 0.0)
        .await
        .expect("read");
    let mut by_id = HashMap::new();
    for (id, dv) in variables.iter().zip(values) {
        assert_eq!(dv.status(), StatusCode::Good, "i={id}");
        let value = dv.value.unwrap_or(Variant::Empty);
        assert!(!value.is_empty(), "i={id} has no value");
        by_id.insert(*id, value);
    }

    // NamespaceArray: UA, the server's own, then the simulator's at 2.
    let namespaces = session
        .read_namespace_array()
        .await
        .expect("NamespaceArray");
    assert_eq!(namespaces.get_index(UA_NAMESPACE), Some(0));
    assert_eq!(
        namespaces.get_index("urn:plantgate:sim:deltav:server"),
        Some(1)
    );
    assert_eq!(namespaces.get_index(deltav::NAMESPACE_URI), Some(2));
    assert_eq!(server.namespace_index(), 2);

    // ServerStatus as a structure and in parts.
    let Some(Variant::ExtensionObject(status)) = by_id.get(&2256) else {
        panic!("ServerStatus: {:?}", by_id.get(&2256));
    };
    let status = status
        .inner_as::<ServerStatusDataType>()
        .expect("a ServerStatusDataType");
    assert_eq!(status.state, ServerState::Running);
    assert!(status.start_time <= status.current_time);
    assert_eq!(
        status.build_info.product_name.as_ref(),
        "plantgate deltav simulator"
    );
    assert_eq!(by_id.get(&2259), Some(&Variant::Int32(0)), "State");
    assert!(matches!(by_id.get(&2258), Some(Variant::DateTime(_))));
    assert_eq!(
        by_id.get(&11714),
        Some(&Variant::UInt32(100_000)),
        "MaxMonitoredItemsPerCall (the simulators' limit)"
    );

    // A simulator variable's DataType is a node the server serves.
    let tag = NodeId::new(2, deltav::continuous_tags()[0].as_str());
    let data_type = session
        .read(
            &[ReadValueId {
                node_id: tag,
                attribute_id: AttributeId::DataType as u32,
                ..Default::default()
            }],
            TimestampsToReturn::Neither,
            0.0,
        )
        .await
        .expect("read DataType");
    let Some(Variant::NodeId(data_type)) = data_type[0].value.clone() else {
        panic!("DataType: {:?}", data_type[0]);
    };
    let name = session
        .read(
            &[ReadValueId {
                node_id: *data_type,
                attribute_id: AttributeId::BrowseName as u32,
                ..Default::default()
            }],
            TimestampsToReturn::Neither,
            0.0,
        )
        .await
        .expect("read BrowseName");
    assert_eq!(
        name[0].value,
        Some(Variant::from(QualifiedName::new(0, "Double")))
    );

    close(session, event_loop).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_time_is_sampled_for_subscribers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start("deltav", dir.path(), 0).await;
    let (session, event_loop) = open_session(&server.endpoint(), &dir.path().join("client")).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = session
        .create_subscription(
            Duration::from_millis(50),
            300,
            100,
            0,
            0,
            true,
            DataChangeCallback::new(move |dv, _| {
                let _ = tx.send(dv);
            }),
        )
        .await
        .expect("subscription");
    let item = |id: u32| {
        MonitoredItemCreateRequest::new(
            ReadValueId::from(NodeId::new(0, id)),
            MonitoringMode::Reporting,
            MonitoringParameters {
                sampling_interval: 50.0,
                queue_size: 10,
                ..Default::default()
            },
        )
    };
    let created = session
        .create_monitored_items(
            sub,
            TimestampsToReturn::Both,
            vec![item(2258), item(99_999)],
        )
        .await
        .expect("monitored items");
    assert_eq!(created[0].result.status_code, StatusCode::Good);
    assert_eq!(created[1].result.status_code, StatusCode::BadNodeIdUnknown);
    let mut times = HashSet::new();
    while times.len() < 3 {
        let dv = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("CurrentTime keeps changing")
            .expect("subscription open");
        if let Some(Variant::DateTime(t)) = dv.value {
            times.insert(t.ticks());
        }
    }
    close(session, event_loop).await;
    server.shutdown().await;
}
