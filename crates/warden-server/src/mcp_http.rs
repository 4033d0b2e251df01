//! The Streamable HTTP MCP gateway: every `[[mcp_servers]]` entry with a `url` is served
//! at `/mcp/{name}`, and POST, GET and DELETE are proxied to that URL. A thin transport:
//! what each message means and what Warden does with it is the session engine's
//! ([`warden_mcp::engine`]), shared with the stdio proxy, so both govern alike:
//! every request decided and audited or passed by the server's `passthrough` list, list
//! answers filtered, server requests decided, ids matched as the SDKs match them,
//! `warden.*` baggage stripped, calls cancelled on kill, timeout and client disconnect.
//!
//! What is particular to HTTP:
//! - every request carries the agent's own bearer token, which authenticates it here and
//!   is never forwarded; the upstream gets an allow-list of the client's headers plus
//!   `X-Agent-Id`, `traceparent` and `baggage` set by the gateway;
//! - one engine session per upstream MCP session (`Mcp-Session-Id`), bound to the agent
//!   that opened it: another agent presenting its id is refused, an unknown or expired
//!   id gets 404 (the client then initializes anew, as the spec has it), and a full
//!   table refuses new sessions (503) rather than serving them unbound;
//! - a message over the gateway's size limit (as large as stdio's) is answered in
//!   JSON-RPC form with its own id, and a governed one is audited as refused;
//! - SSE is inspected event by event and re-emitted unchanged unless it had to change,
//!   so progress notifications reach the client as they happen.
//!
//! INVARIANT: a governed request reaches the upstream server only after the gate
//! permitted it and its decision is durable in the audit trail.
//! INVARIANT: the agent's credential is never sent upstream.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use warden_core::pipeline::CallContext;
use warden_core::Reason;
use warden_mcp::engine::{error_response, Admit, Emit, IdKey, Rules, Session, Step};
use warden_mcp::message::{into_messages, parse_frame, FrameError, UPSTREAM_UNAVAILABLE};
use warden_mcp::sniff::{sanitize, Sniffer};
use warden_mcp::sse;
use warden_mcp::stdio::{MAX_CLIENT_MESSAGE, MAX_SERVER_MESSAGE};
use warden_mcp::tools::{tool_call_of, ToolMap};

use crate::api::{bearer, Peer};
use crate::error::{close_connection, declares_body};
use crate::gate::EmbeddedGate;
use crate::ids::random_hex;
use crate::rebinding::RebindingGuard;
use crate::upstream::{error_chain, ASSERTION_HEADER};
use crate::App;
use warden_core::trace::parse_traceparent;

/// How often a stream with requests in flight asks whether the agent was stopped.
const STOP_POLL: Duration = Duration::from_millis(200);
/// How much of an over-limit body is read to find its id before giving up on it.
const MAX_SNIFF: usize = 64 * 1024 * 1024;

const MCP_SESSION_ID: &str = "mcp-session-id";

type McpSession = Session<EmbeddedGate>;

/// The gateway's routes, to merge into the node's router.
pub fn routes(app: Arc<App>) -> Router {
    let gw = Arc::new(Gateway::new(app));
    Router::new()
        .route("/mcp/{server}", post(handle).get(handle).delete(handle))
        // The gateway reads bodies itself, with its own limit and a JSON-RPC answer.
        .layer(DefaultBodyLimit::disable())
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
    #[error("unknown or expired MCP session; initialize a new one")]
    UnknownSession,
    #[error("too many MCP sessions are open; try again later")]
    SessionsFull,
    #[error("{0}")]
    BadBody(String),
    /// `Host` or `Origin` not one the gateway answers (see [`crate::rebinding`]).
    #[error("{0}")]
    ForeignHost(String),
    /// A JSON-RPC error answering the message itself (unparsable, over the limit).
    #[error("{message}")]
    Rpc { message: String, body: Value },
    /// The upstream server could not be reached or answered with garbage; `body` holds a
    /// JSON-RPC error for each request that was forwarded.
    #[error("{message}")]
    Upstream { message: String, body: Value },
}

