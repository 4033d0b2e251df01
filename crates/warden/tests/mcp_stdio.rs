//! `warden mcp-proxy` between the official Python MCP client and the reference MCP
//! servers, over stdio, in both modes (embedded pipeline, remote `warden serve`).
//!
//! The peers are installed by `.ci/run` (a venv with `mcp`, `npm ci` in tests/mcp). Where
//! they are missing the tests say so and skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/peers.rs"]
mod peers;
#[path = "support/process.rs"]
mod process;
use peers::Peers;
use process::{root, serve_in, wait_with_deadline, Guard};

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

/// A temp copy of examples/mcp whose documents folder is real.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let ex = root().join("examples/mcp");
        std::fs::create_dir_all(d.join("policy")).unwrap();
        for f in ["warden.toml", "policy/mcp.cedarschema", "policy/mcp.cedar"] {
            let text = std::fs::read_to_string(ex.join(f)).unwrap();
            let text = text.replace("/srv/docs", &d.join("docs").display().to_string());
            let text = text.replace("refresh = \"250ms\"", "refresh = \"100ms\"");
            std::fs::write(d.join(f), text).unwrap();
        }
        warden_server::setup::write_secret(
            &d.join("operator.token"),
            "wop_mcp_test_operator_0123456789\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.join("docs")).unwrap();
        std::fs::create_dir_all(d.join("secret")).unwrap();
        std::fs::write(d.join("docs/a.txt"), "claim notes\n").unwrap();
        std::fs::write(d.join("secret/s.txt"), "the vault code\n").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(d.join("secret"), d.join("docs/link")).unwrap();
        Setup { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    fn config(&self) -> PathBuf {
        self.path().join("warden.toml")
    }

    fn warden(&self, args: &[&str]) -> Output {
        Command::new(WARDEN)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(self.path())
            .output()
            .unwrap()
    }

    fn token(&self) -> String {
        let out = self.warden(&["agent", "token", "research-agent"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Runs the Python client with `plan` against `warden mcp-proxy <proxy_args> -- <server>`.
    fn client(
        &self,
        peers: &Peers,
        plan: &Value,
        proxy_args: &[&str],
        server: &[&str],
        token: &str,
    ) -> Child {
        self.client_with_env(peers, plan, proxy_args, server, &[("WARDEN_TOKEN", token)])
    }

    /// [`Setup::client`] with these variables in the client's (and so the proxy's)
    /// environment.
    fn client_with_env(
        &self,
        peers: &Peers,
        plan: &Value,
        proxy_args: &[&str],
        server: &[&str],
        env: &[(&str, &str)],
    ) -> Child {
        let plan_file = self.path().join(format!("plan-{}.json", rand_suffix()));
        std::fs::write(&plan_file, plan.to_string()).unwrap();
        let mut cmd = Command::new(&peers.python);
        cmd.arg(root().join("tests/mcp/mcp_client.py"))
            .arg(&plan_file)
            .arg("--")
            .arg(WARDEN)
            .arg("--config")
            .arg(self.config())
            .arg("mcp-proxy")
            .args(proxy_args)
            .arg("--")
            .args(server)
            .envs(env.iter().copied())
            .current_dir(self.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        let out = self.warden(&["audit", "verify"]);
        assert!(
            out.status.success(),
            "audit verify: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = self.warden(&["audit", "export", "--format", "jsonl"]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Waits for the client and returns its result lines (after `initialize`).
fn results(child: Child) -> Vec<Value> {
    results_and_stderr(child).0
}

/// Like [`results`], with the client's stderr (which carries the proxy's).
fn results_and_stderr(child: Child) -> (Vec<Value>, String) {
    let out = wait_with_deadline(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["op"], "initialize", "{stdout}");
    (
        lines[1..].to_vec(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tool_calls(audit: &[Value]) -> Vec<&Value> {
    audit.iter().filter(|e| e["kind"] == "decision").collect()
}

fn everything_plan() -> Value {
    json!([
        {"op": "list_tools"},
        {"op": "call", "name": "echo", "arguments": {"message": "hello"}, "meta": {"rationale": "greeting the user"}},
        {"op": "call", "name": "echo", "arguments": {"message": "my password is hunter2"}},
        {"op": "call", "name": "get-sum", "arguments": {"a": 5000000, "b": 1}},
        {"op": "call", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
        {"op": "call", "name": "get-env", "arguments": {}},
        {"op": "list_resources"},
        {"op": "list_prompts"},
        {"op": "ping"},
        {"op": "read_resource", "uri": "file:///etc/shadow"}
    ])
}

fn check_everything(r: &[Value]) {
    assert_eq!(
        r[0]["tools"],
        json!(["echo", "get-sum", "trigger-long-running-operation"]),
        "tools/list is filtered"
    );
    assert_eq!(
        (r[1]["is_error"].clone(), r[1]["text"].clone()),
        (json!(false), json!("Echo: hello"))
    );
    assert_eq!(r[2]["is_error"], true);
    let t = r[2]["text"].as_str().unwrap();
    assert!(
        t.contains("CONSTRAINT_VIOLATION") && t.contains("no-secrets-in-echo"),
        "{t}"
    );
    assert_eq!(r[3]["is_error"], true);
    assert!(
        r[3]["text"].as_str().unwrap().contains("no-huge-sums"),
        "{}",
        r[3]
    );
    assert_eq!(r[4]["text"], "The sum of 2 and 3 is 5.");
    assert_eq!(
        r[5]["is_error"], true,
        "get-env is above the agent's data ceiling"
    );
    assert!(
        r[5]["text"]
            .as_str()
            .unwrap()
            .contains("DATA_BOUNDARY_VIOLATION"),
        "{}",
        r[5]
    );
    // Regression: resources and prompts passed ungoverned, and a tier-2 agent read
    // file:///etc/shadow as a resource. This agent may read the server's documents and
    // get one prompt; that is what it is offered, and the read of a local file is denied.
    // (Every method through both transports: tests/mcp_governed.rs.)
    assert!(r[6]["count"].as_u64().unwrap() > 0, "{}", r[6]);
    assert_eq!(
        r[7]["names"],
        json!(["args-prompt"]),
        "prompts are filtered"
    );
    assert_eq!(r[8]["ok"], true);
    assert_eq!(r[9]["ok"], false);
    let e = r[9]["error"].as_str().unwrap();
    assert!(
        e.contains("denied") && e.contains("CONSTRAINT_VIOLATION") && e.contains("no-local-files"),
        "{e}"
    );
}

fn check_everything_audit(audit: &[Value]) {
    let calls = tool_calls(audit);
    let got: Vec<(&str, &str, &str)> = calls
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["decision"].as_str().unwrap(),
                e["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("everything/echo", "permit", "PERMITTED"),
            ("everything/echo", "deny", "CONSTRAINT_VIOLATION"),
            ("everything/get-sum", "deny", "CONSTRAINT_VIOLATION"),
            ("everything/get-sum", "permit", "PERMITTED"),
            ("everything/get-env", "deny", "DATA_BOUNDARY_VIOLATION"),
            ("everything/resources/read", "deny", "CONSTRAINT_VIOLATION"),
        ],
        "one audit entry per governed request, denials included"
    );
    assert_eq!(calls[0]["rationale"], "greeting the user");
    let outcomes: Vec<&Value> = audit.iter().filter(|e| e["kind"] == "outcome").collect();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes
        .iter()
        .all(|o| o["decision"] == "ok" && o["output_hash"].as_str().unwrap().len() == 64));
    assert_eq!(outcomes[0]["call_id"], calls[0]["call_id"]);
    assert_eq!(outcomes[0]["trace_id"], calls[0]["trace_id"]);
}

/// Embedded mode verifies with the public key file alone: with the signing key and the
/// operator token gone from this host it still governs, creates no key, and says on
/// stderr what it trusts.
#[test]
fn embedded_proxy_governs_without_signing_key_or_operator_token() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    std::fs::remove_file(s.path().join("warden.key")).unwrap();
    std::fs::remove_file(s.path().join("operator.token")).unwrap();
    let server = ["node", peers.everything.to_str().unwrap(), "stdio"];
    let (r, stderr) = results_and_stderr(s.client(
        &peers,
        &everything_plan(),
        &["--name", "everything", "--embedded"],
        &server,
        &token,
    ));
    check_everything(&r);
    check_everything_audit(&s.audit());
    assert!(
        !s.path().join("warden.key").exists(),
        "the embedded proxy created a signing key"
    );
    assert!(
        stderr.contains("embedded mode") && stderr.contains("trusted as much as Warden itself"),
        "no trust warning on stderr:\n{stderr}"
    );
}

#[test]
fn remote_proxy_asks_a_running_warden_serve() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let (_guard, url) = serve(&s);
    let server = ["node", peers.everything.to_str().unwrap(), "stdio"];
    let r = results(s.client(
        &peers,
        &everything_plan(),
        &["--name", "everything", "--server", &url],
        &server,
        &token,
    ));
    check_everything(&r);
    check_everything_audit(&s.audit());
}

#[test]
fn filesystem_reads_stay_in_the_documents_folder() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let d = s.path();
    let docs = d.join("docs");
    // The server may open anything under the temp root: Warden's policy is what confines it.
    let server = [
        "node",
        peers.filesystem.to_str().unwrap(),
        d.to_str().unwrap(),
    ];
    let read =
        |p: String| json!({"op": "call", "name": "read_text_file", "arguments": {"path": p}});
    let plan = json!([
        {"op": "list_tools"},
        read(docs.join("a.txt").display().to_string()),
        read("docs/a.txt".into()),
        {"op": "call", "name": "list_directory", "arguments": {"path": docs.display().to_string()}},
        read(format!("{}/../secret/s.txt", docs.display())),
        read("docs/../secret/s.txt".into()),
        read("/etc/passwd".into()),
        read(d.join("secret/s.txt").display().to_string()),
        read(docs.join("link/s.txt").display().to_string()),
        {"op": "call", "name": "write_file", "arguments": {"path": docs.join("new.txt").display().to_string(), "content": "x"}},
        {"op": "call", "name": "read_media_file", "arguments": {"path": docs.join("a.txt").display().to_string()}}
    ]);
    let r = results(s.client(
        &peers,
        &plan,
        &["--name", "fs", "--embedded"],
        &server,
        &token,
    ));
    assert_eq!(
        r[0]["tools"],
        json!(["list_directory", "read_file", "read_text_file"])
    );
    assert_eq!(r[1]["text"], "claim notes\n");
    assert_eq!(
        r[2]["text"], "claim notes\n",
        "relative paths resolve against the server's folder"
    );
    assert!(r[3]["text"].as_str().unwrap().contains("a.txt"));
    for (i, what) in [
        (4, "../"),
        (5, "relative ../"),
        (6, "absolute path elsewhere"),
        (7, "absolute path to the secret"),
        (8, "symlink out of the folder"),
    ] {
        assert_eq!(r[i]["is_error"], true, "{what}: {}", r[i]);
        let t = r[i]["text"].as_str().unwrap();
        assert!(
            t.contains("Warden denied") && t.contains("TOOL_NOT_PERMITTED"),
            "{what}: {t}"
        );
        assert!(!t.contains("vault"), "{what} leaked the secret");
    }
    let t = r[9]["text"].as_str().unwrap();
    assert!(
        t.contains("CONSTRAINT_VIOLATION") && t.contains("no-writes"),
        "{t}"
    );
    assert!(
        !docs.join("new.txt").exists(),
        "the write never reached the server"
    );
    assert!(
        r[10]["text"]
            .as_str()
            .unwrap()
            .contains("TOOL_NOT_PERMITTED"),
        "unmapped tools are not in the catalog"
    );

    let audit = s.audit();
    let calls = tool_calls(&audit);
    assert_eq!(calls.len(), 10);
    assert_eq!(
        calls.iter().filter(|e| e["decision"] == "permit").count(),
        3
    );
}

#[test]
fn a_kill_stops_the_call_in_flight_and_every_call_after() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let server = ["node", peers.everything.to_str().unwrap(), "stdio"];
    let plan = json!([
        {"op": "call_in_background", "name": "trigger-long-running-operation", "arguments": {"duration": 10, "steps": 10}},
        {"op": "sleep", "seconds": 4.0},
        {"op": "call", "name": "echo", "arguments": {"message": "still there?"}},
        {"op": "wait_background"}
    ]);
    let child = s.client(
        &peers,
        &plan,
        &["--name", "everything", "--embedded"],
        &server,
        &token,
    );
    // Once the long call is permitted and running, kill the agent from the CLI: a separate
    // process writing the store, which the proxy's control refresh picks up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = s.warden(&["audit", "export", "--format", "jsonl"]);
        if String::from_utf8_lossy(&out.stdout).contains("trigger-long-running-operation") {
            break;
        }
        assert!(Instant::now() < deadline, "the long call never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = s.warden(&["kill", "research-agent", "--reason", "runaway"]);
    assert!(out.status.success());
    let r = results(child);
    let echo = r.iter().find(|l| l["name"] == "echo").unwrap();
    assert!(echo["text"].as_str().unwrap().contains("KILLED"), "{echo}");
    let long = r
        .iter()
        .find(|l| l["name"] == "trigger-long-running-operation")
        .unwrap();
    assert!(
        long["error"].as_str().unwrap().contains("agent stopped"),
        "{long}"
    );
    let audit = s.audit();
    let outcome = audit.iter().find(|e| e["kind"] == "outcome").unwrap();
    assert_eq!(outcome["decision"], "cancelled");
    assert_eq!(
        outcome["action"],
        "everything/trigger-long-running-operation"
    );
    let ran_for = outcome["duration_ns"].as_u64().unwrap();
    assert!(
        ran_for < 8_000_000_000,
        "the 10 s call was cut short (ran {ran_for} ns)"
    );
}

/// Raw frames on the proxy's stdin, to check what an SDK would never send.
#[test]
fn bad_frames_crashes_and_hangs_end_cleanly() {
    let _peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let spawn = |server: &[&str], extra: &[&str]| {
        Command::new(WARDEN)
            .arg("--config")
            .arg(s.config())
            .args(["mcp-proxy", "--embedded", "--name", "everything"])
            .args(["--max-frame", "2048"])
            .args(extra)
            .arg("--")
            .args(server)
            .env("WARDEN_TOKEN", &token)
            .env("WARDEN_LOG", "debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let read_line = |r: &mut BufReader<std::process::ChildStdout>| {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    };

    // A hanging server: the call is cancelled after the timeout.
    let hang = "process.stdin.on('data', () => {}); setInterval(() => {}, 1000);";
    let mut p = spawn(&["node", "-e", hang], &["--call-timeout", "1s"]);
    let mut stdin = p.stdin.take().unwrap();
    let mut out = BufReader::new(p.stdout.take().unwrap());
    stdin.write_all(b"{not json\n").unwrap();
    assert_eq!(read_line(&mut out)["error"]["code"], -32700);
    stdin
        .write_all(format!("{}\n", "y".repeat(4096)).as_bytes())
        .unwrap();
    assert_eq!(read_line(&mut out)["error"]["code"], -32600);
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"x"}}});
    stdin.write_all(format!("{call}\n").as_bytes()).unwrap();
    let t = Instant::now();
    let e = read_line(&mut out);
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (json!(1), json!(-32003)),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(stdin); // the client leaves: the proxy ends and takes the server down
    let status = wait_with_deadline(p, Duration::from_secs(10)).status;
    assert!(status.success());

    // A crashing server: the waiting request gets an error and the proxy exits non-zero.
    let crash = "process.stdin.once('data', () => process.exit(3));";
    let mut p = spawn(&["node", "-e", crash], &[]);
    let mut stdin = p.stdin.take().unwrap();
    let mut out = BufReader::new(p.stdout.take().unwrap());
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"ping\"}\n")
        .unwrap();
    let e = read_line(&mut out);
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (json!(9), json!(-32001)),
        "{e}"
    );
    let status = wait_with_deadline(p, Duration::from_secs(10)).status;
    assert_eq!(status.code(), Some(1));

    let audit = s.audit();
    let outcome = audit.iter().find(|e| e["kind"] == "outcome").unwrap();
    assert_eq!(outcome["decision"], "timeout");
}

/// The proxy reads and writes the client's pipes without blocking, and a pipe's
/// `O_NONBLOCK` is shared with whoever else holds it: after the proxy, the next program
/// on the same pipes (here, in a shell) finds them blocking as before. Files and socket
/// pairs work too.
#[test]
fn stdin_and_stdout_work_as_pipes_or_files_and_are_left_as_found() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    // An MCP server that answers every request with an empty result.
    let server = "require('readline').createInterface({input: process.stdin}).on('line', l => { const m = JSON.parse(l); if (m.id !== undefined) console.log(JSON.stringify({jsonrpc: '2.0', id: m.id, result: {}})); });";
    let ping = "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"ping\"}\n";
    let flags = "import fcntl, os; print('nonblocking', [bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) for fd in (0, 1)], flush=True)";
    let script = "\"$WARDEN\" --config \"$CONFIG\" mcp-proxy --embedded --name everything -- node -e \"$SERVER\" && \"$PY\" -c \"$FLAGS\"";
    let mut sh = Command::new("sh")
        .args(["-c", script])
        .env("WARDEN", WARDEN)
        .env("CONFIG", s.config())
        .env("SERVER", server)
        .env("PY", &peers.python)
        .env("FLAGS", flags)
        .env("WARDEN_TOKEN", &token)
        .current_dir(s.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = sh.stdin.take().unwrap();
    stdin.write_all(ping.as_bytes()).unwrap();
    drop(stdin);
    let out = wait_with_deadline(sh, Duration::from_secs(20));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let answer: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        (answer["id"].clone(), answer["result"].clone()),
        (json!(7), json!({}))
    );
    assert_eq!(lines[1], "nonblocking [False, False]");

    // The embedded proxy on these stdin and stdout, logging which way it reads them.
    let proxy = |stdin: Stdio, stdout: Stdio| {
        Command::new(WARDEN)
            .arg("--config")
            .arg(s.config())
            .args(["mcp-proxy", "--embedded", "--name", "everything", "--"])
            .args(["node", "-e", server])
            .env("WARDEN_TOKEN", &token)
            .env("WARDEN_LOG", "debug")
            .current_dir(s.path())
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Files: the same request read from one, the answer written to another.
    std::fs::write(s.path().join("in.jsonl"), ping).unwrap();
    let p = proxy(
        std::fs::File::open(s.path().join("in.jsonl"))
            .unwrap()
            .into(),
        std::fs::File::create(s.path().join("out.jsonl"))
            .unwrap()
            .into(),
    );
    let out = wait_with_deadline(p, Duration::from_secs(20));
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("stdin is neither a pipe nor a socket"),
        "{log}"
    );
    let answer: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path().join("out.jsonl")).unwrap())
            .unwrap();
    assert_eq!(answer["id"], 7);

    // A Unix socket pair, as Node's child_process gives its children for stdin and stdout.
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let p = proxy(
        std::os::fd::OwnedFd::from(theirs.try_clone().unwrap()).into(),
        std::os::fd::OwnedFd::from(theirs).into(),
    );
    ours.write_all(ping.as_bytes()).unwrap();
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let out = wait_with_deadline(p, Duration::from_secs(20));
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("neither a pipe nor a socket"), "{log}");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut ours, &mut text).unwrap();
    let answer: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        (answer["id"].clone(), answer["result"].clone()),
        (json!(7), json!({}))
    );
}

