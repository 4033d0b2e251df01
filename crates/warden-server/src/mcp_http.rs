//! The Streamable HTTP MCP gateway: every `[[mcp_servers]]` entry with a `url` is served
//! at `/mcp/{name}`, and POST, GET and DELETE are proxied to that URL with Warden's
//! decision in front of every `tools/call`.
//!
//! It behaves as the stdio proxy does ([`warden_mcp::stdio`]), over HTTP:
//! - every request carries the agent's own bearer token, which authenticates it here and
//!   is never forwarded; the upstream gets `X-Agent-Id`, `traceparent` and `baggage`
//!   instead;
//! - a `tools/call` is decided first; a denied one is answered by the gateway with an
//!   error result and never reaches the server; a permitted one is forwarded with its
//!   trace context in `params._meta`, and its response (a JSON body, or an event inside
//!   an SSE stream) is recorded as the call's outcome as it passes through;
//! - `tools/list` responses are filtered to the tools the agent could ever call;
//! - a response to an id that was never forwarded is dropped;
//! - while a permitted call is in flight, a kill or a revoked credential cancels it: the
//!   client gets an error, the server gets `notifications/cancelled`, the audit trail gets
//!   a `cancelled` outcome. A call past its server's timeout ends the same way, as
//!   `timeout`.
//!
//! SSE is inspected event by event and re-emitted unchanged unless it had to change, so
//! progress notifications reach the client as they happen.
//!
//! INVARIANT: a `tools/call` reaches the upstream server only after the gate permitted
//! it and its decision is durable in the audit trail.
//! INVARIANT: the agent's credential is never sent upstream.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use warden_core::pipeline::CallContext;
use warden_core::Reason;
use warden_mcp::gate::{Gate, Outcome, ToolCall, Verdict};
use warden_mcp::message::{
    classify, error_response, id_key, into_messages, meta_mut, parse_frame, FrameError, Kind,
    CALL_CANCELLED, CALL_TIMED_OUT, UPSTREAM_UNAVAILABLE,
};
use warden_mcp::sse;
use warden_mcp::tools::{
    denied_result, filter_tools_list, forward_arguments, resolve_call_paths, tool_call_of,
    trace_headers, ToolMap,
};

use crate::api::{bearer, Peer};
use crate::error::close_connection;
use crate::gate::EmbeddedGate;
use crate::ids::random_hex;
use crate::App;
use warden_core::trace::parse_traceparent;

/// How often a stream with calls in flight asks whether the agent was stopped.
const STOP_POLL: Duration = Duration::from_millis(200);
/// The largest upstream JSON body or SSE event the gateway will hold to inspect. Tool
/// results can be large (images), but a server that never stops must not exhaust memory.
const MAX_UPSTREAM_MESSAGE: usize = 32 * 1024 * 1024;
/// Session-to-agent bindings kept at most; past this, new sessions go unbound (the
/// upstream's own session checks still apply).
const MAX_SESSIONS: usize = 100_000;
/// JSON-RPC error for a request refused because the agent is stopped (kill switch).
pub const AGENT_STOPPED: i64 = -32004;
/// JSON-RPC "invalid params".
const INVALID_PARAMS: i64 = -32602;

const MCP_SESSION_ID: &str = "mcp-session-id";

/// The gateway's routes, to merge into the node's router.
pub fn routes(app: Arc<App>) -> Router {
    let limit = app.settings.max_body_bytes;
    let gw = Arc::new(Gateway::new(app));
    Router::new()
        .route("/mcp/{server}", post(handle).get(handle).delete(handle))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gw)
}

/// Why the gateway answered a request itself. Each knows its status; nothing else in
/// this module picks one.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no MCP server `{0}` is served over HTTP here")]
    UnknownServer(String),
    #[error("{message}")]
    Refused { reason: Reason, message: String },
    #[error("unknown MCP session")]
    ForeignSession,
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    BadBody(String),
    #[error("{0}")]
    Frame(FrameError),
    /// The upstream server could not be reached or answered with garbage; `body` holds a
    /// JSON-RPC error for each request that was forwarded.
    #[error("{message}")]
    Upstream { message: String, body: Value },
}

