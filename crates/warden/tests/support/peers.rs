//! The official MCP client and the reference servers the MCP tests drive (included with
//! `#[path]`). `.ci/run` installs them (a venv with `mcp`, `npm ci` in tests/mcp); where
//! they are missing a test says so and skips, unless `WARDEN_REQUIRE_MCP_PEERS` is set.
#![allow(dead_code)] // each test crate uses some of these

use std::path::PathBuf;
use std::process::Command;

use super::process::root;

pub struct Peers {
    pub python: PathBuf,
    pub everything: PathBuf,
    pub filesystem: PathBuf,
}

/// The official client and reference servers, or why they are not there.
pub fn peers() -> Result<Peers, String> {
    let r = root();
    let python = std::env::var_os("WARDEN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| r.join(".venv-test/bin/python"));
    let modules = r.join("tests/mcp/node_modules/@modelcontextprotocol");
    let p = Peers {
        python,
        everything: modules.join("server-everything/dist/index.js"),
        filesystem: modules.join("server-filesystem/dist/index.js"),
    };
    if !p.python.exists() {
        return Err(format!(
            "no Python with the MCP SDK at {} (run .ci/run or see tests/mcp)",
            p.python.display()
        ));
    }
    if !p.everything.exists() || !p.filesystem.exists() {
        return Err("reference MCP servers not installed (npm ci --prefix tests/mcp)".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not installed".into());
    }
    Ok(p)
}

/// The peers, or return from the test (failing instead where CI requires them).
#[macro_export]
macro_rules! peers_or_skip {
    () => {
        match $crate::peers::peers() {
            Ok(p) => p,
            // CI sets WARDEN_REQUIRE_MCP_PEERS so a missing peer fails instead of skipping.
            Err(why) if std::env::var_os("WARDEN_REQUIRE_MCP_PEERS").is_some() => panic!("{why}"),
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}
