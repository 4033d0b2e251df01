//! The gateway's session engine: what Warden does with each MCP message, whichever
//! transport carried it. The stdio proxy ([`crate::stdio`]) and the Streamable HTTP
//! gateway (in warden-server) are thin transports around one [`Session`] per MCP session:
//! they frame bytes, and the session classifies each message, asks the gate, keeps the
//! table of requests in flight and says what to send to which side.
//!
//! What it enforces, for both transports alike:
//! - every client request is decided and audited, except the methods the server's
//!   `passthrough` list names (by default `initialize` and `ping`) and the list methods,
//!   whose answers are filtered to what the agent could ever use. A `tools/call` is the
//!   action `<server>/<tool>` (or its configured name); any other method `m` is the
//!   action `<server>/<m>`, `prompts/get` is `<server>/prompts/get/<name>`, with the
//!   request's params (without `_meta`) as the arguments policy sees. A method policy
//!   does not know is denied like an unknown tool, so "not configured" means "denied";
//! - every server-to-client request other than `ping` (sampling, elicitation, roots) is
//!   decided as `<server>/<method>` for the session's agent; a denied one is answered
//!   to the server with an error and never reaches the client;
//! - decisions run concurrently: a pending decision never holds up other messages;
//! - an answer must match a request in flight (ids compared as the official SDKs
//!   compare them: `1` and `"1"` are one id); one that does not is dropped, and a
//!   request reusing an id still in flight is refused;
//! - every permitted call ends with exactly one outcome: whoever removes it from the
//!   table (its answer, a cancellation, a timeout, a kill, the end of the session)
//!   records it, and removal happens under one lock;
//! - `warden.*` baggage in a message's `_meta` never comes from the client: it is
//!   stripped from every message, and set by Warden on the requests it permits;
//! - a `tools/call` run as a task is followed through `tasks/*` to its real result,
//!   which is its outcome; the task methods name only this session's tasks; a kill
//!   cancels the session's tasks upstream.
//!
//! The messages Warden writes itself (errors, denied results, cancellations) are small
//! serde structs here rather than the `rmcp` crate's model: Warden writes five kinds of
//! message and passes everything else through byte for byte, and rmcp's model would
//! bring its dependency tree (schemars, chrono, futures) into every build for them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::gate::Refusal;
use crate::gate::{Gate, Outcome, ToolCall, Verdict};
use crate::message::{
    classify, FrameError, Kind, CALL_CANCELLED, CALL_TIMED_OUT, UPSTREAM_UNAVAILABLE,
};
use crate::sniff::Sniffer;
use warden_core::args::Schema;

/// Tool schemas kept per session at most: a server's `tools/list` is untrusted input.
const MAX_SCHEMAS: usize = 4096;
/// Server-to-client requests awaiting the client's answer, at most.
const MAX_SERVER_REQUESTS: usize = 1024;
use crate::tools::{forward_arguments, resolve_call_paths, tool_call_of, trace_headers, ToolMap};

/// JSON-RPC "invalid request".
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC "invalid params".
pub const INVALID_PARAMS: i64 = -32602;
/// A request refused because the agent is stopped (kill switch, revoked credential).
pub const AGENT_STOPPED: i64 = -32004;
/// A request (other than `tools/call`, which gets an error *result*) denied by policy.
pub const DENIED: i64 = -32005;

/// Methods that pass ungoverned unless the server's config says otherwise.
pub const DEFAULT_PASSTHROUGH: [&str; 3] = ["initialize", "ping", "notifications/*"];

/// What the engine needs to know about one upstream server.
#[derive(Debug, Clone)]
pub struct Rules {
    pub map: ToolMap,
    /// Client methods (requests and notifications) that pass without a decision. An
    /// entry ending in `/*` names a prefix.
    pub passthrough: Vec<String>,
    /// Filter list results to what the agent could ever use.
    pub filter_lists: bool,
    /// A permitted request with no answer after this long is cancelled.
    pub call_timeout: Duration,
    /// Arguments that name local files, resolved before policy sees them.
    pub resolve_paths: Vec<String>,
    /// What relative paths are relative to (the server's working directory), if known.
    pub path_base: Option<PathBuf>,
}

impl Rules {
    pub fn new(map: ToolMap) -> Self {
        Self {
            map,
            passthrough: DEFAULT_PASSTHROUGH.iter().map(|s| s.to_string()).collect(),
            filter_lists: true,
            call_timeout: Duration::from_secs(300),
            resolve_paths: Vec::new(),
            path_base: None,
        }
    }

    /// Whether a client request of `method` is decided (and audited) by the gate.
    pub fn governs(&self, method: &str) -> bool {
        !self.passes(method) && ListKind::of(method).is_none() && !method.starts_with("tasks/")
    }

    fn passes(&self, method: &str) -> bool {
        self.passthrough.iter().any(|p| match p.strip_suffix("/*") {
            Some(prefix) => method
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/')),
            None => p == method,
        })
    }
}

/// A request id as the official SDKs match answers to requests: the TypeScript SDK
/// looks answers up by `Number(id)` and the Python SDK accepts a string that holds the
/// integer it sent, so `1` and `"1"` are the same request. Other strings are compared
/// exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdKey {
    Int(i64),
    Str(String),
    /// A number that is not an integer (odd, but legal JSON-RPC), by its text.
    Num(String),
}

impl IdKey {
    pub fn of(id: &Value) -> Option<IdKey> {
        match id {
            Value::Number(n) => Some(match n.as_i64() {
                Some(i) => IdKey::Int(i),
                None => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => IdKey::Int(f as i64),
                    _ => IdKey::Num(n.to_string()),
                },
            }),
            Value::String(s) => Some(match canonical_int(s) {
                Some(i) => IdKey::Int(i),
                None => IdKey::Str(s.clone()),
            }),
            _ => None,
        }
    }
}

