//! The environment `mcp-proxy` gives the MCP server it starts.
//!
//! The proxy's own environment holds the agent's credential (`WARDEN_TOKEN`) and whatever
//! else the MCP client put there for other servers; a child that inherited it could read
//! the token and act as the agent without Warden, or leak secrets meant for someone else.
//! So the server starts from an empty environment plus a short list of variables that a
//! program needs to run at all, and whatever the operator names explicitly (`--env`, the
//! config's `env` and `pass_env`). `WARDEN_*` is refused even when named.

use std::collections::BTreeMap;
use std::ffi::OsString;

use warden_core::config::{check_child_env_name, McpServer};

/// Passed from the proxy's environment when set, because ordinary programs need them:
/// - `PATH`: to find the server's interpreter (`npx` runs `#!/usr/bin/env node`, `uvx`
///   finds `python`) and the programs it runs in turn;
/// - `HOME`: where per-user caches and config live (npm's `~/.npm` for `npx`, pip's and
///   uv's caches, `~/.config`); without it `npx` and `uvx` cannot fetch or cache;
/// - `LANG` and `LC_*`: the character encoding of file names and text, so a non-ASCII
///   path means the same to the server as to the client;
/// - `TZ`: the local time the server reports;
/// - `TMPDIR`: where the system's temporary files go (a sandboxed host often moves it).
///
/// Left out, each for a reason: `TERM` (the server's stdin and stdout are pipes, not a
/// terminal), `USER`/`LOGNAME`/`SHELL` (a program that needs them asks the system),
/// `HTTP(S)_PROXY`/`NO_PROXY` (their URLs often carry credentials: pass them with
/// `--env NAME` where a server must reach the network through a proxy), `NODE_OPTIONS`,
/// `PYTHONPATH` and the like (they change what code the server runs).
#[cfg(not(windows))]
const BASE: &[&str] = &["PATH", "HOME", "LANG", "TZ", "TMPDIR"];

/// On Windows a program also needs the system folders (`SystemRoot` for sockets and
/// crypto), the command interpreter, executable extensions and the per-user folders.
#[cfg(windows)]
const BASE: &[&str] = &[
    "PATH",
    "PATHEXT",
    "SYSTEMROOT",
    "SYSTEMDRIVE",
    "WINDIR",
    "COMSPEC",
    "TEMP",
    "TMP",
    "USERPROFILE",
    "APPDATA",
    "LOCALAPPDATA",
    "PROGRAMDATA",
    "HOMEDRIVE",
    "HOMEPATH",
    "LANG",
    "TZ",
];

/// One `--env` argument: pass a variable through, or set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvArg {
    /// `--env NAME`: the value of NAME in the proxy's environment, if it has one.
    Pass(String),
    /// `--env NAME=VALUE`.
    Set(String, String),
}

/// Parses `--env NAME` or `--env NAME=VALUE`, refusing `WARDEN_*` and malformed names.
pub fn parse_env_arg(arg: &str) -> Result<EnvArg, String> {
    let parsed = match arg.split_once('=') {
        Some((name, value)) => EnvArg::Set(name.to_owned(), value.to_owned()),
        None => EnvArg::Pass(arg.to_owned()),
    };
    let (EnvArg::Pass(name) | EnvArg::Set(name, _)) = &parsed;
    check_child_env_name(name)?;
    Ok(parsed)
}

/// The server's environment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServerEnv {
    pub vars: BTreeMap<String, OsString>,
    /// Names the operator asked to pass through that the proxy's environment lacks; the
    /// caller says so, since a server missing its key fails later with a vaguer message.
    pub missing: Vec<String>,
}

