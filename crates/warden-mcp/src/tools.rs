//! Tool names and the messages a gateway writes itself.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};

use crate::gate::Verdict;

/// Maps an MCP server's tool names to Warden actions: by default `server/tool`,
/// overridden per tool so policies can speak the organisation's own names.
#[derive(Debug, Clone, Default)]
pub struct ToolMap {
    pub server: String,
    pub overrides: BTreeMap<String, String>,
}

impl ToolMap {
    pub fn new(server: impl Into<String>, overrides: BTreeMap<String, String>) -> Self {
        Self {
            server: server.into(),
            overrides,
        }
    }

    pub fn action(&self, tool: &str) -> String {
        self.overrides
            .get(tool)
            .cloned()
            .unwrap_or_else(|| format!("{}/{tool}", self.server))
    }
}

/// The tool result a denied call gets: an error result the agent's model can read and
/// recover from, with Warden's decision attached under `_meta`.
pub fn denied_result(id: &Value, tool: &str, v: &Verdict) -> Value {
    let rules = if v.rules.is_empty() {
        String::new()
    } else {
        format!(" (rule {})", v.rules.join(", "))
    };
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {
            "content": [{
                "type": "text",
                "text": format!("Warden denied the call to `{tool}`: {}{rules}. {}", v.reason, v.message),
            }],
            "isError": true,
            "_meta": {
                "warden": { "decision": "deny", "reason": v.reason, "rules": v.rules, "call_id": v.call_id }
            }
        }
    })
}

/// Removes from a `tools/list` result the tools whose actions the agent can never call.
/// Returns how many were removed.
pub fn filter_tools_list(response: &mut Value, map: &ToolMap, visible: &HashSet<String>) -> usize {
    let Some(tools) = response
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    else {
        return 0;
    };
    let before = tools.len();
    tools.retain(|t| {
        t.get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| visible.contains(&map.action(name)))
    });
    before - tools.len()
}

/// The `traceparent` and `baggage` values for an upstream request.
pub fn trace_headers(v: &Verdict) -> (String, String) {
    (
        format!("00-{}-{}-01", v.trace_id, v.span_id),
        format!(
            "warden.agent_id={},warden.call_id={}",
            v.agent_id, v.call_id
        ),
    )
}

/// The trace id of a W3C `traceparent` value, if it is well formed.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut it = traceparent.trim().split('-');
    let (_v, trace, parent, _f) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(trace, 32) && trace.bytes().any(|b| b != b'0') && hex(parent, 16))
        .then(|| trace.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict() -> Verdict {
        Verdict {
            permit: false,
            reason: "TOOL_NOT_PERMITTED".into(),
            rules: vec!["r1".into()],
            message: "no".into(),
            call_id: "c".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            agent_id: "a".into(),
        }
    }

    #[test]
    fn maps_and_filters() {
        let m = ToolMap::new(
            "fs",
            [("write_file".to_string(), "files:write".to_string())].into(),
        );
        assert_eq!(m.action("read_file"), "fs/read_file");
        assert_eq!(m.action("write_file"), "files:write");
        let mut resp = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_file"},{"name":"write_file"},{"nope":1}]}});
        let visible: HashSet<String> = ["fs/read_file".to_string()].into();
        assert_eq!(filter_tools_list(&mut resp, &m, &visible), 2);
        assert_eq!(resp["result"]["tools"], json!([{"name":"read_file"}]));
    }

    #[test]
    fn denied_result_is_an_error_result_with_reason() {
        let r = denied_result(&json!(7), "write_file", &verdict());
        assert_eq!(r["id"], 7);
        assert_eq!(r["result"]["isError"], true);
        let text = r["result"]["content"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("TOOL_NOT_PERMITTED")
                && text.contains("r1")
                && text.contains("write_file")
        );
    }

    #[test]
    fn trace() {
        let (tp, bag) = trace_headers(&verdict());
        assert_eq!(
            trace_id_of(&tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(bag.contains("warden.agent_id=a"));
        assert!(trace_id_of("garbage").is_none());
    }
}