/// `s` as an integer if it is one written plainly (`-12`, not `012`, `+1` or `1e2`).
fn canonical_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let plain = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if plain {
        s.parse().ok()
    } else {
        None
    }
}

// ------------------------------------------------------------------ wire messages

#[derive(Serialize)]
struct ErrorResponse<'a> {
    jsonrpc: &'static str,
    id: &'a Value,
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    code: i64,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<WardenMeta<'a>>,
}

/// Warden's decision, attached to what it answers itself.
#[derive(Serialize)]
struct WardenMeta<'a> {
    warden: DecisionMeta<'a>,
}

#[derive(Serialize)]
struct DecisionMeta<'a> {
    decision: &'static str,
    reason: &'a str,
    rules: &'a [String],
    call_id: &'a str,
}

#[derive(Serialize)]
struct Notification<'a, P> {
    jsonrpc: &'static str,
    method: &'a str,
    params: P,
}

#[derive(Serialize)]
struct Request<'a, P> {
    jsonrpc: &'static str,
    id: &'a str,
    method: &'a str,
    params: P,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CancelledParams<'a> {
    request_id: &'a Value,
    reason: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TaskParams<'a> {
    task_id: &'a str,
}

fn to_value<T: Serialize>(t: &T) -> Value {
    // Serializing these plain structs cannot fail (string keys, no maps of other keys).
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// A JSON-RPC error response.
pub fn error_response(id: &Value, code: i64, message: &str) -> Value {
    to_value(&ErrorResponse {
        jsonrpc: "2.0",
        id,
        error: ErrorObject {
            code,
            message,
            data: None,
        },
    })
}

fn denied_error(id: &Value, method: &str, v: &Verdict) -> Value {
    let message = format!(
        "Warden denied `{method}`: {}{}. {}",
        v.reason,
        rules_suffix(&v.rules),
        v.message
    );
    to_value(&ErrorResponse {
        jsonrpc: "2.0",
        id,
        error: ErrorObject {
            code: DENIED,
            message: &message,
            data: Some(WardenMeta {
                warden: DecisionMeta {
                    decision: "deny",
                    reason: &v.reason,
                    rules: &v.rules,
                    call_id: &v.call_id,
                },
            }),
        },
    })
}

fn rules_suffix(rules: &[String]) -> String {
    if rules.is_empty() {
        String::new()
    } else {
        format!(" (rule {})", rules.join(", "))
    }
}

/// `notifications/cancelled` for a request Warden gave up on.
pub fn cancelled_notification(id: &Value, reason: &str) -> Value {
    to_value(&Notification {
        jsonrpc: "2.0",
        method: "notifications/cancelled",
        params: CancelledParams {
            request_id: id,
            reason,
        },
    })
}

// ------------------------------------------------------------------ the session

/// What to do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send it on as it came (the transport may reuse the original bytes).
    Pass(Value),
    /// Send it on as changed here.
    Changed(Value),
    /// Answer the side it came from with this; nothing goes on.
    Reply(Value),
    /// Nothing goes anywhere.
    Drop,
}

/// A message to send, and to whom.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit {
    ToClient(Value),
    ToServer(Value),
}

/// The first look at a message: done at once, or work for [`Session::finish`].
pub enum Admit {
    Now(Step),
    Later(Pending),
}

/// A message awaiting a decision or another question to the gate.
pub struct Pending {
    msg: Value,
    work: Work,
    /// The trace to join if the message names none (over HTTP, the request's
    /// `traceparent` header).
    trace: Option<String>,
}

impl Pending {
    pub fn join_trace(mut self, trace: Option<String>) -> Self {
        self.trace = trace;
        self
    }
}