impl GatewayError {
    fn status(&self) -> StatusCode {
        match self {
            GatewayError::UnknownServer(_) | GatewayError::UnknownSession => StatusCode::NOT_FOUND,
            GatewayError::Refused { reason, .. } if reason.is_authentication_failure() => {
                StatusCode::UNAUTHORIZED
            }
            GatewayError::Refused {
                reason: Reason::Internal,
                ..
            }
            | GatewayError::SessionsFull => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Refused { .. } | GatewayError::ForeignHost(_) => StatusCode::FORBIDDEN,
            GatewayError::BadBody(_) | GatewayError::Rpc { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            GatewayError::Rpc { body, .. } | GatewayError::Upstream { body, .. } => body.clone(),
            GatewayError::Refused { reason, message } => json!({
                "error": match status {
                    StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
                    StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
                    _ => "FORBIDDEN",
                },
                "reason": reason.code(),
                "message": message,
            }),
            GatewayError::UnknownServer(_) | GatewayError::UnknownSession => {
                json!({ "error": "NOT_FOUND", "message": self.to_string() })
            }
            GatewayError::SessionsFull => {
                json!({ "error": "UNAVAILABLE", "message": self.to_string() })
            }
            GatewayError::BadBody(_) => {
                json!({ "error": "BAD_REQUEST", "message": self.to_string() })
            }
            GatewayError::ForeignHost(_) => {
                json!({ "error": "FORBIDDEN", "message": self.to_string() })
            }
        };
        let mut resp = (status, Json(body)).into_response();
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

/// One upstream MCP session and the agent it belongs to.
struct Bound {
    agent: String,
    session: Arc<McpSession>,
    last_used: Instant,
}

/// One configured upstream.
struct Upstream {
    url: String,
    rules: Arc<Rules>,
}

/// The gateway's shared state.
struct Gateway {
    app: Arc<App>,
    upstreams: HashMap<String, Upstream>,
    /// Sessions kept at most (`server.mcp_sessions_max`). Past this, after expiring idle
    /// ones, new sessions are refused: a session Warden does not track is one it could
    /// not govern.
    max_sessions: usize,
    /// A session unused this long is forgotten (`server.mcp_session_idle`).
    session_idle: Duration,
    sessions: Mutex<HashMap<(String, String), Bound>>,
    rebinding: RebindingGuard,
}

impl Gateway {
    fn new(app: Arc<App>) -> Self {
        // The HTTP clients, one per server, are the node's (`App::upstream`), built and
        // checked at start.
        let upstreams = app
            .settings
            .mcp_servers
            .values()
            .filter_map(|s| {
                let url = s.url.clone()?;
                let mut rules = Rules::new(ToolMap::new(s.name.clone(), s.actions.clone()));
                rules.passthrough = s.passthrough.clone();
                rules.call_timeout = Duration::from_nanos(s.timeout_ns);
                rules.resolve_paths = s.resolve_paths.clone();
                // The upstream's working directory is not known here: relative paths are
                // refused rather than guessed.
                rules.path_base = None;
                Some((
                    s.name.clone(),
                    Upstream {
                        url,
                        rules: Arc::new(rules),
                    },
                ))
            })
            .collect();
        Self {
            max_sessions: app.settings.mcp_sessions_max,
            session_idle: Duration::from_nanos(app.settings.mcp_session_idle_ns),
            rebinding: RebindingGuard::new(&app.settings),
            app,
            upstreams,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The session `id` of `server`, if it is live and belongs to `agent`.
    fn session(
        &self,
        server: &str,
        id: &str,
        agent: &str,
    ) -> Result<Arc<McpSession>, GatewayError> {
        let mut map = lock(&self.sessions);
        let key = (server.to_owned(), id.to_owned());
        let now = Instant::now();
        match map.get_mut(&key) {
            Some(b) if now.duration_since(b.last_used) > self.session_idle => {
                map.remove(&key);
                Err(GatewayError::UnknownSession)
            }
            // Another agent's session: as good as unknown to this one.
            Some(b) if b.agent != agent => Err(GatewayError::UnknownSession),
            Some(b) => {
                b.last_used = now;
                Ok(b.session.clone())
            }
            None => Err(GatewayError::UnknownSession),
        }
    }

    /// Whether a new session could be bound now (expiring idle ones to make room).
    fn has_room(&self) -> bool {
        let mut map = lock(&self.sessions);
        if map.len() < self.max_sessions {
            return true;
        }
        let now = Instant::now();
        let idle = self.session_idle;
        map.retain(|_, b| now.duration_since(b.last_used) <= idle);
        map.len() < self.max_sessions
    }

    fn bind(&self, server: &str, id: &str, agent: &str, session: Arc<McpSession>) -> bool {
        if !self.has_room() {
            return false;
        }
        let mut map = lock(&self.sessions);
        map.entry((server.to_owned(), id.to_owned()))
            .or_insert_with(|| Bound {
                agent: agent.to_owned(),
                session,
                last_used: Instant::now(),
            });
        true
    }

    fn unbind(&self, server: &str, id: &str) -> Option<Arc<McpSession>> {
        lock(&self.sessions)
            .remove(&(server.to_owned(), id.to_owned()))
            .map(|b| b.session)
    }
}

/// What a request asked for, resolved from the route and the node's config.
#[derive(Clone)]
struct Target {
    name: String,
    url: String,
    rules: Arc<Rules>,
}

async fn handle(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Peer(peer): Peer,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Detached from the client's connection: a client that hangs up mid-call must not
    // cut the decision or the outcome record short. It is noticed instead: if this
    // future is dropped (the connection closed) before the answer is handed over, the
    // sender goes without a word and the exchange cancels what it carried upstream.
    let (handed_over, client) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(gw, name, peer, method, headers, body, client));
    let resp = task.await;
    let _ = handed_over.send(());
    match resp {
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
    body: Body,
    client: Client,
) -> Response {
    // First, before the route or the credential: a rebound browser page learns nothing.
    if let Err(why) = gw.rebinding.check(&headers) {
        let mut refused = GatewayError::ForeignHost(why).into_response();
        // Its body is never read, so the connection cannot carry another request.
        if declares_body(&headers) {
            close_connection(&mut refused);
        }
        return refused;
    }
    let Some(up) = gw.upstreams.get(&name) else {
        return GatewayError::UnknownServer(name).into_response();
    };
    let target = Target {
        name: name.clone(),
        url: up.url.clone(),
        rules: up.rules.clone(),
    };
    let result = if method == Method::POST {
        post_messages(gw, target, peer, headers, body, client).await
    } else {
        open_or_end(gw, target, method, headers).await
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

/// The client's headers that go upstream: what Streamable HTTP needs end to end, and
/// nothing else. An allow-list, because a deny-list lets through whatever it forgot
/// (`X-Forwarded-For`, `x-agent_id`, a cookie under another name): the agent's
/// credential is for Warden, and what the upstream learns of the caller comes from
/// Warden alone (`X-Agent-Id`, `traceparent`, `baggage`, set by [`stamp`], and the
/// signed `Warden-Assertion`).
const FORWARDED: [&str; 6] = [
    "accept",
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
    "user-agent",
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

/// The client's headers that go upstream (see [`FORWARDED`]).
pub fn upstream_request_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        if FORWARDED.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
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

/// Trace context for an upstream request: the client's trace if it sent one, else a
/// new one.
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

/// Reads a request body of at most `limit` bytes. Past the limit the rest is only
/// sniffed for the message's id (up to `sniff_up_to` bytes in all), so the refusal can
/// name it.
async fn read_body(
    mut body: Body,
    limit: usize,
    sniff_up_to: usize,
) -> Result<Result<Vec<u8>, (FrameError, Sniffer)>, GatewayError> {
    let mut buf = Vec::new();
    let mut over: Option<Sniffer> = None;
    let mut seen = 0usize;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|e| GatewayError::BadBody(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        match &mut over {
            Some(s) => s.feed(&data),
            None if buf.len() + data.len() > limit => {
                let mut s = Sniffer::default();
                s.feed(&buf);
                s.feed(&data);
                buf = Vec::new();
                over = Some(s);
            }
            None => buf.extend_from_slice(&data),
        }
        if over.is_some() && seen >= sniff_up_to {
            // Not waited for: the peer may never send the rest.
            break;
        }
    }
    Ok(match over {
        Some(s) => Err((FrameError::TooLarge(seen, limit), s)),
        None => Ok(buf),
    })
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
        _ => warden_core::json::from_slice_strict(rest).ok(),
    }
}

/// POST: one message or a batch from the client.
async fn post_messages(
    gw: Arc<Gateway>,
    target: Target,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    body: Body,
    client: Client,
) -> Result<Response, GatewayError> {
    let token = bearer(&headers).map(str::to_owned);
    let header_trace = header_str(&headers, "traceparent")
        .and_then(parse_traceparent)
        .map(|(t, _)| t);
    // Authenticate before reading: a caller without a valid credential gets no more of
    // its body read than the decision API would read (and nothing sniffed past it), and
    // its first message parsed and nothing more, so a batch of N calls costs one audit
    // entry, not N. The gateway's own, larger limit is for agents Warden knows.
    let standing = gw.app.standing(token.as_deref()).await;
    let unknown = matches!(&standing, Err(d) if d.reason.is_authentication_failure());
    let read = if unknown {
        let limit = gw.app.settings.max_body_bytes;
        read_body(body, limit, limit).await?
    } else {
        read_body(body, MAX_CLIENT_MESSAGE, MAX_SNIFF).await?
    };
    if let Err(d) = &standing {
        if d.reason.is_authentication_failure() {
            // Refused, but the attempted tool call is still on the audit trail, as it is
            // on the decision API.
            let first = read.as_ref().ok().and_then(|b| first_message(b));
            if let Some((_, call)) = first
                .as_ref()
                .filter(|m| m.get("method").and_then(Value::as_str) == Some("tools/call"))
                .and_then(|m| tool_call_of(&target.rules.map, m))
            {
                let ctx = CallContext {
                    rationale: call.rationale,
                    peer,
                    ..Default::default()
                };
                let trace = call.trace_id.or(header_trace.clone());
                gw.app
                    .decide(
                        token.as_deref(),
                        &call.action,
                        &call.arguments,
                        &ctx,
                        trace.as_deref(),
                    )
                    .await;
            }
            let mut resp = refused(d.clone()).into_response();
            if read.is_err() {
                // The rest of the body was not read: this connection cannot go on.
                close_connection(&mut resp);
            }
            return Ok(resp);
        }
    }
    let gate = EmbeddedGate::new(gw.app.clone(), token.clone().unwrap_or_default());
    let session_id = header_str(&headers, MCP_SESSION_ID).map(str::to_owned);
    let live = standing.is_ok();
    let stopped = standing.as_ref().err().cloned();
    let agent_id = standing.map(|s| s.agent.id).unwrap_or_default();
    // A stopped agent's messages go nowhere; they are still answered (refused) by an
    // engine of their own, so every request gets its decision and audit entry.
    let (session, transient) = match (&session_id, live) {
        (Some(sid), true) => (gw.session(&target.name, sid, &agent_id)?, false),
        _ => {
            let gate = Arc::new(EmbeddedGate::new(
                gw.app.clone(),
                token.clone().unwrap_or_default(),
            ));
            (Session::new(gate, target.rules.clone()).0, true)
        }
    };

    let bytes = match read {
        Ok(b) => b,
        Err((e, sniffed)) => {
            let step = session.oversized(&sniffed, &e).await;
            let body = match step {
                Step::Reply(r) => r,
                _ => error_response(&Value::Null, e.code(), &e.to_string()),
            };
            let mut resp = (StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response();
            // The rest of an over-limit body may not have been read.
            close_connection(&mut resp);
            return Ok(resp);
        }
    };
    let (bytes, sanitized) = match sanitize(&bytes) {
        Some(clean) => (clean, true),
        None => (bytes, false),
    };
    let (value, batch) = match parse_frame(&bytes, usize::MAX) {
        Ok(v) => v,
        Err(e) => {
            let mut s = Sniffer::default();
            s.feed(&bytes);
            let id = s.id().unwrap_or(Value::Null);
            return Err(GatewayError::Rpc {
                message: e.to_string(),
                body: error_response(&id, e.code(), &e.to_string()),
            });
        }
    };
    let items = into_messages(value);
    if let Some(d) = stopped {
        // A stopped agent: refused outright, unless it tried a governed request, whose
        // denial goes on the audit trail (and is answered below).
        let governed = |m: &Value| {
            m.get("id").is_some()
                && m.get("method")
                    .and_then(Value::as_str)
                    .is_some_and(|method| target.rules.governs(method))
        };
        if !items.iter().any(governed) {
            return Err(refused(d));
        }
    }
    let n_items = items.len();
    let mut answers: Vec<Value> = Vec::new();
    let mut forward: Vec<Value> = Vec::with_capacity(n_items);
    let mut own: HashSet<IdKey> = HashSet::new();
    let mut changed = sanitized;
    let mut opens_session = false;
    let mut first_permit: Option<(String, String)> = None;
    for msg in items {
        let request_key = msg.get("method").and(msg.get("id")).and_then(IdKey::of);
        if msg.get("method").and_then(Value::as_str) == Some("initialize") {
            opens_session = true;
        }
        let step = match session.admit_client(msg) {
            Admit::Now(s) => s,
            Admit::Later(p) => {
                session
                    .finish(&gate, p.join_trace(header_trace.clone()))
                    .await
            }
        };
        match step {
            Step::Pass(m) | Step::Changed(m) if !live => {
                // A stopped agent's messages go nowhere; its requests are refused.
                changed = true;
                if let Some(id) = m.get("method").and(m.get("id")) {
                    answers.push(error_response(
                        id,
                        warden_mcp::engine::AGENT_STOPPED,
                        "refused by Warden: the agent is stopped",
                    ));
                }
            }
            Step::Pass(m) => {
                own.extend(request_key);
                forward.push(m);
            }
            Step::Changed(m) => {
                own.extend(request_key);
                changed = true;
                if first_permit.is_none() {
                    first_permit = stamped_trace(&m);
                }
                forward.push(m);
            }
            Step::Reply(r) => {
                changed = true;
                answers.push(r);
            }
            Step::Drop => changed = true,
        }
    }
    if forward.is_empty() {
        if transient {
            session.close();
        }
        return Ok(json_reply(StatusCode::OK, HeaderMap::new(), answers, batch));
    }
    if transient && opens_session && !gw.has_room() {
        session
            .finish_all(
                Some(&own),
                "upstream-failed",
                "too many MCP sessions",
                false,
            )
            .await;
        return Err(GatewayError::SessionsFull);
    }
    let prepared = gw.app.upstream.for_request(
        &target.name,
        &target.url,
        &agent_id,
        single_call_id(&forward),
    );
    let (http, assertion) = match prepared {
        Ok(p) => p,
        Err(why) => {
            answers.extend(client_only(
                session
                    .finish_all(Some(&own), "upstream-failed", &why, false)
                    .await,
            ));
            return Err(GatewayError::Upstream {
                body: reply_body(answers, batch),
                message: why,
            });
        }
    };
    let payload = if !changed && forward.len() == n_items {
        bytes
    } else {
        serde_json::to_vec(&reply_body(forward, batch)).unwrap_or_default()
    };
    let mut up = upstream_request_headers(&headers);
    // The headers carry the first permitted request's trace, so a server that reads
    // either finds the same decision.
    let (tp, bag) = first_permit.unwrap_or_else(|| fresh_trace(&headers, &agent_id));
    stamp(&mut up, &agent_id, &tp, &bag);
    up.insert(ASSERTION_HEADER, assertion);

    let mut ex = Exchange::new(gw.clone(), target, session, gate, up.clone(), own);
    ex.session_id = session_id;
    ex.transient = transient;
    ex.client = Some(client);

    let send = http.post(&ex.target.url).headers(up).body(payload).send();
    tokio::pin!(send);
    let resp = loop {
        match ex.watched(send.as_mut(), None).await {
            Watched::Done(Ok(r)) => break r,
            Watched::Done(Err(e)) => {
                let message = format!(
                    "MCP server `{}` is unreachable: {}",
                    ex.target.name,
                    error_chain(&e)
                );
                answers.extend(ex.finish("upstream-failed", &message, false).await);
                ex.end();
                return Err(GatewayError::Upstream {
                    body: reply_body(answers, batch),
                    message,
                });
            }
            Watched::Stopped { errors, end } => {
                answers.extend(errors);
                if end || !ex.unsettled() {
                    ex.end();
                    return Ok(json_reply(StatusCode::OK, HeaderMap::new(), answers, batch));
                }
            }
            Watched::ClientGone => {
                ex.finish("cancelled", "client disconnected", true).await;
                ex.end();
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    };

    let status = resp.status();
    let rh = client_response_headers(resp.headers());
    if let Some(sid) = header_str(resp.headers(), MCP_SESSION_ID) {
        if ex.transient && live {
            if gw.bind(&ex.target.name, sid, &agent_id, ex.session.clone()) {
                ex.transient = false;
            } else {
                // No room to govern it: the session is ended upstream and refused here.
                ex.session_id = Some(sid.to_owned());
                ex.finish("upstream-failed", "too many MCP sessions", true)
                    .await;
                ex.delete_upstream();
                return Err(GatewayError::SessionsFull);
            }
        }
        if ex.session_id.is_none() {
            ex.session_id = Some(sid.to_owned());
        }
    }

    if status.is_success() && is_sse(resp.headers()) {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pump_sse(ex, resp, Out::new(tx), answers));
        return Ok(streamed(status, rh, rx));
    }
    if status.is_success() && is_json(resp.headers()) {
        return json_exchange(ex, resp, status, rh, answers, batch).await;
    }
    // Anything else (202 for notifications, an error status, another content type) is
    // not a place where answers come from: whatever was asked is left unanswered.
    let why = format!(
        "MCP server `{}` answered {status} without a response",
        ex.target.name
    );
    let errors = ex.finish("upstream-failed", &why, false).await;
    ex.end();
    if answers.is_empty() && (errors.is_empty() || !status.is_success()) {
        return Ok(pipe_raw(status, rh, resp));
    }
    answers.extend(errors);
    Ok(json_reply(StatusCode::OK, rh, answers, batch))
}

/// The trace context Warden stamped into a request it permitted, if it did.
fn stamped_trace(msg: &Value) -> Option<(String, String)> {
    let meta = msg.pointer("/params/_meta")?;
    let baggage = meta.get("baggage")?.as_str()?;
    if !baggage.contains("warden.call_id=") {
        return None;
    }
    Some((
        meta.get("traceparent")?.as_str()?.to_owned(),
        baggage.to_owned(),
    ))
}

/// The call id of the one permitted request among `forward` (from the baggage Warden
/// stamped, which a client cannot forge: the engine strips `warden.*` from theirs), for
/// the request's assertion; none if it carries no permitted request, or several.
fn single_call_id(forward: &[Value]) -> Option<&str> {
    let mut ids = forward.iter().filter_map(|m| {
        m.pointer("/params/_meta/baggage")?
            .as_str()?
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("warden.call_id="))
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Some(id),
        _ => None,
    }
}

/// The messages meant for the client, of what the engine emitted.
fn client_only(emits: Vec<Emit>) -> Vec<Value> {
    emits
        .into_iter()
        .filter_map(|e| match e {
            Emit::ToClient(v) => Some(v),
            Emit::ToServer(_) => None,
        })
        .collect()
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
    let standing = gw.app.standing(token.as_deref()).await.map_err(refused)?;
    let agent_id = standing.agent.id;
    let session_id = header_str(&headers, MCP_SESSION_ID).map(str::to_owned);
    let gate = EmbeddedGate::new(gw.app.clone(), token.clone().unwrap_or_default());
    let session = match &session_id {
        Some(sid) => gw.session(&target.name, sid, &agent_id)?,
        None => {
            let g = Arc::new(EmbeddedGate::new(gw.app.clone(), token.unwrap_or_default()));
            Session::new(g, target.rules.clone()).0
        }
    };
    let (http, assertion) = gw
        .app
        .upstream
        .for_request(&target.name, &target.url, &agent_id, None)
        .map_err(|m| GatewayError::Upstream {
            body: error_response(&Value::Null, UPSTREAM_UNAVAILABLE, &m),
            message: m,
        })?;
    let mut up = upstream_request_headers(&headers);
    let (tp, bag) = fresh_trace(&headers, &agent_id);
    stamp(&mut up, &agent_id, &tp, &bag);
    up.insert(ASSERTION_HEADER, assertion);
    let resp = http
        .request(method.clone(), &target.url)
        .headers(up.clone())
        .send()
        .await
        .map_err(|e| {
            let m = format!(
                "MCP server `{}` is unreachable: {}",
                target.name,
                error_chain(&e)
            );
            GatewayError::Upstream {
                body: error_response(&Value::Null, UPSTREAM_UNAVAILABLE, &m),
                message: m,
            }
        })?;
    if let Some(s) = &session_id {
        if method == Method::DELETE && resp.status().is_success() {
            if let Some(gone) = gw.unbind(&target.name, s) {
                gone.finish_all(None, "cancelled", "the MCP session ended", false)
                    .await;
                gone.close();
            }
        }
    }
    let status = resp.status();
    let rh = client_response_headers(resp.headers());
    if method == Method::GET && is_sse(resp.headers()) {
        let mut ex = Exchange::new(gw, target, session, gate, up, HashSet::new());
        ex.session_id = session_id;
        ex.is_get = true;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pump_sse(ex, resp, Out::new(tx), Vec::new()));
        return Ok(streamed(status, rh, rx));
    }
    Ok(pipe_raw(status, rh, resp))
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
    let read = read_capped(&mut resp, MAX_SERVER_MESSAGE);
    tokio::pin!(read);
    let body = loop {
        match ex.watched(read.as_mut(), None).await {
            Watched::Done(r) => break r,
            Watched::Stopped { errors, end } => {
                answers.extend(errors);
                if end || !ex.unsettled() {
                    ex.end();
                    return Ok(json_reply(StatusCode::OK, rh, answers, batch));
                }
            }
            Watched::ClientGone => {
                ex.finish("cancelled", "client disconnected", true).await;
                ex.end();
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    };
    let parsed = body.and_then(|raw| {
        let raw = sanitize(&raw).unwrap_or(raw);
        // Strict: duplicate keys would let the client read another value than Warden.
        warden_core::json::from_slice_strict(&raw)
            .map(|v| (raw, v))
            .map_err(|e| e.to_string())
    });
    let (raw, value) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let message = format!(
                "unreadable answer from MCP server `{}`: {e}",
                ex.target.name
            );
            answers.extend(ex.finish("upstream-failed", &message, false).await);
            ex.end();
            return Err(GatewayError::Upstream {
                body: reply_body(answers, batch),
                message,
            });
        }
    };
    let inspected = ex.inspect_payload(value).await;
    let why = format!(
        "MCP server `{}` did not answer this request",
        ex.target.name
    );
    let errors = ex.finish("upstream-failed", &why, false).await;
    ex.end();
    if answers.is_empty() && errors.is_empty() {
        return Ok(match inspected {
            Inspected::Unchanged(_) => bytes_reply(status, rh, raw),
            Inspected::Changed(v) => {
                bytes_reply(status, rh, serde_json::to_vec(&v).unwrap_or_default())
            }
            Inspected::Dropped => json_reply(status, rh, Vec::new(), batch),
        });
    }
    match inspected {
        Inspected::Unchanged(v) | Inspected::Changed(v) => push_messages(&mut answers, v),
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
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if buf.len() + chunk.len() > cap {
            return Err(format!("answer larger than {cap} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// How a message or batch from upstream fared.
enum Inspected {
    Unchanged(Value),
    Changed(Value),
    /// Nothing in it may reach the client.
    Dropped,
}

enum Watched<T> {
    Done(T),
    /// The client of a stream hung up.
    ClientGone,
    /// Requests were stopped: the errors to send the client, and whether to end the
    /// stream (the agent was stopped).
    Stopped {
        errors: Vec<Value>,
        end: bool,
    },
}

/// One upstream request (a POST, or the GET stream) and what it is waiting for.
struct Exchange {
    gw: Arc<Gateway>,
    target: Target,
    session: Arc<McpSession>,
    /// Not in the session table: this exchange owns the session and closes it.
    transient: bool,
    session_id: Option<String>,
    /// Decides as the credential of the client request that opened this exchange.
    gate: EmbeddedGate,
    /// The headers the request went with, for what the gateway sends upstream itself
    /// (cancellations, refusals of server requests) in the same session.
    headers: HeaderMap,
    /// The client requests this exchange carried.
    own: HashSet<IdKey>,
    tick: tokio::time::Interval,
    /// The server's GET stream: watched for a stop even with nothing in flight.
    is_get: bool,
    /// Until the answer is handed to the client's connection: fires (as an error) if
    /// the client hangs up first.
    client: Option<Client>,
}

/// Resolves when the client's request is over: `Ok` once its answer was handed over,
/// `Err` if the client hung up first.
type Client = tokio::sync::oneshot::Receiver<()>;

impl Exchange {
    fn new(
        gw: Arc<Gateway>,
        target: Target,
        session: Arc<McpSession>,
        gate: EmbeddedGate,
        headers: HeaderMap,
        own: HashSet<IdKey>,
    ) -> Self {
        let mut tick = tokio::time::interval(STOP_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            gw,
            target,
            session,
            transient: false,
            session_id: None,
            gate,
            headers,
            own,
            tick,
            is_get: false,
            client: None,
        }
    }

    fn unsettled(&self) -> bool {
        self.own.iter().any(|k| self.session.in_flight(k))
    }

    /// The exchange is over: a session only it knew is closed.
    fn end(&self) {
        if self.transient {
            self.session.close();
        }
    }

    /// Runs `fut`, checking every tick whether the agent was stopped, a request ran out
    /// of time, or the client (if given) hung up.
    ///
    /// Cancel safety: only `fut` may be dropped half-way; a sweep, once started, settles
    /// and records what it stopped before this returns.
    async fn watched<F: Future>(
        &mut self,
        mut fut: Pin<&mut F>,
        client: Option<&mpsc::Sender<Bytes>>,
    ) -> Watched<F::Output> {
        loop {
            let watching = self.is_get || self.unsettled();
            let waiting_on_client = self.client.is_some();
            let request = &mut self.client;
            tokio::select! {
                out = fut.as_mut() => return Watched::Done(out),
                left = async {
                    match request.as_mut() {
                        Some(c) => c.await,
                        None => std::future::pending().await,
                    }
                }, if waiting_on_client => {
                    self.client = None;
                    if left.is_err() {
                        return Watched::ClientGone;
                    }
                }
                _ = self.tick.tick(), if watching => {
                    if client.is_some_and(mpsc::Sender::is_closed) {
                        return Watched::ClientGone;
                    }
                    let emits = self.session.sweep(&self.gate, Some(&self.own)).await;
                    let end = self.session.stopped().is_some();
                    let errors = self.route(emits);
                    if end || !errors.is_empty() {
                        return Watched::Stopped { errors, end };
                    }
                }
            }
        }
    }

    /// Sends what is meant for the server, returns what is meant for the client.
    fn route(&self, emits: Vec<Emit>) -> Vec<Value> {
        let mut to_client = Vec::new();
        let mut to_server = Vec::new();
        for e in emits {
            match e {
                Emit::ToClient(v) => to_client.push(v),
                Emit::ToServer(v) => to_server.push(v),
            }
        }
        for v in to_server {
            self.post_upstream(v);
        }
        to_client
    }

    /// Whatever of this exchange is still unanswered will not be: permitted calls get
    /// `status`, the client an error per request.
    async fn finish(&mut self, status: &'static str, why: &str, cancel: bool) -> Vec<Value> {
        let emits = self
            .session
            .finish_all(Some(&self.own), status, why, cancel)
            .await;
        self.route(emits)
    }

    /// The client, and the headers of this exchange with an assertion of its own (the
    /// request's may have expired since), for what the gateway sends upstream itself.
    fn own_request(&self) -> Option<(reqwest::Client, HeaderMap)> {
        // Set by `stamp`, never taken from the client.
        let agent = header_str(&self.headers, "x-agent-id").unwrap_or_default();
        let prepared =
            self.gw
                .app
                .upstream
                .for_request(&self.target.name, &self.target.url, agent, None);
        match prepared {
            Ok((http, assertion)) => {
                let mut headers = self.headers.clone();
                headers.insert(ASSERTION_HEADER, assertion);
                Some((http, headers))
            }
            Err(e) => {
                tracing::warn!(error = %e, server = %self.target.name, "cannot send upstream");
                None
            }
        }
    }

    /// Sends one message upstream in this session, in the background: the client's
    /// answer must not wait on a server that may be stuck.
    fn post_upstream(&self, msg: Value) {
        let Some((http, mut headers)) = self.own_request() else {
            return;
        };
        headers.remove("last-event-id");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Some(s) = self
            .session_id
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            headers.insert(HeaderName::from_static(MCP_SESSION_ID), s);
        }
        let url = self.target.url.clone();
        let bytes = serde_json::to_vec(&msg).unwrap_or_default();
        tokio::spawn(async move {
            let res = http
                .post(&url)
                .headers(headers)
                .body(bytes)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %error_chain(&e), "could not send a message upstream");
            }
        });
    }

    /// Ends the upstream session (it could not be bound here).
    fn delete_upstream(&self) {
        let (Some((http, mut headers)), Some(sid)) = (self.own_request(), self.session_id.clone())
        else {
            return;
        };
        let url = self.target.url.clone();
        if let Ok(v) = HeaderValue::from_str(&sid) {
            headers.insert(HeaderName::from_static(MCP_SESSION_ID), v);
        }
        tokio::spawn(async move {
            let _ = http
                .delete(&url)
                .headers(headers)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
        });
    }

    /// Looks at one message or batch from upstream through the engine.
    async fn inspect_payload(&mut self, v: Value) -> Inspected {
        let (items, batch) = match v {
            Value::Array(items) => (items, true),
            one => (vec![one], false),
        };
        let mut kept = Vec::with_capacity(items.len());
        let mut changed = false;
        let n = items.len();
        for m in items {
            let step = match self.session.admit_server(m) {
                Admit::Now(s) => s,
                Admit::Later(p) => self.session.finish(&self.gate, p).await,
            };
            match step {
                Step::Pass(m) => kept.push(m),
                Step::Changed(m) => {
                    changed = true;
                    kept.push(m);
                }
                Step::Reply(r) => {
                    // A server request refused: the server hears it, the client never.
                    self.post_upstream(r);
                    changed = true;
                }
                Step::Drop => changed = true,
            }
        }
        if kept.is_empty() {
            return Inspected::Dropped;
        }
        let out = if batch {
            Value::Array(kept)
        } else {
            kept.pop().unwrap_or(Value::Null)
        };
        if changed || kept_len_differs(n, &out, batch) {
            Inspected::Changed(out)
        } else {
            Inspected::Unchanged(out)
        }
    }

    /// One SSE event from upstream: the bytes to send on, if any. Events that carry no
    /// data (priming events, keep-alives, comments) pass as they came. Data that is not
    /// one JSON message Warden can read whole (unparsable, duplicate keys) is dropped:
    /// passed on uninspected, a lenient client could read an answer out of it that
    /// Warden never saw.
    async fn pass_event(&mut self, ev: sse::Event) -> Option<Bytes> {
        let Some(data) = ev.data.as_deref().filter(|d| !d.trim().is_empty()) else {
            return Some(Bytes::from(ev.raw));
        };
        let bytes = data.as_bytes();
        let parsed = match sanitize(bytes) {
            Some(clean) => warden_core::json::from_slice_strict(&clean),
            None => warden_core::json::from_slice_strict(bytes),
        };
        let v = match parsed {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(server = %self.target.name, error = %e, "dropped an unreadable event from the MCP server");
                self.session.note_rejected_frame();
                return None;
            }
        };
        match self.inspect_payload(v).await {
            Inspected::Unchanged(_) => Some(Bytes::from(ev.raw)),
            Inspected::Changed(v) => Some(Bytes::from(ev.with_data(&v.to_string()))),
            Inspected::Dropped => None,
        }
    }
}

fn kept_len_differs(n: usize, out: &Value, batch: bool) -> bool {
    batch && out.as_array().map_or(0, Vec::len) != n
}

/// The client's side of a stream. A client that went away is noted: what it asked is
/// then cancelled upstream, as on stdio.
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
async fn pump_sse(mut ex: Exchange, mut resp: reqwest::Response, mut out: Out, first: Vec<Value>) {
    out.messages(first).await;
    let mut parser = sse::Parser::new(MAX_SERVER_MESSAGE);
    loop {
        // A POST's stream has served its purpose once everything it carried is settled
        // (answered, or cancelled). A client that left has its requests cancelled.
        if out.gone {
            let gone = ex.finish("cancelled", "client disconnected", true).await;
            drop(gone);
            break;
        }
        if !ex.is_get && !ex.unsettled() {
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
                    let why = format!("MCP server `{}` sent a broken stream: {e}", ex.target.name);
                    let errors = ex.finish("upstream-failed", &why, false).await;
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
                    ex.target.name
                );
                let errors = ex.finish("upstream-failed", &why, false).await;
                out.messages(errors).await;
                break;
            }
            Watched::Done(Err(e)) => {
                let why = format!(
                    "MCP server `{}` stream failed: {}",
                    ex.target.name,
                    error_chain(&e)
                );
                let errors = ex.finish("upstream-failed", &why, false).await;
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
    ex.end();
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
            ("x-agent_id", "someone-else"),
            ("x-forwarded-for", "10.0.0.1"),
            ("warden-assertion", "forged"),
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
        assert_eq!(GatewayError::UnknownSession.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            GatewayError::SessionsFull.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn reply_bodies_keep_the_clients_shape() {
        assert_eq!(reply_body(vec![json!(1)], false), json!(1));
        assert_eq!(reply_body(vec![json!(1)], true), json!([1]));
        assert_eq!(reply_body(vec![json!(1), json!(2)], false), json!([1, 2]));
    }
}