impl GatewayError {
    fn status(&self) -> StatusCode {
        match self {
            GatewayError::UnknownServer(_) | GatewayError::ForeignSession => StatusCode::NOT_FOUND,
            GatewayError::Refused { reason, .. } if reason.is_authentication_failure() => {
                StatusCode::UNAUTHORIZED
            }
            GatewayError::Refused {
                reason: Reason::Internal,
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Refused { .. } => StatusCode::FORBIDDEN,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadBody(_) | GatewayError::Frame(_) => StatusCode::BAD_REQUEST,
            GatewayError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            GatewayError::Frame(e) => error_response(&Value::Null, e.code(), e.to_string()),
            GatewayError::Upstream { body, .. } => body.clone(),
            GatewayError::Refused { reason, message } => json!({
                "error": match status {
                    StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
                    StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
                    _ => "FORBIDDEN",
                },
                "reason": reason.code(),
                "message": message,
            }),
            GatewayError::UnknownServer(_) | GatewayError::ForeignSession => {
                json!({ "error": "NOT_FOUND", "message": self.to_string() })
            }
            GatewayError::TooLarge(_) => {
                json!({ "error": "PAYLOAD_TOO_LARGE", "message": self.to_string() })
            }
            GatewayError::BadBody(_) => {
                json!({ "error": "BAD_REQUEST", "message": self.to_string() })
            }
        };
        let mut resp = (status, Json(body)).into_response();
        if matches!(self, GatewayError::TooLarge(_)) {
            close_connection(&mut resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"warden\""),
            );
        }
        resp
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked mid-update; the bookkeeping is
    // still the best there is, and refusing to go on would hang every client.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registry key of a forwarded request: (server, session, request id).
type PendingKey = (String, String, String);

/// The gateway's shared state.
struct Gateway {
    app: Arc<App>,
    http: Result<reqwest::Client, String>,
    /// Requests forwarded within a session and not yet answered, so that an answer
    /// arriving on another stream (a resumed GET) or a client's `notifications/cancelled`
    /// can settle them.
    pending: Mutex<HashMap<PendingKey, Arc<Pending>>>,
    /// Which agent opened each upstream session: another agent presenting the same
    /// session id is refused, so it cannot ride on (or cancel) someone else's calls.
    sessions: Mutex<HashMap<(String, String), String>>,
}

/// A request forwarded upstream, awaiting its answer.
struct Pending {
    id: Value,
    key: Option<PendingKey>,
    /// Set for a permitted `tools/call`: its outcome goes on the audit trail.
    call: Option<CallInfo>,
    list_tools: bool,
    started: Instant,
    deadline: Instant,
    /// Set once by whoever settles it (answer, cancel, timeout, upstream failure), so a
    /// call gets exactly one outcome.
    settled: AtomicBool,
}

struct CallInfo {
    call_id: String,
    agent_id: String,
}

impl Gateway {
    fn new(app: Arc<App>) -> Self {
        // No overall timeout: SSE streams live as long as the calls they carry, and each
        // call's own timeout is enforced by the gateway. Redirects are not followed: the
        // upstream is a configured URL, not something to be talked into leaving.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the gateway's HTTP client: {e}"));
        Self {
            app,
            http,
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Marks `p` settled; true for the one caller that gets to act on it.
    fn settle(&self, p: &Arc<Pending>) -> bool {
        if p.settled.swap(true, Ordering::SeqCst) {
            return false;
        }
        if let Some(k) = &p.key {
            let mut map = lock(&self.pending);
            // A client may reuse an id once answered; remove only our own entry.
            if map.get(k).is_some_and(|e| Arc::ptr_eq(e, p)) {
                map.remove(k);
            }
        }
        true
    }

    fn register(&self, p: &Arc<Pending>) {
        if let Some(k) = &p.key {
            lock(&self.pending).insert(k.clone(), p.clone());
        }
    }

    /// A request of `agent` forwarded in `session` and not yet settled.
    fn registered(&self, key: &PendingKey, agent: &str) -> Option<Arc<Pending>> {
        lock(&self.pending)
            .get(key)
            .filter(|p| p.call.as_ref().is_none_or(|c| c.agent_id == agent))
            .cloned()
    }

    fn check_session(&self, server: &str, session: Option<&str>, agent: &str) -> bool {
        let Some(s) = session else { return true };
        lock(&self.sessions)
            .get(&(server.to_owned(), s.to_owned()))
            .is_none_or(|owner| owner == agent)
    }

    fn bind_session(&self, server: &str, session: &str, agent: &str) {
        let mut map = lock(&self.sessions);
        if map.len() < MAX_SESSIONS {
            map.entry((server.to_owned(), session.to_owned()))
                .or_insert_with(|| agent.to_owned());
        } else {
            tracing::warn!(
                "too many MCP sessions to bind to agents; session `{session}` is unbound"
            );
        }
    }
}

/// What a request asked for, resolved from the route and the node's config.
struct Target {
    name: String,
    url: String,
    map: ToolMap,
    timeout: Duration,
    /// Arguments that name files, resolved before policy sees them.
    resolve_paths: Vec<String>,
}

async fn handle(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Peer(peer): Peer,
    method: Method,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // Detached from the client's connection: a client that hangs up mid-call must not
    // cut the decision, the forwarding or the outcome record short.
    let task = tokio::spawn(serve(gw, name, peer, method, headers, body));
    match task.await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "MCP gateway task failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn serve(
    gw: Arc<Gateway>,
    name: String,
    peer: Option<IpAddr>,
    method: Method,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = match gw.app.settings.mcp_servers.get(&name) {
        Some(server) => match &server.url {
            Some(url) => {
                let target = Target {
                    name: name.clone(),
                    url: url.clone(),
                    map: ToolMap::new(name.clone(), server.actions.clone()),
                    timeout: Duration::from_nanos(server.timeout_ns),
                    resolve_paths: server.resolve_paths.clone(),
                };
                if method == Method::POST {
                    post_messages(gw, target, peer, headers, body).await
                } else {
                    open_or_end(gw, target, method, headers).await
                }
            }
            None => Err(GatewayError::UnknownServer(name)),
        },
        None => Err(GatewayError::UnknownServer(name)),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1), which belong to one connection.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers never forwarded upstream besides the hop-by-hop ones: the agent's credential
/// and cookies (meant for Warden, not the tool server), what the gateway sets itself
/// (identity and trace context, which a client must not be able to spoof), and
/// `Accept-Encoding`, since the gateway must read the bodies it inspects.
const NOT_FORWARDED: [&str; 10] = [
    "host",
    "content-length",
    "authorization",
    "cookie",
    "accept-encoding",
    "traceparent",
    "tracestate",
    "baggage",
    "x-agent-id",
    "expect",
];

fn connection_listed(headers: &HeaderMap) -> HashSet<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The client's headers that go upstream: the end-to-end ones (`Mcp-Session-Id`,
/// `MCP-Protocol-Version`, `Accept`, `Content-Type`, `Last-Event-ID`, any other `Mcp-*`
/// ...), without hop-by-hop headers, `Host`, `Content-Length`, the agent's credential
/// and the headers the gateway sets itself.
pub fn upstream_request_headers(incoming: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || NOT_FORWARDED.contains(&n) || listed.contains(n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The upstream's response headers that go back to the client: all but hop-by-hop ones
/// and `Content-Length` (the gateway may change the body).
pub fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "content-length" || listed.contains(n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Adds what the upstream learns from the gateway: who the agent is and the trace.
fn stamp(headers: &mut HeaderMap, agent_id: &str, traceparent: &str, baggage: &str) {
    for (name, value) in [
        ("x-agent-id", agent_id),
        ("traceparent", traceparent),
        ("baggage", baggage),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
}

/// Trace context for an upstream request that carries no permitted call: the client's
/// trace if it sent one, else a new one.
fn fresh_trace(incoming: &HeaderMap, agent_id: &str) -> (String, String) {
    let trace = header_str(incoming, "traceparent")
        .and_then(parse_traceparent)
        .map(|(t, _)| t)
        .or_else(|| random_hex(16).ok())
        .unwrap_or_default();
    let span = random_hex(8).unwrap_or_default();
    (
        format!("00-{trace}-{span}-01"),
        format!("warden.agent_id={agent_id}"),
    )
}

fn refused(d: warden_core::Decision) -> GatewayError {
    GatewayError::Refused {
        reason: d.reason,
        message: format!("{}: {}", d.reason.code(), d.message),
    }
}

/// GET (the server's own SSE stream) and DELETE (end of session): authenticated and
/// passed through; a GET stream is inspected like any other.
async fn open_or_end(
    gw: Arc<Gateway>,
    target: Target,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let token = bearer(&headers).map(str::to_owned);
    let standing = gw
        .app
        .pipeline
        .standing(token.as_deref())
        .map_err(refused)?;
    let session = header_str(&headers, MCP_SESSION_ID).map(str::to_owned);
    if !gw.check_session(&target.name, session.as_deref(), &standing.agent.id) {
        return Err(GatewayError::ForeignSession);
    }
    let http = gw.http.clone().map_err(|m| GatewayError::Upstream {
        body: error_response(&Value::Null, UPSTREAM_UNAVAILABLE, m.clone()),
        message: m,
    })?;
    let mut up = upstream_request_headers(&headers);
    let (tp, bag) = fresh_trace(&headers, &standing.agent.id);
    stamp(&mut up, &standing.agent.id, &tp, &bag);
    let resp = http
        .request(method.clone(), &target.url)
        .headers(up.clone())
        .send()
        .await
        .map_err(|e| {
            let m = format!("MCP server `{}` is unreachable: {e}", target.name);
            GatewayError::Upstream {
                body: error_response(&Value::Null, UPSTREAM_UNAVAILABLE, m.clone()),
                message: m,
            }
        })?;
    if let Some(s) = &session {
        if method == Method::DELETE && resp.status().is_success() {
            lock(&gw.sessions).remove(&(target.name.clone(), s.clone()));
        }
    }
    let status = resp.status();
    let rh = client_response_headers(resp.headers());
    if method == Method::GET && is_sse(resp.headers()) {
        let ex = Exchange::new(
            gw,
            &target,
            token.unwrap_or_default(),
            standing.agent.id,
            session,
            up,
        );
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pump_sse(ex, resp, Out::new(tx), Vec::new(), true));
        return Ok(streamed(status, rh, rx));
    }
    Ok(pipe_raw(status, rh, resp))
}

fn is_sse(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
    })
}

fn is_json(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
    })
}

/// What became of a `tools/call` at the gate.
enum Decided {
    /// The gateway answers it (denied, or malformed).
    Answer(Value),
    Permit(Verdict),
}

/// Decides a `tools/call` as the stdio proxy does: the client's rationale and trace are
/// passed to the gate, path arguments are resolved first and forwarded as resolved; a
/// permitted call gets the decision's trace context in `_meta`.
async fn decide_call(
    gate: &EmbeddedGate,
    target: &Target,
    id: &Value,
    msg: &mut Value,
    header_trace: Option<&str>,
) -> Decided {
    let Some((name, mut call)) = tool_call(&target.map, msg, header_trace) else {
        return Decided::Answer(error_response(
            id,
            INVALID_PARAMS,
            "tools/call needs `params.name`",
        ));
    };
    // The upstream server's working directory is not known here, so relative paths
    // are refused rather than guessed.
    let resolved = resolve_call_paths(&mut call, &target.resolve_paths, None);
    let verdict = gate.check(call).await;
    if !verdict.permit {
        return Decided::Answer(denied_result(id, &name, &verdict));
    }
    if let Some(args) = resolved {
        forward_arguments(msg, args);
    }
    let (traceparent, baggage) = trace_headers(&verdict);
    if let Some(m) = meta_mut(msg) {
        m.insert("traceparent".into(), Value::String(traceparent));
        m.insert("baggage".into(), Value::String(baggage));
    }
    Decided::Permit(verdict)
}

/// The tool name and the call to decide, if the message names a tool.
/// A `tools/call` with the trace to join: the client's `_meta.traceparent`, else the
/// request's `traceparent` header.
fn tool_call(map: &ToolMap, msg: &Value, header_trace: Option<&str>) -> Option<(String, ToolCall)> {
    let (name, mut call) = tool_call_of(map, msg)?;
    if call.trace_id.is_none() {
        call.trace_id = header_trace.map(str::to_owned);
    }
    Some((name, call))
}

/// One reply body from a list of messages: a single object if the client sent one.
fn reply_body(mut messages: Vec<Value>, batch: bool) -> Value {
    if messages.len() == 1 && !batch {
        messages.remove(0)
    } else {
        Value::Array(messages)
    }
}

fn json_reply(
    status: StatusCode,
    mut headers: HeaderMap,
    messages: Vec<Value>,
    batch: bool,
) -> Response {
    if messages.is_empty() {
        headers.remove(header::CONTENT_TYPE);
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = if status.is_success() {
            StatusCode::ACCEPTED
        } else {
            status
        };
        *resp.headers_mut() = headers;
        return resp;
    }
    let body = serde_json::to_vec(&reply_body(messages, batch)).unwrap_or_default();
    bytes_reply(status, headers, body)
}

fn bytes_reply(status: StatusCode, mut headers: HeaderMap, body: Vec<u8>) -> Response {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// POST: one message or a batch from the client.
async fn post_messages(
    gw: Arc<Gateway>,
    target: Target,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, GatewayError> {
    let limit = gw.app.settings.max_body_bytes;
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::TooLarge(limit)
        } else {
            GatewayError::BadBody(format!("cannot read the request body: {r}"))
        }
    })?;
    let token = bearer(&headers).map(str::to_owned);
    let header_trace = header_str(&headers, "traceparent")
        .and_then(parse_traceparent)
        .map(|(t, _)| t);
    let is_call = |m: &Value| m.get("method").and_then(Value::as_str) == Some("tools/call");

    // Authenticate before decoding: a caller without a valid credential gets its first
    // message read and nothing more, so a batch of N calls costs one audit entry (and
    // one parse of one message), not N.
    let standing = gw.app.standing(token.as_deref()).await;
    if let Err(d) = &standing {
        if d.reason.is_authentication_failure() {
            // Refused, but the attempted tool call is still on the audit trail, as it is
            // on the decision API.
            let first = first_message(&bytes);
            if let Some((_, call)) = first
                .as_ref()
                .filter(|m| is_call(m))
                .and_then(|m| tool_call(&target.map, m, header_trace.as_deref()))
            {
                let ctx = CallContext {
                    rationale: call.rationale,
                    peer,
                    ..Default::default()
                };
                gw.app
                    .decide(
                        token.as_deref(),
                        &call.action,
                        &call.arguments,
                        &ctx,
                        call.trace_id.as_deref(),
                    )
                    .await;
            }
            return Err(refused(d.clone()));
        }
    }
    let (value, batch) = parse_frame(&bytes, limit).map_err(GatewayError::Frame)?;
    let items = into_messages(value);
    let stopped = match standing {
        Ok(s) => Ok(s),
        Err(d) => {
            if !items.iter().any(is_call) {
                return Err(refused(d));
            }
            Err(d)
        }
    };
    let agent_id = match &stopped {
        Ok(s) => s.agent.id.clone(),
        Err(_) => String::new(),
    };
    let session = header_str(&headers, MCP_SESSION_ID).map(str::to_owned);
    // A stopped agent's messages go nowhere, so only a live one needs its session checked.
    if stopped.is_ok() && !gw.check_session(&target.name, session.as_deref(), &agent_id) {
        return Err(GatewayError::ForeignSession);
    }
    let gate = EmbeddedGate::new(gw.app.clone(), token.clone().unwrap_or_default());

    // Sort the messages: answered here, or forwarded (with what to watch for).
    let mut answers: Vec<Value> = Vec::new();
    let mut forward: Vec<Value> = Vec::with_capacity(items.len());
    let mut pending: Vec<(Value, Option<CallInfo>, bool)> = Vec::new();
    let mut first_permit: Option<Verdict> = None;
    let mut changed = false;
    let n_items = items.len();
    for mut msg in items {
        let kind = match classify(&msg) {
            Ok(k) => k,
            Err(e) => {
                let id = msg
                    .get("id")
                    .filter(|i| i.is_string() || i.is_number())
                    .cloned()
                    .unwrap_or(Value::Null);
                answers.push(error_response(&id, e.code(), e.to_string()));
                continue;
            }
        };
        match kind {
            Kind::Request { id, method } if method == "tools/call" => {
                match decide_call(&gate, &target, &id, &mut msg, header_trace.as_deref()).await {
                    Decided::Answer(a) => answers.push(a),
                    Decided::Permit(v) => {
                        changed = true;
                        let info = CallInfo {
                            call_id: v.call_id.clone(),
                            agent_id: v.agent_id.clone(),
                        };
                        first_permit.get_or_insert(v);
                        pending.push((id, Some(info), false));
                        forward.push(msg);
                    }
                }
            }
            Kind::Request { id, method } => match &stopped {
                Err(d) => answers.push(error_response(
                    &id,
                    AGENT_STOPPED,
                    format!("refused by Warden: {}: {}", d.reason.code(), d.message),
                )),
                Ok(_) => {
                    pending.push((id, None, method == "tools/list"));
                    forward.push(msg);
                }
            },
            // A stopped agent's notifications and answers go nowhere: it is stopped.
            Kind::Notification { .. } | Kind::Response { .. } if stopped.is_err() => {}
            // A `tools/call` without an id is not a call anyone could answer, but a lax
            // server might still run it: it must not pass ungoverned.
            Kind::Notification { method } if method == "tools/call" => {
                tracing::warn!(server = %target.name, "dropped a tools/call sent as a notification");
            }
            Kind::Notification { method } => {
                if method == "notifications/cancelled" {
                    client_cancelled(&gw, &gate, &target, session.as_deref(), &agent_id, &msg)
                        .await;
                }
                forward.push(msg);
            }
            Kind::Response { .. } => forward.push(msg),
        }
    }
    if forward.is_empty() {
        return Ok(json_reply(StatusCode::OK, HeaderMap::new(), answers, batch));
    }
    let Ok(http) = gw.http.clone() else {
        return Err(upstream_error(
            &gate,
            "the gateway's HTTP client is unavailable".into(),
            answers,
            pending,
            batch,
        )
        .await);
    };

    let payload = if !changed && forward.len() == n_items {
        bytes.to_vec()
    } else {
        serde_json::to_vec(&reply_body(forward, batch)).unwrap_or_default()
    };
    let mut up = upstream_request_headers(&headers);
    let (tp, bag) = match &first_permit {
        Some(v) => trace_headers(v),
        None => fresh_trace(&headers, &agent_id),
    };
    stamp(&mut up, &agent_id, &tp, &bag);

    let mut ex = Exchange::new(
        gw.clone(),
        &target,
        token.unwrap_or_default(),
        agent_id,
        session,
        up.clone(),
    );
    for (id, call, list_tools) in pending {
        ex.track(id, call, list_tools, target.timeout);
    }

    let send = http.post(&target.url).headers(up).body(payload).send();
    tokio::pin!(send);
    let resp = loop {
        match ex.watched(send.as_mut(), None).await {
            Watched::Done(Ok(r)) => break r,
            Watched::Done(Err(e)) => {
                let message = format!("MCP server `{}` is unreachable: {e}", target.name);
                answers.extend(ex.finish("upstream-failed", &message).await);
                return Err(GatewayError::Upstream {
                    body: reply_body(answers, batch),
                    message,
                });
            }
            Watched::Stopped { errors, end } => {
                answers.extend(errors);
                if end || !ex.unsettled() {
                    return Ok(json_reply(StatusCode::OK, HeaderMap::new(), answers, batch));
                }
            }
            Watched::ClientGone => {}
        }
    };

    let status = resp.status();
    let rh = client_response_headers(resp.headers());
    if let Some(sid) = header_str(resp.headers(), MCP_SESSION_ID) {
        if !ex.agent_id.is_empty() {
            gw.bind_session(&target.name, sid, &ex.agent_id);
        }
        // The session the server just opened is where a cancel for this exchange goes.
        if ex.session.is_none() {
            ex.session = Some(sid.to_owned());
        }
    }

    if status.is_success() && is_sse(resp.headers()) {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pump_sse(ex, resp, Out::new(tx), answers, false));
        return Ok(streamed(status, rh, rx));
    }
    if status.is_success() && is_json(resp.headers()) {
        return json_exchange(ex, resp, status, rh, answers, batch).await;
    }
    // Anything else (202 for notifications, an error status, another content type) is
    // not a place where answers come from: whatever was asked is left unanswered.
    let why = format!(
        "MCP server `{}` answered {status} without a response",
        target.name
    );
    let errors = ex.finish("upstream-failed", &why).await;
    if answers.is_empty() && (errors.is_empty() || !status.is_success()) {
        return Ok(pipe_raw(status, rh, resp));
    }
    answers.extend(errors);
    Ok(json_reply(StatusCode::OK, rh, answers, batch))
}

/// The first message of a frame, decoded without reading further: the object itself, or
/// a batch's first element (the rest of the batch is not parsed at all).
fn first_message(bytes: &[u8]) -> Option<Value> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = bytes.get(start..)?;
    match rest.first() {
        Some(b'[') => serde_json::Deserializer::from_slice(rest.get(1..)?)
            .into_iter::<Value>()
            .next()?
            .ok(),
        _ => serde_json::from_slice(rest).ok(),
    }
}

/// The client gave up on a call: if it is one of this agent's calls in flight here, its
/// outcome is `cancelled`. The notification itself is forwarded by the caller.
async fn client_cancelled(
    gw: &Arc<Gateway>,
    gate: &EmbeddedGate,
    target: &Target,
    session: Option<&str>,
    agent_id: &str,
    msg: &Value,
) {
    let (Some(session), Some(rid)) = (session, msg.pointer("/params/requestId")) else {
        return;
    };
    let key = (target.name.clone(), session.to_owned(), id_key(rid));
    let Some(p) = gw.registered(&key, agent_id) else {
        return;
    };
    if gw.settle(&p) {
        if let Some(c) = &p.call {
            gate.outcome(Outcome {
                call_id: c.call_id.clone(),
                agent_id: c.agent_id.clone(),
                status: "cancelled",
                output: None,
                duration_ns: p.started.elapsed().as_nanos() as u64,
            })
            .await;
        }
    }
}

/// The upstream could not be asked: permitted calls get `upstream-failed`, the client a
/// 502 with an error for each forwarded request.
async fn upstream_error(
    gate: &EmbeddedGate,
    message: String,
    mut answers: Vec<Value>,
    pending: Vec<(Value, Option<CallInfo>, bool)>,
    batch: bool,
) -> GatewayError {
    for (id, call, _) in pending {
        if let Some(c) = call {
            gate.outcome(Outcome {
                call_id: c.call_id,
                agent_id: c.agent_id,
                status: "upstream-failed",
                output: None,
                duration_ns: 0,
            })
            .await;
        }
        answers.push(error_response(&id, UPSTREAM_UNAVAILABLE, message.clone()));
    }
    GatewayError::Upstream {
        body: reply_body(answers, batch),
        message,
    }
}

/// A JSON answer: read whole (bounded), inspected, merged with the gateway's own answers.
async fn json_exchange(
    mut ex: Exchange,
    mut resp: reqwest::Response,
    status: StatusCode,
    rh: HeaderMap,
    mut answers: Vec<Value>,
    batch: bool,
) -> Result<Response, GatewayError> {
    let read = read_capped(&mut resp, MAX_UPSTREAM_MESSAGE);
    tokio::pin!(read);
    let body = loop {
        match ex.watched(read.as_mut(), None).await {
            Watched::Done(r) => break r,
            Watched::Stopped { errors, end } => {
                answers.extend(errors);
                if end || !ex.unsettled() {
                    return Ok(json_reply(StatusCode::OK, rh, answers, batch));
                }
            }
            Watched::ClientGone => {}
        }
    };
    let parsed = body.and_then(|raw| {
        serde_json::from_slice::<Value>(&raw)
            .map(|v| (raw, v))
            .map_err(|e| e.to_string())
    });
    let (raw, value) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let message = format!("unreadable answer from MCP server `{}`: {e}", ex.server);
            answers.extend(ex.finish("upstream-failed", &message).await);
            return Err(GatewayError::Upstream {
                body: reply_body(answers, batch),
                message,
            });
        }
    };
    let inspected = ex.inspect_payload(value.clone()).await;
    let why = format!("MCP server `{}` did not answer this request", ex.server);
    let errors = ex.finish("upstream-failed", &why).await;
    if answers.is_empty() && errors.is_empty() {
        return Ok(match inspected {
            Inspected::Unchanged => bytes_reply(status, rh, raw),
            Inspected::Changed(v) => {
                bytes_reply(status, rh, serde_json::to_vec(&v).unwrap_or_default())
            }
            Inspected::Dropped => json_reply(status, rh, Vec::new(), batch),
        });
    }
    match inspected {
        Inspected::Unchanged => push_messages(&mut answers, value),
        Inspected::Changed(v) => push_messages(&mut answers, v),
        Inspected::Dropped => {}
    }
    answers.extend(errors);
    Ok(json_reply(status, rh, answers, batch))
}