enum Work {
    /// A governed client request: decide it.
    Decide {
        key: IdKey,
        id: Value,
        method: String,
    },
    /// A passthrough client request: forward it if the agent is not stopped.
    Standing {
        key: IdKey,
        id: Value,
        /// Whether admitting it changed the message (baggage stripped).
        changed: bool,
    },
    /// A server request: decide it for the session's agent.
    ServerRequest {
        key: IdKey,
        id: Value,
        method: String,
    },
    /// A list answer to filter.
    Filter { list: ListKind, restore_id: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListKind {
    Tools,
    Prompts,
    Resources,
    ResourceTemplates,
}

impl ListKind {
    fn of(method: &str) -> Option<ListKind> {
        Some(match method {
            "tools/list" => ListKind::Tools,
            "prompts/list" => ListKind::Prompts,
            "resources/list" => ListKind::Resources,
            "resources/templates/list" => ListKind::ResourceTemplates,
            _ => return None,
        })
    }
}

/// A permitted call's identity on the audit trail.
#[derive(Debug, Clone)]
struct CallInfo {
    call_id: String,
    agent_id: String,
}

/// What an answer to a client request means.
#[derive(Debug, Clone)]
enum Expect {
    /// Nothing to record: pass it on.
    Plain,
    /// A list to filter.
    List(ListKind),
    /// A permitted call: its answer is its outcome (or, if it became a task, the task's
    /// result will be).
    Call(CallInfo),
    /// `tasks/result` for a task of this session: the answer is the task's outcome.
    TaskResult(String),
    /// `tasks/cancel` for a task of this session: once the server confirms, the task's
    /// call is settled as `cancelled`.
    TaskCancel(String),
    /// `tasks/list`: only this session's tasks are shown.
    TaskList,
    /// Sent by Warden itself (a `tasks/cancel` on kill): the answer goes nowhere.
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Awaiting the gate.
    Deciding,
    /// The client cancelled it while it was being decided.
    Cancelled,
    /// Forwarded; awaiting the server's answer.
    Sent,
}

#[derive(Debug)]
struct ClientRequest {
    id: Value,
    phase: Phase,
    expect: Expect,
    started: Instant,
}

#[derive(Debug)]
struct ServerRequest {
    id: Value,
    call: Option<CallInfo>,
    started: Instant,
    /// Passed on to the client. Until then (while it is being decided) nothing the
    /// client sends can answer it: a client must not answer what Warden may refuse.
    forwarded: bool,
}

#[derive(Debug)]
struct Task {
    call: CallInfo,
    started: Instant,
}

/// Counts, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub calls_permitted: u64,
    pub calls_denied: u64,
    pub calls_cancelled: u64,
    pub frames_rejected: u64,
    pub responses_dropped: u64,
}

#[derive(Default)]
struct Table {
    client: HashMap<IdKey, ClientRequest>,
    server: HashMap<IdKey, ServerRequest>,
    tasks: HashMap<String, Task>,
    /// Each tool's input schema as the server declared it in `tools/list`, compiled
    /// (or why it cannot be used), to type a call's arguments before policy sees them.
    schemas: HashMap<String, Result<Arc<Schema>, Refusal>>,
    /// Why the agent is stopped, once a check found it so.
    stopped: Option<String>,
    internal_ids: u64,
    stats: Stats,
}

/// One MCP session's governance.
pub struct Session<G: Gate> {
    gate: Arc<G>,
    rules: Arc<Rules>,
    table: Mutex<Table>,
    /// To the recorder; taken by [`Session::close`] so the recorder can finish.
    outcomes: Mutex<Option<mpsc::UnboundedSender<Outcome>>>,
}

impl<G: Gate> Session<G> {
    /// A session whose outcomes are recorded by `gate` in the background, in the order
    /// the answers came (see [`Session::drain`] to wait for them).
    pub fn new(gate: Arc<G>, rules: Arc<Rules>) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
        let recorder_gate = gate.clone();
        let recorder = tokio::spawn(async move {
            // What has queued up is recorded together (sent in order, awaited together):
            // a gate may let an outcome wait a little for company (the audit writer's
            // linger), and one at a time a burst of answers would pay that wait each.
            let mut queued = Vec::new();
            while rx.recv_many(&mut queued, 256).await > 0 {
                join_all(queued.drain(..).map(|o| recorder_gate.outcome(o))).await;
            }
        });
        (
            Arc::new(Self {
                gate,
                rules,
                table: Mutex::new(Table::default()),
                outcomes: Mutex::new(Some(tx)),
            }),
            recorder,
        )
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn gate(&self) -> &Arc<G> {
        &self.gate
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means another task panicked mid-update; the table is
        // still the best there is, and refusing to go on would hang the client.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn note_rejected_frame(&self) {
        self.lock().stats.frames_rejected += 1;
    }

    /// Whether anything is in flight that a kill or a timeout would have to stop.
    pub fn busy(&self) -> bool {
        let t = self.lock();
        !t.tasks.is_empty()
            || t.client
                .values()
                .any(|r| r.phase == Phase::Sent && !matches!(r.expect, Expect::Internal))
    }

    /// Why the agent is stopped, if a sweep found it so.
    pub fn stopped(&self) -> Option<String> {
        self.lock().stopped.clone()
    }

    /// Whether the client request with this key is still awaiting its answer.
    pub fn in_flight(&self, key: &IdKey) -> bool {
        self.lock().client.contains_key(key)
    }

    fn record_later(
        &self,
        call: CallInfo,
        status: &'static str,
        output: Option<Value>,
        started: Instant,
    ) {
        let o = Outcome {
            call_id: call.call_id,
            agent_id: call.agent_id,
            status,
            output,
            duration_ns: started.elapsed().as_nanos() as u64,
        };
        let tx = self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tx {
            Some(tx) => {
                let _ = tx.send(o);
            }
            None => {
                // The session is closing: record it on its own rather than lose it.
                let gate = self.gate.clone();
                tokio::spawn(async move { gate.outcome(o).await });
            }
        }
    }

