//! The official MCP conformance suite (`@modelcontextprotocol/conformance`) against a
//! server directly and through each of Warden's gateways, compared check by check.
//!
//! The suite tests a server at a Streamable HTTP URL. For each server it runs four times:
//! - `direct`: the server's own Streamable HTTP transport;
//! - `http`: `warden serve` in front of it at `/mcp/{name}` (the suite sends no
//!   credential, so `add-bearer.mjs` adds the agent's token on the way);
//! - `bridge`: the server over stdio behind `stdio-bridge.mjs` (HTTP to stdio), no Warden;
//! - `stdio`: the same bridge in front of `warden mcp-proxy --server URL` in front of
//!   the server over stdio.
//!
//! `http` is compared with `direct` and `stdio` with `bridge`, so what the bridge itself
//! changes never counts against Warden. Every difference must be listed, with its reason,
//! in tests/mcp/conformance/expected-differences.toml: a new difference fails, and so does
//! a listed one that no longer happens (the fix should take its line with it).
//! docs/conformance.md has the tables; `WARDEN_CONFORMANCE_REPORT=DIR` writes them afresh
//! (`DIR/<server>.md`), `WARDEN_CONFORMANCE_RESULTS=DIR` keeps the suite's own records.
//!
//! Two servers: the suite's scenarios written down as a server (tests/mcp/conformance/
//! server.mjs, on which every scenario passes directly, so every difference is the
//! gateway's) and the reference `server-everything` (which lacks most of what the suite
//! asks for, but is the server people run).
//!
//! Written in Rust rather than as a script so that it runs in `cargo test --workspace`
//! against the binary cargo just built, and skips or fails on missing peers by the same
//! rule as the other MCP tests (CI sets WARDEN_REQUIRE_MCP_PEERS: missing peers fail).
//! The suite wants Node 22; on Node 20 `node20.mjs` supplies the one API it lacks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

#[path = "support/process.rs"]
mod process;
use process::{everything_over_http, root, serve_in, wait_with_deadline, warden_in, Guard};

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

fn here() -> PathBuf {
    root().join("tests/mcp/conformance")
}

struct Peers {
    suite: PathBuf,
    everything: PathBuf,
}

fn peers() -> Result<Peers, String> {
    let modules = root().join("tests/mcp/node_modules/@modelcontextprotocol");
    let p = Peers {
        suite: modules.join("conformance/dist/index.js"),
        everything: modules.join("server-everything/dist/index.js"),
    };
    if !p.suite.exists() || !p.everything.exists() || !modules.join("sdk").exists() {
        return Err(
            "the conformance suite, the SDK or server-everything is not installed \
             (npm ci --prefix tests/mcp)"
                .into(),
        );
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not installed".into());
    }
    Ok(p)
}

/// Starts a helper that prints `listening on PORT` and returns it with that port.
fn start_listening(cmd: &mut Command) -> (Guard, u16) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let guard = Guard(child);
    let port = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{cmd:?} did not start: {line:?}"))
        .parse()
        .unwrap();
    (guard, port)
}

/// One server the suite is run against.
struct Server {
    /// Its `[[mcp_servers]]` name, so its tools are `<name>/<tool>`.
    name: &'static str,
    /// Starts it over Streamable HTTP; its URL.
    http: fn(&Peers) -> (Guard, String),
    /// Its command over stdio.
    stdio: fn(&Peers) -> Vec<String>,
}

const FIXTURE: Server = Server {
    name: "conformance",
    http: |_| {
        let script = here().join("server.mjs");
        let (g, port) = start_listening(Command::new("node").arg(script).args(["http", "0"]));
        (g, format!("http://127.0.0.1:{port}/mcp"))
    },
    stdio: |_| {
        let script = here().join("server.mjs");
        vec!["node".into(), script.display().to_string(), "stdio".into()]
    },
};

const EVERYTHING: Server = Server {
    name: "everything",
    http: |p| everything_over_http(&p.everything),
    stdio: |p| {
        vec![
            "node".into(),
            p.everything.display().to_string(),
            "stdio".into(),
        ]
    },
};

