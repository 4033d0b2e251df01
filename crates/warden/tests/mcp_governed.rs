//! Every MCP method, governed alike through both gateways. The official Python MCP client
//! (tests/mcp/mcp_client.py) drives the reference server `server-everything` through
//! `warden serve`: over stdio with `warden mcp-proxy --server`, and over Streamable HTTP
//! through the gateway at /mcp/everything. One plan and one table of what each step must
//! answer and what the audit must record serve both transports: how a message came does
//! not change what an agent may do.
//!
//! The config is examples/mcp (which governs resource reads, prompts and completions) plus
//! what only these tests need: two more agents, and the server-everything tools that make
//! the server ask the client for sampling and elicitation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/peers.rs"]
mod peers;
#[path = "support/process.rs"]
mod process;
use peers::Peers;
use process::{everything_over_http, root, serve_in, wait_with_deadline, warden_in, Guard};

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

/// Added to examples/mcp/warden.toml.
const CONFIG: &str = r#"
[[tools]]
name = "everything/trigger-sampling-request"
scope = "test:trigger"
classification = "public"
# As the server declares it: with it in the catalog, policy reads maxTokens as a decimal
# whether or not the session listed tools first.
[tools.input_schema]
type = "object"
required = ["prompt"]
properties = { prompt = { type = "string" }, maxTokens = { type = "number" } }

[[tools]]
name = "everything/trigger-elicitation-request"
scope = "test:trigger"
classification = "public"

# The server asking the client's model, decided for the session's agent. Elicitation is
# not listed, so it is denied to everyone.
[[tools]]
name = "everything/sampling/createMessage"
scope = "test:sampling"
classification = "internal"

# Tier 1 sees at most internal data, and the example's resources are confidential.
[[agents]]
id = "intern-agent"
owner = "research"
tier = 1
scopes = ["demo:resources", "test:trigger"]
rotation = "30d"

# May make the server ask for sampling, holds no scope for resources, prompts or sampling.
[[agents]]
id = "guest-agent"
owner = "visitors"
tier = 2
scopes = ["test:trigger"]
rotation = "30d"
"#;

/// Added to examples/mcp/policy/mcp.cedarschema.
const SCHEMA: &str = r#"
// The tool declares maxTokens a JSON Schema number, so policy reads a decimal.
action "everything/trigger-sampling-request" appliesTo {
  principal: Agent, resource: Tool,
  context: { params: { prompt: String, maxTokens?: decimal }, call: Call },
};

action "everything/trigger-elicitation-request" appliesTo {
  principal: Agent, resource: Tool,
  context: { params: {}, call: Call },
};

// What server-everything asks for: text messages, a system prompt, a token budget.
action "everything/sampling/createMessage" appliesTo {
  principal: Agent, resource: Tool,
  context: {
    params: {
      messages: Set<{ role: String, content: { "type": String, text: String } }>,
      systemPrompt?: String,
      maxTokens: Long,
      temperature?: decimal,
    },
    call: Call,
  },
};
"#;

/// Written as policy/test.cedar beside the example's rules.
const POLICY: &str = r#"
@id("test-triggers")
permit (
  principal,
  action in [
    Action::"everything/trigger-sampling-request",
    Action::"everything/trigger-elicitation-request"
  ],
  resource
);

@id("short-samples")
permit (principal, action == Action::"everything/sampling/createMessage", resource)
when { context.params.maxTokens <= 100 };
"#;

const DOC: &str = "demo://resource/static/document/features.md";
const TEXT_TEMPLATE: &str = "demo://resource/dynamic/text/{resourceId}";

const AGENTS: [&str; 3] = ["research-agent", "intern-agent", "guest-agent"];

/// `warden serve` on a copy of examples/mcp with the additions above.
struct Warden {
    dir: tempfile::TempDir,
    _serve: Guard,
    base: String,
    tokens: HashMap<&'static str, String>,
}

