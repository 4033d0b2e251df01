//! The governed stdio proxy: an MCP server to the client on one pair of pipes, an MCP
//! client to the real server on another, and Warden's decision in front of every
//! `tools/call`.
//!
//! Messages pass through byte for byte unless the proxy must act on them:
//! - a `tools/call` is decided first; a denied one is answered by the proxy with an error
//!   result and never reaches the server; a permitted one is forwarded with the call's
//!   `traceparent` and `baggage` in `params._meta`, and its response is recorded as the
//!   call's outcome;
//! - a `tools/list` response is filtered to the tools the agent could ever call;
//! - a response to an id that was never asked is dropped, so a server cannot answer a
//!   call Warden denied, nor a client a request the server never made.
//!
//! INVARIANT: a `tools/call` reaches the server only after the gate permitted it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::gate::{Gate, Outcome};
use crate::message::{
    classify, error_response, id_key, into_messages, meta_mut, parse_frame, FrameError, Kind,
    CALL_CANCELLED, CALL_TIMED_OUT, UPSTREAM_UNAVAILABLE,
};
use crate::tools::{
    denied_result, filter_tools_list, forward_arguments, resolve_call_paths, tool_call_of,
    trace_headers, ToolMap,
};

#[derive(Debug, Clone)]
pub struct Options {
    pub map: ToolMap,
    /// Largest frame accepted from either side.
    pub max_frame: usize,
    /// Filter `tools/list` to the tools the agent could ever be permitted.
    pub filter_tools: bool,
    /// A permitted call with no answer after this long is cancelled.
    pub call_timeout: Duration,
    /// How often to ask whether the agent was stopped while calls are in flight.
    pub stop_poll: Duration,
    /// Arguments that name local files, resolved before policy sees them.
    pub resolve_paths: Vec<String>,
    /// What relative paths are relative to: the server's working directory.
    pub path_base: std::path::PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            map: ToolMap::default(),
            max_frame: 4 * 1024 * 1024,
            filter_tools: true,
            call_timeout: Duration::from_secs(300),
            stop_poll: Duration::from_millis(200),
            resolve_paths: Vec::new(),
            path_base: std::path::PathBuf::from("/"),
        }
    }
}

/// Why the proxy stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The client closed its input.
    ClientClosed,
    /// The server closed its output (exited or crashed).
    ServerClosed,
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

struct InFlight {
    id: Value,
    call_id: String,
    agent_id: String,
    started: Instant,
}

