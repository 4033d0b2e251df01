//! The Streamable HTTP MCP gateway of `warden serve`, with real parts: Warden on an
//! ephemeral port with the `examples/mcp` config, in front of
//! - a small MCP server written here (JSON answers, an SSE stream it controls, a call that
//!   hangs), to pin what the gateway does at every edge, and
//! - the reference server `@modelcontextprotocol/server-everything` in Streamable HTTP
//!   mode, driven by the official Python MCP client (`tests/mcp/mcp_client.py`).
//!
//! The second needs node, `tests/mcp/node_modules` (`npm ci --prefix tests/mcp`) and
//! `.venv-test` (`python3 -m venv .venv-test && .venv-test/bin/pip install -r
//! tests/mcp/requirements.txt`); without them it prints `skipped: <why>` and passes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use warden_core::audit::{verify_store, Entry, EntryKind, Record};
use warden_core::clock::{SystemClock, NANOS_PER_SEC};
use warden_core::config::Settings;
use warden_core::store::{Store, StoreError};
use warden_mcp::message::{CALL_CANCELLED, CALL_TIMED_OUT, PARSE_ERROR, UPSTREAM_UNAVAILABLE};
use warden_mcp::sse;
use warden_server::{App, Running};
use warden_store::SqliteStore;

#[macro_use]
#[path = "support/store.rs"]
mod store;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const OPERATOR: &str = "wop_test_operator_token_0123456789";
const AGENT: &str = "research-agent";
const ACCEPT: &str = "application/json, text/event-stream";

fn root() -> PathBuf {
    Path::new(ROOT).to_path_buf()
}

// ---------------------------------------------------------------------------------------
// Warden

struct Node {
    _dir: tempfile::TempDir,
    running: Option<Running>,
    base: String,
    http: reqwest::Client,
}

impl Node {
    /// Warden with the example config, its `everything` server pointed at `upstream`.
    async fn start(upstream: &str, timeout: &str) -> Node {
        Node::start_with(upstream, timeout, |t| t).await
    }

    /// As `start`, with the example's files edited by `edit` first.
    async fn start_with(upstream: &str, timeout: &str, edit: fn(String) -> String) -> Node {
        Node::start_on(upstream, timeout, edit, |s| {
            Arc::new(SqliteStore::open(&s.store_path).unwrap())
        })
        .await
    }

    /// As `start_with`, on the store `store` makes for the settings.
    async fn start_on(
        upstream: &str,
        timeout: &str,
        edit: fn(String) -> String,
        store: impl FnOnce(&Settings) -> Arc<dyn Store>,
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let example = root().join("examples/mcp");
        std::fs::create_dir_all(dir.path().join("policy")).unwrap();
        for f in ["warden.toml", "policy/mcp.cedar", "policy/mcp.cedarschema"] {
            let text = edit(std::fs::read_to_string(example.join(f)).unwrap());
            let text = text
                .replace("http://127.0.0.1:3001/mcp", upstream)
                .replace("timeout = \"30s\"", &format!("timeout = \"{timeout}\""));
            std::fs::write(dir.path().join(f), text).unwrap();
        }
        warden_server::setup::write_secret(
            &dir.path().join("operator.token"),
            &format!("{OPERATOR}\n"),
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("warden.toml")).unwrap();
        let settings = Settings::from_toml(&text, "warden.toml", dir.path(), &|_| None).unwrap();
        assert_eq!(
            settings.mcp_servers["everything"].url.as_deref(),
            Some(upstream)
        );
        let store = store(&settings);
        let app = App::build_with_store(settings, store, Arc::new(SystemClock)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = warden_server::start_app(app, listener).await.unwrap();
        let base = format!("http://{}", running.addr);
        Node {
            _dir: dir,
            running: Some(running),
            base,
            http: reqwest::Client::new(),
        }
    }

    fn app(&self) -> &Arc<App> {
        &self.running.as_ref().unwrap().app
    }

    fn mcp_url(&self) -> String {
        format!("{}/mcp/everything", self.base)
    }

    async fn admin(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(OPERATOR)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    async fn token(&self) -> String {
        let v = self
            .admin(&format!("/admin/v1/agents/{AGENT}/tokens"), json!({}))
            .await;
        v["token"].as_str().unwrap().to_owned()
    }

    async fn kill(&self) {
        self.admin(
            "/admin/v1/kills",
            json!({"target": format!("agent:{AGENT}"), "reason": "incident 7"}),
        )
        .await;
    }

    /// POSTs `body` to the gateway as an MCP client would.
    async fn post(
        &self,
        token: Option<&str>,
        session: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        self.post_raw(token, session, serde_json::to_vec(body).unwrap())
            .await
    }

    async fn post_raw(
        &self,
        token: Option<&str>,
        session: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.mcp_url())
            .header("accept", ACCEPT)
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2025-06-18")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(s) = session {
            req = req.header("mcp-session-id", s);
        }
        req.send().await.unwrap()
    }

    fn audit(&self) -> Vec<Record> {
        self.app().store.read_audit(0, 100_000).unwrap()
    }

    /// Decisions and outcomes on `everything/*` tools, in order: (kind, action, decision,
    /// reason).
    fn tool_entries(&self) -> Vec<(EntryKind, String, String, String)> {
        self.audit()
            .into_iter()
            .filter(|r| r.entry.action.starts_with("everything/"))
            .map(|r| {
                (
                    r.entry.kind,
                    r.entry.action,
                    r.entry.decision,
                    r.entry.reason,
                )
            })
            .collect()
    }

    async fn wait_for_outcome(&self, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .tool_entries()
                .iter()
                .any(|(k, _, d, _)| *k == EntryKind::Outcome && d == status)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no `{status}` outcome in {:?}", self.tool_entries());
    }

    async fn stop(mut self) {
        let store = self.app().store.clone();
        let report = verify_store(store.as_ref()).unwrap();
        assert!(report.error.is_none(), "{:?}", report.error);
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }
}

fn call(id: i64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments}})
}

fn initialize(id: i64) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}})
}

/// Reads an SSE response one event at a time.
struct Events {
    resp: reqwest::Response,
    parser: sse::Parser,
    ready: std::collections::VecDeque<sse::Event>,
}