impl Warden {
    /// Its HTTP gateway forwards /mcp/everything to `upstream`.
    fn start(upstream: &str) -> Warden {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ex = root().join("examples/mcp");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        std::fs::create_dir_all(d.join("policy")).unwrap();
        let config = read(ex.join("warden.toml"))
            .replace("http://127.0.0.1:3001/mcp", upstream)
            .replace(
                "scopes = [\"demo:echo\"",
                "scopes = [\"test:trigger\", \"test:sampling\", \"demo:echo\"",
            );
        assert!(
            config.contains(upstream) && config.contains("\"test:sampling\", \"demo:echo\""),
            "examples/mcp/warden.toml changed shape"
        );
        std::fs::write(d.join("warden.toml"), config + CONFIG).unwrap();
        std::fs::write(
            d.join("policy/mcp.cedarschema"),
            read(ex.join("policy/mcp.cedarschema")) + SCHEMA,
        )
        .unwrap();
        std::fs::copy(ex.join("policy/mcp.cedar"), d.join("policy/mcp.cedar")).unwrap();
        std::fs::write(d.join("policy/test.cedar"), POLICY).unwrap();
        warden_server::setup::write_secret(
            &d.join("operator.token"),
            "wop_governed_test_operator_0123456789\n",
        )
        .unwrap();
        // Tokens first: the CLI creates the store, so nothing reads it before it exists
        // (`serve` listens before it has opened the store).
        let tokens = AGENTS
            .iter()
            .map(|a| (*a, warden_in(d, &["agent", "token", a]).trim().to_owned()))
            .collect();
        let (serve, base) = serve_in(d, Stdio::inherit());
        Warden {
            dir,
            _serve: serve,
            base,
            tokens,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("warden.toml")
    }

    fn warden(&self, args: &[&str]) -> String {
        warden_in(self.dir.path(), args)
    }

    fn token(&self, agent: &str) -> &str {
        &self.tokens[agent]
    }

    /// The audit trail (`warden audit verify` checks its chain at the end).
    fn audit(&self) -> Vec<Value> {
        self.warden(&["audit", "export", "--format", "jsonl"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The plan and what it must do

/// What a step must answer.
enum Answer {
    /// A list with exactly these entries (none: everything was filtered away).
    List(&'static [&'static str]),
    /// A list that holds at least these entries.
    Holds(&'static [&'static str]),
    /// Answered by the server; its text (or its completion values) holds this.
    Answered(&'static str),
    /// Refused by Warden with a JSON-RPC error naming this reason code.
    Refused(&'static str),
    /// A tool result marked as an error whose text holds this (the server's tool failed
    /// because Warden refused what the server asked the client).
    ToolError(&'static str),
}

/// One decision on the audit trail, and for a permit the outcome recorded for it.
struct Decided {
    action: &'static str,
    decision: &'static str,
    reason: &'static str,
    rules: &'static [&'static str],
    outcome: Option<&'static str>,
}

const fn permit(
    action: &'static str,
    rule: &'static [&'static str],
    outcome: &'static str,
) -> Decided {
    Decided {
        action,
        decision: "permit",
        reason: "PERMITTED",
        rules: rule,
        outcome: Some(outcome),
    }
}

const fn deny(
    action: &'static str,
    reason: &'static str,
    rules: &'static [&'static str],
) -> Decided {
    Decided {
        action,
        decision: "deny",
        reason,
        rules,
        outcome: None,
    }
}

struct Step {
    op: Value,
    answer: Answer,
    decided: Vec<Decided>,
}

fn step(op: Value, answer: Answer, decided: Vec<Decided>) -> Step {
    Step {
        op,
        answer,
        decided,
    }
}

struct Session {
    agent: &'static str,
    /// Client capabilities the session declares (and answers).
    callbacks: &'static [&'static str],
    steps: Vec<Step>,
    /// The server requests that must reach the client, in order (`sampling_request`, ...).
    asked: &'static [&'static str],
}

const READ: &str = "everything/resources/read";
const SAMPLE: &str = "everything/sampling/createMessage";
const TRIGGER_SAMPLING: &str = "everything/trigger-sampling-request";
const SCOPE: &[&str] = &["warden.scope"];

fn read(uri: &str) -> Value {
    json!({"op": "read_resource", "uri": uri})
}

fn sample() -> Value {
    json!({"op": "call", "name": "trigger-sampling-request",
           "arguments": {"prompt": "a haiku about audits", "maxTokens": 10}})
}

/// Three agents, one session each: one that may use resources, prompts, completions and
/// sampling (within the rules), one held back by its tier, one by its scopes.
fn sessions() -> Vec<Session> {
    vec![
        Session {
            agent: "research-agent",
            callbacks: &["sampling", "elicitation"],
            asked: &["sampling_request"],
            steps: vec![
                step(
                    json!({"op": "list_resources"}),
                    Answer::Holds(&[DOC]),
                    vec![],
                ),
                step(
                    json!({"op": "list_resource_templates"}),
                    Answer::Holds(&[TEXT_TEMPLATE]),
                    vec![],
                ),
                // Only the prompt the catalog lists is offered.
                step(
                    json!({"op": "list_prompts"}),
                    Answer::List(&["args-prompt"]),
                    vec![],
                ),
                step(
                    read(DOC),
                    Answer::Answered("Everything Server - Features"),
                    vec![permit(READ, &["read-static-documents"], "ok")],
                ),
                // No permit covers this URI.
                step(
                    read("demo://resource/dynamic/text/1"),
                    Answer::Refused("TOOL_NOT_PERMITTED"),
                    vec![deny(
                        READ,
                        "TOOL_NOT_PERMITTED",
                        &["warden.policy.default-deny"],
                    )],
                ),
                // Regression: a tier-2 agent read file:///etc/shadow as a resource.
                step(
                    read("file:///etc/shadow"),
                    Answer::Refused("CONSTRAINT_VIOLATION"),
                    vec![deny(READ, "CONSTRAINT_VIOLATION", &["no-local-files"])],
                ),
                step(
                    json!({"op": "subscribe_resource", "uri": DOC}),
                    Answer::Answered(""),
                    vec![permit(
                        "everything/resources/subscribe",
                        &["read-static-documents"],
                        "ok",
                    )],
                ),
                step(
                    json!({"op": "get_prompt", "name": "args-prompt", "arguments": {"city": "Paris"}}),
                    Answer::Answered("weather in Paris"),
                    vec![permit(
                        "everything/prompts/get/args-prompt",
                        &["weather-prompt"],
                        "ok",
                    )],
                ),
                step(
                    json!({"op": "get_prompt", "name": "simple-prompt"}),
                    Answer::Refused("TOOL_NOT_PERMITTED"),
                    vec![deny(
                        "everything/prompts/get/simple-prompt",
                        "TOOL_NOT_PERMITTED",
                        &["warden.tool-catalog"],
                    )],
                ),
                step(
                    json!({"op": "complete",
                           "ref": {"type": "ref/prompt", "name": "completable-prompt"},
                           "argument": {"name": "department", "value": "E"}}),
                    Answer::Answered("Engineering"),
                    vec![permit(
                        "everything/completion/complete",
                        &["completions"],
                        "ok",
                    )],
                ),
                // The server asks the client's model; Warden decides that for this agent.
                step(
                    sample(),
                    Answer::Answered("sampled by the test client"),
                    vec![
                        permit(TRIGGER_SAMPLING, &["test-triggers"], "ok"),
                        permit(SAMPLE, &["short-samples"], "ok"),
                    ],
                ),
                // Elicitation is in nobody's catalog: refused to the server, which fails.
                step(
                    json!({"op": "call", "name": "trigger-elicitation-request", "arguments": {}}),
                    Answer::ToolError("Warden denied `elicitation/create`"),
                    vec![
                        permit(
                            "everything/trigger-elicitation-request",
                            &["test-triggers"],
                            "error",
                        ),
                        deny(
                            "everything/elicitation/create",
                            "TOOL_NOT_PERMITTED",
                            &["warden.tool-catalog"],
                        ),
                    ],
                ),
            ],
        },
        Session {
            agent: "intern-agent",
            callbacks: &[],
            asked: &[],
            steps: vec![
                step(json!({"op": "list_resources"}), Answer::List(&[]), vec![]),
                step(
                    read(DOC),
                    Answer::Refused("DATA_BOUNDARY_VIOLATION"),
                    vec![deny(
                        READ,
                        "DATA_BOUNDARY_VIOLATION",
                        &["warden.data-boundary"],
                    )],
                ),
            ],
        },
        Session {
            agent: "guest-agent",
            callbacks: &["sampling"],
            asked: &[],
            steps: vec![
                step(
                    json!({"op": "list_tools"}),
                    Answer::List(&["trigger-sampling-request"]),
                    vec![],
                ),
                step(json!({"op": "list_resources"}), Answer::List(&[]), vec![]),
                step(
                    json!({"op": "list_resource_templates"}),
                    Answer::List(&[]),
                    vec![],
                ),
                step(json!({"op": "list_prompts"}), Answer::List(&[]), vec![]),
                step(
                    read(DOC),
                    Answer::Refused("TOOL_NOT_PERMITTED"),
                    vec![deny(READ, "TOOL_NOT_PERMITTED", SCOPE)],
                ),
                step(
                    json!({"op": "get_prompt", "name": "args-prompt", "arguments": {"city": "Paris"}}),
                    Answer::Refused("TOOL_NOT_PERMITTED"),
                    vec![deny(
                        "everything/prompts/get/args-prompt",
                        "TOOL_NOT_PERMITTED",
                        SCOPE,
                    )],
                ),
                // The same request research-agent's model answered never reaches this
                // client: the server gets Warden's refusal instead.
                step(
                    sample(),
                    Answer::ToolError("Warden denied `sampling/createMessage`"),
                    vec![
                        permit(TRIGGER_SAMPLING, &["test-triggers"], "error"),
                        deny(SAMPLE, "TOOL_NOT_PERMITTED", SCOPE),
                    ],
                ),
            ],
        },
    ]
}

fn token_env(agent: &str) -> String {
    format!("TOKEN_{}", agent.replace('-', "_").to_uppercase())
}

fn plan(sessions: &[Session]) -> Value {
    let sessions: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "token_env": token_env(s.agent),
                "callbacks": s.callbacks,
                "steps": s.steps.iter().map(|st| st.op.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "sessions": sessions })
}