    /// No more outcomes go through the recorder; it ends once it has written the queued
    /// ones (await its handle to know they are durable).
    pub fn close(&self) {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    async fn record_now(&self, call: CallInfo, status: &'static str, started: Instant) {
        self.gate
            .outcome(Outcome {
                call_id: call.call_id,
                agent_id: call.agent_id,
                status,
                output: None,
                duration_ns: started.elapsed().as_nanos() as u64,
            })
            .await;
    }

    // -------------------------------------------------------------- client side

    /// First look at a message from the client.
    pub fn admit_client(&self, mut msg: Value) -> Admit {
        let kind = match classify(&msg) {
            Ok(k) => k,
            Err(e) => {
                self.note_rejected_frame();
                let id = msg
                    .get("id")
                    .filter(|i| i.is_string() || i.is_number())
                    .cloned()
                    .unwrap_or(Value::Null);
                return Admit::Now(Step::Reply(error_response(&id, e.code(), &e.to_string())));
            }
        };
        let stripped = strip_warden_baggage(&mut msg);
        match kind {
            Kind::Request { id, method } => {
                let Some(key) = IdKey::of(&id) else {
                    return Admit::Now(Step::Drop);
                };
                let mut t = self.lock();
                if t.client.contains_key(&key) {
                    t.stats.frames_rejected += 1;
                    return Admit::Now(Step::Reply(error_response(
                        &id,
                        INVALID_REQUEST,
                        "request id is already in use by a request in flight; use a new id",
                    )));
                }
                let list = ListKind::of(&method);
                let task_method = method.starts_with("tasks/");
                let work = if list.is_some() {
                    // Passed (and its answer filtered), but not to a stopped agent.
                    Some(Work::Standing {
                        key: key.clone(),
                        id: id.clone(),
                        changed: stripped,
                    })
                } else if task_method {
                    match self.task_expect(&t, &method, &msg) {
                        Ok(expect) => {
                            t.client.insert(
                                key.clone(),
                                ClientRequest {
                                    id: id.clone(),
                                    phase: Phase::Deciding,
                                    expect,
                                    started: Instant::now(),
                                },
                            );
                            return Admit::Later(Pending {
                                msg,
                                work: Work::Standing {
                                    key,
                                    id,
                                    changed: stripped,
                                },
                                trace: None,
                            });
                        }
                        Err(m) => {
                            return Admit::Now(Step::Reply(error_response(&id, INVALID_PARAMS, &m)))
                        }
                    }
                } else if self.rules.passes(&method) {
                    Some(Work::Standing {
                        key: key.clone(),
                        id: id.clone(),
                        changed: stripped,
                    })
                } else {
                    Some(Work::Decide {
                        key: key.clone(),
                        id: id.clone(),
                        method: method.clone(),
                    })
                };
                let expect = match list {
                    Some(l) => Expect::List(l),
                    None => Expect::Plain,
                };
                let phase = if work.is_some() {
                    Phase::Deciding
                } else {
                    Phase::Sent
                };
                t.client.insert(
                    key,
                    ClientRequest {
                        id,
                        phase,
                        expect,
                        started: Instant::now(),
                    },
                );
                match work {
                    Some(work) => Admit::Later(Pending {
                        msg,
                        work,
                        trace: None,
                    }),
                    None => Admit::Now(pass(msg, stripped)),
                }
            }
            Kind::Notification { method } => {
                if method == "notifications/cancelled" {
                    return Admit::Now(self.client_cancelled(msg, stripped));
                }
                if self.rules.passes(&method) {
                    Admit::Now(pass(msg, stripped))
                } else {
                    // A notification cannot be denied with an answer; one that is not
                    // allowed simply goes nowhere (a `tools/call` without an id could
                    // otherwise run undecided on a lax server).
                    tracing::warn!(%method, "dropped a notification that is not in the passthrough list");
                    self.note_rejected_frame();
                    Admit::Now(Step::Drop)
                }
            }
            Kind::Response { id } => {
                let Some(key) = IdKey::of(&id) else {
                    self.lock().stats.responses_dropped += 1;
                    return Admit::Now(Step::Drop);
                };
                let found = {
                    let mut t = self.lock();
                    let forwarded = t.server.get(&key).is_some_and(|r| r.forwarded);
                    let r = if forwarded {
                        t.server.remove(&key)
                    } else {
                        None
                    };
                    if r.is_none() {
                        t.stats.responses_dropped += 1;
                    }
                    r
                };
                let Some(req) = found else {
                    tracing::warn!(id = %id, "client answered a request the server never made; dropped");
                    return Admit::Now(Step::Drop);
                };
                if let Some(call) = req.call {
                    let (status, output) = outcome_of(&msg);
                    self.record_later(call, status, output, req.started);
                }
                Admit::Now(with_id(msg, &req.id, stripped))
            }
        }
    }

    /// Keeps the input schemas a `tools/list` answer declares, compiled once per listing.
    /// A schema that cannot be compiled is kept as the refusal its tool's calls get:
    /// untyped, they would be judged on a shape policy was not written for.
    fn learn_schemas(&self, msg: &Value) {
        let Some(tools) = msg.pointer("/result/tools").and_then(Value::as_array) else {
            return;
        };
        let learned: Vec<(String, Result<Arc<Schema>, Refusal>)> = tools
            .iter()
            .filter_map(|t| {
                let name = t.get("name")?.as_str()?;
                let schema = t.get("inputSchema")?;
                let action = self.rules.map.action(name);
                let compiled = Schema::compile(schema)
                    .map(Arc::new)
                    .map_err(|e| Refusal::unusable_schema(&action, &e));
                Some((name.to_owned(), compiled))
            })
            .collect();
        let mut t = self.lock();
        for (name, schema) in learned {
            if t.schemas.len() < MAX_SCHEMAS || t.schemas.contains_key(&name) {
                t.schemas.insert(name, schema);
            }
        }
    }

    /// The task methods name only this session's tasks.
    fn task_expect(&self, t: &Table, method: &str, msg: &Value) -> Result<Expect, String> {
        if method == "tasks/list" {
            return Ok(Expect::TaskList);
        }
        let task_id = msg
            .pointer("/params/taskId")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{method} needs `params.taskId`"))?;
        if !t.tasks.contains_key(task_id) {
            return Err(format!("no task `{task_id}` was started in this session"));
        }
        Ok(match method {
            "tasks/result" => Expect::TaskResult(task_id.to_owned()),
            "tasks/cancel" => Expect::TaskCancel(task_id.to_owned()),
            _ => Expect::Plain,
        })
    }

    fn client_cancelled(&self, msg: Value, stripped: bool) -> Step {
        let Some(key) = msg.pointer("/params/requestId").and_then(IdKey::of) else {
            return pass(msg, stripped);
        };
        let settled = {
            let mut t = self.lock();
            match t.client.get_mut(&key) {
                Some(r) if r.phase == Phase::Deciding => {
                    // Still at the gate: the decision, when it comes, is not forwarded.
                    r.phase = Phase::Cancelled;
                    return Step::Drop;
                }
                Some(_) => t.client.remove(&key),
                None => None,
            }
        };
        match settled {
            Some(r) => {
                if let Expect::Call(call) = r.expect {
                    self.lock().stats.calls_cancelled += 1;
                    self.record_later(call, "cancelled", None, r.started);
                }
                // The server may still be working on it: tell it, with its own id.
                pass_with_request_id(msg, &r.id, stripped)
            }
            // Nothing of this session's in flight by that id: nothing to tell anyone.
            None => Step::Drop,
        }
    }

    /// Does the work [`Admit::Later`] left: asks the gate. `gate` decides as the
    /// credential of the message's transport request (over HTTP, each request carries
    /// its own); it may be the session's own gate.
    pub async fn finish<G2: Gate>(&self, gate: &G2, p: Pending) -> Step {
        let Pending {
            mut msg,
            work,
            trace,
        } = p;
        match work {
            Work::Decide { key, id, method } => {
                self.decide(gate, key, id, &method, msg, trace).await
            }
            Work::Standing { key, id, changed } => match gate.stopped().await {
                Some(why) => {
                    self.lock().client.remove(&key);
                    Step::Reply(error_response(
                        &id,
                        AGENT_STOPPED,
                        &format!("refused by Warden: {why}"),
                    ))
                }
                None => {
                    let mut t = self.lock();
                    match t.client.get(&key).map(|r| r.phase) {
                        Some(Phase::Deciding) => {
                            if let Some(r) = t.client.get_mut(&key) {
                                r.phase = Phase::Sent;
                            }
                            // Untouched unless its baggage was: passed on byte for byte.
                            pass(msg, changed)
                        }
                        _ => {
                            t.client.remove(&key);
                            Step::Drop
                        }
                    }
                }
            },
            Work::ServerRequest { key, id, method } => {
                let call = ToolCall {
                    action: format!("{}/{method}", self.rules.map.server),
                    arguments: arguments_of(&msg),
                    rationale: None,
                    trace_id: None,
                    refusal: None,
                };
                let v = gate.check(call).await;
                let mut t = self.lock();
                if !v.permit {
                    t.server.remove(&key);
                    t.stats.calls_denied += 1;
                    return Step::Reply(denied_error(&id, &method, &v));
                }
                if let Some(r) = t.server.get_mut(&key) {
                    r.call = Some(CallInfo {
                        call_id: v.call_id.clone(),
                        agent_id: v.agent_id.clone(),
                    });
                    r.forwarded = true;
                }
                t.stats.calls_permitted += 1;
                stamp_trace(&mut msg, &v);
                Step::Changed(msg)
            }
            Work::Filter { list, restore_id } => {
                let visible = gate.visible_actions().await.unwrap_or_default();
                let removed = filter_list(&mut msg, list, &self.rules.map, &visible);
                if removed > 0 || restore_id {
                    Step::Changed(msg)
                } else {
                    Step::Pass(msg)
                }
            }
        }
    }

    async fn decide<G2: Gate>(
        &self,
        gate: &G2,
        key: IdKey,
        id: Value,
        method: &str,
        mut msg: Value,
        trace: Option<String>,
    ) -> Step {
        let is_tool = method == "tools/call";
        let (label, mut call) = if is_tool {
            match tool_call_of(&self.rules.map, &msg) {
                Some(c) => c,
                None => {
                    self.lock().client.remove(&key);
                    self.note_rejected_frame();
                    return Step::Reply(error_response(
                        &id,
                        INVALID_PARAMS,
                        "tools/call needs `params.name`",
                    ));
                }
            }
        } else {
            let action = match method {
                "prompts/get" => match msg.pointer("/params/name").and_then(Value::as_str) {
                    Some(name) => format!("{}/prompts/get/{name}", self.rules.map.server),
                    None => {
                        self.lock().client.remove(&key);
                        return Step::Reply(error_response(
                            &id,
                            INVALID_PARAMS,
                            "prompts/get needs `params.name`",
                        ));
                    }
                },
                _ => format!("{}/{method}", self.rules.map.server),
            };
            let arguments = if method == "prompts/get" {
                msg.pointer("/params/arguments")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Map::new()))
            } else {
                arguments_of(&msg)
            };
            let (rationale, trace_id) = crate::tools::rationale_and_trace(&msg);
            (
                method.to_owned(),
                ToolCall {
                    action,
                    arguments,
                    rationale,
                    trace_id,
                    refusal: None,
                },
            )
        };
        if call.trace_id.is_none() {
            call.trace_id = trace;
        }
        // Policy judges the resolved paths, and the server gets what policy judged.
        let resolved = if is_tool {
            resolve_call_paths(
                &mut call,
                &self.rules.resolve_paths,
                self.rules.path_base.as_deref(),
            )
        } else {
            None
        };
        // Then the arguments are typed by the tool's own schema for policy (an integer
        // for a number is a number, an absent optional is absent). Only policy's view
        // changes: the server gets them as sent (paths resolved), since the schema holds
        // both forms equal and a tool may insist on a `null` the typing drops.
        if is_tool && call.refusal.is_none() {
            let schema = self.lock().schemas.get(&label).cloned();
            match schema {
                Some(Ok(schema)) => {
                    if let Err(e) = schema.normalize(&mut call.arguments) {
                        call.refusal = Some(Refusal::misfit(&call.action, &e));
                    }
                }
                Some(Err(refusal)) => call.refusal = Some(refusal),
                None => {}
            }
        }
        let v = gate.check(call).await;
        let mut t = self.lock();
        let phase = t.client.get(&key).map(|r| r.phase);
        if !v.permit {
            t.client.remove(&key);
            t.stats.calls_denied += 1;
            if phase != Some(Phase::Deciding) {
                return Step::Drop;
            }
            return Step::Reply(if is_tool {
                crate::tools::denied_result(&id, &label, &v)
            } else {
                denied_error(&id, method, &v)
            });
        }
        t.stats.calls_permitted += 1;
        let info = CallInfo {
            call_id: v.call_id.clone(),
            agent_id: v.agent_id.clone(),
        };
        if phase != Some(Phase::Deciding) {
            // Cancelled by the client while at the gate: permitted, never run.
            let started = t
                .client
                .remove(&key)
                .map_or_else(Instant::now, |r| r.started);
            t.stats.calls_cancelled += 1;
            drop(t);
            self.record_later(info, "cancelled", None, started);
            return Step::Drop;
        }
        if let Some(r) = t.client.get_mut(&key) {
            r.phase = Phase::Sent;
            r.expect = Expect::Call(info);
            r.started = Instant::now();
        }
        drop(t);
        if let Some(args) = resolved {
            forward_arguments(&mut msg, args);
        }
        stamp_trace(&mut msg, &v);
        Step::Changed(msg)
    }

