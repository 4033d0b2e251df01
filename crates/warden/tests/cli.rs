//! The real `warden` binary, run as an operator would: `init`, the policy and agent
//! commands, error exits, and the README quickstart end to end against a `warden serve`
//! subprocess, then the audit trail it left behind (verified, exported, tampered with).
//!
//! The HTTP API itself is covered in-process by `warden-server`'s tests; here the point
//! is that separate processes (the CLI writing the SQLite file, the server reading it)
//! work together the way the README says they do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_warden");
const AGENT: &str = "claims-processor-v3";
/// How long a running server may take to see a change the CLI made to the store
/// (the example refreshes its control view every 250 ms).
const PROPAGATION: Duration = Duration::from_secs(5);

/// What a finished `warden` process left: exit code and output.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A `warden` command with none of the caller's `WARDEN_*` variables leaking in.
fn command() -> Command {
    scrubbed(Command::new(BIN))
}

fn scrubbed(mut cmd: Command) -> Command {
    for var in [
        "WARDEN_CONFIG",
        "WARDEN_LISTEN",
        "WARDEN_ADMIN_LISTEN",
        "WARDEN_STORE",
        "WARDEN_OPERATOR_TOKEN",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Out {
    let out = cmd.output().expect("run warden");
    Out {
        code: out.status.code().expect("warden ended by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs `warden ARGS` against the setup in `dir`, named the way the README does it
/// (`WARDEN_CONFIG`).
fn warden(dir: &Path, args: &[&str]) -> Out {
    run(command()
        .args(args)
        .env("WARDEN_CONFIG", dir.join("warden.toml")))
}

/// Runs `warden ARGS` and insists that it succeeds.
fn warden_ok(dir: &Path, args: &[&str]) -> Out {
    let out = warden(dir, args);
    assert_eq!(out.code, 0, "warden {args:?}\n{out}");
    out
}

/// A fresh `warden init` setup in a temporary folder.
fn init() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = run(command().arg("init").arg(dir.path()));
    assert_eq!(out.code, 0, "{out}");
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "`{from}` not in {}", path.display());
    fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or_default()
}

const SETUP_FILES: [&str; 8] = [
    "warden.toml",
    "policy/warden.cedarschema",
    "policy/claims.cedar",
    "policy/database.cedar",
    "policy-tests.toml",
    "warden.key",
    "warden.pub",
    "operator.token",
];

#[test]
fn init_writes_a_setup_that_validates_and_a_second_run_leaves_it_alone() {
    let dir = init();
    let d = dir.path();
    for f in SETUP_FILES {
        assert!(d.join(f).is_file(), "`warden init` did not write {f}");
    }
    #[cfg(unix)]
    for secret in ["warden.key", "operator.token"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(d.join(secret)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{secret} has mode {mode:o}");
    }
    let out = warden_ok(d, &["policy", "validate"]);
    assert!(out.stdout.starts_with("policy is valid: 9 rules"), "{out}");

    // A second run, even after the operator edited the config, changes nothing.
    edit(&d.join("warden.toml"), "rate = 5\n", "rate = 7\n");
    let before: Vec<Vec<u8>> = SETUP_FILES
        .iter()
        .map(|f| fs::read(d.join(f)).unwrap())
        .collect();
    let out = run(command().arg("init").arg(d));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("exists; leaving the setup"), "{out}");
    for (f, old) in SETUP_FILES.iter().zip(&before) {
        assert_eq!(
            &fs::read(d.join(f)).unwrap(),
            old,
            "second init changed {f}"
        );
    }
}

#[test]
fn a_broken_policy_fails_validation_naming_the_file_and_line() {
    let dir = init();
    let file = dir.path().join("policy/claims.cedar");
    let mut text = fs::read_to_string(&file).unwrap();
    let line = text.lines().count() + 1;
    text.push_str("permit (principal, action, resource\n");
    fs::write(&file, text).unwrap();

    let out = warden(dir.path(), &["policy", "validate"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains(&format!("claims.cedar:{line}:")),
        "no `claims.cedar:{line}:` in\n{out}"
    );
}

#[test]
fn a_config_error_names_the_file_and_the_field() {
    let dir = init();
    edit(
        &dir.path().join("warden.toml"),
        "refresh = \"250ms\"",
        "refresh = \"soon\"",
    );
    let out = warden(dir.path(), &["policy", "validate"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("warden.toml: field `control.refresh`"),
        "{out}"
    );
}

#[test]
fn policy_test_passes_on_the_example_and_reports_a_wrong_expectation() {
    let dir = init();
    let tests = dir.path().join("policy-tests.toml");
    let tests_arg = tests.to_str().unwrap();
    let out = warden_ok(dir.path(), &["policy", "test", tests_arg]);
    assert_eq!(last_line(&out.stdout), "24 passed, 0 failed", "{out}");
    assert_eq!(out.stdout.matches("\nPASS  ").count() + 1, 24, "{out}");

    // The first case reads a claim, which is permitted; claim it is not.
    edit(&tests, "expect = \"permit\"", "expect = \"deny\"");
    let out = warden(dir.path(), &["policy", "test", tests_arg]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stdout
            .contains("FAIL  claims processor reads a claim: expected deny, got permit"),
        "{out}"
    );
    assert_eq!(last_line(&out.stdout), "23 passed, 1 failed", "{out}");
}

#[test]
fn operator_add_list_remove_and_disable_bootstrap() {
    let dir = init();
    let d = dir.path();
    let out = warden_ok(d, &["operator", "add", "rita", "--role", "reviewer"]);
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    let token = out.stdout.trim().to_owned();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert_eq!(parts[0], "wdo1");
    let (rita_id, secret) = (parts[1].to_owned(), parts[2].to_owned());

    let out = warden(d, &["operator", "add", "rita", "--role", "auditor"]);
    assert_eq!(out.code, 2, "a second live `rita`\n{out}");
    assert!(out.stderr.contains("exists already"), "{out}");
    let out = warden(d, &["operator", "add", "root", "--role", "superuser"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("admin, reviewer or auditor"), "{out}");
    // No admin account yet: disabling the bootstrap token would leave the API without one.
    let out = warden(d, &["operator", "disable-bootstrap"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("no admin account"), "{out}");

    warden_ok(
        d,
        &[
            "operator",
            "add",
            "ada",
            "--role",
            "admin",
            "--expires-in",
            "30d",
        ],
    );
    let out = warden_ok(d, &["operator", "list"]);
    assert!(
        !out.stdout.contains(&secret),
        "the list shows a secret\n{out}"
    );
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.contains(&vec![rita_id.as_str(), "rita", "reviewer", "active"]),
        "{out}"
    );
    assert!(
        out.stdout.contains("bootstrap operator token: enabled"),
        "{out}"
    );

    warden_ok(d, &["operator", "remove", &rita_id]);
    let out = warden(d, &["operator", "remove", &rita_id]);
    assert_eq!(out.code, 2, "removed twice\n{out}");
    warden_ok(d, &["operator", "disable-bootstrap"]);
    let out = warden_ok(d, &["operator", "list"]);
    assert!(out.stdout.contains(&format!("{rita_id} ")), "{out}");
    assert!(out.stdout.contains("removed"), "{out}");
    assert!(
        out.stdout.contains("bootstrap operator token: disabled"),
        "{out}"
    );
    // Every change is in the audit, under the CLI's name, and the chain verifies.
    let out = warden_ok(d, &["audit", "verify"]);
    assert!(!out.stdout.is_empty(), "{out}");
}

#[test]
fn agent_register_list_show_and_refusals() {
    let dir = init();
    let d = dir.path();
    let register = [
        "agent",
        "register",
        "intake-bot",
        "--owner",
        "intake-team",
        "--tier",
        "1",
        "--scope",
        "claims:read",
    ];
    let out = warden_ok(d, &register);
    let token = out.stdout.trim();
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert_eq!(token.split('.').count(), 3, "not a JWS: {token}");

    let out = warden_ok(d, &["agent", "list"]);
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("intake-bot "))
        .unwrap_or_else(|| panic!("intake-bot not listed\n{out}"));
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["intake-bot", "intake-team", "1", "active", "claims:read"]
    );
    // The agents declared in the config are registered by the first command that opens
    // the store.
    assert!(out.stdout.contains(&format!("\n{AGENT} ")), "{out}");

    let out = warden_ok(d, &["agent", "show", "intake-bot"]);
    assert!(out.stdout.contains("owner     intake-team\n"), "{out}");
    assert!(out.stdout.contains("status    active\n"), "{out}");
    let creds: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("credential "))
        .collect();
    assert_eq!(creds.len(), 1, "{out}");
    assert!(creds[0].ends_with("  valid"), "{out}");

    let out = warden(d, &register);
    assert_eq!(out.code, 2, "registering twice must fail\n{out}");
    assert!(out.stderr.contains("already registered"), "{out}");

    let mut tier9 = register;
    tier9[2] = "tier9-bot";
    tier9[6] = "9";
    let out = warden(d, &tier9);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("tier 9 is not declared in") && out.stderr.contains("warden.toml"),
        "{out}"
    );
    let out = warden_ok(d, &["agent", "list"]);
    assert!(!out.stdout.contains("tier9-bot"), "{out}");
}

#[test]
fn a_missing_config_exits_2_and_points_at_init() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/warden.toml");
    let out = run(command()
        .args(["policy", "validate", "--config"])
        .arg(&missing));
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("warden init"), "{out}");
    assert!(out.stderr.contains("nowhere/warden.toml"), "{out}");

    // The default, `warden.toml` in the working folder.
    let out = run(command().args(["agent", "list"]).current_dir(dir.path()));
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("warden init"), "{out}");
}