impl Events {
    fn new(resp: reqwest::Response) -> Self {
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Self {
            resp,
            parser: sse::Parser::new(1 << 24),
            ready: Default::default(),
        }
    }

    /// The next event, or `None` at the end of the stream.
    async fn next(&mut self) -> Option<sse::Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(15), self.resp.chunk())
                .await
                .expect("the stream stalled")
                .unwrap();
            match chunk {
                Some(b) => self.ready.extend(self.parser.push(&b).unwrap()),
                None => return None,
            }
        }
    }

    /// The next event that carries a JSON-RPC message.
    async fn next_message(&mut self) -> Option<Value> {
        while let Some(e) = self.next().await {
            if let Some(d) = e.data.filter(|d| !d.is_empty()) {
                return Some(serde_json::from_str(&d).unwrap());
            }
        }
        None
    }
}

/// The JSON-RPC answer in a response, whether JSON or a stream.
async fn answer(resp: reqwest::Response) -> Value {
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    if ct.starts_with("text/event-stream") {
        let mut ev = Events::new(resp);
        while let Some(m) = ev.next_message().await {
            if m.get("result").is_some() || m.get("error").is_some() {
                return m;
            }
        }
        panic!("the stream ended without an answer");
    }
    resp.json().await.unwrap()
}

// ---------------------------------------------------------------------------------------
// An MCP server of our own, to see exactly what reaches it

#[derive(Default)]
struct Seen {
    /// Every POST: its headers and body.
    posts: Vec<(HeaderMap, Value)>,
}

type Fake = Arc<Mutex<Seen>>;

struct ChannelBody(mpsc::Receiver<Bytes>);

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn tool_result(id: &Value, text: String) -> Value {
    json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":text}]}})
}

fn answer_one(msg: &Value) -> Option<Value> {
    let id = msg.get("id")?;
    let result = match msg["method"].as_str()? {
        "initialize" => json!({"protocolVersion":"2025-06-18","capabilities":{"tools":{}},
                               "serverInfo":{"name":"fake","version":"1"}}),
        "tools/list" => {
            let tools: Vec<Value> = [
                "echo",
                "get-env",
                "get-sum",
                "trigger-long-running-operation",
                "not-in-the-catalog",
            ]
            .iter()
            .map(|n| json!({"name": n, "inputSchema": {"type": "object"}}))
            .collect();
            json!({ "tools": tools })
        }
        "tools/call" => {
            let text = format!(
                "Echo: {}",
                msg["params"]["arguments"]["message"].as_str().unwrap_or("")
            );
            return Some(tool_result(id, text));
        }
        _ => json!({}),
    };
    Some(json!({"jsonrpc":"2.0","id":id,"result":result}))
}

async fn fake_mcp(State(fake): State<Fake>, headers: HeaderMap, body: Bytes) -> Response {
    let msg: Value = serde_json::from_slice(&body).unwrap();
    fake.lock().unwrap().posts.push((headers, msg.clone()));
    // A client named `s-...` gets that session id, so tests can open several.
    let sid = msg
        .pointer("/params/clientInfo/name")
        .and_then(Value::as_str)
        .filter(|n| n.starts_with("s-"))
        .unwrap_or("fake-session")
        .to_owned();
    let session = [("mcp-session-id", sid)];
    if let Value::Array(items) = &msg {
        let answers: Vec<Value> = items.iter().filter_map(answer_one).collect();
        return (session, Json(Value::Array(answers))).into_response();
    }
    if msg.get("id").is_none() {
        return StatusCode::ACCEPTED.into_response();
    }
    let tool = msg["params"]["name"].as_str().unwrap_or("");
    if tool == "echo" && msg["params"]["arguments"]["message"] == "hang" {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    // An answer with a duplicate key: one reader sees "seen", another "unseen".
    let dup = format!(
        r#"{{"jsonrpc":"2.0","id":{},"result":{{"content":[{{"type":"text","text":"seen"}}]}},"result":{{"content":[{{"type":"text","text":"unseen"}}]}}}}"#,
        msg["id"]
    );
    if tool == "echo" && msg["params"]["arguments"]["message"] == "dup-json" {
        return (session, [("content-type", "application/json")], dup).into_response();
    }
    if tool == "echo" && msg["params"]["arguments"]["message"] == "dup-sse" {
        let body = format!("event: message\ndata: {dup}\n\n");
        return (session, [("content-type", "text/event-stream")], body).into_response();
    }
    if tool == "trigger-long-running-operation" {
        // A stream that reports progress until it is told to stop, with a forged answer to
        // a request nobody made at its start.
        let id = msg["id"].clone();
        let token = msg["params"]["_meta"]["progressToken"].clone();
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        tokio::spawn(async move {
            let send = |b: Vec<u8>| {
                let tx = tx.clone();
                async move { tx.send(Bytes::from(b)).await.is_ok() }
            };
            send(b"id: e0\ndata: \n\n".to_vec()).await;
            let forged = tool_result(&json!(999), "forged".into());
            send(sse::encode(
                Some("message"),
                Some("e1"),
                None,
                &forged.to_string(),
            ))
            .await;
            for i in 1..=100 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let p = json!({"jsonrpc":"2.0","method":"notifications/progress",
                               "params":{"progressToken":token,"progress":i,"total":100}});
                // split each event in two writes, as a network would
                let bytes = sse::encode(
                    Some("message"),
                    Some(&format!("p{i}")),
                    None,
                    &p.to_string(),
                );
                let (a, b) = bytes.split_at(bytes.len() / 2);
                if !send(a.to_vec()).await || !send(b.to_vec()).await {
                    return;
                }
            }
            send(sse::encode(
                None,
                None,
                None,
                &tool_result(&id, "done".into()).to_string(),
            ))
            .await;
        });
        let mut resp = Response::new(Body::new(ChannelBody(rx)));
        resp.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert("mcp-session-id", HeaderValue::from_static("fake-session"));
        return resp;
    }
    let Some(a) = answer_one(&msg) else {
        return StatusCode::ACCEPTED.into_response();
    };
    (session, Json(a)).into_response()
}