/// The tools the suite calls or looks for, with the Cedar type of their arguments.
/// Policy permits them all on both servers: the suite exercises what a server can do, not
/// what an agent may, so what differs through Warden is the gateway, not policy. (On
/// `server-everything`, which has none of them, the server's own "not found" then comes
/// back, as it does without Warden.)
const SUITE_TOOLS: &[(&str, &str)] = &[
    ("test_simple_text", "{}"),
    ("test_image_content", "{}"),
    ("test_audio_content", "{}"),
    ("test_embedded_resource", "{}"),
    ("test_multiple_content_types", "{}"),
    ("test_tool_with_logging", "{}"),
    ("test_tool_with_progress", "{}"),
    ("test_error_handling", "{}"),
    ("test_sampling", "{ prompt: String }"),
    ("test_elicitation", "{ message: String }"),
    ("test_elicitation_sep1034_defaults", "{}"),
    ("test_elicitation_sep1330_enums", "{}"),
    ("test_reconnection", "{}"),
    (
        "json_schema_2020_12_tool",
        "{ name?: String, address?: { street?: String, city?: String } }",
    ),
];

/// `warden serve` on a copy of examples/mcp, with `server` at `url` and the suite's tools
/// in its catalog and permitted for `research-agent` (scope `conformance:run`).
struct Warden {
    dir: tempfile::TempDir,
    _serve: Guard,
    url: String,
    token: String,
}

impl Warden {
    fn start(server: &str, url: &str) -> Warden {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ex = root().join("examples/mcp");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        std::fs::create_dir_all(d.join("policy")).unwrap();
        let mut config = read(ex.join("warden.toml")).replace(
            "scopes = [\"demo:echo\"",
            "scopes = [\"conformance:run\", \"demo:echo\"",
        );
        assert!(config.contains("\"conformance:run\", \"demo:echo"));
        // What the suite exercises besides tools passes by config (the gateways govern
        // every method; an operator names the ones that may pass undecided).
        let passthrough = "passthrough = [\"initialize\", \"ping\", \"notifications/*\", \
            \"logging/setLevel\", \"resources/*\", \"prompts/*\", \"completion/complete\", \
            \"sampling/createMessage\", \"elicitation/create\", \"roots/list\"]\n";
        if server == "everything" {
            config = config.replace(
                "url = \"http://127.0.0.1:3001/mcp\"\n",
                &format!("url = \"{url}\"\n{passthrough}"),
            );
            assert!(
                config.contains(passthrough),
                "the example's server entry moved"
            );
        } else {
            config +=
                &format!("\n[[mcp_servers]]\nname = \"{server}\"\nurl = \"{url}\"\n{passthrough}");
        }
        let mut schema = read(ex.join("policy/mcp.cedarschema"));
        let mut actions = Vec::new();
        for (tool, params) in SUITE_TOOLS {
            let action = format!("{server}/{tool}");
            config += &format!(
                "\n[[tools]]\nname = \"{action}\"\nscope = \"conformance:run\"\nclassification = \"public\"\n"
            );
            schema += &format!(
                "\naction \"{action}\" appliesTo {{\n  principal: Agent, resource: Tool,\n  \
                 context: {{ params: {params}, call: Call }},\n}};\n"
            );
            actions.push(format!("Action::\"{action}\""));
        }
        let policy = format!(
            "@id(\"conformance-suite\")\npermit (principal, action in [{}], resource);\n",
            actions.join(", ")
        );
        std::fs::write(d.join("warden.toml"), config).unwrap();
        std::fs::write(d.join("policy/mcp.cedarschema"), schema).unwrap();
        std::fs::write(d.join("policy/conformance.cedar"), policy).unwrap();
        std::fs::copy(ex.join("policy/mcp.cedar"), d.join("policy/mcp.cedar")).unwrap();
        warden_server::setup::write_secret(
            &d.join("operator.token"),
            "wop_conformance_operator_0123456789\n",
        )
        .unwrap();

        let (serve, url) = serve_in(d, Stdio::inherit());
        let token = warden_in(d, &["agent", "token", "research-agent"])
            .trim()
            .to_owned();
        Warden {
            dir,
            _serve: serve,
            url,
            token,
        }
    }
}

/// One check's result, as the suite wrote it.
#[derive(Deserialize)]
struct Check {
    id: String,
    status: String,
}