#[test]
fn remote_proxy_fails_closed_when_warden_is_unreachable() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    // A port nothing listens on: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server = ["node", peers.everything.to_str().unwrap(), "stdio"];
    let plan = json!([
        {"op": "list_tools"},
        {"op": "call", "name": "echo", "arguments": {"message": "anyone there?"}}
    ]);
    // Fail closed from the first message: without Warden, not even `initialize` is
    // answered by the server, and the client is told why.
    let out = wait_with_deadline(
        s.client(
            &peers,
            &plan,
            &["--name", "everything", "--server", &url],
            &server,
            &token,
        ),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("INTERNAL") && all.contains("cannot reach Warden"),
        "{all}"
    );
}

/// `warden serve` for `s` on a free port, until the guard drops; its base URL.
fn serve(s: &Setup) -> (Guard, String) {
    serve_in(&s.path(), Stdio::null())
}

/// The paths policy judges are the paths the filesystem server opens: resolved as the
/// kernel would (symlinks, `..` after a symlink, dangling links), forwarded as resolved,
/// and refused, on the audit trail, where they cannot be resolved. In both proxy modes.
#[test]
fn filesystem_paths_are_judged_and_opened_as_resolved() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let d = s.path();
    let docs = d.join("docs");
    // docs/link -> secret (from Setup); a dangling link out; a loop
    std::os::unix::fs::symlink(d.join("secret/new.txt"), docs.join("out")).unwrap();
    std::os::unix::fs::symlink("loop", docs.join("loop")).unwrap();
    let server = [
        "node",
        peers.filesystem.to_str().unwrap(),
        d.to_str().unwrap(),
    ];
    let read =
        |p: String| json!({"op": "call", "name": "read_text_file", "arguments": {"path": p}});
    // Physically docs/(link/../docs/)* is docs, so this ends at the secret; spelled, it
    // is inside docs. Over PATH_MAX, the old resolver judged the spelling.
    let long = format!(
        "{}/{}link/s.txt",
        docs.display(),
        "link/../docs/".repeat(400)
    );
    let plan = json!([
        // docs/link/.. is the temp root (link -> secret), so this is docs/a.txt; a server
        // given the string as sent would apply `..` by name and look in docs/docs.
        read(format!("{}/link/../docs/a.txt", docs.display())),
        read(docs.join("out").display().to_string()),
        read(docs.join("loop").display().to_string()),
        read(long),
        // a tool name that would redraw an operator's terminal is refused at the edge
        {"op": "call", "name": "read_text_file\u{1b}[2K", "arguments": {"path": "docs/a.txt"}},
    ]);
    let (_guard, url) = serve(&s);
    for mode in [
        vec!["--name", "fs", "--embedded"],
        vec!["--name", "fs", "--server", &url],
    ] {
        let r = results(s.client(&peers, &plan, &mode, &server, &token));
        assert_eq!(r[0]["text"], "claim notes\n", "{mode:?}: {}", r[0]);
        let t = r[1]["text"].as_str().unwrap();
        assert!(
            t.contains("Warden denied") && t.contains("TOOL_NOT_PERMITTED"),
            "{mode:?}: a dangling link out of docs: {t}"
        );
        for (i, what) in [(2, "a symlink loop"), (3, "over PATH_MAX")] {
            let t = r[i]["text"].as_str().unwrap();
            assert!(
                t.contains("Warden denied")
                    && t.contains("CONSTRAINT_VIOLATION")
                    && t.contains("argument `path`"),
                "{mode:?}: {what}: {t}"
            );
            assert!(!t.contains("vault"), "{what} leaked the secret");
        }
        let t = r[4]["text"].as_str().unwrap();
        assert!(
            t.contains("Warden denied") && t.contains("a control or formatting character"),
            "{mode:?}: {t}"
        );
    }
    assert!(!d.join("secret/new.txt").exists());
    let audit = s.audit();
    let calls = tool_calls(&audit);
    assert_eq!(calls.len(), 10, "every call is on the audit trail");
    let reasons: Vec<&str> = calls
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons[..5],
        [
            "PERMITTED",
            "TOOL_NOT_PERMITTED",
            "CONSTRAINT_VIOLATION",
            "CONSTRAINT_VIOLATION",
            "INVALID_REQUEST"
        ]
    );
    assert_eq!(reasons[..5], reasons[5..]);
    assert!(calls.iter().all(|e| e["agent_id"] == "research-agent"));
}