fn push_messages(out: &mut Vec<Value>, v: Value) {
    match v {
        Value::Array(items) => out.extend(items),
        one => out.push(one),
    }
}

async fn read_capped(resp: &mut reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if buf.len() + chunk.len() > cap {
            return Err(format!("answer larger than {cap} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// How a message or batch from upstream fared.
enum Inspected {
    Unchanged,
    Changed(Value),
    /// Nothing in it may reach the client.
    Dropped,
}

enum Keep {
    Same,
    Changed,
    Drop,
}

enum Watched<T> {
    Done(T),
    /// The client of a stream hung up.
    ClientGone,
    /// Calls were stopped: the errors to send the client, and whether to end the stream
    /// (the agent was stopped).
    Stopped {
        errors: Vec<Value>,
        end: bool,
    },
}

/// One upstream request and what it is waiting for.
struct Exchange {
    gw: Arc<Gateway>,
    gate: EmbeddedGate,
    server: String,
    url: String,
    map: ToolMap,
    agent_id: String,
    session: Option<String>,
    /// The headers the request went with, for `notifications/cancelled` in the same
    /// session.
    headers: HeaderMap,
    own: HashMap<String, Arc<Pending>>,
    visible: Option<HashSet<String>>,
    tick: tokio::time::Interval,
    /// A GET stream: watched for a stop even with nothing in flight.
    watch_always: bool,
}

impl Exchange {
    fn new(
        gw: Arc<Gateway>,
        target: &Target,
        token: String,
        agent_id: String,
        session: Option<String>,
        headers: HeaderMap,
    ) -> Self {
        let gate = EmbeddedGate::new(gw.app.clone(), token);
        let mut tick = tokio::time::interval(STOP_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            gw,
            gate,
            server: target.name.clone(),
            url: target.url.clone(),
            map: target.map.clone(),
            agent_id,
            session,
            headers,
            own: HashMap::new(),
            visible: None,
            tick,
            watch_always: false,
        }
    }

    fn track(&mut self, id: Value, call: Option<CallInfo>, list_tools: bool, timeout: Duration) {
        let k = id_key(&id);
        let started = Instant::now();
        let p = Arc::new(Pending {
            key: self
                .session
                .as_ref()
                .map(|s| (self.server.clone(), s.clone(), k.clone())),
            id,
            call,
            list_tools,
            started,
            deadline: started + timeout,
            settled: AtomicBool::new(false),
        });
        self.gw.register(&p);
        self.own.insert(k, p);
    }

    fn unsettled(&self) -> bool {
        self.own.values().any(|p| !p.settled.load(Ordering::SeqCst))
    }

    fn unsettled_calls(&self) -> bool {
        self.own
            .values()
            .any(|p| p.call.is_some() && !p.settled.load(Ordering::SeqCst))
    }

    /// Runs `fut`, checking every tick whether the agent was stopped, a call ran out of
    /// time, or the client (if given) hung up.
    ///
    /// Cancel safety: only `fut` may be dropped half-way; a check, once started, settles
    /// and records what it stopped before this returns.
    async fn watched<F: Future>(
        &mut self,
        mut fut: Pin<&mut F>,
        client: Option<&mpsc::Sender<Bytes>>,
    ) -> Watched<F::Output> {
        loop {
            let watching = self.watch_always || self.unsettled();
            tokio::select! {
                out = fut.as_mut() => return Watched::Done(out),
                _ = self.tick.tick(), if watching => {
                    if client.is_some_and(mpsc::Sender::is_closed) {
                        return Watched::ClientGone;
                    }
                    if let Some((errors, end)) = self.check().await {
                        return Watched::Stopped { errors, end };
                    }
                }
            }
        }
    }

    /// `Some((errors, end))` if something was stopped.
    async fn check(&mut self) -> Option<(Vec<Value>, bool)> {
        if self.watch_always || self.unsettled_calls() {
            if let Some(why) = self.gate.stopped().await {
                return Some((self.stop_all(&why).await, true));
            }
        }
        let now = Instant::now();
        let expired: Vec<Arc<Pending>> = self
            .own
            .values()
            .filter(|p| !p.settled.load(Ordering::SeqCst) && p.deadline <= now)
            .cloned()
            .collect();
        if expired.is_empty() {
            return None;
        }
        let mut errors = Vec::new();
        for p in expired {
            if !self.gw.settle(&p) {
                continue;
            }
            let secs = p.deadline.duration_since(p.started).as_secs_f64();
            let why = format!("no answer within {secs}s");
            let what = if p.call.is_some() {
                self.cancel_upstream(&p.id, &why);
                "tool call"
            } else {
                "request"
            };
            self.record(&p, "timeout", None).await;
            errors.push(error_response(
                &p.id,
                CALL_TIMED_OUT,
                format!("{what} cancelled by Warden: {why}"),
            ));
        }
        Some((errors, false))
    }

    /// The agent was stopped: every request in flight here ends now.
    async fn stop_all(&mut self, why: &str) -> Vec<Value> {
        let victims: Vec<Arc<Pending>> = self.own.values().cloned().collect();
        let mut errors = Vec::new();
        for p in victims {
            if !self.gw.settle(&p) {
                continue;
            }
            let reason = format!("agent stopped: {why}");
            if p.call.is_some() {
                self.cancel_upstream(&p.id, &reason);
            }
            self.record(&p, "cancelled", None).await;
            errors.push(error_response(
                &p.id,
                CALL_CANCELLED,
                format!("tool call cancelled by Warden: {reason}"),
            ));
        }
        errors
    }

    /// Whatever is still unanswered will not be: permitted calls get `status`, the client
    /// an error per request.
    async fn finish(&mut self, status: &'static str, why: &str) -> Vec<Value> {
        let left: Vec<Arc<Pending>> = self.own.values().cloned().collect();
        let mut errors = Vec::new();
        for p in left {
            if !self.gw.settle(&p) {
                continue;
            }
            self.record(&p, status, None).await;
            errors.push(error_response(&p.id, UPSTREAM_UNAVAILABLE, why));
        }
        errors
    }

    async fn record(&self, p: &Pending, status: &'static str, output: Option<Value>) {
        let Some(c) = &p.call else { return };
        self.gate
            .outcome(Outcome {
                call_id: c.call_id.clone(),
                agent_id: c.agent_id.clone(),
                status,
                output,
                duration_ns: p.started.elapsed().as_nanos() as u64,
            })
            .await;
    }

    /// Tells the server to stop working on a request, in the same session. Sent in the
    /// background: the client's answer must not wait on a server that may be stuck.
    fn cancel_upstream(&self, id: &Value, reason: &str) {
        let Ok(http) = self.gw.http.clone() else {
            return;
        };
        let body = json!({
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": { "requestId": id, "reason": reason },
        });
        let mut headers = self.headers.clone();
        headers.remove("last-event-id");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self
            .session
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            headers.insert(HeaderName::from_static(MCP_SESSION_ID), s);
        }
        let url = self.url.clone();
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        tokio::spawn(async move {
            let res = http
                .post(&url)
                .headers(headers)
                .body(bytes)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "could not send notifications/cancelled upstream");
            }
        });
    }

    /// Looks at one message from upstream: answers settle what they answer (and are
    /// dropped if they answer nothing that was asked); `tools/list` results are filtered.
    async fn inspect(&mut self, msg: &mut Value) -> Keep {
        let id = match classify(msg) {
            Ok(Kind::Response { id }) => id,
            Ok(_) => return Keep::Same,
            Err(e) => {
                tracing::warn!(error = %e, server = %self.server, "dropped an invalid message from the MCP server");
                return Keep::Drop;
            }
        };
        let key = id_key(&id);
        let found = self.own.get(&key).cloned().or_else(|| {
            let s = self.session.as_ref()?;
            self.gw.registered(
                &(self.server.clone(), s.clone(), key.clone()),
                &self.agent_id,
            )
        });
        let Some(p) = found else {
            tracing::warn!(id = %id, server = %self.server, "MCP server answered a request that was never forwarded; dropped");
            return Keep::Drop;
        };
        if !self.gw.settle(&p) {
            // Already settled: cancelled, timed out, or answered twice.
            return Keep::Drop;
        }
        if p.call.is_some() {
            let is_error = msg.get("error").is_some()
                || msg.pointer("/result/isError").and_then(Value::as_bool) == Some(true);
            let output = msg.get("result").or_else(|| msg.get("error")).cloned();
            self.record(&p, if is_error { "error" } else { "ok" }, output)
                .await;
        }
        if p.list_tools {
            if self.visible.is_none() {
                // An agent whose standing cannot be read sees no tools: fail closed.
                self.visible = Some(self.gate.visible_actions().await.unwrap_or_default());
            }
            if let Some(v) = &self.visible {
                if filter_tools_list(msg, &self.map, v) > 0 {
                    return Keep::Changed;
                }
            }
        }
        Keep::Same
    }

    async fn inspect_payload(&mut self, v: Value) -> Inspected {
        match v {
            Value::Array(items) => {
                let mut kept = Vec::with_capacity(items.len());
                let mut changed = false;
                for mut m in items {
                    match self.inspect(&mut m).await {
                        Keep::Same => kept.push(m),
                        Keep::Changed => {
                            changed = true;
                            kept.push(m);
                        }
                        Keep::Drop => changed = true,
                    }
                }
                if kept.is_empty() {
                    Inspected::Dropped
                } else if changed {
                    Inspected::Changed(Value::Array(kept))
                } else {
                    Inspected::Unchanged
                }
            }
            mut one => match self.inspect(&mut one).await {
                Keep::Same => Inspected::Unchanged,
                Keep::Changed => Inspected::Changed(one),
                Keep::Drop => Inspected::Dropped,
            },
        }
    }

    /// One SSE event from upstream: the bytes to send on, if any. Events that carry no
    /// JSON (priming events, keep-alives, comments) pass as they came.
    async fn pass_event(&mut self, ev: sse::Event) -> Option<Bytes> {
        let Some(v) = ev
            .data
            .as_deref()
            .filter(|d| !d.trim().is_empty())
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
        else {
            return Some(Bytes::from(ev.raw));
        };
        match self.inspect_payload(v).await {
            Inspected::Unchanged => Some(Bytes::from(ev.raw)),
            Inspected::Changed(v) => Some(Bytes::from(ev.with_data(&v.to_string()))),
            Inspected::Dropped => None,
        }
    }
}

/// The client's side of a stream. A client that went away is noted, not fatal: a call in
/// flight is still followed to its outcome.
struct Out {
    tx: mpsc::Sender<Bytes>,
    gone: bool,
}

impl Out {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self { tx, gone: false }
    }

    async fn send(&mut self, b: Bytes) {
        if !self.gone && self.tx.send(b).await.is_err() {
            self.gone = true;
        }
    }

    async fn messages(&mut self, msgs: Vec<Value>) {
        for m in msgs {
            self.send(Bytes::from(sse::encode(None, None, None, &m.to_string())))
                .await;
        }
    }
}