    // -------------------------------------------------------------- server side

    /// First look at a message from the server.
    pub fn admit_server(&self, mut msg: Value) -> Admit {
        let kind = match classify(&msg) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "dropped an invalid message from the MCP server");
                self.note_rejected_frame();
                return Admit::Now(Step::Drop);
            }
        };
        match kind {
            Kind::Response { id } => {
                let Some(key) = IdKey::of(&id) else {
                    self.lock().stats.responses_dropped += 1;
                    return Admit::Now(Step::Drop);
                };
                let mut t = self.lock();
                let sent = t.client.get(&key).is_some_and(|r| r.phase == Phase::Sent);
                if !sent {
                    t.stats.responses_dropped += 1;
                    drop(t);
                    tracing::warn!(id = %id, "MCP server answered a request that is not in flight; dropped");
                    return Admit::Now(Step::Drop);
                }
                let Some(req) = t.client.remove(&key) else {
                    return Admit::Now(Step::Drop);
                };
                let restore_id = req.id != id;
                match req.expect {
                    Expect::Plain => {
                        drop(t);
                        Admit::Now(with_id(msg, &req.id, false))
                    }
                    Expect::Internal => Admit::Now(Step::Drop),
                    Expect::List(list) => {
                        drop(t);
                        if list == ListKind::Tools {
                            self.learn_schemas(&msg);
                        }
                        if restore_id {
                            set_id(&mut msg, &req.id);
                        }
                        if !self.rules.filter_lists {
                            return Admit::Now(pass(msg, restore_id));
                        }
                        Admit::Later(Pending {
                            msg,
                            work: Work::Filter { list, restore_id },
                            trace: None,
                        })
                    }
                    Expect::TaskList => {
                        let own: HashSet<String> = t.tasks.keys().cloned().collect();
                        drop(t);
                        if restore_id {
                            set_id(&mut msg, &req.id);
                        }
                        let removed = retain_listed(&mut msg, "tasks", |task| {
                            task.get("taskId")
                                .and_then(Value::as_str)
                                .is_some_and(|id| own.contains(id))
                        });
                        Admit::Now(if removed > 0 || restore_id {
                            Step::Changed(msg)
                        } else {
                            Step::Pass(msg)
                        })
                    }
                    Expect::Call(call) => {
                        let task_id = msg
                            .pointer("/result/task/taskId")
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                        match task_id {
                            Some(task_id) => {
                                // The call runs on as a task: its outcome is the task's
                                // result, fetched later with `tasks/result`.
                                t.tasks.insert(
                                    task_id,
                                    Task {
                                        call,
                                        started: req.started,
                                    },
                                );
                                drop(t);
                            }
                            None => {
                                drop(t);
                                let (status, output) = outcome_of(&msg);
                                self.record_later(call, status, output, req.started);
                            }
                        }
                        Admit::Now(with_id(msg, &req.id, false))
                    }
                    Expect::TaskResult(task_id) => {
                        let task = t.tasks.remove(&task_id);
                        drop(t);
                        if let Some(task) = task {
                            let (status, output) = outcome_of(&msg);
                            self.record_later(task.call, status, output, task.started);
                        }
                        Admit::Now(with_id(msg, &req.id, false))
                    }
                    Expect::TaskCancel(task_id) => {
                        // A refused cancel leaves the task running, and still owed.
                        let task = if msg.get("error").is_none() {
                            t.tasks.remove(&task_id)
                        } else {
                            None
                        };
                        drop(t);
                        if let Some(task) = task {
                            self.lock().stats.calls_cancelled += 1;
                            self.record_later(task.call, "cancelled", None, task.started);
                        }
                        Admit::Now(with_id(msg, &req.id, false))
                    }
                }
            }
            Kind::Request { id, method } => {
                let Some(key) = IdKey::of(&id) else {
                    return Admit::Now(Step::Drop);
                };
                let mut t = self.lock();
                if t.server.contains_key(&key) {
                    return Admit::Now(Step::Reply(error_response(
                        &id,
                        INVALID_REQUEST,
                        "request id is already in use by a request in flight",
                    )));
                }
                if t.server.len() >= MAX_SERVER_REQUESTS {
                    // A server asking faster than the client answers must not grow the
                    // table without bound.
                    return Admit::Now(Step::Reply(error_response(
                        &id,
                        INVALID_REQUEST,
                        "too many requests to the client are unanswered",
                    )));
                }
                let passes = method == "ping" || self.rules.passes(&method);
                t.server.insert(
                    key.clone(),
                    ServerRequest {
                        id: id.clone(),
                        call: None,
                        started: Instant::now(),
                        forwarded: passes,
                    },
                );
                drop(t);
                if passes {
                    // The passthrough list names methods of either side.
                    return Admit::Now(Step::Pass(msg));
                }
                strip_warden_baggage(&mut msg);
                Admit::Later(Pending {
                    msg,
                    work: Work::ServerRequest { key, id, method },
                    trace: None,
                })
            }
            Kind::Notification { method } => {
                if method == "notifications/cancelled" {
                    // The server gave up on one of its requests: forget it.
                    if let Some(key) = msg.pointer("/params/requestId").and_then(IdKey::of) {
                        let gone = self.lock().server.remove(&key);
                        if let Some(ServerRequest {
                            call: Some(call),
                            started,
                            ..
                        }) = gone
                        {
                            self.record_later(call, "cancelled", None, started);
                        }
                    }
                }
                Admit::Now(Step::Pass(msg))
            }
        }
    }

    // -------------------------------------------------------------- watching

    /// Stops what must stop: everything in flight if the agent is stopped (asked of
    /// `gate`: over HTTP the credential of the request being watched, which may be newer
    /// than the one that opened the session), else the requests past their deadline.
    /// `only` limits it to some requests (an HTTP exchange watches its own). Outcomes
    /// are durable before this returns.
    pub async fn sweep<G2: Gate>(&self, gate: &G2, only: Option<&HashSet<IdKey>>) -> Vec<Emit> {
        let stopped = gate.stopped().await;
        // Not sticky: a revived agent's session goes on.
        self.lock().stopped = stopped.clone();
        let now = Instant::now();
        let timeout = self.rules.call_timeout;
        let (victims, tasks) = {
            let mut t = self.lock();
            let keys: Vec<IdKey> = t
                .client
                .iter()
                .filter(|(k, r)| {
                    r.phase == Phase::Sent
                        && !matches!(r.expect, Expect::Internal)
                        && only.is_none_or(|o| o.contains(*k))
                        && (stopped.is_some() || now.duration_since(r.started) >= timeout)
                })
                .map(|(k, _)| k.clone())
                .collect();
            let victims: Vec<ClientRequest> =
                keys.iter().filter_map(|k| t.client.remove(k)).collect();
            let tasks: Vec<(String, Task)> = if stopped.is_some() {
                t.tasks.drain().collect()
            } else {
                Vec::new()
            };
            (victims, tasks)
        };
        let mut out = Vec::new();
        for r in victims {
            let (why, code, status) = match &stopped {
                Some(why) => (format!("agent stopped: {why}"), CALL_CANCELLED, "cancelled"),
                None => (
                    format!("no answer within {}s", timeout.as_secs_f64()),
                    CALL_TIMED_OUT,
                    "timeout",
                ),
            };
            out.push(Emit::ToServer(cancelled_notification(&r.id, &why)));
            if let Expect::Call(call) = r.expect {
                self.lock().stats.calls_cancelled += 1;
                // Durable before the client hears of it, even if it hangs up at once.
                self.record_now(call, status, r.started).await;
            }
            out.push(Emit::ToClient(error_response(
                &r.id,
                code,
                &format!("cancelled by Warden: {why}"),
            )));
        }
        for (task_id, task) in tasks {
            let why = stopped.as_deref().unwrap_or("stopped");
            out.push(Emit::ToServer(self.internal_request(
                "tasks/cancel",
                TaskParams { task_id: &task_id },
            )));
            self.lock().stats.calls_cancelled += 1;
            self.record_now(task.call, "cancelled", task.started).await;
            tracing::info!(%task_id, %why, "cancelled a task: the agent is stopped");
        }
        out
    }

    /// A request Warden sends the server on its own account; its answer is dropped.
    fn internal_request<P: Serialize>(&self, method: &str, params: P) -> Value {
        let mut t = self.lock();
        t.internal_ids += 1;
        let id = format!("warden-{}", t.internal_ids);
        t.client.insert(
            IdKey::Str(id.clone()),
            ClientRequest {
                id: Value::String(id.clone()),
                phase: Phase::Sent,
                expect: Expect::Internal,
                started: Instant::now(),
            },
        );
        to_value(&Request {
            jsonrpc: "2.0",
            id: &id,
            method,
            params,
        })
    }

    /// Settles what is left when the session (or, with `only`, one exchange) ends:
    /// permitted calls get `status`, the client an error per request it still waits on,
    /// the server a cancellation if `cancel_upstream`. Outcomes are durable on return.
    pub async fn finish_all(
        &self,
        only: Option<&HashSet<IdKey>>,
        status: &'static str,
        why: &str,
        cancel_upstream: bool,
    ) -> Vec<Emit> {
        let left: Vec<ClientRequest> = {
            let mut t = self.lock();
            let keys: Vec<IdKey> = t
                .client
                .keys()
                .filter(|k| only.is_none_or(|o| o.contains(*k)))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| t.client.remove(k)).collect()
        };
        let mut out = Vec::new();
        for r in left {
            if matches!(r.expect, Expect::Internal) {
                continue;
            }
            if cancel_upstream && r.phase == Phase::Sent {
                out.push(Emit::ToServer(cancelled_notification(&r.id, why)));
            }
            if let Expect::Call(call) = r.expect {
                self.lock().stats.calls_cancelled += 1;
                self.record_now(call, status, r.started).await;
            }
            out.push(Emit::ToClient(error_response(
                &r.id,
                UPSTREAM_UNAVAILABLE,
                why,
            )));
        }
        if only.is_none() {
            let tasks: Vec<Task> = self.lock().tasks.drain().map(|(_, t)| t).collect();
            for task in tasks {
                self.record_now(task.call, status, task.started).await;
            }
            let server: Vec<ServerRequest> = self.lock().server.drain().map(|(_, r)| r).collect();
            for r in server {
                if let Some(call) = r.call {
                    self.record_now(call, status, r.started).await;
                }
            }
        }
        out
    }

    /// A client message over the size limit, of which only `sniffed` is known. A
    /// governed request is still decided, as refused, so the attempt is on the audit
    /// trail under the agent's name; every request is answered with its own id.
    pub async fn oversized(&self, sniffed: &Sniffer, e: &FrameError) -> Step {
        let Some(id) = sniffed.id() else {
            return Step::Reply(error_response(&Value::Null, e.code(), &e.to_string()));
        };
        let Some(method) = sniffed.method() else {
            // An answer to a server request: the server gets the error instead.
            if let Some(key) = IdKey::of(&id) {
                if let Some(r) = self.lock().server.remove(&key) {
                    return Step::Reply(error_response(&r.id, e.code(), &e.to_string()));
                }
            }
            return Step::Drop;
        };
        let governed = !self.rules.passes(method)
            && ListKind::of(method).is_none()
            && !method.starts_with("tasks/");
        let message = format!("{e}; the message was not forwarded");
        if !governed {
            return Step::Reply(error_response(&id, e.code(), &message));
        }
        let server = &self.rules.map.server;
        let action = match (method, sniffed.name()) {
            ("tools/call", Some(tool)) => self.rules.map.action(tool),
            ("prompts/get", Some(name)) => format!("{server}/prompts/get/{name}"),
            _ => format!("{server}/{method}"),
        };
        let v = self
            .gate
            .check(ToolCall {
                action,
                arguments: Value::Object(Map::new()),
                rationale: None,
                trace_id: None,
                refusal: Some(crate::gate::Refusal::unresolved(message.clone())),
            })
            .await;
        self.lock().stats.calls_denied += 1;
        if v.permit {
            // A gate that permits a refused call is broken; never forward regardless.
            return Step::Reply(error_response(&id, e.code(), &message));
        }
        Step::Reply(if method == "tools/call" {
            crate::tools::denied_result(&id, sniffed.name().unwrap_or(method), &v)
        } else {
            denied_error(&id, method, &v)
        })
    }

    /// A server message over the size limit: the request it answers gets an error (and a
    /// permitted call the outcome `upstream-failed`), so nobody waits for it in vain.
    pub async fn oversized_answer(&self, sniffed: &Sniffer, e: &FrameError) -> Vec<Emit> {
        let Some(key) = sniffed.id().as_ref().and_then(IdKey::of) else {
            tracing::warn!(error = %e, "dropped an over-limit message from the MCP server");
            return Vec::new();
        };
        if sniffed.method().is_some() {
            // A server request too large to judge: refused to the server.
            return vec![Emit::ToServer(error_response(
                &sniffed.id().unwrap_or(Value::Null),
                e.code(),
                &e.to_string(),
            ))];
        }
        let Some(r) = self.lock().client.remove(&key) else {
            return Vec::new();
        };
        if let Expect::Call(call) = r.expect {
            self.record_now(call, "upstream-failed", r.started).await;
        }
        vec![Emit::ToClient(error_response(
            &r.id,
            UPSTREAM_UNAVAILABLE,
            &format!("the MCP server's answer was refused: {e}"),
        ))]
    }

    /// Client requests still awaiting an answer.
    pub fn pending_client_requests(&self) -> usize {
        self.lock()
            .client
            .values()
            .filter(|r| !matches!(r.expect, Expect::Internal))
            .count()
    }
}

