//! Sparkplug topic names: `spBv1.0/{group}/{type}/{edge node}[/{device}]`
//! with the site as group, the agent as edge node and each plant
//! connection as a device (docs/sparkplug.md).

/// The namespace of Sparkplug B (3.0 keeps the 1.0 name).
pub const NAMESPACE: &str = "spBv1.0";

#[derive(Debug, Clone)]
pub struct SpTopics {
    /// `spBv1.0/{group}`
    group: String,
    node: String,
}

impl SpTopics {
    pub fn new(group: &str, node: &str) -> SpTopics {
        SpTopics {
            group: format!("{NAMESPACE}/{group}"),
            node: node.to_string(),
        }
    }

    /// `NBIRTH`, `NDATA`, `NDEATH`, `NCMD`.
    pub fn node(&self, message_type: &str) -> String {
        format!("{}/{message_type}/{}", self.group, self.node)
    }

    /// `DBIRTH`, `DDATA`, `DDEATH`, `DCMD` of `device` (`+` for all).
    pub fn device(&self, message_type: &str, device: &str) -> String {
        format!("{}/{message_type}/{}/{device}", self.group, self.node)
    }

    /// What the agent subscribes to: its node's and its devices' commands.
    pub fn commands(&self) -> [String; 2] {
        [self.node("NCMD"), self.device("DCMD", "+")]
    }

    /// The message type and device of one of this node's topics, if it is
    /// one.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let rest = topic.strip_prefix(self.group.as_str())?.strip_prefix('/')?;
        let (message_type, rest) = rest.split_once('/')?;
        let rest = rest.strip_prefix(self.node.as_str())?;
        match rest {
            "" => Some((message_type, None)),
            r => Some((message_type, Some(r.strip_prefix('/')?))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_parsing() {
        let t = SpTopics::new("plant1", "gw1");
        assert_eq!(t.node("NBIRTH"), "spBv1.0/plant1/NBIRTH/gw1");
        assert_eq!(t.device("DDATA", "line1"), "spBv1.0/plant1/DDATA/gw1/line1");
        assert_eq!(t.commands()[1], "spBv1.0/plant1/DCMD/gw1/+");
        assert_eq!(t.parse("spBv1.0/plant1/NCMD/gw1"), Some(("NCMD", None)));
        assert_eq!(
            t.parse("spBv1.0/plant1/DCMD/gw1/line1"),
            Some(("DCMD", Some("line1")))
        );
        assert_eq!(t.parse("spBv1.0/plant1/NCMD/gw10"), None);
        assert_eq!(t.parse("spBv1.0/plant2/NCMD/gw1"), None);
    }
}