#[test]
fn mcp_proxy_without_a_mode_refuses_and_explains_both() {
    let dir = init();
    let out = run(command()
        .args(["mcp-proxy", "--name", "x", "--", "true"])
        .env("WARDEN_CONFIG", dir.path().join("warden.toml"))
        .env("WARDEN_TOKEN", "a-token")
        .env_remove("WARDEN_SERVER"));
    assert_eq!(out.code, 2, "{out}");
    for words in ["--server URL", "--embedded", "only the agent's token"] {
        assert!(out.stderr.contains(words), "no `{words}` in\n{out}");
    }
    let out = warden(dir.path(), &["mcp-proxy", "--help"]);
    assert!(
        out.stdout.contains("trusted as much as") && out.stdout.contains("--token-file"),
        "{out}"
    );
}

/// TLS options for a node reached in clear would be ignored, and the operator would think
/// the link protected; a CA file that cannot be read stops the proxy naming it, before it
/// starts the MCP server.
#[test]
fn mcp_proxy_tls_options_need_an_https_server_and_usable_files() {
    let dir = init();
    let proxy = |server: &str, ca: &str| {
        run(command()
            .args([
                "mcp-proxy",
                "--server",
                server,
                "--ca-file",
                ca,
                "--",
                "true",
            ])
            .env("WARDEN_CONFIG", dir.path().join("warden.toml"))
            .env("WARDEN_TOKEN", "a-token"))
    };
    let out = proxy("http://127.0.0.1:8480", "ca.pem");
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("only to an https:// --server"), "{out}");
    let missing = dir.path().join("missing-ca.pem");
    let out = proxy("https://127.0.0.1:8480", missing.to_str().unwrap());
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains(missing.to_str().unwrap()) && out.stderr.contains("CA certificate"),
        "{out}"
    );
}