/// The server the proxy starts gets an environment of its own: not the agent's token, not
/// the other secrets in the proxy's environment, only what a program needs to run (node
/// starts and answers) and what the operator named on the command line or in the config.
#[test]
fn the_mcp_server_gets_neither_the_agents_token_nor_other_secrets() {
    let peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let config = std::fs::read_to_string(s.config()).unwrap();
    let config = config.replacen(
        "timeout = \"30s\"\n",
        "timeout = \"30s\"\npass_env = [\"PASSED_BY_CONFIG\"]\nenv = { SET_BY_CONFIG = \"from-config\" }\n",
        1,
    );
    assert!(config.contains("PASSED_BY_CONFIG"));
    std::fs::write(s.config(), config).unwrap();
    let seen = s.path().join("server-env.txt");
    // The server writes what it was given, then becomes the reference server: its answer
    // proves node runs on that environment and that the file is complete.
    let server = [
        "sh",
        "-c",
        "env > \"$0\" && exec node \"$1\" stdio",
        seen.to_str().unwrap(),
        peers.everything.to_str().unwrap(),
    ];
    let canary = "canary-7e0c41b2-do-not-leak";
    let plan = json!([{"op": "call", "name": "echo", "arguments": {"message": "hello"}}]);
    let r = results(s.client_with_env(
        &peers,
        &plan,
        &[
            "--name",
            "everything",
            "--embedded",
            "--env",
            "PASSED_BY_NAME",
            "--env",
            "SET_HERE=from-argv",
        ],
        &server,
        &[
            ("WARDEN_TOKEN", &token),
            ("CANARY_SECRET", canary),
            ("PASSED_BY_NAME", "from-the-proxy"),
            ("PASSED_BY_CONFIG", "also-from-the-proxy"),
        ],
    ));
    assert_eq!(r[0]["text"], "Echo: hello", "{}", r[0]);

    let seen = std::fs::read_to_string(&seen).unwrap();
    assert!(
        !seen.contains(&token),
        "the server got the agent's token:\n{seen}"
    );
    assert!(
        !seen.contains(canary),
        "the server got another secret:\n{seen}"
    );
    let vars: std::collections::BTreeMap<&str, &str> =
        seen.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(
        !vars.keys().any(|k| k.starts_with("WARDEN_")),
        "a WARDEN_ variable reached the server:\n{seen}"
    );
    for (name, value) in [
        ("PASSED_BY_NAME", "from-the-proxy"),
        ("SET_HERE", "from-argv"),
        ("PASSED_BY_CONFIG", "also-from-the-proxy"),
        ("SET_BY_CONFIG", "from-config"),
    ] {
        assert_eq!(vars.get(name), Some(&value), "{name}:\n{seen}");
    }
    assert!(vars.contains_key("PATH"), "{seen}");

    // Asking for Warden's own variables is refused before anything starts.
    for asked in ["WARDEN_TOKEN", "WARDEN_TOKEN=x"] {
        let out = Command::new(WARDEN)
            .arg("--config")
            .arg(s.config())
            .args(["mcp-proxy", "--embedded", "--env", asked, "--", "true"])
            .env("WARDEN_TOKEN", &token)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{asked}: {err}");
        assert!(err.contains("never reach the MCP server"), "{asked}: {err}");
    }
}