/// Runs the whole suite against `url`: `scenario/check` to status (INFO lines, which
/// only narrate, left out).
fn run_suite(peers: &Peers, url: &str, out: &Path) -> BTreeMap<String, String> {
    let started = Instant::now();
    let child = Command::new("node")
        .arg("--import")
        .arg(here().join("node20.mjs"))
        .arg(&peers.suite)
        .args(["server", "--suite", "all", "--url", url, "--output-dir"])
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = wait_with_deadline(child, Duration::from_secs(600));
    eprintln!("conformance suite at {url}: {:.1?}", started.elapsed());
    let mut results = BTreeMap::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let entry = entry.unwrap();
        let dir = entry.file_name().into_string().unwrap();
        // server-<scenario>-<ISO time with - for : and .>, the time 24 characters long
        let scenario = dir
            .strip_prefix("server-")
            .and_then(|s| s.get(..s.len().checked_sub(25)?))
            .unwrap_or_else(|| panic!("unexpected result folder {dir}"));
        let checks: Vec<Check> = serde_json::from_str(
            &std::fs::read_to_string(entry.path().join("checks.json")).unwrap(),
        )
        .unwrap();
        let mut seen = BTreeMap::<String, usize>::new();
        for c in checks.into_iter().filter(|c| c.status != "INFO") {
            let n = seen.entry(c.id.clone()).or_default();
            *n += 1;
            let key = match *n {
                1 => format!("{scenario}/{}", c.id),
                n => format!("{scenario}/{}#{n}", c.id),
            };
            results.insert(key, c.status);
        }
    }
    assert!(
        !results.is_empty(),
        "the suite reported nothing for {url}:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    results
}

/// The four runs of one server.
struct Runs {
    direct: BTreeMap<String, String>,
    http: BTreeMap<String, String>,
    bridge: BTreeMap<String, String>,
    stdio: BTreeMap<String, String>,
}

