//! TOML rendering of the effective configuration for `plantgate check`.
//!
//! Goes through the model's `Serialize` impls, so secrets print as `***` and
//! durations the way users write them. serde_json's `Value` would sort keys
//! alphabetically (no `preserve_order`), so the JSON text is read back into a
//! small order-keeping tree and written out as TOML by hand; the main crate
//! has no `toml` dependency of its own.

use std::fmt::{self, Write as _};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::keys;
use super::model::Config;
use super::units::format_size;

pub fn render(config: &Config) -> String {
    let node = serde_json::to_string(config)
        .map_err(|e| e.to_string())
        .and_then(|json| serde_json::from_str::<Node>(&json).map_err(|e| e.to_string()));
    match node {
        Ok(Node::Table(mut entries)) => {
            prune(&mut entries);
            let mut out = String::new();
            write_table(&mut out, &[], &entries);
            out
        }
        // Unreachable for the model types (all plain structs); say so rather
        // than panic inside `check`.
        Ok(_) => "# could not render the configuration: not a table\n".into(),
        Err(e) => format!("# could not render the configuration: {e}\n"),
    }
}

/// Keeps the output a loadable config (values derived from `mqtt.url` would
/// be rejected by the loader) written the way users write it.
fn prune(root: &mut Vec<(String, Node)>) {
    for (key, value) in root.iter_mut() {
        match (key.as_str(), value) {
            ("mqtt", Node::Table(mqtt)) => {
                // host, port and tls are parsed from `url`, not keys.
                mqtt.retain(|(k, _)| keys::MQTT_KEYS.contains(&k.as_str()));
                human_sizes(mqtt, "max_message_bytes");
            }
            ("buffer", Node::Table(buffer)) => human_sizes(buffer, "max_size"),
            ("connections", Node::Array(conns)) => {
                for conn in conns.iter_mut() {
                    if let Node::Table(conn) = conn {
                        // The kind's own keys serialize after the common
                        // ones; print them in the key table's order instead
                        // (a key the table lacks goes last, where the reload
                        // in the tests reports it as unknown).
                        conn.sort_by_key(|(k, _)| keys::position(k).unwrap_or(usize::MAX));
                    }
                }
            }
            _ => {}
        }
    }
    // `connections = []` would have to precede every [section]; absent means
    // the same thing.
    root.retain(|(_, v)| !matches!(v, Node::Array(items) if items.is_empty()));
}

/// Sizes are plain integers in the model; show them the way users write them.
fn human_sizes(table: &mut [(String, Node)], key: &str) {
    for (k, v) in table.iter_mut() {
        if k == key {
            if let Node::Int(n) = v {
                if let Ok(n) = u64::try_from(*n) {
                    *v = Node::Str(format_size(n));
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
}

impl Node {
    fn is_table(&self) -> bool {
        matches!(self, Node::Table(_))
    }

    /// Non-empty arrays whose elements are all tables become `[[key]]` blocks.
    fn is_array_of_tables(&self) -> bool {
        matches!(self, Node::Array(items) if !items.is_empty() && items.iter().all(Node::is_table))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Node>()? {
            entries.push((k, v));
        }
        Ok(Node::Table(entries))
    }
}

fn write_table(out: &mut String, path: &[String], entries: &[(String, Node)]) {
    // TOML requires a table's plain keys before any of its sub-tables.
    for (key, value) in entries {
        if matches!(value, Node::Null) || value.is_table() || value.is_array_of_tables() {
            continue;
        }
        let _ = writeln!(out, "{} = {}", toml_key(key), inline(value));
    }
    for (key, value) in entries {
        let mut sub = path.to_vec();
        sub.push(key.clone());
        let header = sub
            .iter()
            .map(|k| toml_key(k))
            .collect::<Vec<_>>()
            .join(".");
        match value {
            Node::Table(inner) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                let _ = writeln!(out, "[{header}]");
                write_table(out, &sub, inner);
            }
            Node::Array(items) if value.is_array_of_tables() => {
                for item in items {
                    if let Node::Table(inner) = item {
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        let _ = writeln!(out, "[[{header}]]");
                        write_table(out, &sub, inner);
                    }
                }
            }
            _ => {}
        }
    }
}

fn inline(value: &Node) -> String {
    match value {
        // Only reachable inside inline arrays/tables; TOML has no null.
        Node::Null => "\"\"".into(),
        Node::Bool(b) => b.to_string(),
        Node::Int(i) => i.to_string(),
        Node::Float(f) => toml_float(*f),
        Node::Str(s) => toml_string(s),
        Node::Array(items) => {
            let parts: Vec<String> = items.iter().map(inline).collect();
            format!("[{}]", parts.join(", "))
        }
        Node::Table(entries) => {
            let parts: Vec<String> = entries
                .iter()
                .filter(|(_, v)| !matches!(v, Node::Null))
                .map(|(k, v)| format!("{} = {}", toml_key(k), inline(v)))
                .collect();
            format!("{{ {} }}", parts.join(", "))
        }
    }
}

fn toml_float(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        // Debug keeps a fractional part ("1.0"), which TOML needs to stay a float.
        let s = format!("{f:?}");
        if s.contains(['.', 'e', 'E']) {
            s
        } else {
            format!("{s}.0")
        }
    }
}

fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        toml_string(key)
    }
}

/// A TOML basic string (quoted and escaped).
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_keys_are_escaped() {
        assert_eq!(toml_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        assert_eq!(toml_key("plain_key-1"), "plain_key-1");
        assert_eq!(toml_key("has space"), "\"has space\"");
        assert_eq!(toml_float(1.0), "1.0");
        assert_eq!(toml_float(0.5), "0.5");
    }

    #[test]
    fn nested_arrays_of_tables_keep_order() {
        let node: Node = serde_json::from_str(
            r#"{"z":{"b":1,"a":null},"list":[{"n":"x","sub":[{"k":true}],"empty":[]}]}"#,
        )
        .unwrap();
        let Node::Table(entries) = node else {
            panic!("not a table")
        };
        let mut out = String::new();
        write_table(&mut out, &[], &entries);
        assert_eq!(
            out,
            "[z]\nb = 1\n\n[[list]]\nn = \"x\"\nempty = []\n\n[[list.sub]]\nk = true\n"
        );
    }
}