/// A node that serves TLS on a private CA and requires client certificates: the remote
/// proxy reaches it only with the CA (`--ca-file`) and a certificate of the agent's host
/// (`--client-cert`, `--client-key`), and when it cannot, the client is told why.
#[test]
fn remote_proxy_reaches_a_tls_node_on_a_private_ca_with_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let peers = peers_or_skip!();
    let s = Setup::new();
    let d = s.path();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    for (name, file) in [("127.0.0.1", "server"), ("agent-host", "client")] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(d.join(format!("{file}.pem")), cert.pem()).unwrap();
        warden_server::setup::write_secret(&d.join(format!("{file}.key")), &key.serialize_pem())
            .unwrap();
    }
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    let config = std::fs::read_to_string(s.config()).unwrap().replace(
        "[store]\n",
        "[server.tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
         require_client_cert = true\n\n[store]\n",
    );
    std::fs::write(s.config(), config).unwrap();
    let token = s.token();
    let (_guard, url) = serve(&s);
    let url = url.replace("http://", "https://");
    let server = ["node", peers.everything.to_str().unwrap(), "stdio"];
    let plan = json!([{"op": "call", "name": "echo", "arguments": {"message": "over tls"}}]);
    let ca_file = d.join("ca.pem").display().to_string();
    let cert = d.join("client.pem").display().to_string();
    let key = d.join("client.key").display().to_string();
    let base = ["--name", "everything", "--server", &url];
    let with_cert = ["--client-cert", cert.as_str(), "--client-key", key.as_str()];

    for (extra, why) in [
        (vec!["--ca-file", &ca_file], "CertificateRequired"),
        (
            with_cert.to_vec(),
            "invalid peer certificate: UnknownIssuer",
        ),
    ] {
        // Fail closed from the first message: the client hears why it cannot go on.
        let args: Vec<&str> = base.iter().copied().chain(extra).collect();
        let out = wait_with_deadline(
            s.client(&peers, &plan, &args, &server, &token),
            Duration::from_secs(60),
        );
        assert!(!out.status.success());
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            all.contains("cannot reach Warden") && all.contains(why),
            "{all}"
        );
    }
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--ca-file", &ca_file])
        .chain(with_cert)
        .collect();
    let r = results(s.client(&peers, &plan, &args, &server, &token));
    assert_eq!(
        (r[0]["is_error"].clone(), r[0]["text"].clone()),
        (json!(false), json!("Echo: over tls"))
    );
    let audit = s.audit();
    let calls = tool_calls(&audit);
    assert_eq!(
        calls.len(),
        1,
        "only the call that reached Warden is on its record"
    );
    assert_eq!(calls[0]["decision"], "permit");
}