// ------------------------------------------------------------------ helpers

fn pass(msg: Value, changed: bool) -> Step {
    if changed {
        Step::Changed(msg)
    } else {
        Step::Pass(msg)
    }
}

fn set_id(msg: &mut Value, id: &Value) {
    if let Some(slot) = msg.get_mut("id") {
        *slot = id.clone();
    }
}

/// An answer passed on with the id its requester used (`"1"` answering `1` becomes `1`).
fn with_id(mut msg: Value, id: &Value, changed: bool) -> Step {
    if msg.get("id") != Some(id) {
        set_id(&mut msg, id);
        return Step::Changed(msg);
    }
    pass(msg, changed)
}

fn pass_with_request_id(mut msg: Value, id: &Value, changed: bool) -> Step {
    match msg.pointer_mut("/params/requestId") {
        Some(slot) if slot != id => {
            *slot = id.clone();
            Step::Changed(msg)
        }
        _ => pass(msg, changed),
    }
}

/// The outcome status and output of an answer.
fn outcome_of(msg: &Value) -> (&'static str, Option<Value>) {
    let is_error = msg.get("error").is_some()
        || msg.pointer("/result/isError").and_then(Value::as_bool) == Some(true);
    let output = msg.get("result").or_else(|| msg.get("error")).cloned();
    (if is_error { "error" } else { "ok" }, output)
}

