use super::*;

fn var(path: &[&str], node: &str, access: u8) -> Found {
    Found {
        node: NodeRef::parse(node).expect("node"),
        path: path.iter().map(|s| s.to_string()).collect(),
        class: "Variable".into(),
        data_type: Some("Double".into()),
        access: Some(access),
    }
}

#[test]
fn a_line_has_node_name_class_type_and_access() {
    let f = var(&["DeltaV", "FIC-101", "PV"], "nsu=urn:x;s=FIC-101/PV.CV", 3);
    assert_eq!(
        line(&f),
        "    nsu=urn:x;s=FIC-101/PV.CV  PV  Variable  Double  rw"
    );
    let folder = Found {
        node: NodeRef::parse("nsu=urn:x;s=DeltaV").expect("node"),
        path: vec!["DeltaV".into()],
        class: "Object".into(),
        data_type: None,
        access: None,
    };
    assert_eq!(line(&folder), "nsu=urn:x;s=DeltaV  DeltaV  Object");
    assert!(line(&var(&["A"], "i=1", 2)).ends_with("  w"));
    assert!(line(&var(&["A"], "i=1", 0)).ends_with("  -"));
}

#[test]
fn readable_variables_become_unique_tags_that_load() {
    let found = vec![
        var(&["Plant", "FIC-101", "PV"], "nsu=urn:x;s=A", 1),
        var(&["Plant", "FIC-101", "PV"], "nsu=urn:x;s=B", 3),
        var(&["Plant", "Say \"hi\"\\"], "nsu=urn:x;s=C\"q", 1),
        var(&["Plant", "WriteOnly"], "nsu=urn:x;s=D", 2),
    ];
    let toml = tags_toml(&found);
    assert_eq!(toml.matches("[[connections.tags]]").count(), 3, "{toml}");
    assert!(toml.contains("name = \"Plant.FIC-101.PV\"\n"), "{toml}");
    assert!(toml.contains("name = \"Plant.FIC-101.PV~2\"\n"), "{toml}");
    assert!(!toml.contains("WriteOnly"), "{toml}");
    // Pasted under a connection, it is a valid configuration with these
    // very names and nodes.
    let config = format!(
        "[agent]\nid = \"gw\"\nsite = \"s\"\n[mqtt]\nurl = \"mqtts://broker\"\n\
         [[connections]]\nid = \"c\"\nkind = \"generic\"\nendpoint = \"opc.tcp://h:4840\"\n\
         security_policy = \"None\"\nsecurity_mode = \"None\"\n\n{toml}"
    );
    let loaded = crate::config::load_from(&config, &Default::default()).expect("valid");
    let tags = &loaded.config.connections[0].tags;
    assert_eq!(tags.len(), 3);
    assert_eq!(tags[2].name, "Plant.Say \"hi\"\\");
    assert_eq!(tags[2].node, "nsu=urn:x;s=C\"q");
}

#[test]
fn node_ids_are_written_with_their_namespace_uri() {
    let uri = |ns: u16| (ns == 2).then(|| "urn:plant".to_string());
    let id = NodeId::new(2, "FIC-101/PV.CV");
    assert_eq!(
        to_node_ref(&id, uri).to_string(),
        "nsu=urn:plant;s=FIC-101/PV.CV"
    );
    assert_eq!(
        to_node_ref(&NodeId::new(0, 2258u32), uri).to_string(),
        "i=2258"
    );
    assert_eq!(
        to_node_ref(&NodeId::new(7, 5u32), uri).to_string(),
        "ns=7;i=5"
    );
}