async fn start_fake() -> (Fake, String) {
    let fake: Fake = Default::default();
    let app = Router::new()
        .route("/mcp", post(fake_mcp))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, format!("http://{addr}/mcp"))
}

fn seen_calls(fake: &Fake) -> Vec<Value> {
    fake.lock()
        .unwrap()
        .posts
        .iter()
        .flat_map(|(_, b)| match b {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        })
        .filter(|m| m["method"] == "tools/call")
        .collect()
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_server_behind_the_gateway() {
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "1s").await;
    let token = node.token().await;

    // unknown servers, and servers without a url, are not served
    for name in ["nope", "fs"] {
        let r = node
            .http
            .post(format!("{}/mcp/{name}", node.base))
            .bearer_auth(&token)
            .json(&initialize(1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{name}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "NOT_FOUND");
    }

    // no credential, a forged one: 401 naming the reason, nothing reaches the server
    let r = node.post(None, None, &initialize(1)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(
        r.json::<Value>().await.unwrap()["reason"],
        "UNAUTHENTICATED"
    );
    let forged = format!("{}x", &token[..token.len() - 1]);
    let r = node.post(Some(&forged), None, &initialize(1)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let reason = r.json::<Value>().await.unwrap()["reason"].clone();
    assert!(
        reason == "CREDENTIAL_INVALID" || reason == "CREDENTIAL_MALFORMED",
        "{reason}"
    );
    let r = node
        .post(
            Some("garbage"),
            None,
            &call(1, "echo", json!({"message": "hi"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(fake.lock().unwrap().posts.is_empty());

    // malformed JSON and oversized bodies
    let r = node
        .post_raw(Some(&token), None, b"{not json".to_vec())
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        PARSE_ERROR
    );
    // Regression: a 100 KB call got a bare 413 from the node's API body limit. The
    // gateway has its own limit, as large as stdio's; past it the message is answered in
    // JSON-RPC form with its own id, and the refused call is on the audit trail.
    let before = node.tool_entries().len();
    let big = call(1, "echo", json!({"message": "x".repeat(5 * 1024 * 1024)}));
    let r = node.post(Some(&token), None, &big).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["id"].clone(), v["result"]["isError"].clone()),
        (json!(1), json!(true))
    );
    let entries = node.tool_entries();
    assert_eq!(entries.len(), before + 1, "{entries:?}");
    assert_eq!(
        (entries[before].0, entries[before].2.as_str()),
        (EntryKind::Decision, "deny")
    );

    // initialize: the session comes back; the server sees who the agent is, not its token
    let r = node.post(Some(&token), None, &initialize(1)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    assert_eq!(session, "fake-session");
    assert_eq!(
        r.json::<Value>().await.unwrap()["result"]["serverInfo"]["name"],
        "fake"
    );
    {
        let seen = fake.lock().unwrap();
        let (h, _) = &seen.posts[0];
        assert!(
            h.get("authorization").is_none(),
            "the agent's token leaked upstream"
        );
        assert_eq!(h["x-agent-id"], AGENT);
        assert_eq!(h["accept"], ACCEPT);
        assert_eq!(h["mcp-protocol-version"], "2025-06-18");
        assert!(h.contains_key("traceparent"));
    }

    // tools/list: only what the agent could ever call
    let list = json!({"jsonrpc":"2.0","id":2,"method":"tools/list"});
    let v: Value = node
        .post(Some(&token), Some(&session), &list)
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "get-sum", "trigger-long-running-operation"]);

    // a permitted call: forwarded with its trace, result intact
    let r = node
        .post(
            Some(&token),
            Some(&session),
            &call(3, "echo", json!({"message": "hello"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "Echo: hello");
    let forwarded = seen_calls(&fake).pop().unwrap();
    let tp = forwarded["params"]["_meta"]["traceparent"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(forwarded["params"]["_meta"]["baggage"]
        .as_str()
        .unwrap()
        .contains("warden.agent_id=research-agent"));
    let header_tp = fake.lock().unwrap().posts.last().unwrap().0["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(header_tp, tp);
    let decision = node
        .audit()
        .into_iter()
        .rfind(|r| r.entry.kind == EntryKind::Decision)
        .unwrap();
    assert_eq!(tp.split('-').nth(1).unwrap(), decision.entry.trace_id);

    // denied calls are answered here and never reach the server
    let before = seen_calls(&fake).len();
    let v: Value = node
        .post(
            Some(&token),
            Some(&session),
            &call(4, "echo", json!({"message": "my password is hunter2"})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], 4);
    assert_eq!(v["result"]["isError"], true);
    assert_eq!(
        v["result"]["_meta"]["warden"]["reason"],
        "CONSTRAINT_VIOLATION"
    );
    assert_eq!(
        v["result"]["_meta"]["warden"]["rules"],
        json!(["no-secrets-in-echo"])
    );
    let v: Value = node
        .post(
            Some(&token),
            Some(&session),
            &call(5, "get-sum", json!({"a": 5_000_000, "b": 1})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["isError"], true);
    assert_eq!(seen_calls(&fake).len(), before);
    // nor does a tools/call dressed as a notification (no id, so nobody could answer it)
    let sneaky = json!({"jsonrpc":"2.0","method":"tools/call","params":{"name":"get-env"}});
    let r = node.post(Some(&token), Some(&session), &sneaky).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(seen_calls(&fake).len(), before);

    // a batch is split: the denied call answered here, the permitted one forwarded
    let batch = json!([
        call(6, "echo", json!({"message": "password"})),
        call(7, "echo", json!({"message": "fine"}))
    ]);
    let v: Value = node
        .post(Some(&token), Some(&session), &batch)
        .await
        .json()
        .await
        .unwrap();
    let mut ids: Vec<i64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [6, 7]);
    assert_eq!(seen_calls(&fake).len(), before + 1);

    // a call past the server's timeout: an error for the client, a cancel for the server
    let started = Instant::now();
    let v: Value = node
        .post(
            Some(&token),
            Some(&session),
            &call(8, "echo", json!({"message": "hang"})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], CALL_TIMED_OUT, "{v}");
    assert!(started.elapsed() < Duration::from_secs(10));
    node.wait_for_outcome("timeout").await;
    wait_for_cancel(&fake, 8).await;

    // every tools/call has one decision entry; permitted ones an outcome each
    let entries = node.tool_entries();
    let decisions: Vec<_> = entries
        .iter()
        .filter(|e| e.0 == EntryKind::Decision)
        .map(|e| (e.1.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(
        decisions,
        [
            ("everything/echo", "deny"), // the forged token's
            ("everything/echo", "deny"), // the over-limit call
            ("everything/echo", "permit"),
            ("everything/echo", "deny"),
            ("everything/get-sum", "deny"),
            ("everything/echo", "deny"),
            ("everything/echo", "permit"),
            ("everything/echo", "permit"),
        ]
    );
    let mut outcomes: Vec<&str> = entries
        .iter()
        .filter(|e| e.0 == EntryKind::Outcome)
        .map(|e| e.2.as_str())
        .collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["ok", "ok", "timeout"]);

    // another agent cannot ride on this agent's session
    node.admin(
        "/admin/v1/agents",
        json!({"id": "other-agent", "owner": "elsewhere", "tier": 1, "scopes": ["demo:echo"]}),
    )
    .await;
    let other = node
        .admin("/admin/v1/agents/other-agent/tokens", json!({}))
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = node.post(Some(&other), Some(&session), &list).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = node.post(Some(&other), None, &list).await;
    assert_eq!(r.status(), StatusCode::OK, "its own session is fine");

    // a killed agent: refused for anything but tool calls, whose denials are audited
    node.kill().await;
    let r = node.post(Some(&token), Some(&session), &list).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.json::<Value>().await.unwrap()["reason"], "KILLED");
    let v: Value = node
        .post(
            Some(&token),
            Some(&session),
            &call(9, "echo", json!({"message": "hi"})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["_meta"]["warden"]["reason"], "KILLED");
    let r = node
        .http
        .get(node.mcp_url())
        .bearer_auth(&token)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        node.tool_entries()
            .iter()
            .filter(|e| e.0 == EntryKind::Decision)
            .count(),
        9 // with the over-limit call's
    );
    node.stop().await;
}

/// The HTTP gateway resolves the path arguments configured for a server with the same
/// function as the stdio proxy, forwards what policy judged, and refuses (on the audit
/// trail) what it cannot resolve: here relative paths, as it cannot know the server's
/// working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_arguments_are_resolved_and_forwarded_as_judged() {
    let (fake, url) = start_fake().await;
    let node = Node::start_with(&url, "5s", |t| {
        t.replace(
            "timeout = \"30s\"",
            "timeout = \"30s\"\nresolve_paths = [\"message\"]",
        )
    })
    .await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let dir = node._dir.path().canonicalize().unwrap();
    let spelled = format!("{}/policy/./../warden.toml", node._dir.path().display());
    let r = node
        .post(
            Some(&token),
            Some(&session),
            &call(2, "echo", json!({ "message": spelled })),
        )
        .await;
    let want = format!("Echo: {}", dir.join("warden.toml").display());
    assert_eq!(answer(r).await["result"]["content"][0]["text"], want);
    let r = node
        .post(
            Some(&token),
            Some(&session),
            &call(3, "echo", json!({"message": "relative/notes.txt"})),
        )
        .await;
    let a = answer(r).await;
    assert_eq!(a["result"]["isError"], true, "{a}");
    let text = a["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("CONSTRAINT_VIOLATION") && text.contains("argument `message`"),
        "{text}"
    );
    let seen = seen_calls(&fake);
    assert_eq!(seen.len(), 1, "the refused call never reached the server");
    assert_eq!(
        seen[0]["params"]["arguments"]["message"],
        dir.join("warden.toml").display().to_string()
    );
    let decisions: Vec<_> = node
        .tool_entries()
        .into_iter()
        .filter(|e| e.0 == EntryKind::Decision)
        .map(|e| e.3)
        .collect();
    assert_eq!(decisions, ["PERMITTED", "CONSTRAINT_VIOLATION"]);
    node.stop().await;
}

/// A tool name with a control character is refused at the gateway, on the audit trail
/// (`INVALID_REQUEST`), and never reaches the server: the name would otherwise be stored
/// and shown to operators as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_name_with_control_characters_is_refused_and_audited() {
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "5s").await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    for (id, name) in [(2, "echo\u{1b}[2K\r"), (3, "ec\u{202E}ho")] {
        let r = node
            .post(
                Some(&token),
                Some(&session),
                &call(id, name, json!({"message": "hi"})),
            )
            .await;
        let a = answer(r).await;
        assert_eq!(a["result"]["isError"], true, "{a}");
        let text = a["result"]["content"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("INVALID_REQUEST") && text.contains("a control or formatting character"),
            "{text}"
        );
    }
    assert!(
        seen_calls(&fake).is_empty(),
        "a refused call reached the server"
    );
    let reasons: Vec<_> = node
        .tool_entries()
        .into_iter()
        .filter(|e| e.0 == EntryKind::Decision)
        .map(|e| e.3)
        .collect();
    assert_eq!(reasons, ["INVALID_REQUEST", "INVALID_REQUEST"]);
    node.stop().await;
}

async fn wait_for_cancel(fake: &Fake, id: i64) -> HeaderMap {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = fake.lock().unwrap().posts.iter().find_map(|(h, b)| {
            (b["method"] == "notifications/cancelled" && b["params"]["requestId"] == id)
                .then(|| h.clone())
        });
        if let Some(h) = found {
            assert_eq!(h["mcp-session-id"], "fake-session");
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "no notifications/cancelled for {id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_passes_through_as_it_happens_and_a_kill_cancels_the_call() {
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "30s").await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();

    // the client gives up on a call: its outcome is `cancelled`, and its stream ends
    let mut first_call = call(2, "trigger-long-running-operation", json!({}));
    first_call["params"]["_meta"] = json!({"progressToken": "t2"});
    let mut events = Events::new(node.post(Some(&token), Some(&session), &first_call).await);
    events.next_message().await.unwrap();
    let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                        "params":{"requestId": 2, "reason": "changed my mind"}});
    let r = node.post(Some(&token), Some(&session), &cancel).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    wait_for_cancel(&fake, 2).await;
    node.wait_for_outcome("cancelled").await;
    let ended = Instant::now();
    while events.next().await.is_some() {}
    assert!(ended.elapsed() < Duration::from_secs(3));

    let mut slow = call(
        3,
        "trigger-long-running-operation",
        json!({"duration": 100, "steps": 100}),
    );
    slow["params"]["_meta"] = json!({"progressToken": "tok"});
    let r = node.post(Some(&token), Some(&session), &slow).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut events = Events::new(r);
    // the priming event passes unchanged, id and all
    let first = events.next().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("e0"));
    // progress arrives while the call runs, not at its end; the forged answer never does
    let started = Instant::now();
    for i in 1..=3 {
        let e = events.next().await.unwrap();
        assert_eq!(e.id.as_deref(), Some(format!("p{i}").as_str()), "{e:?}");
        let m: Value = serde_json::from_str(e.data.as_deref().unwrap()).unwrap();
        assert_eq!(m["method"], "notifications/progress");
        assert_eq!(m["params"]["progress"], i);
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    node.kill().await;
    let killed = Instant::now();
    let mut last = None;
    while let Some(m) = events.next_message().await {
        assert_ne!(m["id"], 999, "a forged answer reached the client");
        if m.get("error").is_some() {
            last = Some(m);
        }
    }
    let err = last.expect("no error event after the kill");
    assert_eq!(err["id"], 3);
    assert_eq!(err["error"]["code"], CALL_CANCELLED);
    assert!(err["error"]["message"].as_str().unwrap().contains("KILLED"));
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "the stream did not end promptly"
    );
    wait_for_cancel(&fake, 3).await;
    let outcomes: Vec<String> = node
        .tool_entries()
        .into_iter()
        .filter(|e| e.0 == EntryKind::Outcome)
        .map(|e| e.2)
        .collect();
    assert_eq!(outcomes, ["cancelled", "cancelled"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_outlives_the_request_timeout() {
    let (_fake, url) = start_fake().await;
    let node = Node::start_with(&url, "30s", |t| {
        t.replace("[server]\n", "[server]\nrequest_timeout = \"1s\"\n")
    })
    .await;
    assert_eq!(
        node.app().settings.connections.request_timeout_ns,
        NANOS_PER_SEC
    );
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let mut slow = call(2, "trigger-long-running-operation", json!({}));
    slow["params"]["_meta"] = json!({"progressToken": "tok"});
    let r = node.post(Some(&token), Some(&session), &slow).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut events = Events::new(r);
    // Progress comes every 200 ms, so the tenth event arrives twice the request timeout
    // after the call began.
    loop {
        let e = events.next().await.expect("the stream ended early");
        if e.id.as_deref() == Some("p10") {
            break;
        }
    }
    drop(events);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_gets_a_502_and_the_call_an_upstream_failed_outcome() {
    // a port nobody listens on
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let node = Node::start(&format!("http://127.0.0.1:{port}/mcp"), "30s").await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (json!(1), json!(UPSTREAM_UNAVAILABLE))
    );
    // a session the gateway never saw is refused before anything is decided
    let r = node
        .post(
            Some(&token),
            Some("s"),
            &call(2, "echo", json!({"message": "hi"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = node
        .post(
            Some(&token),
            None,
            &call(2, "echo", json!({"message": "hi"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], 2);
    let entries = node.tool_entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(
        (entries[0].0, entries[0].2.as_str()),
        (EntryKind::Decision, "permit")
    );
    assert_eq!(
        (entries[1].0, entries[1].2.as_str()),
        (EntryKind::Outcome, "upstream-failed")
    );
    node.stop().await;
}

// ---------------------------------------------------------------------------------------
// The reference server and the official client

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn missing_tools() -> Option<String> {
    let root = root();
    let python = root.join(".venv-test/bin/python");
    if !python.exists() {
        return Some("no .venv-test (python3 -m venv .venv-test && .venv-test/bin/pip install -r tests/mcp/requirements.txt)".into());
    }
    let ok = Command::new(&python)
        .args(["-c", "import mcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("the `mcp` package is not installed in .venv-test".into());
    }
    if !Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Some("node is not installed".into());
    }
    if !root.join(EVERYTHING).exists() {
        return Some("tests/mcp/node_modules is missing (npm ci --prefix tests/mcp)".into());
    }
    None
}

const EVERYTHING: &str =
    "tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js";

/// Starts the reference server on a free port; returns it and its MCP url.
async fn start_everything() -> (Killed, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new("node")
        .arg(root().join(EVERYTHING))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "server-everything exited"
        );
        assert!(Instant::now() < deadline, "server-everything did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, format!("http://127.0.0.1:{port}/mcp"))
}

/// Starts the official client on a plan (fed on stdin: no files to clean up).
fn client(url: &str, token: &str, plan: &Value) -> Child {
    let mut child = Command::new(root().join(".venv-test/bin/python"))
        .arg(root().join("tests/mcp/mcp_client.py"))
        .arg("/dev/stdin")
        .args(["--url", url])
        .env("WARDEN_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(plan.to_string().as_bytes()).unwrap();
    drop(stdin);
    child
}

/// Waits for the client: whether it succeeded, its JSON lines, its stderr.
async fn finish(child: Child) -> (bool, Vec<Value>, String) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn step<'a>(lines: &'a [Value], op: &str, n: usize) -> &'a Value {
    lines
        .iter()
        .filter(|l| l["op"] == op)
        .nth(n)
        .unwrap_or_else(|| panic!("no {op} #{n} in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_through_the_gateway_to_the_reference_server() {
    if let Some(why) = missing_tools() {
        // CI sets WARDEN_REQUIRE_MCP_PEERS so a missing peer fails instead of skipping.
        assert!(
            std::env::var_os("WARDEN_REQUIRE_MCP_PEERS").is_none(),
            "{why}"
        );
        println!("skipped: {why}");
        return;
    }
    let (_server, url) = start_everything().await;
    let node = Node::start(&url, "30s").await;
    let token = node.token().await;
    let mcp = node.mcp_url();

    let plan = json!([
        {"op": "list_tools"},
        {"op": "call", "name": "echo", "arguments": {"message": "hello gateway"}},
        {"op": "call", "name": "echo", "arguments": {"message": "the password is swordfish"}},
        {"op": "call", "name": "get-sum", "arguments": {"a": 5_000_000, "b": 1}},
        {"op": "call", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
        {"op": "ping"}
    ]);
    let (ok, lines, stderr) = finish(client(&mcp, &token, &plan)).await;
    assert!(ok, "client failed: {stderr}");
    assert_eq!(
        step(&lines, "initialize", 0)["server"],
        "mcp-servers/everything"
    );
    let tools: Vec<&str> = step(&lines, "list_tools", 0)["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tools.contains(&"echo"), "{tools:?}");
    assert!(
        !tools.contains(&"get-env"),
        "restricted data for a tier-2 agent: {tools:?}"
    );
    assert!(
        tools
            .iter()
            .all(|t| ["echo", "get-sum", "trigger-long-running-operation"].contains(t)),
        "tools without an action or a permit must be hidden: {tools:?}"
    );
    let echo = step(&lines, "call", 0);
    assert_eq!(
        (echo["is_error"].clone(), echo["text"].clone()),
        (json!(false), json!("Echo: hello gateway"))
    );
    let secret = step(&lines, "call", 1);
    assert_eq!(secret["is_error"], true);
    let text = secret["text"].as_str().unwrap();
    assert!(
        text.contains("CONSTRAINT_VIOLATION") && text.contains("no-secrets-in-echo"),
        "{text}"
    );
    assert_eq!(step(&lines, "call", 2)["is_error"], true);
    let sum = step(&lines, "call", 3);
    assert_eq!(sum["is_error"], false);
    assert!(sum["text"].as_str().unwrap().contains('5'), "{sum}");
    assert_eq!(step(&lines, "ping", 0)["ok"], true);

    // a forged token gets nowhere
    let forged = format!("{}x", &token[..token.len() - 1]);
    let (ok, lines, _) = finish(client(&mcp, &forged, &json!([{"op": "list_tools"}]))).await;
    assert!(!ok && lines.is_empty(), "{lines:?}");

    // progress streams through as it happens (raw HTTP, to see the timing)
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    answer(r).await;
    let inited = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
    assert_eq!(
        node.post(Some(&token), Some(&session), &inited)
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    let mut slow = call(
        2,
        "trigger-long-running-operation",
        json!({"duration": 3, "steps": 3}),
    );
    slow["params"]["_meta"] = json!({"progressToken": "p"});
    let started = Instant::now();
    let mut events = Events::new(node.post(Some(&token), Some(&session), &slow).await);
    let mut progress_at = Vec::new();
    let result = loop {
        let m = events.next_message().await.expect("stream ended early");
        if m["method"] == "notifications/progress" {
            progress_at.push(started.elapsed());
        } else if m.get("result").is_some() {
            break m;
        }
    };
    let done_at = started.elapsed();
    assert_eq!(progress_at.len(), 3, "{progress_at:?}");
    assert!(
        progress_at[0] + Duration::from_millis(1500) < done_at,
        "progress was held back until the end: {progress_at:?} vs {done_at:?}"
    );
    assert!(result["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("completed"));

    // a kill while a long operation streams: the client gets an error, the audit a
    // cancelled outcome
    let plan = json!([{"op": "call", "name": "trigger-long-running-operation",
                       "arguments": {"duration": 5, "steps": 5}, "timeout": 30}]);
    let child = client(&mcp, &token, &plan);
    let deadline = Instant::now() + Duration::from_secs(20);
    let permits = |n: &Node| {
        n.tool_entries()
            .iter()
            .filter(|e| {
                e.0 == EntryKind::Decision
                    && e.1 == "everything/trigger-long-running-operation"
                    && e.2 == "permit"
            })
            .count()
    };
    while permits(&node) < 2 {
        assert!(Instant::now() < deadline, "the long call never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    node.kill().await;
    let killed = Instant::now();
    let (_, lines, stderr) = finish(child).await;
    let c = step(&lines, "call", 0);
    assert!(
        c.get("error").is_some() || c["is_error"] == true,
        "the killed call must fail: {c} {stderr}"
    );
    assert!(killed.elapsed() < Duration::from_secs(15));
    node.wait_for_outcome("cancelled").await;

    // the audit: one decision per tools/call (denials included), one outcome per permit
    let entries = node.tool_entries();
    let decisions: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e.0 == EntryKind::Decision)
        .map(|e| (e.1.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(
        decisions,
        [
            ("everything/echo", "permit"),
            ("everything/echo", "deny"),
            ("everything/get-sum", "deny"),
            ("everything/get-sum", "permit"),
            ("everything/trigger-long-running-operation", "permit"),
            ("everything/trigger-long-running-operation", "permit"),
        ]
    );
    let outcomes: Vec<&str> = entries
        .iter()
        .filter(|e| e.0 == EntryKind::Outcome)
        .map(|e| e.2.as_str())
        .collect();
    assert_eq!(outcomes, ["ok", "ok", "ok", "cancelled"]);
    node.stop().await;
}

/// Regression: one unauthenticated MCP batch of 650 calls wrote 650 audit entries. The
/// gateway authenticates first and reads no further than the first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_batch_yields_one_entry_and_is_read_no_further() {
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "30s").await;
    let batch: Vec<Value> = (0..200)
        .map(|i| call(i, "echo", json!({"message": "x"})))
        .collect();
    let r = node.post(None, None, &Value::Array(batch)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let entries = node.tool_entries();
    assert_eq!(
        entries,
        vec![(
            EntryKind::Decision,
            "everything/echo".to_owned(),
            "deny".to_owned(),
            "UNAUTHENTICATED".to_owned()
        )]
    );

    // The rest of the batch is not parsed at all: a tail that is not JSON changes nothing.
    let mut raw = b"[".to_vec();
    raw.extend(serde_json::to_vec(&call(1, "echo", json!({"message": "x"}))).unwrap());
    raw.extend_from_slice(b", this is { not json");
    let r = node.post_raw(Some("garbage"), None, raw).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(node.tool_entries().len(), 2);
    assert!(fake.lock().unwrap().posts.is_empty());
    node.stop().await;
}

/// A web page can POST `text/plain` across origins without a preflight; the gateway takes
/// JSON only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_a_post_that_is_not_json_with_415() {
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "30s").await;
    let token = node.token().await;
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = node
            .http
            .post(node.mcp_url())
            .bearer_auth(&token)
            .header("accept", ACCEPT)
            .header("content-type", ct)
            .body(serde_json::to_vec(&initialize(1)).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
    }
    assert!(fake.lock().unwrap().posts.is_empty());
    node.stop().await;
}

/// Regression: past 100,000 sessions the table stopped binding sessions to agents and
/// served them unbound (failing open), and it never forgot one. Idle sessions expire
/// (their clients get 404 and initialize anew) and a full table refuses new sessions.
#[tokio::test]
async fn the_session_table_expires_idle_sessions_and_refuses_new_ones_when_full() {
    let (_fake, url) = start_fake().await;
    let node = Node::start_with(&url, "30s", |t| {
        t.replacen(
            "[server]\n",
            "[server]\nmcp_sessions_max = 2\nmcp_session_idle = \"1s\"\n",
            1,
        )
    })
    .await;
    let token = node.token().await;
    let init = |name: &str| {
        json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",
               "capabilities":{},"clientInfo":{"name":name,"version":"1"}}})
    };
    for s in ["s-1", "s-2"] {
        let r = node.post(Some(&token), None, &init(s)).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["mcp-session-id"], s);
    }
    let r = node.post(Some(&token), None, &init("s-3")).await;
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "full: refused, not unbound"
    );
    let ping = json!({"jsonrpc":"2.0","id":2,"method":"ping"});
    let r = node.post(Some(&token), Some("s-1"), &ping).await;
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = node.post(Some(&token), Some("s-1"), &ping).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "an idle session is forgotten"
    );
    let r = node.post(Some(&token), None, &init("s-3")).await;
    assert_eq!(r.status(), StatusCode::OK, "and its place is free");
    node.stop().await;
}

/// Regression: a client leaving mid-call cancelled the call upstream on stdio but not
/// over HTTP, where the call ran on. Both transports now cancel it and record it.
#[tokio::test]
async fn a_client_that_hangs_up_mid_call_has_it_cancelled_upstream() {
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "30s").await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let hang = call(2, "echo", json!({"message": "hang"}));
    let post = node.post(Some(&token), Some(&session), &hang);
    // The client gives up: its request future, and with it the connection, is dropped.
    assert!(tokio::time::timeout(Duration::from_millis(500), post)
        .await
        .is_err());
    wait_for_cancel(&fake, 2).await;
    node.wait_for_outcome("cancelled").await;
    node.stop().await;
}

/// Regression: the HTTP gateway read upstream answers leniently, and passed an SSE event
/// it could not parse through uninspected. An answer with a duplicate key (which readers
/// resolve differently) is refused on both paths: never delivered, and the call is
/// settled as failed.
#[tokio::test]
async fn upstream_answers_with_duplicate_keys_never_reach_the_client() {
    let (_fake, url) = start_fake().await;
    let node = Node::start(&url, "30s").await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let r = node
        .post(
            Some(&token),
            Some(&session),
            &call(2, "echo", json!({"message": "dup-json"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let text = r.text().await.unwrap();
    assert!(!text.contains("seen\""), "{text}");
    let r = node
        .post(
            Some(&token),
            Some(&session),
            &call(3, "echo", json!({"message": "dup-sse"})),
        )
        .await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("seen\""), "{text}");
    assert!(text.contains("without answering"), "{text}");
    node.wait_for_outcome("upstream-failed").await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------------
// A decision that waits

/// The node's SQLite store, except that the append of the decision whose rationale is
/// `hold` waits until the test lets it go: that call's decision is made by the real
/// pipeline and is not answered until it is durable, so it waits as a call held on a slow
/// disk would.
struct HoldingStore {
    inner: SqliteStore,
    /// Told when the held append is reached; taken, so only one append is held.
    reached: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Store for HoldingStore {
    pass_to_inner!(
        operators,
        state_version,
        snapshot,
        upsert_agent,
        get_agent,
        list_agents,
        list_credentials,
        apply_control,
        read_audit,
        call_records,
        tail_audit,
    );

    fn append_audit(&self, entries: Vec<Entry>) -> Result<Vec<Record>, StoreError> {
        let held = entries
            .iter()
            .any(|e| e.kind == EntryKind::Decision && e.rationale.as_deref() == Some("hold"));
        if held {
            if let Some(reached) = self.reached.lock().unwrap().take() {
                reached.send(()).unwrap();
                // Bounded, so a failing test cannot hang the suite.
                let _ = self
                    .release
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(60));
            }
        }
        self.inner.append_audit(entries)
    }
}

/// A decision that waits holds up nothing else in its MCP session over HTTP: while one
/// call's decision is not yet durable, a ping and the client's cancellation of that call
/// go through in the same session; once decided (permitted), the call is never sent to
/// the server and ends with exactly one outcome, `cancelled`.
///
/// A second call sent meanwhile is taken in and answered once the held append is done,
/// not before: every decision of a node goes through its one group-commit audit writer
/// ("no audit, no action"), so a slow append holds them all. That a second call is decided and answered
/// while the first waits at the gate is shown over stdio, where the wait is on the way
/// to `warden serve` (`a_held_decision_holds_up_nothing_else_in_the_session`), and in the
/// engine's own tests.
/// DNS rebinding: a request whose `Host` is not one the node answers, or which comes
/// from a foreign browser origin, is refused with 403 before its route or credential is
/// looked at, and reaches neither the upstream nor the audit. By default a node on a
/// loopback address answers the loopback names; `[server] allowed_hosts` names others.
#[tokio::test]
async fn a_rebound_host_or_a_foreign_origin_is_refused_before_anything_else() {
    /// An initialize from `node` with this `Host` and, if any, `Origin`.
    async fn post(node: &Node, token: &str, host: &str, origin: Option<&str>) -> reqwest::Response {
        let mut req = node
            .http
            .post(node.mcp_url())
            .header("host", host)
            .header("accept", ACCEPT)
            .bearer_auth(token)
            .json(&initialize(1));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send().await.unwrap()
    }
    let (fake, url) = start_fake().await;
    let node = Node::start(&url, "5s").await;
    let token = node.token().await;
    let before = node.audit().len();
    let port = node.base.rsplit(':').next().unwrap().to_owned();
    let (evil, own) = (
        format!("evil.example.com:{port}"),
        format!("127.0.0.1:{port}"),
    );

    for (host, origin) in [
        ("evil.example.com", None),
        (evil.as_str(), Some("http://evil.example.com")),
        (own.as_str(), Some("http://evil.example.com")),
        (own.as_str(), Some("null")),
    ] {
        let r = post(&node, &token, host, origin).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{host} {origin:?}");
        // The body was never read, so the connection ends with the answer.
        assert_eq!(r.headers()["connection"], "close", "{host} {origin:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "FORBIDDEN", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("[server] allowed_"),
            "{body}"
        );
    }
    assert!(seen_calls(&fake).is_empty(), "nothing reached the server");
    assert_eq!(node.audit().len(), before, "nor the audit");

    // The node's own names, from a client or from a page the node itself serves.
    let own_origin = format!("http://localhost:{port}");
    let localhost = format!("localhost:{port}");
    for (host, origin) in [
        (own.as_str(), None),
        (localhost.as_str(), Some(own_origin.as_str())),
    ] {
        let r = post(&node, &token, host, origin).await;
        assert_eq!(r.status(), StatusCode::OK, "{host}");
    }

    // Named hosts, on a node that is reached by a name.
    let (_fake, url) = start_fake().await;
    let named = Node::start_with(&url, "5s", |t| {
        t.replace(
            "[server]\n",
            "[server]\nallowed_hosts = [\"mcp.example.com\"]\nallowed_origins = [\"https://console.example.com\"]\n",
        )
    })
    .await;
    let token = named.token().await;
    for (host, origin, status) in [
        ("mcp.example.com", None, StatusCode::OK),
        (
            "mcp.example.com",
            Some("https://console.example.com"),
            StatusCode::OK,
        ),
        (
            "mcp.example.com",
            Some("https://other.example.com"),
            StatusCode::FORBIDDEN,
        ),
        ("127.0.0.1", None, StatusCode::FORBIDDEN),
    ] {
        let r = post(&named, &token, host, origin).await;
        assert_eq!(r.status(), status, "{host} {origin:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_decision_holds_up_nothing_else_in_the_session() {
    let (fake, url) = start_fake().await;
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let node = Node::start_on(
        &url,
        "30s",
        |t| t,
        move |s| {
            Arc::new(HoldingStore {
                inner: SqliteStore::open(&s.store_path).unwrap(),
                reached: Mutex::new(Some(reached_tx)),
                release: Mutex::new(release_rx),
            })
        },
    )
    .await;
    let token = node.token().await;
    let r = node.post(Some(&token), None, &initialize(1)).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    answer(r).await;
    let echo = |id: i64, message: &str, rationale: &str| {
        let mut c = call(id, "echo", json!({ "message": message }));
        c["params"]["_meta"] = json!({ "rationale": rationale });
        c
    };

    // A POST in a task of its own, answered whenever the gateway answers it.
    let in_background = |msg: Value| {
        let (http, url, token, session) = (
            node.http.clone(),
            node.mcp_url(),
            token.clone(),
            session.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .header("accept", ACCEPT)
                .header("content-type", "application/json")
                .header("mcp-session-id", session)
                .bearer_auth(token)
                .json(&msg)
                .send()
                .await
                .unwrap()
        })
    };
    let held = in_background(echo(2, "held", "hold"));
    tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the held call's decision never reached the store");

    // While call 2's decision waits:
    let ping = json!({"jsonrpc":"2.0","id":3,"method":"ping"});
    let pong = answer(node.post(Some(&token), Some(&session), &ping).await).await;
    assert_eq!(pong, json!({"jsonrpc":"2.0","id":3,"result":{}}));
    let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                        "params":{"requestId":2,"reason":"the user gave up"}});
    let r = node.post(Some(&token), Some(&session), &cancel).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let second = in_background(echo(4, "second", "go"));

    release.send(()).unwrap();
    let r = held.await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "the cancelled call is not answered"
    );
    let second = answer(second.await.unwrap()).await;
    assert_eq!(second["result"]["content"][0]["text"], "Echo: second");
    node.wait_for_outcome("cancelled").await;

    let calls = seen_calls(&fake);
    let messages: Vec<&Value> = calls
        .iter()
        .map(|c| &c["params"]["arguments"]["message"])
        .collect();
    assert_eq!(
        messages,
        ["second"],
        "the held call never reached the server"
    );
    let audit = node.audit();
    let held_call = audit
        .iter()
        .find(|r| {
            r.entry.kind == EntryKind::Decision && r.entry.rationale.as_deref() == Some("hold")
        })
        .expect("the held call's decision is on the audit trail");
    assert_eq!(held_call.entry.decision, "permit");
    let outcomes: Vec<&str> = audit
        .iter()
        .filter(|r| {
            r.entry.kind == EntryKind::Outcome && r.entry.call_id == held_call.entry.call_id
        })
        .map(|r| r.entry.decision.as_str())
        .collect();
    assert_eq!(
        outcomes,
        ["cancelled"],
        "exactly one outcome for the held call"
    );
    node.stop().await;
}

/// An unauthenticated peer gets no more of its body read than the decision API would
/// read: a request announcing 100 MiB is refused after the first part, without waiting
/// for (or sniffing through) the rest, and the connection is closed.
#[tokio::test]
async fn an_unauthenticated_body_is_read_no_further_than_the_api_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_fake, url) = start_fake().await;
    let node = Node::start(&url, "30s").await;
    let addr = node.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /mcp/everything HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         accept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n",
        100 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // More than the API limit, far less than announced; then the peer goes quiet.
    let limit = node.app().settings.max_body_bytes;
    conn.write_all(&vec![b' '; limit + 1024]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the node waited for the rest of the body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    node.stop().await;
}