#[test]
fn no_command_takes_a_token_on_the_command_line() {
    let dir = init();
    let out = warden(
        dir.path(),
        &[
            "mcp-proxy",
            "--token",
            "secret",
            "--server",
            "http://127.0.0.1:1",
            "--",
            "true",
        ],
    );
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("unexpected argument '--token'"),
        "{out}"
    );
    // Nor does any other command offer a flag that takes one.
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["agent", "token", "--help"],
        vec!["mcp-proxy", "--help"],
        vec!["kill", "--help"],
        vec!["audit", "verify", "--help"],
    ] {
        let out = warden(dir.path(), &args);
        assert!(!out.stdout.contains("--token "), "{args:?}\n{out}");
        assert!(!out.stdout.contains("--operator-token"), "{args:?}\n{out}");
    }
}

#[test]
fn reading_commands_create_neither_store_nor_key() {
    let dir = init();
    let d = dir.path();
    fs::remove_file(d.join("warden.key")).unwrap();
    for args in [
        &["agent", "list"][..],
        &["agent", "show", AGENT],
        &["audit", "verify"],
        &["audit", "tail"],
        &["audit", "export"],
    ] {
        let out = warden(d, args);
        assert_eq!(out.code, 2, "{args:?}\n{out}");
        assert!(out.stderr.contains("no store at"), "{args:?}\n{out}");
    }
    warden_ok(d, &["policy", "validate"]);
    warden_ok(
        d,
        &[
            "policy",
            "test",
            d.join("policy-tests.toml").to_str().unwrap(),
        ],
    );
    assert!(!d.join("warden.db").exists(), "a read created the store");
    assert!(
        !d.join("warden.key").exists(),
        "a read created a signing key"
    );
}

#[cfg(unix)]
#[test]
fn secrets_others_may_read_are_refused_naming_chmod() {
    use std::os::unix::fs::PermissionsExt;

    let dir = init();
    let d = dir.path();
    let key = d.join("warden.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = warden(d, &["agent", "token", AGENT]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr
            .contains(&format!("run `chmod 600 {}`", key.display())),
        "{out}"
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let token = d.join("operator.token");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o604)).unwrap();
    let out = warden(d, &["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr
            .contains(&format!("run `chmod 600 {}`", token.display())),
        "{out}"
    );
    // However it is given, the operator token must be long.
    let out = run(command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("WARDEN_CONFIG", d.join("warden.toml"))
        .env("WARDEN_OPERATOR_TOKEN", "short-token"));
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("shorter than 32 characters"), "{out}");
}