/// Carries an upstream SSE stream to the client event by event.
async fn pump_sse(
    mut ex: Exchange,
    mut resp: reqwest::Response,
    mut out: Out,
    first: Vec<Value>,
    is_get: bool,
) {
    ex.watch_always = is_get;
    out.messages(first).await;
    let mut parser = sse::Parser::new(MAX_UPSTREAM_MESSAGE);
    loop {
        // A POST's stream has served its purpose once everything it carried is settled
        // (answered, or cancelled by the client). With the client gone there is nobody to
        // stream to, but a call in flight is still followed so its outcome is recorded.
        if (!is_get && !ex.unsettled()) || (out.gone && (is_get || !ex.unsettled_calls())) {
            break;
        }
        let step = {
            let chunk = resp.chunk();
            tokio::pin!(chunk);
            let client = (!out.gone).then_some(&out.tx);
            ex.watched(chunk.as_mut(), client).await
        };
        match step {
            Watched::ClientGone => out.gone = true,
            Watched::Done(Ok(Some(bytes))) => match parser.push(&bytes) {
                Ok(events) => {
                    for ev in events {
                        if let Some(b) = ex.pass_event(ev).await {
                            out.send(b).await;
                        }
                    }
                }
                Err(e) => {
                    let why = format!("MCP server `{}` sent a broken stream: {e}", ex.server);
                    let errors = ex.finish("upstream-failed", &why).await;
                    out.messages(errors).await;
                    break;
                }
            },
            Watched::Done(Ok(None)) => {
                let (events, _unfinished) = parser.finish();
                for ev in events {
                    if let Some(b) = ex.pass_event(ev).await {
                        out.send(b).await;
                    }
                }
                let why = format!(
                    "MCP server `{}` ended the stream without answering",
                    ex.server
                );
                let errors = ex.finish("upstream-failed", &why).await;
                out.messages(errors).await;
                break;
            }
            Watched::Done(Err(e)) => {
                let why = format!("MCP server `{}` stream failed: {e}", ex.server);
                let errors = ex.finish("upstream-failed", &why).await;
                out.messages(errors).await;
                break;
            }
            Watched::Stopped { errors, end } => {
                out.messages(errors).await;
                if end {
                    break;
                }
            }
        }
    }
    // Requests left behind by a client that went away are forgotten, not leaked.
    ex.finish("upstream-failed", "the client went away").await;
}