/// Between `mcp-proxy --server` and `warden serve`: passes every request on, except that
/// it holds the `/v1/check` whose rationale is `hold` until told to let it go. The call
/// it holds is decided by the real pipeline, only later.
struct Relay {
    upstream: String,
    http: reqwest::Client,
    held: tokio::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: tokio::sync::Notify,
}

async fn relay(
    axum::extract::State(r): axum::extract::State<std::sync::Arc<Relay>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    if parts.uri.path() == "/v1/check" {
        let check: Value = serde_json::from_slice(&body).unwrap();
        if check["context"]["rationale"] == "hold" {
            let reached = r.held.lock().await.take();
            if let Some(reached) = reached {
                let released = r.release.notified();
                let _ = reached.send(());
                released.await;
            }
        }
    }
    let mut up = r
        .http
        .request(parts.method, format!("{}{}", r.upstream, parts.uri))
        .body(body);
    for name in ["authorization", "content-type"] {
        if let Some(v) = parts.headers.get(name) {
            up = up.header(name, v);
        }
    }
    let resp = up.send().await.unwrap();
    let status = resp.status();
    let ct = resp.headers().get("content-type").cloned();
    let mut out =
        axum::response::Response::new(axum::body::Body::from(resp.bytes().await.unwrap()));
    *out.status_mut() = status;
    if let Some(ct) = ct {
        out.headers_mut().insert("content-type", ct);
    }
    out
}