#[derive(Default)]
struct State {
    /// Permitted `tools/call`s awaiting the server's answer, by request id.
    calls: HashMap<String, InFlight>,
    /// Every client request forwarded to the server and not yet answered.
    client_requests: HashSet<String>,
    /// Every server request forwarded to the client and not yet answered.
    server_requests: HashSet<String>,
    /// `tools/list` requests whose responses are to be filtered.
    tool_lists: HashSet<String>,
    stats: Stats,
    closing: bool,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    // A poisoned lock only means another task panicked mid-update; the bookkeeping is
    // still the best we have, and refusing to go on would hang the client.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one newline-delimited frame of at most `limit` bytes. `Ok(None)` at end of input;
/// an oversized frame is consumed to its end and reported.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<Result<(), FrameError>>> {
    buf.clear();
    let mut seen = 0usize;
    let mut too_large = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            // At the end of input the last frame has no newline: its `limit + 1` slack
            // (kept for the newline) must not let one byte too many through.
            return Ok(if seen == 0 {
                None
            } else if too_large || buf.len() > limit {
                Some(Err(FrameError::TooLarge(seen, limit)))
            } else {
                Some(Ok(()))
            });
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        seen += take;
        if !too_large {
            if buf.len() + take > limit + 1 {
                too_large = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            if too_large {
                return Ok(Some(Err(FrameError::TooLarge(seen, limit))));
            }
            while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                buf.pop();
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                // Blank lines carry nothing; skip them.
                buf.clear();
                seen = 0;
                continue;
            }
            return Ok(Some(Ok(())));
        }
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The frame to pass on: the original bytes if nothing was changed (byte-for-byte
/// passthrough), else the remaining messages re-serialized; `None` if none remain.
fn reframe(
    original: &[u8],
    mut forward: Vec<Value>,
    modified: bool,
    is_batch: bool,
) -> Option<Vec<u8>> {
    if forward.is_empty() {
        None
    } else if !modified {
        let mut b = Vec::with_capacity(original.len() + 1);
        b.extend_from_slice(original);
        b.push(b'\n');
        Some(b)
    } else if is_batch {
        Some(line(&Value::Array(forward)))
    } else {
        Some(line(&forward.remove(0)))
    }
}

async fn writer<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// Runs the proxy until one side closes. The caller owns the server process.
pub async fn run<G, CR, CW, SR, SW>(
    gate: Arc<G>,
    opts: Options,
    client_in: CR,
    client_out: CW,
    server_out: SR,
    server_in: SW,
) -> (Exit, Stats)
where
    G: Gate,
    CR: AsyncBufRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    SR: AsyncBufRead + Unpin + Send + 'static,
    SW: AsyncWrite + Unpin + Send + 'static,
{
    let (to_client, client_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (to_server, server_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let client_writer = tokio::spawn(writer(client_out, client_rx));
    let server_writer = tokio::spawn(writer(server_in, server_rx));
    let state: Shared = Arc::new(Mutex::new(State::default()));
    let opts = Arc::new(opts);

    let watcher = tokio::spawn(watch_in_flight(
        gate.clone(),
        opts.clone(),
        state.clone(),
        to_client.clone(),
        to_server.clone(),
    ));
    let mut from_client = tokio::spawn(client_loop(
        gate.clone(),
        opts.clone(),
        state.clone(),
        client_in,
        to_client.clone(),
        to_server.clone(),
    ));
    let (outcomes, outcomes_rx) = mpsc::unbounded_channel::<Outcome>();
    let recorder = tokio::spawn(record_outcomes(gate.clone(), outcomes_rx));
    let mut from_server = tokio::spawn(server_loop(
        gate.clone(),
        opts.clone(),
        state.clone(),
        server_out,
        to_client.clone(),
        outcomes,
    ));

    let exit = tokio::select! {
        _ = &mut from_client => Exit::ClientClosed,
        _ = &mut from_server => Exit::ServerClosed,
    };
    lock(&state).closing = true;
    watcher.abort();
    // Settle every call still in flight: the server is told to stop working on it, the
    // client (if still there) gets an error, and the audit trail gets its outcome.
    let orphans: Vec<InFlight> = {
        let mut st = lock(&state);
        let calls: Vec<(String, InFlight)> = st.calls.drain().collect();
        for (k, _) in &calls {
            st.client_requests.remove(k);
        }
        calls.into_iter().map(|(_, c)| c).collect()
    };
    for c in orphans {
        let why = match exit {
            Exit::ClientClosed => "client disconnected",
            Exit::ServerClosed => "MCP server exited",
        };
        let _ = to_server.send(line(&json!({
            "jsonrpc": "2.0", "method": "notifications/cancelled", "params": { "requestId": c.id, "reason": why }
        })));
        let _ = to_client.send(line(&error_response(
            &c.id,
            UPSTREAM_UNAVAILABLE,
            format!("tool call ended: {why}"),
        )));
        lock(&state).stats.calls_cancelled += 1;
        gate.outcome(Outcome {
            call_id: c.call_id,
            agent_id: c.agent_id,
            status: if exit == Exit::ClientClosed {
                "cancelled"
            } else {
                "upstream-failed"
            },
            output: None,
            duration_ns: c.started.elapsed().as_nanos() as u64,
        })
        .await;
    }
    if exit == Exit::ServerClosed {
        // Every other request the client is waiting on will never be answered.
        let pending: Vec<String> = lock(&state).client_requests.drain().collect();
        for key in pending {
            if let Ok(id) = serde_json::from_str::<Value>(&key) {
                let _ = to_client.send(line(&error_response(
                    &id,
                    UPSTREAM_UNAVAILABLE,
                    "MCP server exited",
                )));
            }
        }
    }
    from_client.abort();
    from_server.abort();
    // The server loop's end drops the recorder's last sender; let it finish writing.
    let _ = tokio::time::timeout(Duration::from_secs(10), recorder).await;
    drop(to_client);
    drop(to_server);
    let _ = tokio::time::timeout(Duration::from_secs(2), client_writer).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server_writer).await;
    let stats = lock(&state).stats.clone();
    (exit, stats)
}

async fn client_loop<G: Gate, R: AsyncBufRead + Unpin>(
    gate: Arc<G>,
    opts: Arc<Options>,
    state: Shared,
    mut input: R,
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    to_server: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut buf = Vec::new();
    loop {
        let frame = match read_frame(&mut input, &mut buf, opts.max_frame).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        let parsed = frame.and_then(|_| parse_frame(&buf, opts.max_frame));
        let (value, is_batch) = match parsed {
            Ok(v) => v,
            Err(e) => {
                lock(&state).stats.frames_rejected += 1;
                let _ =
                    to_client.send(line(&error_response(&Value::Null, e.code(), e.to_string())));
                continue;
            }
        };
        let items = into_messages(value);
        let mut forward = Vec::with_capacity(items.len());
        let mut modified = is_batch;
        for mut msg in items {
            let kind = match classify(&msg) {
                Ok(k) => k,
                Err(e) => {
                    lock(&state).stats.frames_rejected += 1;
                    let id = msg
                        .get("id")
                        .filter(|i| i.is_string() || i.is_number())
                        .cloned()
                        .unwrap_or(Value::Null);
                    let _ = to_client.send(line(&error_response(&id, e.code(), e.to_string())));
                    modified = true;
                    continue;
                }
            };
            match kind {
                Kind::Request { id, method } if method == "tools/call" => {
                    match decide(gate.as_ref(), &opts, &state, &id, &mut msg).await {
                        Some(reply) => {
                            let _ = to_client.send(line(&reply));
                            modified = true;
                            continue;
                        }
                        None => modified = true,
                    }
                    lock(&state).client_requests.insert(id_key(&id));
                }
                Kind::Request { id, method } => {
                    let mut st = lock(&state);
                    st.client_requests.insert(id_key(&id));
                    if method == "tools/list" && opts.filter_tools {
                        st.tool_lists.insert(id_key(&id));
                    }
                }
                Kind::Response { id } => {
                    if !lock(&state).server_requests.remove(&id_key(&id)) {
                        tracing::warn!(id = %id, "client answered a request the server never made; dropped");
                        lock(&state).stats.responses_dropped += 1;
                        modified = true;
                        continue;
                    }
                }
                Kind::Notification { method } if method == "tools/call" => {
                    // A call without an id gets no answer, but a server might still run
                    // it: it is not forwarded, so nothing runs undecided.
                    tracing::warn!("dropped a tools/call sent as a notification (it has no id)");
                    lock(&state).stats.frames_rejected += 1;
                    modified = true;
                    continue;
                }
                Kind::Notification { method } => {
                    if method == "notifications/cancelled" {
                        // The client gave up on a call: it is no longer ours to settle.
                        if let Some(rid) = msg.pointer("/params/requestId") {
                            let key = id_key(rid);
                            let call = {
                                let mut st = lock(&state);
                                st.client_requests.remove(&key);
                                st.calls.remove(&key)
                            };
                            if let Some(c) = call {
                                gate.outcome(Outcome {
                                    call_id: c.call_id,
                                    agent_id: c.agent_id,
                                    status: "cancelled",
                                    output: None,
                                    duration_ns: c.started.elapsed().as_nanos() as u64,
                                })
                                .await;
                            }
                        }
                    }
                }
            }
            forward.push(msg);
        }
        let Some(bytes) = reframe(&buf, forward, modified, is_batch) else {
            continue;
        };
        if to_server.send(bytes).is_err() {
            return;
        }
    }
}

/// Decides a `tools/call`. Returns the reply for the client if the call is denied; if it
/// is permitted, stamps the trace context into the message and tracks the call.
async fn decide<G: Gate>(
    gate: &G,
    opts: &Options,
    state: &Shared,
    id: &Value,
    msg: &mut Value,
) -> Option<Value> {
    let Some((name, mut call)) = tool_call_of(&opts.map, msg) else {
        lock(state).stats.frames_rejected += 1;
        return Some(error_response(id, -32602, "tools/call needs `params.name`"));
    };
    // Policy judges the resolved paths, and the server gets what policy judged.
    let resolved = resolve_call_paths(&mut call, &opts.resolve_paths, Some(&opts.path_base));
    let verdict = gate.check(call).await;
    if !verdict.permit {
        lock(state).stats.calls_denied += 1;
        return Some(denied_result(id, &name, &verdict));
    }
    if let Some(args) = resolved {
        forward_arguments(msg, args);
    }
    let (traceparent, baggage) = trace_headers(&verdict);
    if let Some(m) = meta_mut(msg) {
        m.insert("traceparent".into(), Value::String(traceparent));
        m.insert("baggage".into(), Value::String(baggage));
    }
    let mut st = lock(state);
    st.stats.calls_permitted += 1;
    st.calls.insert(
        id_key(id),
        InFlight {
            id: id.clone(),
            call_id: verdict.call_id,
            agent_id: verdict.agent_id,
            started: Instant::now(),
        },
    );
    None
}

async fn server_loop<G: Gate, R: AsyncBufRead + Unpin>(
    gate: Arc<G>,
    opts: Arc<Options>,
    state: Shared,
    mut input: R,
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let mut buf = Vec::new();
    loop {
        let frame = match read_frame(&mut input, &mut buf, opts.max_frame).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        let (value, is_batch) = match frame.and_then(|_| parse_frame(&buf, opts.max_frame)) {
            Ok(v) => v,
            Err(e) => {
                // Garbage from the server is not passed on: the client could not use it.
                tracing::warn!(error = %e, "dropped an unreadable frame from the MCP server");
                lock(&state).stats.frames_rejected += 1;
                continue;
            }
        };
        let items = into_messages(value);
        let mut forward = Vec::with_capacity(items.len());
        let mut modified = is_batch;
        for mut msg in items {
            match classify(&msg) {
                Ok(Kind::Response { id }) => {
                    let key = id_key(&id);
                    let (asked, call, filter) = {
                        let mut st = lock(&state);
                        (
                            st.client_requests.remove(&key),
                            st.calls.remove(&key),
                            st.tool_lists.remove(&key),
                        )
                    };
                    if !asked {
                        tracing::warn!(id = %id, "MCP server answered a request that was never forwarded; dropped");
                        lock(&state).stats.responses_dropped += 1;
                        modified = true;
                        continue;
                    }
                    if let Some(c) = call {
                        let is_error = msg.get("error").is_some()
                            || msg.pointer("/result/isError").and_then(Value::as_bool)
                                == Some(true);
                        let output = msg.get("result").or_else(|| msg.get("error")).cloned();
                        // Recorded beside the response, not before it: the decision was
                        // durable before the call ran, and a second fsync on the way back
                        // would double the proxy's latency. `run` waits for the recorder.
                        let _ = outcomes.send(Outcome {
                            call_id: c.call_id,
                            agent_id: c.agent_id,
                            status: if is_error { "error" } else { "ok" },
                            output,
                            duration_ns: c.started.elapsed().as_nanos() as u64,
                        });
                    }
                    if filter {
                        // Asked afresh for every list (scopes and kill switches change);
                        // if the agent's standing cannot be read, it is offered nothing.
                        let visible = gate.visible_actions().await.unwrap_or_default();
                        if filter_tools_list(&mut msg, &opts.map, &visible) > 0 {
                            modified = true;
                        }
                    }
                }
                Ok(Kind::Request { id, .. }) => {
                    lock(&state).server_requests.insert(id_key(&id));
                }
                Ok(Kind::Notification { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "dropped an invalid message from the MCP server");
                    lock(&state).stats.frames_rejected += 1;
                    modified = true;
                    continue;
                }
            }
            forward.push(msg);
        }
        let Some(bytes) = reframe(&buf, forward, modified, is_batch) else {
            continue;
        };
        if to_client.send(bytes).is_err() {
            return;
        }
    }
}

/// Records outcomes in the order the server answered.
async fn record_outcomes<G: Gate>(gate: Arc<G>, mut rx: mpsc::UnboundedReceiver<Outcome>) {
    while let Some(o) = rx.recv().await {
        gate.outcome(o).await;
    }
}

/// While calls are in flight: cancel them if the agent is stopped or they run too long.
async fn watch_in_flight<G: Gate>(
    gate: Arc<G>,
    opts: Arc<Options>,
    state: Shared,
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    to_server: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut tick = tokio::time::interval(opts.stop_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let busy = {
            let st = lock(&state);
            !st.calls.is_empty() && !st.closing
        };
        if !busy {
            continue;
        }
        let stopped = gate.stopped().await;
        let victims: Vec<(InFlight, String, i64)> = {
            let mut st = lock(&state);
            let keys: Vec<String> = st
                .calls
                .iter()
                .filter(|(_, c)| stopped.is_some() || c.started.elapsed() >= opts.call_timeout)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| {
                    st.client_requests.remove(&k);
                    st.calls.remove(&k)
                })
                .map(|c| match &stopped {
                    Some(why) => (c, format!("agent stopped: {why}"), CALL_CANCELLED),
                    None => (
                        c,
                        format!("no answer within {}s", opts.call_timeout.as_secs()),
                        CALL_TIMED_OUT,
                    ),
                })
                .collect()
        };
        for (c, why, code) in victims {
            let _ = to_server.send(line(&json!({
                "jsonrpc": "2.0", "method": "notifications/cancelled", "params": { "requestId": c.id, "reason": why }
            })));
            lock(&state).stats.calls_cancelled += 1;
            // Recorded before the client hears of it, so the outcome is durable even if
            // the client hangs up at once.
            gate.outcome(Outcome {
                call_id: c.call_id,
                agent_id: c.agent_id,
                status: if code == CALL_TIMED_OUT {
                    "timeout"
                } else {
                    "cancelled"
                },
                output: None,
                duration_ns: c.started.elapsed().as_nanos() as u64,
            })
            .await;
            let _ = to_client.send(line(&error_response(
                &c.id,
                code,
                format!("tool call cancelled by Warden: {why}"),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{ToolCall, Verdict};
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{duplex, AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

    #[derive(Default)]
    struct FakeGate {
        checked: Mutex<Vec<String>>,
        outcomes: Mutex<Vec<(String, &'static str)>>,
        stopped: AtomicBool,
    }

    impl Gate for FakeGate {
        async fn check(&self, call: ToolCall) -> Verdict {
            let n = {
                let mut c = self.checked.lock().unwrap();
                c.push(call.action.clone());
                c.len()
            };
            let permit =
                !call.action.ends_with("forbidden") && !self.stopped.load(Ordering::SeqCst);
            Verdict {
                permit,
                reason: if permit {
                    "PERMITTED".into()
                } else {
                    "TOOL_NOT_PERMITTED".into()
                },
                rules: vec!["r".into()],
                message: "m".into(),
                call_id: format!("call-{n}"),
                trace_id: call
                    .trace_id
                    .unwrap_or_else(|| "4bf92f3577b34da6a3ce929d0e0e4736".into()),
                span_id: "00f067aa0ba902b7".into(),
                agent_id: "agent-1".into(),
            }
        }
        async fn outcome(&self, o: Outcome) {
            self.outcomes.lock().unwrap().push((o.call_id, o.status));
        }
        async fn stopped(&self) -> Option<String> {
            self.stopped
                .load(Ordering::SeqCst)
                .then(|| "kill switch".to_owned())
        }
        async fn visible_actions(&self) -> Option<HashSet<String>> {
            Some(["srv/echo".to_string()].into())
        }
    }

    struct Harness {
        gate: Arc<FakeGate>,
        client_tx: DuplexStream,
        client_rx: Lines<BufReader<DuplexStream>>,
        server_tx: DuplexStream,
        server_rx: Lines<BufReader<DuplexStream>>,
        task: tokio::task::JoinHandle<(Exit, Stats)>,
    }

    fn start(opts: Options) -> Harness {
        let gate = Arc::new(FakeGate::default());
        let (client_tx, proxy_client_in) = duplex(1 << 20);
        let (proxy_client_out, client_rx) = duplex(1 << 20);
        let (server_tx, proxy_server_out) = duplex(1 << 20);
        let (proxy_server_in, server_rx) = duplex(1 << 20);
        let task = tokio::spawn(run(
            gate.clone(),
            Options {
                map: ToolMap::new("srv", Default::default()),
                ..opts
            },
            BufReader::new(proxy_client_in),
            proxy_client_out,
            BufReader::new(proxy_server_out),
            proxy_server_in,
        ));
        Harness {
            gate,
            client_tx,
            client_rx: BufReader::new(client_rx).lines(),
            server_tx,
            server_rx: BufReader::new(server_rx).lines(),
            task,
        }
    }

    async fn send(w: &mut DuplexStream, v: Value) {
        w.write_all(&line(&v)).await.unwrap();
    }

    async fn recv(r: &mut Lines<BufReader<DuplexStream>>) -> Value {
        let l = tokio::time::timeout(Duration::from_secs(5), r.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_str(&l).unwrap()
    }

    fn call(id: i64, tool: &str) -> Value {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":{"x":1},"_meta":{"rationale":"because"}}})
    }

    #[tokio::test]
    async fn permitted_call_is_forwarded_traced_and_its_outcome_recorded() {
        let mut h = start(Options::default());
        send(&mut h.client_tx, call(1, "echo")).await;
        let fwd = recv(&mut h.server_rx).await;
        assert_eq!(fwd["params"]["name"], "echo");
        assert_eq!(
            fwd["params"]["_meta"]["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(fwd["params"]["_meta"]["baggage"]
            .as_str()
            .unwrap()
            .contains("warden.agent_id=agent-1"));
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}),
        )
        .await;
        let resp = recv(&mut h.client_rx).await;
        assert_eq!(resp["result"]["content"][0]["text"], "hi");
        // The outcome is recorded beside the response; closing the session waits for it.
        drop(h.client_tx);
        h.task.await.unwrap();
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "ok")]
        );
        assert_eq!(
            *h.gate.checked.lock().unwrap(),
            vec!["srv/echo".to_string()]
        );
    }

    #[tokio::test]
    async fn denied_call_never_reaches_the_server_and_a_forged_answer_is_dropped() {
        let mut h = start(Options::default());
        send(&mut h.client_tx, call(7, "forbidden")).await;
        let resp = recv(&mut h.client_rx).await;
        assert_eq!(resp["id"], 7);
        assert_eq!(resp["result"]["isError"], true);
        assert!(resp["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("TOOL_NOT_PERMITTED"));
        // the server tries to answer the denied call anyway: dropped
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":7,"result":{"content":[]}}),
        )
        .await;
        // a ping passes through untouched, and is the next thing the server sees
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":8,"method":"ping"}),
        )
        .await;
        let fwd = recv(&mut h.server_rx).await;
        assert_eq!(fwd["method"], "ping");
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":8,"result":{}}),
        )
        .await;
        let resp = recv(&mut h.client_rx).await;
        assert_eq!(
            resp["id"], 8,
            "the forged answer to 7 must not reach the client"
        );
        drop(h.client_tx);
        let (exit, stats) = h.task.await.unwrap();
        assert_eq!(exit, Exit::ClientClosed);
        assert_eq!((stats.calls_denied, stats.responses_dropped), (1, 1));
    }

    #[tokio::test]
    async fn tools_list_is_filtered_to_what_the_agent_may_call() {
        let mut h = start(Options::default());
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"l","method":"tools/list"}),
        )
        .await;
        recv(&mut h.server_rx).await;
        send(&mut h.server_tx, json!({"jsonrpc":"2.0","id":"l","result":{"tools":[{"name":"echo"},{"name":"forbidden"}]}})).await;
        let resp = recv(&mut h.client_rx).await;
        assert_eq!(resp["result"]["tools"], json!([{"name":"echo"}]));
    }

    #[tokio::test]
    async fn bad_frames_get_errors_and_the_proxy_keeps_going() {
        let mut h = start(Options {
            max_frame: 1024,
            ..Options::default()
        });
        h.client_tx.write_all(b"{not json\n").await.unwrap();
        assert_eq!(recv(&mut h.client_rx).await["error"]["code"], -32700);
        h.client_tx
            .write_all(format!("{}\n", "x".repeat(5000)).as_bytes())
            .await
            .unwrap();
        assert_eq!(recv(&mut h.client_rx).await["error"]["code"], -32600);
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"1.0","id":3,"method":"x"}),
        )
        .await;
        let e = recv(&mut h.client_rx).await;
        assert_eq!(
            (e["id"].clone(), e["error"]["code"].clone()),
            (json!(3), json!(-32600))
        );
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{}}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["error"]["code"], -32602);
        // unknown methods pass through: the server answers them
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":5,"method":"no/such"}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["method"], "no/such");
        assert!(h.gate.checked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_kill_cancels_the_call_in_flight() {
        let mut h = start(Options {
            stop_poll: Duration::from_millis(20),
            ..Options::default()
        });
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        h.gate.stopped.store(true, Ordering::SeqCst);
        let cancel = recv(&mut h.server_rx).await;
        assert_eq!(cancel["method"], "notifications/cancelled");
        assert_eq!(cancel["params"]["requestId"], 1);
        let err = recv(&mut h.client_rx).await;
        assert_eq!(
            (err["id"].clone(), err["error"]["code"].clone()),
            (json!(1), json!(CALL_CANCELLED))
        );
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "cancelled")]
        );
        // a late answer from the server is dropped; the next call is denied
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{}}),
        )
        .await;
        send(&mut h.client_tx, call(2, "echo")).await;
        let resp = recv(&mut h.client_rx).await;
        assert_eq!(
            (resp["id"].clone(), resp["result"]["isError"].clone()),
            (json!(2), json!(true))
        );
    }

    #[tokio::test]
    async fn a_hanging_server_times_out_and_a_crashing_one_answers_every_waiter() {
        let mut h = start(Options {
            call_timeout: Duration::from_millis(100),
            stop_poll: Duration::from_millis(20),
            ..Options::default()
        });
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        let err = recv(&mut h.client_rx).await;
        assert_eq!(err["error"]["code"], CALL_TIMED_OUT);
        assert_eq!(
            recv(&mut h.server_rx).await["method"],
            "notifications/cancelled"
        );
        assert_eq!(h.gate.outcomes.lock().unwrap()[0].1, "timeout");

        send(&mut h.client_tx, call(2, "echo")).await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":3,"method":"resources/list"}),
        )
        .await;
        recv(&mut h.server_rx).await;
        recv(&mut h.server_rx).await;
        drop(h.server_tx); // the server crashes
        let mut ids = vec![
            recv(&mut h.client_rx).await["id"].clone(),
            recv(&mut h.client_rx).await["id"].clone(),
        ];
        ids.sort_by_key(|v| v.as_i64());
        assert_eq!(ids, vec![json!(2), json!(3)]);
        let (exit, _) = h.task.await.unwrap();
        assert_eq!(exit, Exit::ServerClosed);
        assert_eq!(
            h.gate.outcomes.lock().unwrap()[1],
            ("call-2".to_string(), "upstream-failed")
        );
    }

    #[tokio::test]
    async fn a_client_leaving_mid_call_cancels_it_upstream() {
        let mut h = start(Options::default());
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        drop(h.client_tx);
        let cancel = recv(&mut h.server_rx).await;
        assert_eq!(cancel["method"], "notifications/cancelled");
        let (exit, _) = h.task.await.unwrap();
        assert_eq!(exit, Exit::ClientClosed);
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "cancelled")]
        );
    }

    #[tokio::test]
    async fn server_requests_and_client_answers_pass_through() {
        let mut h = start(Options::default());
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":"s1","method":"roots/list"}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["method"], "roots/list");
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"s1","result":{"roots":[]}}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["id"], "s1");
        // an answer to a request the server never made is dropped
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"s9","result":{}}),
        )
        .await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        )
        .await;
        assert_eq!(
            recv(&mut h.server_rx).await["method"],
            "notifications/initialized"
        );
    }

    #[tokio::test]
    async fn a_tools_call_without_an_id_is_never_forwarded() {
        let mut h = start(Options::default());
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","method":"tools/call","params":{"name":"echo","arguments":{}}}),
        )
        .await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":1,"method":"ping"}),
        )
        .await;
        assert_eq!(
            recv(&mut h.server_rx).await["method"],
            "ping",
            "the id-less call was dropped"
        );
        assert!(h.gate.checked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn batches_are_split_between_denied_and_forwarded() {
        let mut h = start(Options::default());
        send(
            &mut h.client_tx,
            json!([call(1, "forbidden"), call(2, "echo")]),
        )
        .await;
        let denied = recv(&mut h.client_rx).await;
        assert_eq!(denied["id"], 1);
        let fwd = recv(&mut h.server_rx).await;
        assert_eq!(fwd.as_array().unwrap().len(), 1);
        assert_eq!(fwd[0]["id"], 2);
    }

    /// Regression (found by fuzzing): a last frame without a newline could be one byte
    /// over the limit.
    #[tokio::test]
    async fn a_final_unterminated_frame_respects_the_limit() {
        let mut r = tokio::io::BufReader::new(&b"{}x"[..]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut r, &mut buf, 2).await.unwrap(),
            Some(Err(FrameError::TooLarge(3, 2)))
        ));
        let mut r = tokio::io::BufReader::new(&b"{}"[..]);
        assert!(matches!(
            read_frame(&mut r, &mut buf, 2).await.unwrap(),
            Some(Ok(()))
        ));
        assert_eq!(buf, b"{}");
    }

    proptest::proptest! {
        /// Whatever bytes the client sends, the proxy answers or forwards without
        /// panicking, and no tools/call reaches the server unless the gate saw it.
        #[test]
        fn arbitrary_client_bytes(frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), 1..8)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut h = start(Options { max_frame: 128, ..Options::default() });
                for f in &frames {
                    h.client_tx.write_all(f).await.unwrap();
                    h.client_tx.write_all(b"\n").await.unwrap();
                }
                drop(h.client_tx);
                let (exit, _) = h.task.await.unwrap();
                assert_eq!(exit, Exit::ClientClosed);
            });
        }
    }
}