/// SQLite would create the store 0644 less the umask, and its -wal and -shm likewise.
#[cfg(unix)]
#[tokio::test]
async fn the_store_and_its_wal_and_shm_are_private_even_under_umask_0() {
    use std::os::unix::fs::PermissionsExt;

    let dir = init();
    let d = dir.path();
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = d.join("serve.log");
    let mut sh = Command::new("sh");
    // The same environment as every other `warden` here (`command()` removes WARDEN_*).
    for (k, v) in command().get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let child = sh
        .args(["-c", "umask 000 && exec \"$0\" serve --listen \"$1\""])
        .arg(BIN)
        .arg(addr.to_string())
        .env("WARDEN_CONFIG", d.join("warden.toml"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        base: format!("http://{addr}"),
        log,
    };
    server.wait_ready().await;
    // A decision makes the server write, so SQLite has its -wal and -shm open.
    let t = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/check", server.base))
        .bearer_auth(&t)
        .json(&json!({"tool": "get_claim", "params": {"claim_id": "CLM-1001"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for f in ["warden.db", "warden.db-wal", "warden.db-shm"] {
        let mode = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }
}

#[test]
fn reviving_what_is_not_killed_exits_2() {
    let dir = init();
    warden_ok(dir.path(), &["agent", "token", AGENT]);
    let out = warden(dir.path(), &["revive", AGENT]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("no kill switch is set"), "{out}");
}

/// A store deleted under a running node: a kill written to a new file at its path would
/// report success while no node ever reads it.
#[test]
fn kill_and_revive_refuse_a_missing_store_and_create_none() {
    let dir = init();
    let d = dir.path();
    warden_ok(d, &["agent", "token", AGENT]);
    fs::remove_file(d.join("warden.db")).unwrap();
    for args in [&["kill", AGENT][..], &["revive", AGENT], &["kill", "--all"]] {
        let out = warden(d, args);
        assert_eq!(out.code, 2, "{args:?}: {out}");
        assert!(out.stderr.contains("no store at"), "{args:?}: {out}");
        assert!(!d.join("warden.db").exists(), "{args:?} created a store");
    }
}

#[test]
fn killing_an_unknown_agent_or_owner_is_refused_unless_pre_emptive() {
    let dir = init();
    let d = dir.path();
    warden_ok(d, &["agent", "token", AGENT]); // creates the store
    for args in [
        &["kill", "nobody-here"][..],
        &["kill", "--owner", "no-such-team"][..],
    ] {
        let out = warden(d, args);
        assert_eq!(out.code, 2, "{args:?}: {out}");
        assert!(
            out.stderr.contains("would stop nothing") && out.stderr.contains("--pre-emptive"),
            "{args:?}: {out}"
        );
    }
    let out = warden(d, &["audit", "export"]);
    assert!(
        !out.stdout.contains("\"kill\""),
        "a refused kill must leave no audit entry: {out}"
    );
    warden_ok(d, &["kill", "nobody-here", "--pre-emptive"]);
    warden_ok(d, &["kill", "--owner", "no-such-team", "--pre-emptive"]);
    // and an agent that exists needs no flag
    warden_ok(d, &["kill", AGENT]);
    let kills = export(d)
        .into_iter()
        .filter(|r| r["kind"] == "control" && r["action"] == "kill")
        .count();
    assert_eq!(kills, 3, "one audit entry per kill");
}

/// A `warden serve` subprocess, killed when dropped (so also when a test panics).
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        let log = dir.join("serve.log");
        Self::start_logging_to(dir, fs::File::create(&log).unwrap(), "warn", log, None).await
    }

    /// Starts `warden serve` with its standard error on `stderr` (read back from `log`);
    /// with `nofile`, under that soft open-file limit (`ulimit -S -n`).
    async fn start_logging_to(
        dir: &Path,
        stderr: fs::File,
        level: &str,
        log: PathBuf,
        nofile: Option<u32>,
    ) -> Server {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut cmd = match nofile {
            None => command(),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    &format!("ulimit -S -n {n} && exec \"$0\" \"$@\""),
                    BIN,
                ]);
                scrubbed(sh)
            }
        };
        let child = cmd
            .args(["serve", "--listen", &addr.to_string()])
            .env("WARDEN_CONFIG", dir.join("warden.toml"))
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            base: format!("http://{addr}"),
            log,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("warden serve exited ({status})\n{}", self.log());
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "warden serve not ready\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the node abruptly (SIGKILL): whatever it answered must already be on disk.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One answer from `/v1/check`.
struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    fn reason(&self) -> &str {
        self.body["reason"].as_str().unwrap_or_default()
    }

    fn assert(&self, decision: &str, reason: &str) {
        assert_eq!(
            (self.body["decision"].as_str(), self.reason()),
            (Some(decision), reason),
            "{}",
            self.body
        );
    }
}

/// An agent's side of the quickstart: it calls `/v1/check` and remembers what each call
/// was answered, to compare with the audit trail afterwards.
struct Caller {
    http: reqwest::Client,
    base: String,
    /// (tool, decision, reason) of every `/v1/check` call, in order.
    calls: Vec<(String, String, String)>,
}

impl Caller {
    async fn check(&mut self, token: &str, body: Value) -> Answer {
        let resp = self
            .http
            .post(format!("{}/v1/check", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        self.calls.push((
            body["tool"].as_str().unwrap().to_owned(),
            v["decision"].as_str().unwrap().to_owned(),
            v["reason"].as_str().unwrap().to_owned(),
        ));
        Answer { status, body: v }
    }

    /// Repeats a call until it is answered with `reason`, for changes that reach the
    /// server through its control refresh.
    async fn check_until(&mut self, token: &str, body: Value, reason: &str) -> Answer {
        let deadline = Instant::now() + PROPAGATION;
        loop {
            let a = self.check(token, body.clone()).await;
            if a.reason() == reason {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "still not {reason} after {PROPAGATION:?}: {}",
                a.body
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn get_claim() -> Value {
    json!({"tool": "get_claim", "params": {"claim_id": "CLM-1001"}})
}

fn export(dir: &Path) -> Vec<Value> {
    let out = warden_ok(dir, &["audit", "export", "--format", "jsonl"]);
    out.stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(v.is_object(), "{l}");
            v
        })
        .collect()
}

#[tokio::test]
async fn quickstart_end_to_end_then_the_audit_trail_verifies_and_catches_a_change() {
    let dir = init();
    let d = dir.path();
    let mut server = Server::start(d).await;
    let mut agent = Caller {
        http: reqwest::Client::new(),
        base: server.base.clone(),
        calls: Vec::new(),
    };
    let t = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();

    // A permitted call, and its outcome.
    let a = agent
        .check(
            &t,
            json!({"tool": "get_claim", "params": {"claim_id": "CLM-1001"},
                   "context": {"rationale": "customer asked"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    a.assert("permit", "PERMITTED");
    assert_eq!(a.body["rules"], json!(["claims-read"]));
    let call_id = a.body["call_id"].as_str().unwrap().to_owned();
    let resp = agent
        .http
        .post(format!("{}/v1/calls/{call_id}/outcome", server.base))
        .bearer_auth(&t)
        .json(&json!({"status": "ok", "output": {"claim": "CLM-1001"}, "duration_ms": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Denials, each with its reason and rule.
    let a = agent
        .check(
            &t,
            json!({"tool": "update_claim",
                   "params": {"claim_id": "CLM-1002", "status": "approved", "payout": 25000}}),
        )
        .await;
    a.assert("deny", "CONSTRAINT_VIOLATION");
    assert_eq!(a.body["rules"], json!(["large-payout-needs-human"]));
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("need a human reviewer"),
        "{}",
        a.body
    );
    let a = agent
        .check(
            &t,
            json!({"tool": "run_sql", "params": {"query": "SELECT 1"}}),
        )
        .await;
    a.assert("deny", "TOOL_NOT_PERMITTED");
    assert_eq!(a.body["rules"], json!(["warden.scope"]));
    let a = agent
        .check(
            &t,
            json!({"tool": "get_claim", "params": {"claim_id": "CLM-1001"},
                   "context": {"classification": "restricted"}}),
        )
        .await;
    a.assert("deny", "DATA_BOUNDARY_VIOLATION");

    // The rate limit: five updates a minute, the sixth is refused.
    for i in 1..=6 {
        let a = agent
            .check(
                &t,
                json!({"tool": "update_claim", "params": {"claim_id": "CLM-1003", "status": "open"}}),
            )
            .await;
        if i < 6 {
            a.assert("permit", "PERMITTED");
        } else {
            a.assert("deny", "RATE_LIMITED");
            assert_eq!(a.body["rules"], json!(["update-claim-rate"]));
            assert!(a.body["retry_after_ms"].as_u64().unwrap() > 0, "{}", a.body);
        }
    }

    // Kill and revive from the CLI, a separate process writing the store.
    warden_ok(d, &["kill", AGENT, "--reason", "test"]);
    let a = agent.check_until(&t, get_claim(), "KILLED").await;
    let m = a.body["message"].as_str().unwrap();
    assert!(
        m.contains(&format!("agent `{AGENT}`")) && m.ends_with(": test)"),
        "{m}"
    );
    warden_ok(d, &["revive", AGENT]);
    agent.check_until(&t, get_claim(), "PERMITTED").await;

    warden_ok(d, &["kill", "--owner", "claims-team"]);
    let a = agent.check_until(&t, get_claim(), "KILLED").await;
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("owner `claims-team`"),
        "{}",
        a.body
    );
    // Reviving the agent does not lift a kill aimed at its owner.
    let out = warden(d, &["revive", AGENT]);
    assert_eq!(out.code, 2, "{out}");
    warden_ok(d, &["revive", "--owner", "claims-team"]);
    agent.check_until(&t, get_claim(), "PERMITTED").await;

    // An agent registered while the server runs can use the token it was given.
    let intake = warden_ok(
        d,
        &[
            "agent",
            "register",
            "intake-bot",
            "--owner",
            "intake-team",
            "--tier",
            "1",
            "--scope",
            "claims:read",
        ],
    )
    .stdout
    .trim()
    .to_owned();
    let search = json!({"tool": "search_claims", "params": {"query": "hail damage"}});
    agent.check_until(&intake, search, "PERMITTED").await;

    // Revoking the agent voids its credentials.
    warden_ok(d, &["agent", "revoke", AGENT]);
    let a = agent
        .check_until(&t, get_claim(), "CREDENTIAL_REVOKED")
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    a.assert("deny", "CREDENTIAL_REVOKED");

    server.kill();

    // The audit trail: every call, denials included, in the order it was made.
    let out = warden_ok(d, &["audit", "verify"]);
    let total: usize = out
        .stdout
        .strip_prefix("audit verified: ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entry count in\n{out}"));

    let entries = export(d);
    assert_eq!(entries.len(), total);
    let decisions: Vec<(String, String, String)> = entries
        .iter()
        .filter(|e| e["kind"] == "decision")
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("action"), s("decision"), s("reason"))
        })
        .collect();
    assert_eq!(decisions, agent.calls);
    let outcomes: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "outcome").collect();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0]["call_id"], json!(call_id));
    let control: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "control")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        control,
        [
            // the config's two agents, recorded as the config declares them
            "agent-config",
            "agent-config",
            "credential-issue",
            "kill",
            "revive",
            "kill",
            "revive",
            "agent-register",
            // registering prints the agent's first token, an issue like any other
            "credential-issue",
            "revoke"
        ]
    );

    let out = warden_ok(d, &["audit", "tail", "-n", "3"]);
    let seqs: Vec<usize> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, [total - 2, total - 1, total], "{out}");

    // Change one byte of a denial (the run_sql one) and verification names it.
    let denied = entries.iter().find(|e| e["action"] == "run_sql").unwrap()["seq"]
        .as_u64()
        .unwrap();
    let db = rusqlite::Connection::open(d.join("warden.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE audit SET decision = 'permit' WHERE seq = ?1 AND decision = 'deny'",
            [denied],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let out = warden(d, &["audit", "verify"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stdout.starts_with(&format!(
            "audit BROKEN: entry {denied}: contents do not match"
        )),
        "{out}"
    );
    assert!(
        out.stdout
            .contains(&format!("({} entries before it verified)", denied - 1)),
        "{out}"
    );
}

/// A node whose log reader went away (standard error on a full device here, a closed pipe
/// in the field) used to panic at its first log line and exit 101.
#[tokio::test]
async fn serve_with_a_broken_stderr_serves_and_exits_0_on_sigterm() {
    let dir = init();
    let d = dir.path();
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut server = Server::start_logging_to(d, full, "debug", d.join("no.log"), None).await;
    let t = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();
    let mut agent = Caller {
        http: reqwest::Client::new(),
        base: server.base.clone(),
        calls: Vec::new(),
    };
    agent
        .check(&t, get_claim())
        .await
        .assert("permit", "PERMITTED");
    // A denial is logged too.
    agent
        .check(&t, json!({"tool": "nope", "params": {}}))
        .await
        .assert("deny", "TOOL_NOT_PERMITTED");

    // A store fault the node logs: another process holds the write lock past the busy
    // timeout. The calls waiting on it are denied; once it is released, calls are
    // permitted again (the audit writer used to die logging the fault).
    let blocker = rusqlite::Connection::open(d.join("warden.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let a = agent.check(&t, get_claim()).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    a.assert("deny", "INTERNAL");
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    agent.check_until(&t, get_claim(), "PERMITTED").await;

    let pid = server.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "warden serve ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "{status}");
    let out = warden_ok(d, &["audit", "verify"]);
    assert!(out.stdout.starts_with("audit verified: "), "{out}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_raises_the_open_file_soft_limit_to_the_hard_limit() {
    let dir = init();
    let d = dir.path();
    let log = d.join("serve.log");
    let server =
        Server::start_logging_to(d, fs::File::create(&log).unwrap(), "warn", log, Some(64)).await;
    let limits = fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft_hard: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(soft_hard[0], soft_hard[1], "{line}");
    assert_ne!(
        soft_hard[0], "64",
        "the hard limit is 64 as well, so this cannot tell: {line}"
    );
}

/// Regression: an unauthenticated request drew a forged `permit` row on the operator's
/// terminal with escape codes in its tool name. Whatever an agent sends, the audit trail
/// printed by `warden audit tail` holds no raw control character: one line per entry,
/// the agent's bytes shown escaped.
#[tokio::test]
async fn escape_codes_in_a_tool_name_never_reach_the_operators_terminal() {
    let dir = init();
    let d = dir.path();
    let server = Server::start(d).await;
    let http = reqwest::Client::new();
    let t = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();
    let forged_row = "     9  2026-01-01T00:00:00Z  decision claims-processor-v3  get_claim  permit PERMITTED  claims-read";
    let tool = format!("get_claim\u{1b}[2K\r{forged_row}\n\u{202E}");
    for token in [None, Some(t.as_str())] {
        let mut req = http.post(format!("{}/v1/check", server.base)).json(&json!({
            "tool": tool,
            "params": {"claim_id": "CLM-1001"},
            "context": {"rationale": "\u{1b}]0;owned\u{7}\u{1b}[1A"}
        }));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        // refused at the edge, whoever asks
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    let out = warden_ok(d, &["audit", "tail", "-n", "50"]);
    for bad in ['\u{1b}', '\r', '\u{7}', '\u{202E}'] {
        assert!(!out.stdout.contains(bad), "raw {bad:?} in\n{out}");
    }
    let shown: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("get_claim\\u{1b}[2K\\u{d}"))
        .collect();
    assert_eq!(shown.len(), 2, "both attempts, each on one line\n{out}");
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("     9  2026")),
        "a forged row\n{out}"
    );
    drop(server);
}

/// Operators' and agents' strings in `agent list` and `agent show` (and in errors) are
/// printed escaped too.
#[test]
fn agent_listings_escape_control_characters() {
    let dir = init();
    let d = dir.path();
    let owner = "team\u{1b}[2J\u{1b}[31m";
    warden_ok(
        d,
        &[
            "agent",
            "register",
            "painted-bot",
            "--owner",
            owner,
            "--tier",
            "1",
            "--scope",
            "claims:read",
        ],
    );
    for args in [&["agent", "list"][..], &["agent", "show", "painted-bot"]] {
        let out = warden_ok(d, args);
        assert!(!out.stdout.contains('\u{1b}'), "{args:?}\n{out}");
        assert!(
            out.stdout.contains("team\\u{1b}[2J\\u{1b}[31m"),
            "{args:?}\n{out}"
        );
    }
    let out = warden(d, &["agent", "show", "nobody\u{1b}[2J"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(!out.stderr.contains('\u{1b}'), "{out}");
    assert!(out.stderr.contains("nobody\\u{1b}[2J"), "{out}");
}

#[test]
fn audit_verify_fails_on_a_missing_or_empty_store_and_creates_nothing() {
    let dir = init();
    let d = dir.path();
    let out = warden(d, &["audit", "verify"]);
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr.contains("no store at"), "{out}");
    assert!(!d.join("warden.db").exists(), "verify created the store");

    // A store with no entries is no evidence of anything either.
    drop(warden_store::SqliteStore::open(&d.join("warden.db")).unwrap());
    let out = warden(d, &["audit", "verify"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stdout.contains("the audit is empty"), "{out}");
    let out = warden(d, &["audit", "verify", "--expect-head", "1:zz"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("64 hex digits"), "{out}");
}

/// What the chain cannot show alone (a log cut short, or rewritten with every hash
/// recomputed) a head kept outside the store does: the server logs it, `--expect-head`
/// checks it.
#[tokio::test]
async fn the_logged_chain_head_pins_history_against_truncation_and_rewrites() {
    use warden_core::audit::{chain_hash, GENESIS};

    let dir = init();
    let d = dir.path();
    let log = d.join("serve.log");
    let mut server =
        Server::start_logging_to(d, fs::File::create(&log).unwrap(), "info", log, None).await;
    let t = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();
    let mut agent = Caller {
        http: reqwest::Client::new(),
        base: server.base.clone(),
        calls: Vec::new(),
    };
    for _ in 0..3 {
        agent
            .check(&t, get_claim())
            .await
            .assert("permit", "PERMITTED");
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "warden serve ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = server.log();
    let line = text
        .lines()
        .rfind(|l| l.contains("audit chain head") && l.contains("at shutdown"))
        .unwrap_or_else(|| panic!("no chain head logged at shutdown:\n{text}"));
    let pin = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pin="))
        .unwrap_or_else(|| panic!("no pin in `{line}`"))
        .to_owned();
    let (seq, _) = pin.split_once(':').unwrap();
    let n: u64 = seq.parse().unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("audit chain head") && l.contains("periodic")),
        "no chain head logged at start:\n{text}"
    );

    let out = warden_ok(d, &["audit", "verify", "--expect-head", &pin]);
    assert!(
        out.stdout.ends_with(&format!("chain head {pin}\n")),
        "{out}"
    );
    warden_ok(d, &["audit", "verify", "--min-entries", seq]);
    let earlier = last_line(&warden_ok(d, &["audit", "verify"]).stdout).to_owned();
    assert!(earlier.contains(&pin), "{earlier}");

    // Cut the last entry off: the chain alone still verifies, the pins do not.
    let db = rusqlite::Connection::open(d.join("warden.db")).unwrap();
    assert_eq!(
        db.execute("DELETE FROM audit WHERE seq = ?1", [n]).unwrap(),
        1
    );
    warden_ok(d, &["audit", "verify"]);
    let out = warden(d, &["audit", "verify", "--expect-head", &pin]);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stdout.contains(&format!("entry {n} is missing")),
        "{out}"
    );
    let out = warden(d, &["audit", "verify", "--min-entries", seq]);
    assert_eq!(out.code, 1, "{out}");

    // Rewrite the first entry and recompute every hash after it: the chain verifies, the
    // head of the shortened log pinned beforehand does not.
    let short = warden_ok(d, &["audit", "verify"]).stdout;
    let short_pin = short.trim().rsplit(' ').next().unwrap().to_owned();
    let store = warden_store::SqliteStore::open_read_only(&d.join("warden.db")).unwrap();
    let records = warden_core::store::Store::read_audit(&store, 0, 10_000).unwrap();
    drop(store);
    let mut prev = GENESIS;
    for mut r in records {
        if r.seq == 1 {
            r.entry.decision = format!("{}-rewritten", r.entry.decision);
        }
        let hash = chain_hash(&prev, r.seq, &r.entry);
        db.execute(
            "UPDATE audit SET decision = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            rusqlite::params![r.entry.decision, prev.to_vec(), hash.to_vec(), r.seq],
        )
        .unwrap();
        prev = hash;
    }
    drop(db);
    warden_ok(d, &["audit", "verify"]);
    let out = warden(d, &["audit", "verify", "--expect-head", &short_pin]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stdout.contains("was rewritten"), "{out}");
}

#[cfg(unix)]
#[test]
fn mcp_proxy_reads_the_agent_token_from_a_private_file_or_the_environment() {
    use std::os::unix::fs::PermissionsExt;

    let dir = init();
    let d = dir.path();
    let file = d.join("agent.token");
    fs::write(&file, "an-agent-token\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    // `true` as the MCP server and no client: the proxy starts, finds both gone, ends.
    let proxy = |token_file: Option<&Path>| {
        let mut cmd = command();
        cmd.args(["mcp-proxy", "--server", "http://127.0.0.1:1"])
            .env("WARDEN_CONFIG", d.join("warden.toml"))
            .env_remove("WARDEN_TOKEN")
            .stdin(Stdio::null());
        if let Some(f) = token_file {
            cmd.arg("--token-file").arg(f);
        }
        run(cmd.args(["--", "true"]))
    };
    let out = proxy(Some(&file));
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr
            .contains(&format!("run `chmod 600 {}`", file.display())),
        "{out}"
    );
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = proxy(Some(&file));
    assert_eq!(out.code, 0, "{out}");
    let out = proxy(None);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("set WARDEN_TOKEN or pass --token-file"),
        "{out}"
    );
}

/// The lifecycle commands against a running node: each reason code reached by a real
/// call, each change picked up by the node's control refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rotate_suspend_resume_retire_from_the_cli() {
    let dir = init();
    let d = dir.path();
    let mut server = Server::start(d).await;
    let mut agent = Caller {
        http: reqwest::Client::new(),
        base: server.base.clone(),
        calls: Vec::new(),
    };
    let token = |out: Out| out.stdout.trim().to_owned();
    let first = token(warden_ok(d, &["agent", "token", AGENT]));
    agent.check_until(&first, get_claim(), "PERMITTED").await;

    // Rotation with the default overlap (1h): the old token keeps working.
    let out = warden_ok(d, &["agent", "rotate", AGENT]);
    assert!(out.stderr.contains("stop working in 3600s"), "{out}");
    let second = token(out);
    agent.check_until(&second, get_claim(), "PERMITTED").await;
    agent
        .check(&first, get_claim())
        .await
        .assert("permit", "PERMITTED");
    let shown = warden_ok(d, &["agent", "show", AGENT]);
    assert!(shown.stdout.contains("in overlap"), "{shown}");

    // Without an overlap both earlier tokens stop at once, with what to do.
    let third = token(warden_ok(d, &["agent", "rotate", AGENT, "--overlap", "0s"]));
    let a = agent
        .check_until(&first, get_claim(), "CREDENTIAL_EXPIRED")
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("warden agent rotate {AGENT}")),
        "{}",
        a.body
    );
    agent
        .check_until(&second, get_claim(), "CREDENTIAL_EXPIRED")
        .await;
    agent.check_until(&third, get_claim(), "PERMITTED").await;
    let out = warden(d, &["agent", "rotate", AGENT, "--overlap", "later"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("--overlap"), "{out}");

    warden_ok(d, &["agent", "suspend", AGENT]);
    let a = agent
        .check_until(&third, get_claim(), "AGENT_SUSPENDED")
        .await;
    a.assert("deny", "AGENT_SUSPENDED");
    let out = warden(d, &["agent", "suspend", AGENT]);
    assert!(out.stderr.contains("already suspended"), "{out}");
    warden_ok(d, &["agent", "resume", AGENT]);
    agent.check_until(&third, get_claim(), "PERMITTED").await;

    warden_ok(d, &["agent", "revoke", AGENT, "--jti", &only_valid_jti(d)]);
    agent
        .check_until(&third, get_claim(), "CREDENTIAL_REVOKED")
        .await;
    let fourth = token(warden_ok(d, &["agent", "rotate", AGENT]));
    agent.check_until(&fourth, get_claim(), "PERMITTED").await;

    warden_ok(d, &["agent", "retire", AGENT]);
    agent
        .check_until(&fourth, get_claim(), "AGENT_RETIRED")
        .await;
    let out = warden(d, &["agent", "resume", AGENT]);
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr.contains("retirement is final"), "{out}");
    let listed = warden_ok(d, &["agent", "list"]);
    assert!(listed.stdout.contains("retired"), "{listed}");
    server.kill();
}

/// The one credential `warden agent show` lists as valid.
fn only_valid_jti(dir: &Path) -> String {
    let shown = warden_ok(dir, &["agent", "show", AGENT]);
    let valid: Vec<&str> = shown
        .stdout
        .lines()
        .filter(|l| l.ends_with("  valid"))
        .filter_map(|l| l.strip_prefix("credential ")?.split_whitespace().next())
        .collect();
    assert_eq!(valid.len(), 1, "{shown}");
    valid[0].to_owned()
}

/// The Python of the test venv (with PyJWT), or why it is missing.
fn python_with_pyjwt() -> Result<PathBuf, String> {
    let python = std::env::var_os("WARDEN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-test/bin/python")
        });
    let ok = Command::new(&python)
        .args(["-c", "import jwt, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "no Python with PyJWT at {} (tests/mcp/requirements.txt)",
            python.display()
        ))
    }
}