/// The next message the proxy writes to its client.
async fn next_frame(out: &mut tokio::io::BufReader<tokio::process::ChildStdout>) -> Value {
    use tokio::io::AsyncBufReadExt;
    let mut l = String::new();
    tokio::time::timeout(Duration::from_secs(30), out.read_line(&mut l))
        .await
        .expect("the proxy said nothing for 30 s")
        .unwrap();
    serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
}

/// A decision that waits holds up nothing else in its session: while Warden has not
/// answered for one call, a ping, a second call (decided by `warden serve` and answered
/// by the server) and the client's cancellation of the waiting call all go through; the
/// waiting call, once decided, is never sent to the server and ends with exactly one
/// outcome, `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_decision_holds_up_nothing_else_in_the_session() {
    let _peers = peers_or_skip!();
    let s = Setup::new();
    let token = s.token();
    let (_serve, url) = serve(&s);
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let r = std::sync::Arc::new(Relay {
        upstream: url,
        http: reqwest::Client::new(),
        held: tokio::sync::Mutex::new(Some(reached_tx)),
        release: tokio::sync::Notify::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(relay).with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A server that writes down every message it gets and answers calls with an echo.
    let seen = s.path().join("seen.jsonl");
    let recorder = r#"
        const fs = require('fs');
        const log = process.argv[1];
        require('readline').createInterface({ input: process.stdin }).on('line', (l) => {
          fs.appendFileSync(log, l + '\n');
          const m = JSON.parse(l);
          if (m.id === undefined || !m.method) return;
          let result = {};
          if (m.method === 'initialize') {
            result = { protocolVersion: m.params.protocolVersion, capabilities: { tools: {} },
                       serverInfo: { name: 'recorder', version: '1' } };
          } else if (m.method === 'tools/call') {
            result = { content: [{ type: 'text', text: 'Echo: ' + m.params.arguments.message }] };
          }
          process.stdout.write(JSON.stringify({ jsonrpc: '2.0', id: m.id, result }) + '\n');
        });"#;
    let mut proxy = tokio::process::Command::new(WARDEN)
        .arg("--config")
        .arg(s.config())
        .args([
            "mcp-proxy",
            "--name",
            "everything",
            "--server",
            &relay_url,
            "--",
        ])
        .args(["node", "-e", recorder])
        .arg(&seen)
        .env("WARDEN_TOKEN", &token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = proxy.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(proxy.stdout.take().unwrap());
    let send = |m: Value| format!("{m}\n").into_bytes();
    use tokio::io::AsyncWriteExt;
    let echo = |id: i64, message: &str, rationale: &str| {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{
            "name":"echo","arguments":{"message":message},"_meta":{"rationale":rationale}}})
    };
    stdin
        .write_all(&send(json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}})))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut out).await["id"], 1);
    stdin
        .write_all(&send(
            json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        ))
        .await
        .unwrap();
    stdin
        .write_all(&send(echo(2, "held", "hold")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), reached)
        .await
        .expect("the held call never reached Warden")
        .unwrap();

    // While Warden has not answered for call 2:
    stdin
        .write_all(&send(json!({"jsonrpc":"2.0","id":3,"method":"ping"})))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut out).await,
        json!({"jsonrpc":"2.0","id":3,"result":{}})
    );
    stdin
        .write_all(&send(echo(4, "second", "go")))
        .await
        .unwrap();
    let second = next_frame(&mut out).await;
    assert_eq!(
        (
            second["id"].clone(),
            second["result"]["content"][0]["text"].clone()
        ),
        (json!(4), json!("Echo: second")),
        "{second}"
    );
    stdin
        .write_all(&send(
            json!({"jsonrpc":"2.0","method":"notifications/cancelled",
            "params":{"requestId":2,"reason":"the user gave up"}}),
        ))
        .await
        .unwrap();
    // The proxy reads its client in order: once this ping is answered, it has taken the
    // cancellation in.
    stdin
        .write_all(&send(json!({"jsonrpc":"2.0","id":5,"method":"ping"})))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut out).await["id"], 5);

    // Warden decides call 2 (permits it): it goes nowhere, and is recorded as cancelled.
    r.release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(20);
    let held_outcomes = loop {
        let audit = s.audit();
        let held = audit
            .iter()
            .find(|e| e["kind"] == "decision" && e["rationale"] == "hold")
            .map(|e| e["call_id"].clone());
        let outcomes: Vec<Value> = audit
            .iter()
            .filter(|e| e["kind"] == "outcome" && Some(&e["call_id"]) == held.as_ref())
            .cloned()
            .collect();
        if !outcomes.is_empty() || Instant::now() > deadline {
            break (audit, outcomes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (audit, outcomes) = held_outcomes;
    stdin
        .write_all(&send(json!({"jsonrpc":"2.0","id":6,"method":"ping"})))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut out).await["id"],
        6,
        "the session goes on, and nothing answers the cancelled call"
    );
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(20), proxy.wait())
        .await
        .expect("the proxy did not end when its client left")
        .unwrap();
    assert!(status.success());

    let decisions: Vec<(&str, &str)> = audit
        .iter()
        .filter(|e| e["kind"] == "decision")
        .map(|e| {
            (
                e["rationale"].as_str().unwrap(),
                e["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [("go", "permit"), ("hold", "permit")],
        "{audit:?}"
    );
    let statuses: Vec<&str> = outcomes
        .iter()
        .map(|o| o["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["cancelled"],
        "exactly one outcome for the held call"
    );
    let seen = std::fs::read_to_string(&seen).unwrap();
    let calls: Vec<Value> = seen
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m["method"] == "tools/call")
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "only the second call reached the server: {seen}"
    );
    assert_eq!(calls[0]["params"]["arguments"]["message"], "second");
}