/// A request's params without `_meta`: what policy sees of a method other than a tool.
fn arguments_of(msg: &Value) -> Value {
    let mut args = msg
        .get("params")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    args.remove("_meta");
    Value::Object(args)
}

/// Puts the decision's trace context into a permitted request's `_meta`.
fn stamp_trace(msg: &mut Value, v: &Verdict) {
    let (traceparent, baggage) = trace_headers(v);
    if let Some(m) = crate::message::meta_mut(msg) {
        m.insert("traceparent".into(), Value::String(traceparent));
        m.insert("baggage".into(), Value::String(baggage));
    }
}

/// Removes `warden.*` members from `params._meta.baggage`: only Warden says who an agent
/// is and which call this is. True if the message changed.
pub fn strip_warden_baggage(msg: &mut Value) -> bool {
    let Some(Value::String(b)) = msg.pointer_mut("/params/_meta/baggage") else {
        return false;
    };
    let kept: Vec<&str> = b
        .split(',')
        .filter(|m| {
            let key = m.split(['=', ';']).next().unwrap_or("").trim();
            !key.to_ascii_lowercase().starts_with("warden.")
        })
        .collect();
    if kept.len() == b.split(',').count() {
        return false;
    }
    *b = kept.join(",");
    true
}

/// Keeps the items of `result.<field>` for which `keep` holds; returns how many went.
fn retain_listed(msg: &mut Value, field: &str, mut keep: impl FnMut(&Value) -> bool) -> usize {
    let Some(items) = msg
        .get_mut("result")
        .and_then(|r| r.get_mut(field))
        .and_then(Value::as_array_mut)
    else {
        return 0;
    };
    let before = items.len();
    items.retain(|i| keep(i));
    before - items.len()
}

/// Filters a list answer to what the agent could ever be permitted to use.
fn filter_list(msg: &mut Value, list: ListKind, map: &ToolMap, visible: &HashSet<String>) -> usize {
    let server = &map.server;
    match list {
        ListKind::Tools => retain_listed(msg, "tools", |t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|name| visible.contains(&map.action(name)))
        }),
        ListKind::Prompts => retain_listed(msg, "prompts", |p| {
            p.get("name")
                .and_then(Value::as_str)
                .is_some_and(|name| visible.contains(&format!("{server}/prompts/get/{name}")))
        }),
        ListKind::Resources => {
            let readable = visible.contains(&format!("{server}/resources/read"));
            retain_listed(msg, "resources", |_| readable)
        }
        ListKind::ResourceTemplates => {
            let readable = visible.contains(&format!("{server}/resources/read"));
            retain_listed(msg, "resourceTemplates", |_| readable)
        }
    }
}