/// The entries a list step printed.
fn listed(line: &Value) -> Vec<String> {
    let key = if line["op"] == "list_tools" {
        "tools"
    } else if line["op"] == "list_prompts" {
        "names"
    } else {
        "uris"
    };
    line[key]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {line}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn check_answer(transport: &str, agent: &str, op: &Value, want: &Answer, got: &Value) {
    let what = format!("{transport}, {agent}, {op}: got {got}");
    match want {
        Answer::List(names) => assert_eq!(listed(got), *names, "{what}"),
        Answer::Holds(names) => {
            let l = listed(got);
            assert!(names.iter().all(|n| l.iter().any(|x| x == n)), "{what}");
        }
        Answer::Answered(text) => {
            let body = if got["op"] == "call" {
                assert_eq!(got["is_error"], false, "{what}");
                got["text"].as_str().unwrap().to_owned()
            } else {
                assert_eq!(got["ok"], true, "{what}");
                if got["op"] == "complete" {
                    got["values"].to_string()
                } else {
                    got["text"].as_str().unwrap_or("").to_owned()
                }
            };
            assert!(body.contains(text), "{what}");
        }
        Answer::Refused(reason) => {
            assert_eq!(got["ok"], false, "{what}");
            assert_eq!(got["code"], -32005, "{what}");
            let e = got["error"].as_str().unwrap();
            assert!(e.contains("Warden denied") && e.contains(reason), "{what}");
        }
        Answer::ToolError(text) => {
            assert_eq!(got["is_error"], true, "{what}");
            assert!(got["text"].as_str().unwrap().contains(text), "{what}");
        }
    }
}

/// Runs the plan through `transport` and checks every answer; returns nothing but panics
/// with the transport's name on the first difference.
fn run(w: &Warden, peers: &Peers, transport: &str, sessions: &[Session]) {
    let plan_file = w.dir.path().join(format!("plan-{transport}.json"));
    std::fs::write(&plan_file, plan(sessions).to_string()).unwrap();
    let mut cmd = Command::new(&peers.python);
    cmd.arg(root().join("tests/mcp/mcp_client.py"))
        .arg(&plan_file);
    match transport {
        "stdio" => {
            cmd.arg("--")
                .arg(WARDEN)
                .arg("--config")
                .arg(w.config())
                .args([
                    "mcp-proxy",
                    "--name",
                    "everything",
                    "--server",
                    &w.base,
                    "--",
                ])
                .arg("node")
                .arg(&peers.everything)
                .arg("stdio");
        }
        _ => {
            cmd.args(["--url", &format!("{}/mcp/everything", w.base)]);
        }
    }
    for s in sessions {
        cmd.env(token_env(s.agent), w.token(s.agent));
    }
    let child = cmd
        .current_dir(w.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{transport}: the client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, s) in sessions.iter().enumerate() {
        let mine: Vec<&Value> = lines.iter().filter(|l| l["session"] == i).collect();
        let is_asked = |l: &&&Value| l["op"].as_str().is_some_and(|o| o.ends_with("_request"));
        let asked: Vec<&str> = mine
            .iter()
            .filter(is_asked)
            .map(|l| l["op"].as_str().unwrap())
            .collect();
        assert_eq!(
            asked, s.asked,
            "{transport}, {}: the server requests that reached the client",
            s.agent
        );
        let answers: Vec<&&Value> = mine
            .iter()
            .filter(|l| !is_asked(l) && l["op"] != "initialize")
            .collect();
        assert_eq!(
            answers.len(),
            s.steps.len(),
            "{transport}, {}: {stdout}",
            s.agent
        );
        for (st, got) in s.steps.iter().zip(answers) {
            check_answer(transport, s.agent, &st.op, &st.answer, got);
        }
    }
}

/// The decisions on `everything/*` since entry `after`, as (agent, action, decision,
/// reason, rules), and each permit's outcomes.
fn check_audit(w: &Warden, transport: &str, sessions: &[Session], after: u64) {
    let want: Vec<(&str, &Decided)> = sessions
        .iter()
        .flat_map(|s| {
            s.steps
                .iter()
                .flat_map(move |st| st.decided.iter().map(move |d| (s.agent, d)))
        })
        .collect();
    let permits = want.iter().filter(|(_, d)| d.outcome.is_some()).count();
    // Outcomes are recorded as the answers pass; the last may land just after the client
    // has its answer and left.
    let deadline = Instant::now() + Duration::from_secs(20);
    let entries = loop {
        let entries: Vec<Value> = w
            .audit()
            .into_iter()
            .filter(|e| e["seq"].as_u64().unwrap() > after)
            .filter(|e| e["action"].as_str().unwrap().starts_with("everything/"))
            .collect();
        let outcomes = entries.iter().filter(|e| e["kind"] == "outcome").count();
        if outcomes >= permits || Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let decisions: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "decision").collect();
    let got: Vec<(String, String, String, String, Vec<String>)> = decisions
        .iter()
        .map(|e| {
            (
                e["agent_id"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["decision"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap().to_owned(),
                serde_json::from_value(e["rules"].clone()).unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String, String, Vec<String>)> = want
        .iter()
        .map(|(agent, d)| {
            (
                agent.to_string(),
                d.action.to_owned(),
                d.decision.to_owned(),
                d.reason.to_owned(),
                d.rules.iter().map(|r| r.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        got, expected,
        "{transport}: one decision per governed request, in order"
    );
    // Every permitted request has exactly one outcome, and it says how it ended.
    for ((_, d), e) in want.iter().zip(&decisions) {
        let outcomes: Vec<&str> = entries
            .iter()
            .filter(|o| o["kind"] == "outcome" && o["call_id"] == e["call_id"])
            .map(|o| o["decision"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = d.outcome.into_iter().collect();
        assert_eq!(
            outcomes, expected,
            "{transport}: the outcome of {}",
            d.action
        );
    }
}

fn last_seq(w: &Warden) -> u64 {
    w.audit()
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0)
}

/// Resource reads (permitted by URI, refused by a rule on the URI, by scope and by data
/// class), subscriptions, prompts (permitted, not in the catalog, out of scope), argument
/// completion, filtered resource, template, prompt and tool lists, and the server's
/// sampling and elicitation requests (permitted for one agent, refused to the server for
/// another), each on the audit trail: through `warden mcp-proxy` over stdio and through
/// the Streamable HTTP gateway, with one plan and one set of expectations.
#[test]
fn every_method_is_governed_alike_over_stdio_and_http() {
    let peers = peers_or_skip!();
    let (_everything, upstream) = everything_over_http(&peers.everything);
    let w = Warden::start(&upstream);
    let sessions = sessions();
    for transport in ["stdio", "http"] {
        let after = last_seq(&w);
        run(&w, &peers, transport, &sessions);
        check_audit(&w, transport, &sessions, after);
    }
    w.warden(&["audit", "verify"]);
}
