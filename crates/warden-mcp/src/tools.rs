//! Tool names and the messages a gateway writes itself.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use warden_core::trace::parse_traceparent;

use crate::gate::{ToolCall, Verdict};

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

/// Reads a `tools/call` request: the tool's name and what the gate needs to decide it
/// (its action, arguments, the agent's stated rationale from `params._meta.rationale`,
/// and the trace to join from `params._meta.traceparent`). `None` without a tool name.
pub fn tool_call_of(map: &ToolMap, msg: &Value) -> Option<(String, ToolCall)> {
    let params = msg.get("params");
    let name = params?.get("name")?.as_str()?.to_owned();
    let arguments = params
        .and_then(|p| p.get("arguments"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let meta = params.and_then(|p| p.get("_meta"));
    let rationale = meta
        .and_then(|m| m.get("rationale"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let trace_id = meta
        .and_then(|m| m.get("traceparent"))
        .and_then(Value::as_str)
        .and_then(parse_traceparent)
        .map(|(trace, _)| trace);
    let action = map.action(&name);
    Some((
        name,
        ToolCall {
            action,
            arguments,
            rationale,
            trace_id,
        },
    ))
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

/// Replaces the file-path arguments named in `names` with the paths the server will
/// actually open: made absolute against `base`, symlinks resolved, `.` and `..` applied.
/// Policy then judges where a call really goes, not how its path is spelled.
///
/// The server opens the file after the decision, so a symlink swapped in between is not
/// seen here; confine the server to its folder as well (defence in depth).
pub fn resolve_path_args(args: &mut Value, names: &[String], base: &Path) {
    let Some(obj) = args.as_object_mut() else {
        return;
    };
    for name in names {
        match obj.get_mut(name) {
            Some(Value::String(p)) => *p = resolve_path(p, base),
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::String(p) = item {
                        *p = resolve_path(p, base);
                    }
                }
            }
            _ => {}
        }
    }
}

fn resolve_path(p: &str, base: &Path) -> String {
    let expanded = match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    };
    let abs = if expanded.is_absolute() {
        expanded
    } else {
        base.join(expanded)
    };
    let abs = lexical(&abs, true);
    // The longest prefix that exists is resolved by the OS (symlinks included); what does
    // not exist yet cannot be a symlink and is appended as written.
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for c in rest.iter().rev() {
                out.push(c);
            }
            return lexical(&out, false).to_string_lossy().into_owned();
        }
        match (
            existing.file_name().map(|f| f.to_owned()),
            existing.parent().map(Path::to_path_buf),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return abs.to_string_lossy().into_owned(),
        }
    }
}

/// Applies `.` and `..` by name. With `keep_parent_of_links`, `..` is kept wherever the
/// prefix exists on disk, because there it must be resolved by the OS (after a symlink,
/// `a/link/..` is not `a`).
fn lexical(p: &Path, keep_parent_of_links: bool) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if keep_parent_of_links && out.exists() => out.push(".."),
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
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
            parse_traceparent(&tp).map(|(t, _)| t).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(bag.contains("warden.agent_id=a"));
    }

    #[test]
    fn paths_resolve_through_dot_dot_and_symlinks() {
        let dir = std::env::temp_dir().join(format!("warden-paths-{}", std::process::id()));
        let docs = dir.join("docs");
        let secret = dir.join("secret");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        let link = docs.join("link");
        let _ = std::fs::remove_file(&link);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let real = std::fs::canonicalize(&dir).unwrap();
        let names = vec!["path".to_string(), "paths".to_string()];
        let mut args = json!({
            "path": "docs/../secret/x.txt",
            "paths": [format!("{}/docs/link/y.txt", dir.display()), "docs/new/./z.txt"],
            "other": "../untouched"
        });
        resolve_path_args(&mut args, &names, &dir);
        assert_eq!(
            args["path"],
            real.join("secret/x.txt").to_string_lossy().as_ref()
        );
        #[cfg(unix)]
        assert_eq!(
            args["paths"][0],
            real.join("secret/y.txt").to_string_lossy().as_ref()
        );
        assert_eq!(
            args["paths"][1],
            real.join("docs/new/z.txt").to_string_lossy().as_ref()
        );
        assert_eq!(args["other"], "../untouched");
        // `..` after a symlink is resolved physically: docs/link/.. is `dir`, not `docs`
        let mut a = json!({"path": "docs/link/../docs/f"});
        resolve_path_args(&mut a, &names, &dir);
        #[cfg(unix)]
        assert_eq!(a["path"], real.join("docs/f").to_string_lossy().as_ref());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