/// What a tool server does with the JWKS alone: fetch it, pick the key by `kid`, verify
/// with PyJWT. Prints the verified `sub`, or the error.
const PYJWT_VERIFY: &str = r#"
import sys, jwt
url, token, issuer = sys.argv[1:4]
try:
    key = jwt.PyJWKClient(url).get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="warden-agent",
                        issuer=issuer, options={"require": ["exp", "iat", "sub", "jti"]})
    print("verified", claims["sub"])
except Exception as e:
    print("refused", type(e).__name__, e)
"#;

fn pyjwt_verify(python: &Path, jwks: &str, token: &str, issuer: &str) -> String {
    let out = Command::new(python)
        .args(["-c", PYJWT_VERIFY, jwks, token, issuer])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The JWKS is public, cacheable and lists public keys only; PyJWT verifies a Warden
/// token from it alone. After `warden key rotate` and a restart, the old key verifies
/// through the overlap beside the new one, on the node and for PyJWT; with no overlap
/// the old key's tokens are refused at once, as expired, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_lets_a_standard_library_verify_tokens_and_follows_key_rotation() {
    let python = match python_with_pyjwt() {
        Ok(p) => Some(p),
        Err(why) if std::env::var_os("WARDEN_REQUIRE_MCP_PEERS").is_some() => panic!("{why}"),
        Err(why) => {
            eprintln!("PyJWT checks skipped: {why}");
            None
        }
    };
    let dir = init();
    let d = dir.path();
    let issuer = fs::read_to_string(d.join("warden.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("issuer = ")
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "warden".to_owned());
    let mut server = Server::start(d).await;
    let http = reqwest::Client::new();
    let jwks_url = |base: &str| format!("{base}/.well-known/jwks.json");
    let fetch = |base: String| {
        let http = http.clone();
        async move {
            // No credential of any kind: the route is public.
            let resp = http.get(jwks_url(&base)).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let cache = resp.headers()["cache-control"].to_str().unwrap().to_owned();
            assert!(cache.starts_with("public, max-age="), "{cache}");
            resp.json::<Value>().await.unwrap()
        }
    };
    let set = fetch(server.base.clone()).await;
    let keys = set["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{set}");
    let k = keys[0].as_object().unwrap();
    let mut fields: Vec<&str> = k.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["alg", "crv", "kid", "kty", "use", "x"],
        "public members only: {set}"
    );
    assert_eq!(
        (&k["kty"], &k["crv"], &k["alg"], &k["use"]),
        (
            &json!("OKP"),
            &json!("Ed25519"),
            &json!("EdDSA"),
            &json!("sig")
        )
    );
    let public = fs::read_to_string(d.join("warden.pub")).unwrap();
    let old_kid = k["kid"].as_str().unwrap().to_owned();

    let old = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();
    if let Some(py) = &python {
        assert_eq!(
            pyjwt_verify(py, &jwks_url(&server.base), &old, &issuer),
            format!("verified {AGENT}")
        );
        // Altered by one claim, the same library refuses it.
        let mut parts: Vec<String> = old.split('.').map(str::to_owned).collect();
        parts[2] = parts[2].chars().rev().collect();
        let out = pyjwt_verify(py, &jwks_url(&server.base), &parts.join("."), &issuer);
        assert!(out.starts_with("refused"), "{out}");
    }

    // Rotate the key with an overlap, restart: both keys listed, both tokens accepted.
    let out = warden_ok(d, &["key", "rotate", "--overlap", "1h"]);
    assert!(out.stdout.contains(&old_kid), "{out}");
    let rotated_pub = fs::read_to_string(d.join("warden.pub")).unwrap();
    assert_eq!(rotated_pub.lines().count(), 2, "{rotated_pub}");
    assert!(
        rotated_pub
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(public.trim()),
        "{rotated_pub}"
    );
    server.kill();
    let mut server = Server::start(d).await;
    let set = fetch(server.base.clone()).await;
    assert_eq!(set["keys"].as_array().unwrap().len(), 2, "{set}");
    let new = warden_ok(d, &["agent", "rotate", AGENT])
        .stdout
        .trim()
        .to_owned();
    let mut caller = Caller {
        http: http.clone(),
        base: server.base.clone(),
        calls: Vec::new(),
    };
    caller.check_until(&old, get_claim(), "PERMITTED").await;
    caller.check_until(&new, get_claim(), "PERMITTED").await;
    if let Some(py) = &python {
        for t in [&old, &new] {
            assert_eq!(
                pyjwt_verify(py, &jwks_url(&server.base), t, &issuer),
                format!("verified {AGENT}")
            );
        }
    }
    // A second rotation's restart keeps the first retired key through its overlap.
    let out = warden_ok(d, &["key", "rotate", "--overlap", "0s"]);
    assert!(out.stdout.contains("0s more"), "{out}");
    server.kill();
    let server = Server::start(d).await;
    let set = fetch(server.base.clone()).await;
    let kids: Vec<&str> = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(
        kids.len(),
        2,
        "the first key (1h) and the new one; the second (0s) is gone: {set}"
    );
    assert_eq!(
        fs::read_to_string(d.join("warden.pub"))
            .unwrap()
            .lines()
            .count(),
        3,
        "the file still names the second key, to refuse its tokens as expired"
    );
    assert!(kids.contains(&old_kid.as_str()), "{set}");
    let mut caller = Caller {
        http,
        base: server.base.clone(),
        calls: Vec::new(),
    };
    caller.check_until(&old, get_claim(), "PERMITTED").await;
    let a = caller
        .check_until(&new, get_claim(), "CREDENTIAL_EXPIRED")
        .await;
    let m = a.body["message"].as_str().unwrap();
    assert!(
        m.contains("rotated out") && m.contains(&format!("warden agent rotate {AGENT}")),
        "{m}"
    );
    let newest = warden_ok(d, &["agent", "token", AGENT])
        .stdout
        .trim()
        .to_owned();
    caller.check_until(&newest, get_claim(), "PERMITTED").await;
    let records = export(d);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["action"] == "key-rotate")
            .count(),
        2,
        "each key rotation is on the record"
    );
    drop(server);
}