fn run_all(peers: &Peers, server: &Server) -> Runs {
    // The suite's own records of each run, kept where WARDEN_CONFORMANCE_RESULTS says.
    let out = tempfile::tempdir().unwrap();
    let kept = std::env::var_os("WARDEN_CONFORMANCE_RESULTS").map(PathBuf::from);
    let base = kept
        .unwrap_or_else(|| out.path().to_path_buf())
        .join(server.name);
    let o = |name: &str| {
        let p = base.join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let (_direct, direct_url) = (server.http)(peers);
    let warden = Warden::start(server.name, &direct_url);
    let direct = run_suite(peers, &direct_url, &o("direct"));

    let (_bearer, port) = start_listening(
        Command::new("node")
            .arg(here().join("add-bearer.mjs"))
            .arg(&warden.url)
            .env("WARDEN_TOKEN", &warden.token),
    );
    let http = run_suite(
        peers,
        &format!("http://127.0.0.1:{port}/mcp/{}", server.name),
        &o("http"),
    );

    let stdio_cmd = (server.stdio)(peers);
    let (_bridge, port) = start_listening(
        Command::new("node")
            .arg(here().join("stdio-bridge.mjs"))
            .arg("--")
            .args(&stdio_cmd),
    );
    let bridge = run_suite(peers, &format!("http://127.0.0.1:{port}/mcp"), &o("bridge"));

    let (_proxied, port) = start_listening(
        Command::new("node")
            .arg(here().join("stdio-bridge.mjs"))
            .arg("--")
            .arg(WARDEN)
            .arg("--config")
            .arg(warden.dir.path().join("warden.toml"))
            .args([
                "mcp-proxy",
                "--server",
                &warden.url,
                "--name",
                server.name,
                "--",
            ])
            .args(&stdio_cmd)
            .env("WARDEN_TOKEN", &warden.token)
            .current_dir(warden.dir.path()),
    );
    let stdio = run_suite(peers, &format!("http://127.0.0.1:{port}/mcp"), &o("stdio"));

    // Both gateway runs went through Warden: each decided and audited the suite's call.
    let out = Command::new(WARDEN)
        .arg("--config")
        .arg(warden.dir.path().join("warden.toml"))
        .args(["audit", "export", "--format", "jsonl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let action = format!("{}/test_simple_text", server.name);
    let permits = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "decision" && e["action"] == action.as_str())
        .filter(|e| e["decision"] == "permit")
        .count();
    assert_eq!(permits, 2, "one permitted `{action}` per gateway run");
    Runs {
        direct,
        http,
        bridge,
        stdio,
    }
}

/// One line of expected-differences.toml.
#[derive(Deserialize, Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[serde(deny_unknown_fields)]
struct Difference {
    server: String,
    transport: String,
    check: String,
    without: String,
    through: String,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    #[serde(default)]
    difference: Vec<Difference>,
}

const MISSING: &str = "NOT RUN";

fn differences(server: &str, runs: &Runs) -> Vec<Difference> {
    let mut out = Vec::new();
    for (transport, without, through) in [
        ("http", &runs.direct, &runs.http),
        ("stdio", &runs.bridge, &runs.stdio),
    ] {
        let keys: std::collections::BTreeSet<&String> =
            without.keys().chain(through.keys()).collect();
        for k in keys {
            let a = without.get(k).map_or(MISSING, String::as_str);
            let b = through.get(k).map_or(MISSING, String::as_str);
            if a != b {
                out.push(Difference {
                    server: server.into(),
                    transport: transport.into(),
                    check: k.clone(),
                    without: a.into(),
                    through: b.into(),
                    reason: String::new(),
                });
            }
        }
    }
    out
}

fn table(server: &str, runs: &Runs, expected: &[Difference]) -> String {
    let mut t = format!(
        "| {server}: scenario/check | direct | HTTP gateway | stdio bridge | stdio proxy | why they differ |\n\
         | --- | --- | --- | --- | --- | --- |\n"
    );
    let keys: std::collections::BTreeSet<&String> = runs
        .direct
        .keys()
        .chain(runs.http.keys())
        .chain(runs.bridge.keys())
        .chain(runs.stdio.keys())
        .collect();
    let get = |m: &BTreeMap<String, String>, k: &String| {
        m.get(k).map_or(MISSING.to_owned(), |s| s.clone())
    };
    for k in keys {
        let why: Vec<String> = expected
            .iter()
            .filter(|d| d.server == server && &d.check == k)
            .map(|d| format!("{}: {}", d.transport, d.reason))
            .collect();
        let _ = writeln!(
            t,
            "| {k} | {} | {} | {} | {} | {} |",
            get(&runs.direct, k),
            get(&runs.http, k),
            get(&runs.bridge, k),
            get(&runs.stdio, k),
            why.join("<br>")
        );
    }
    t
}

/// Runs the suite four ways against `server` and compares the differences found with
/// those expected-differences.toml lists for it.
fn suite_differs_only_where_listed(server: &Server) {
    let peers = match peers() {
        Ok(p) => p,
        Err(why) if std::env::var_os("WARDEN_REQUIRE_MCP_PEERS").is_some() => panic!("{why}"),
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let listed: Expected =
        toml::from_str(&std::fs::read_to_string(here().join("expected-differences.toml")).unwrap())
            .unwrap();
    let listed: Vec<Difference> = listed
        .difference
        .into_iter()
        .filter(|d| d.server == server.name)
        .collect();
    let runs = run_all(&peers, server);
    let found = differences(server.name, &runs);
    let report = table(server.name, &runs, &listed);
    eprintln!("{report}");
    if let Some(dir) = std::env::var_os("WARDEN_CONFORMANCE_REPORT") {
        std::fs::write(Path::new(&dir).join(format!("{}.md", server.name)), &report).unwrap();
    }

    let key = |d: &Difference| {
        (
            d.transport.clone(),
            d.check.clone(),
            d.without.clone(),
            d.through.clone(),
        )
    };
    let listed: std::collections::BTreeSet<_> = listed.iter().map(key).collect();
    let found: std::collections::BTreeSet<_> = found.iter().map(key).collect();
    let new: Vec<_> = found.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&found).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "the conformance suite on `{}` through Warden differs from the server alone other \
         than tests/mcp/conformance/expected-differences.toml says.\n\
         new (transport, check, without, through): find the cause; list it, with the \
         reason, only if it is intended or a known bug:\n{new:#?}\n\
         listed but no longer found: remove from the file:\n{gone:#?}",
        server.name
    );
}

/// The suite's scenarios as a server (tests/mcp/conformance/server.mjs): every check
/// passes directly, so each difference is one the gateway makes.
#[test]
fn conformance_suite_on_its_own_scenarios_differs_through_warden_only_where_listed() {
    suite_differs_only_where_listed(&FIXTURE);
}

/// The reference server people run, `server-everything`.
#[test]
fn conformance_suite_on_server_everything_differs_through_warden_only_where_listed() {
    suite_differs_only_where_listed(&EVERYTHING);
}