/// A response body fed from a channel: each message is sent to the client as it comes.
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

fn streamed(status: StatusCode, headers: HeaderMap, rx: mpsc::Receiver<Bytes>) -> Response {
    let mut resp = Response::new(Body::new(ChannelBody(rx)));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Passes a body the gateway has no business reading, as it comes.
fn pipe_raw(status: StatusCode, headers: HeaderMap, mut resp: reqwest::Response) -> Response {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = resp.chunk().await {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    streamed(status, headers, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn upstream_gets_end_to_end_headers_but_never_the_credential() {
        let incoming = headers(&[
            ("host", "warden:8480"),
            ("authorization", "Bearer wat_secret"),
            ("cookie", "session=1"),
            ("content-length", "42"),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("accept-encoding", "gzip"),
            ("mcp-session-id", "s-1"),
            ("mcp-protocol-version", "2025-11-25"),
            ("mcp-custom-thing", "x"),
            ("last-event-id", "ev-9"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("baggage", "a=b"),
            ("x-agent-id", "someone-else"),
            ("user-agent", "python-httpx"),
        ]);
        let out = upstream_request_headers(&incoming);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            vec![
                "accept",
                "content-type",
                "last-event-id",
                "mcp-custom-thing",
                "mcp-protocol-version",
                "mcp-session-id",
                "user-agent"
            ]
        );
        let mut out = out;
        stamp(
            &mut out,
            "agent-1",
            "00-aa-bb-01",
            "warden.agent_id=agent-1",
        );
        assert_eq!(out["x-agent-id"], "agent-1");
        assert_eq!(out["traceparent"], "00-aa-bb-01");
        assert!(out.get("authorization").is_none());
    }

    #[test]
    fn client_gets_upstream_headers_but_not_hop_by_hop_ones() {
        let up = headers(&[
            ("content-type", "text/event-stream"),
            ("mcp-session-id", "s-1"),
            ("cache-control", "no-cache"),
            ("content-length", "10"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
        ]);
        let out = client_response_headers(&up);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            vec!["cache-control", "content-type", "mcp-session-id"]
        );
        assert!(is_sse(&out));
        assert!(!is_json(&out));
    }

    #[test]
    fn refusals_pick_their_status() {
        let e = |reason| GatewayError::Refused {
            reason,
            message: String::new(),
        };
        assert_eq!(
            e(Reason::Unauthenticated).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            e(Reason::CredentialInvalid).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(e(Reason::Killed).status(), StatusCode::FORBIDDEN);
        assert_eq!(
            e(Reason::Internal).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let r = GatewayError::Frame(FrameError::Parse("x".into())).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn reply_bodies_keep_the_clients_shape() {
        assert_eq!(reply_body(vec![json!(1)], false), json!(1));
        assert_eq!(reply_body(vec![json!(1)], true), json!([1]));
        assert_eq!(reply_body(vec![json!(1), json!(2)], false), json!([1, 2]));
    }
}
