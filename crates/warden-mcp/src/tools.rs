//! Tool names and the messages a gateway writes itself.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
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
    let (rationale, trace_id) = rationale_and_trace(msg);
    let action = map.action(&name);
    Some((
        name,
        ToolCall {
            action,
            arguments,
            rationale,
            trace_id,
            refusal: None,
        },
    ))
}

/// What a request's `params._meta` says for its decision: the agent's stated rationale
/// (`rationale`) and the W3C trace to join (`traceparent`).
pub fn rationale_and_trace(msg: &Value) -> (Option<String>, Option<String>) {
    let meta = msg.pointer("/params/_meta");
    let rationale = meta
        .and_then(|m| m.get("rationale"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let trace_id = meta
        .and_then(|m| m.get("traceparent"))
        .and_then(Value::as_str)
        .and_then(parse_traceparent)
        .map(|(trace, _)| trace);
    (rationale, trace_id)
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

/// Resolves the path arguments of `call` (see [`resolve_path_args`]). A path that cannot
/// be resolved becomes the call's refusal, so the gate denies and records it. Returns the
/// arguments as resolved, for [`forward_arguments`] once the call is permitted; `None` if
/// no arguments name paths.
pub fn resolve_call_paths(
    call: &mut ToolCall,
    names: &[String],
    base: Option<&Path>,
) -> Option<Value> {
    if names.is_empty() {
        return None;
    }
    if let Err(e) = resolve_path_args(&mut call.arguments, names, base) {
        call.refusal = Some(crate::gate::Refusal::unresolved(e.to_string()));
    }
    Some(call.arguments.clone())
}

/// Puts the arguments policy judged into a permitted `tools/call`, so the server opens
/// the resolved paths rather than the strings the client sent.
pub fn forward_arguments(msg: &mut Value, arguments: Value) {
    if let Some(slot) = msg.get_mut("params").and_then(|p| p.get_mut("arguments")) {
        *slot = arguments;
    }
}

/// The longest path the kernel resolves (Linux `PATH_MAX`, counting the final NUL).
pub const PATH_MAX: usize = 4096;
/// The longest single component (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Symlinks followed while resolving one path before it counts as a loop (Linux
/// `MAXSYMLINKS`, after which the kernel answers `ELOOP`).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// Why a file-path argument could not be resolved. A call with such an argument is
/// denied: policy can only judge a path whose destination is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("argument `{arg}`: {problem}")]
pub struct PathError {
    /// The argument's name, as configured in `resolve_paths`.
    pub arg: String,
    pub problem: PathProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("path is {0} bytes; paths must be shorter than {PATH_MAX} bytes")]
    TooLong(usize),
    #[error("a path component is {0} bytes; components may be at most {NAME_MAX} bytes")]
    NameTooLong(usize),
    #[error("path resolves through more than {MAX_SYMLINK_HOPS} symlinks (a symlink loop)")]
    Loop,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("relative path, but the server's working directory is unknown; send an absolute path")]
    Relative,
    #[error("a symlink on the path points to a name that is not valid UTF-8")]
    NotUtf8,
    #[error("`..` follows a folder that does not exist yet, so where it leads cannot be known")]
    ParentOfMissing,
    #[error("a component of the path that is not a folder is followed by more components")]
    NotADirectory,
    #[error("cannot resolve the path: {0}")]
    Io(String),
}

/// Replaces the file-path arguments named in `names` with the paths the server will
/// actually open: made absolute against `base` (the server's working directory, if
/// known), every symlink followed, `.` and `..` applied. Policy then judges where a call
/// really goes, not how its path is spelled, and the gateway forwards these resolved
/// paths to the server, so what was judged is what is opened.
///
/// Fails closed: any path that cannot be resolved with certainty is an error naming the
/// argument (see [`resolve_path`]), and the call is to be denied.
///
/// The server opens the file after the decision, so a symlink swapped in between is not
/// seen here; confine the server to its folder as well (defence in depth).
pub fn resolve_path_args(
    args: &mut Value,
    names: &[String],
    base: Option<&Path>,
) -> Result<(), PathError> {
    let Some(obj) = args.as_object_mut() else {
        return Ok(());
    };
    for name in names {
        let err = |problem| PathError {
            arg: name.clone(),
            problem,
        };
        match obj.get_mut(name) {
            Some(Value::String(p)) => *p = resolve_path(p, base).map_err(err)?,
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::String(p) = item {
                        *p = resolve_path(p, base).map_err(err)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Resolves `p` as `realpath(3)` does, one component at a time from the root, except
/// that what does not exist yet is allowed where a write or `mkdir -p` could create it:
/// - a symlink is replaced by its target (read with `read_link`, so a dangling link
///   resolves to what a write through it would create), at most [`MAX_SYMLINK_HOPS`];
/// - `..` goes to the parent of the resolved prefix (physically, not by spelling);
/// - a missing final component is kept as written; missing folders before it are kept
///   too (a tool creating them makes plain folders, not links), but `..` after a
///   missing folder is refused: it would lead back into the existing tree by a way this
///   function has not resolved;
/// - every other error (permission, not a folder, too long) refuses the path, as do
///   paths of [`PATH_MAX`] bytes or more, before or after resolving, and components
///   longer than [`NAME_MAX`]: the kernel would not resolve them, and a server that
///   shortens or splits them would open something nobody judged.
pub fn resolve_path(p: &str, base: Option<&Path>) -> Result<String, PathProblem> {
    if p.len() >= PATH_MAX {
        return Err(PathProblem::TooLong(p.len()));
    }
    if p.contains('\0') {
        return Err(PathProblem::Nul);
    }
    let expanded = match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    };
    let abs = if expanded.is_absolute() {
        expanded
    } else {
        base.ok_or(PathProblem::Relative)?.join(expanded)
    };

    // Components still to walk, next first; a symlink's target is pushed in front.
    let mut todo: Vec<OsString> = Vec::new();
    let mut out = PathBuf::new();
    push_components(&abs, &mut todo, &mut out);
    let mut hops = 0usize;
    // Set once a component does not exist: everything after it is new as well.
    let mut missing = false;
    while let Some(c) = todo.pop() {
        if c == ".." {
            if missing {
                return Err(PathProblem::ParentOfMissing);
            }
            // `out` is a resolved path with no links left in it, so its parent by name
            // is its parent on disk.
            out.pop();
            continue;
        }
        if c.len() > NAME_MAX {
            return Err(PathProblem::NameTooLong(c.len()));
        }
        out.push(&c);
        if out.as_os_str().len() >= PATH_MAX {
            return Err(PathProblem::TooLong(out.as_os_str().len()));
        }
        if missing {
            continue;
        }
        match std::fs::symlink_metadata(&out) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(PathProblem::Loop);
                }
                let target = std::fs::read_link(&out).map_err(io_problem)?;
                out.pop();
                push_components(&target, &mut todo, &mut out);
            }
            Ok(m) => {
                if !m.is_dir() && !todo.is_empty() {
                    return Err(PathProblem::NotADirectory);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing = true,
            Err(e) => return Err(io_problem(e)),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(Component::RootDir.as_os_str());
    }
    out.into_os_string()
        .into_string()
        .map_err(|_| PathProblem::NotUtf8)
}

/// Queues the components of `p` (a path or a symlink's target) to be walked next. An
/// absolute one restarts from its root; `.` is dropped here.
fn push_components(p: &Path, todo: &mut Vec<OsString>, out: &mut PathBuf) {
    let mut root = PathBuf::new();
    let mut names = Vec::new();
    for c in p.components() {
        match c {
            // Only ever at the start of a path.
            Component::Prefix(_) | Component::RootDir => root.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => names.push(OsString::from("..")),
            Component::Normal(n) => names.push(n.to_owned()),
        }
    }
    if !root.as_os_str().is_empty() {
        *out = root;
    }
    todo.extend(names.into_iter().rev());
}

fn io_problem(e: std::io::Error) -> PathProblem {
    PathProblem::Io(e.to_string())
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

    /// A real layout: `docs/` (allowed), `secret/` beside it, and links between them.
    struct Layout {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Layout {
        fn new() -> Layout {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap();
            std::fs::create_dir_all(root.join("docs/sub")).unwrap();
            std::fs::create_dir_all(root.join("secret")).unwrap();
            std::fs::write(root.join("docs/a.txt"), "a").unwrap();
            std::fs::write(root.join("secret/s.txt"), "s").unwrap();
            Layout { _dir: dir, root }
        }

        fn link(&self, at: &str, to: impl AsRef<Path>) {
            std::os::unix::fs::symlink(to, self.root.join(at)).unwrap();
        }

        fn resolve(&self, p: &str) -> Result<String, PathProblem> {
            resolve_path(p, Some(&self.root))
        }

        fn at(&self, p: &str) -> String {
            self.root.join(p).to_string_lossy().into_owned()
        }
    }

    #[test]
    fn paths_resolve_through_dot_dot_and_symlinks() {
        let l = Layout::new();
        l.link("docs/link", l.root.join("secret"));
        let names = vec!["path".to_string(), "paths".to_string()];
        let mut args = json!({
            "path": "docs/../secret/x.txt",
            "paths": [l.at("docs/link/y.txt"), "docs/new/./z.txt"],
            "other": "../untouched"
        });
        resolve_path_args(&mut args, &names, Some(&l.root)).unwrap();
        assert_eq!(args["path"], l.at("secret/x.txt"));
        assert_eq!(args["paths"][0], l.at("secret/y.txt"));
        assert_eq!(args["paths"][1], l.at("docs/new/z.txt"));
        assert_eq!(args["other"], "../untouched");
        // `..` after a symlink is resolved physically: docs/link/.. is the root, not docs
        assert_eq!(l.resolve("docs/link/../docs/f").unwrap(), l.at("docs/f"));
        assert_eq!(l.resolve("docs/link/..").unwrap(), l.root.to_string_lossy());
        assert_eq!(l.resolve("/").unwrap(), "/");
        assert_eq!(l.resolve("/..").unwrap(), "/");
    }

    #[test]
    fn symlink_chains_resolve_to_their_last_target() {
        let l = Layout::new();
        // relative and absolute targets mixed: docs/one -> two -> ../docs/three -> secret
        l.link("docs/one", "two");
        l.link("docs/two", "../docs/three");
        l.link("docs/three", l.root.join("secret"));
        assert_eq!(l.resolve("docs/one/s.txt").unwrap(), l.at("secret/s.txt"));
        assert_eq!(l.resolve("docs/one").unwrap(), l.at("secret"));
    }

    #[test]
    fn a_dangling_symlink_resolves_to_what_a_write_through_it_creates() {
        let l = Layout::new();
        // Nothing exists at the target yet: a write to docs/out would create secret/new.txt.
        l.link("docs/out", l.root.join("secret/new.txt"));
        assert_eq!(l.resolve("docs/out").unwrap(), l.at("secret/new.txt"));
        // also when the link's target's folder does not exist yet (mkdir -p then write)
        l.link("docs/deep", "../secret/made/new.txt");
        assert_eq!(l.resolve("docs/deep").unwrap(), l.at("secret/made/new.txt"));
    }

    #[test]
    fn a_symlink_loop_is_refused() {
        let l = Layout::new();
        l.link("docs/l1", "l2");
        l.link("docs/l2", "l1");
        assert_eq!(l.resolve("docs/l1/x"), Err(PathProblem::Loop));
        assert_eq!(l.resolve("docs/l1"), Err(PathProblem::Loop));
        l.link("docs/self", "self");
        assert_eq!(l.resolve("docs/self"), Err(PathProblem::Loop));
    }

    #[test]
    fn a_path_over_path_max_through_a_symlink_is_refused() {
        let l = Layout::new();
        l.link("docs/link", l.root.join("secret"));
        // Physically docs/(link/../docs/)* is docs again, then link/s.txt is the secret.
        // The old resolver gave up on the over-long path and judged it inside docs.
        let long = format!("docs/{}link/s.txt", "link/../docs/".repeat(400));
        assert!(l.root.join(&long).as_os_str().len() > PATH_MAX);
        assert!(matches!(l.resolve(&long), Err(PathProblem::TooLong(_))));
        // short to write, over-long once a link is followed
        let deep = "d".repeat(203);
        let target = vec![deep.as_str(); 20].join("/");
        l.link("docs/far", &target);
        let got = l.resolve("docs/far/x");
        assert!(matches!(got, Err(PathProblem::TooLong(_))), "{got:?}");
        assert!(matches!(
            l.resolve(&format!("docs/{}", "n".repeat(256))),
            Err(PathProblem::NameTooLong(256))
        ));
    }

    #[test]
    fn missing_folders_are_allowed_but_not_dot_dot_after_them() {
        let l = Layout::new();
        l.link("docs/link", l.root.join("secret"));
        // mkdir -p docs/new/deeper: plain folders, nothing to follow
        assert_eq!(
            l.resolve("docs/new/deeper").unwrap(),
            l.at("docs/new/deeper")
        );
        // `new/..` would lead back into existing folders (and their links)
        assert_eq!(
            l.resolve("docs/new/../link/s.txt"),
            Err(PathProblem::ParentOfMissing)
        );
        // a file used as a folder
        assert_eq!(l.resolve("docs/a.txt/x"), Err(PathProblem::NotADirectory));
    }

    #[test]
    fn unresolvable_paths_are_refused_naming_the_argument() {
        let l = Layout::new();
        let names = vec!["path".to_string()];
        let mut args = json!({"path": "docs/a\u{0}b"});
        let e = resolve_path_args(&mut args, &names, Some(&l.root)).unwrap_err();
        assert_eq!(e.problem, PathProblem::Nul);
        assert!(e.to_string().starts_with("argument `path`: "), "{e}");
        // without a known working directory, a relative path is not guessed at
        let mut args = json!({"path": ["/abs", "rel"]});
        let e = resolve_path_args(&mut args, &names, None).unwrap_err();
        assert_eq!(e.problem, PathProblem::Relative);
    }

    #[test]
    fn permission_errors_deny_rather_than_guess() {
        use std::os::unix::fs::PermissionsExt;
        let l = Layout::new();
        std::fs::create_dir(l.root.join("docs/locked")).unwrap();
        let locked = l.root.join("docs/locked");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        // root ignores permissions: then the folder is readable and nothing is missing
        let readable = std::fs::read_dir(&locked).is_ok();
        let got = l.resolve("docs/locked/x/y");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
        if readable {
            assert_eq!(got.unwrap(), l.at("docs/locked/x/y"));
        } else {
            assert!(matches!(got, Err(PathProblem::Io(_))), "{got:?}");
        }
    }

    #[test]
    fn resolved_arguments_are_what_is_forwarded() {
        let l = Layout::new();
        let mut msg = json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
            "params":{"name":"read","arguments":{"path":"docs/sub/../a.txt"}}});
        let (_, mut call) = tool_call_of(&ToolMap::new("fs", BTreeMap::new()), &msg).unwrap();
        let names = vec!["path".to_string()];
        let resolved = resolve_call_paths(&mut call, &names, Some(&l.root)).unwrap();
        assert_eq!(call.refusal, None);
        forward_arguments(&mut msg, resolved);
        assert_eq!(msg["params"]["arguments"]["path"], l.at("docs/a.txt"));
        let mut bad = json!({"params":{"name":"read","arguments":{"path":"rel"}}});
        let (_, mut call) = tool_call_of(&ToolMap::default(), &bad).unwrap();
        resolve_call_paths(&mut call, &names, None);
        assert!(call
            .refusal
            .as_ref()
            .unwrap()
            .message
            .contains("argument `path`"));
        assert_eq!(resolve_call_paths(&mut call, &[], None), None);
        forward_arguments(&mut bad, json!({}));
    }
}