/// Builds the server's environment from the proxy's (`lookup`, and `all` for the `LC_*`
/// family), the config entry and the command line, in that order: a later source
/// overrides an earlier one, so `--env` has the last word.
pub fn server_env(
    lookup: &dyn Fn(&str) -> Option<OsString>,
    all: &[(String, OsString)],
    declared: Option<&McpServer>,
    args: &[EnvArg],
) -> ServerEnv {
    let mut env = ServerEnv::default();
    for name in BASE {
        if let Some(v) = lookup(name) {
            env.vars.insert((*name).to_owned(), v);
        }
    }
    // The locale comes as a family (`LC_ALL`, `LC_CTYPE`, ...); all of them or none.
    for (name, value) in all {
        if name.starts_with("LC_") && check_child_env_name(name).is_ok() {
            env.vars.insert(name.clone(), value.clone());
        }
    }
    let pass = |env: &mut ServerEnv, name: &str| match lookup(name) {
        Some(v) => {
            env.vars.insert(name.to_owned(), v);
        }
        None => env.missing.push(name.to_owned()),
    };
    if let Some(m) = declared {
        for name in &m.pass_env {
            pass(&mut env, name);
        }
        for (name, value) in &m.env {
            env.vars.insert(name.clone(), value.into());
        }
    }
    for a in args {
        match a {
            EnvArg::Pass(name) => pass(&mut env, name),
            EnvArg::Set(name, value) => {
                env.vars.insert(name.clone(), value.into());
            }
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy_env() -> Vec<(String, OsString)> {
        [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/a"),
            ("LC_ALL", "C.UTF-8"),
            ("TERM", "xterm"),
            ("WARDEN_TOKEN", "wtk_secret"),
            ("AWS_SECRET_ACCESS_KEY", "canary"),
            ("GITHUB_TOKEN", "ghp_x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect()
    }

    fn build(declared: Option<&McpServer>, args: &[EnvArg]) -> ServerEnv {
        let all = proxy_env();
        let lookup = |n: &str| all.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        server_env(&lookup, &all, declared, args)
    }

    fn names(env: &ServerEnv) -> Vec<&str> {
        env.vars.keys().map(String::as_str).collect()
    }

    #[test]
    fn by_default_only_what_a_program_needs_passes() {
        let env = build(None, &[]);
        assert_eq!(names(&env), ["HOME", "LC_ALL", "PATH"]);
        assert!(env.missing.is_empty());
    }

    #[test]
    fn the_operator_adds_by_name_or_value_and_the_command_line_wins() {
        let m = McpServer {
            name: "gh".into(),
            url: None,
            actions: BTreeMap::new(),
            timeout_ns: 1,
            resolve_paths: vec![],
            env: [("LOG_LEVEL".to_owned(), "info".to_owned())].into(),
            pass_env: vec!["GITHUB_TOKEN".into(), "NOT_SET".into()],
            passthrough: Vec::new(),
            tls: Default::default(),
        };
        let args = [
            parse_env_arg("LOG_LEVEL=debug").unwrap(),
            parse_env_arg("HOME=/srv").unwrap(),
            parse_env_arg("ALSO_NOT_SET").unwrap(),
        ];
        let env = build(Some(&m), &args);
        assert_eq!(
            names(&env),
            ["GITHUB_TOKEN", "HOME", "LC_ALL", "LOG_LEVEL", "PATH"]
        );
        assert_eq!(env.vars["LOG_LEVEL"], "debug");
        assert_eq!(env.vars["HOME"], "/srv");
        assert_eq!(env.vars["GITHUB_TOKEN"], "ghp_x");
        assert_eq!(env.missing, ["NOT_SET", "ALSO_NOT_SET"]);
    }

    #[test]
    fn warden_variables_are_refused_however_asked_for() {
        for arg in ["WARDEN_TOKEN", "WARDEN_TOKEN=x", "warden_server", "=x", ""] {
            assert!(parse_env_arg(arg).is_err(), "{arg}");
        }
        let err = parse_env_arg("WARDEN_TOKEN").unwrap_err();
        assert!(err.contains("never reach the MCP server"), "{err}");
        assert_eq!(
            parse_env_arg("A=b=c").unwrap(),
            EnvArg::Set("A".into(), "b=c".into())
        );
    }
}
