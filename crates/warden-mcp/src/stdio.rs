//! The governed stdio proxy: an MCP server to the client on one pair of pipes, an MCP
//! client to the real server on another. Framing only: what each message means and what
//! Warden does with it is the session engine's ([`crate::engine`]), shared with the
//! Streamable HTTP gateway.
//!
//! Messages pass through byte for byte unless the engine changed them. Messages that
//! need the gate (decisions, list filters, standing checks) are finished in tasks of
//! their own, so a slow decision never holds up pings, cancellations or other calls.
//!
//! Ends of the session:
//! - the client closes its input: what is in flight is still answered (the server sees
//!   its input close and answers or abandons its requests itself), then the proxy ends;
//! - the client stops reading (its output breaks): everything in flight is cancelled
//!   upstream and recorded as `cancelled`;
//! - the server exits: every request still waiting gets an error, permitted calls are
//!   recorded as `upstream-failed`.
//!
//! INVARIANT: a governed request reaches the server only after the gate permitted it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub use crate::engine::Stats;
use crate::engine::{error_response, Admit, Emit, Rules, Session, Step};
use crate::gate::Gate;
use crate::message::{into_messages, parse_frame, FrameError};
use crate::sniff::{sanitize, Sniffer};

#[derive(Debug, Clone)]
pub struct Options {
    pub rules: Rules,
    /// Largest message accepted from the client.
    pub max_frame: usize,
    /// Largest message accepted from the server (results of file and database servers
    /// are often large).
    pub max_server_frame: usize,
    /// How often to ask whether the agent was stopped while calls are in flight.
    pub stop_poll: Duration,
}

/// The default limit on a client's message.
pub const MAX_CLIENT_MESSAGE: usize = 4 * 1024 * 1024;
/// The default limit on a server's message.
pub const MAX_SERVER_MESSAGE: usize = 32 * 1024 * 1024;

impl Options {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            max_frame: MAX_CLIENT_MESSAGE,
            max_server_frame: MAX_SERVER_MESSAGE,
            stop_poll: Duration::from_millis(200),
        }
    }
}

/// Why the proxy stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The client closed its input (or stopped reading).
    ClientClosed,
    /// The server closed its output (exited or crashed).
    ServerClosed,
}

/// One frame read: its bytes are in the caller's buffer, or it was refused (what the
/// sniffer saw of it says whom to answer).
pub enum Frame {
    Ok,
    Refused(FrameError, Box<Sniffer>),
}

/// Reads one newline-delimited frame of at most `limit` bytes. `Ok(None)` at end of input;
/// an oversized frame is consumed to its end and reported with what its head said.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<Frame>> {
    buf.clear();
    let mut seen = 0usize;
    let mut too_large: Option<Sniffer> = None;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            // At the end of input the last frame has no newline: its `limit + 1` slack
            // (kept for the newline) must not let one byte too many through.
            return Ok(if seen == 0 {
                None
            } else if let Some(s) = too_large {
                Some(Frame::Refused(
                    FrameError::TooLarge(seen, limit),
                    Box::new(s),
                ))
            } else if buf.len() > limit {
                let mut s = Sniffer::default();
                s.feed(buf);
                Some(Frame::Refused(
                    FrameError::TooLarge(seen, limit),
                    Box::new(s),
                ))
            } else {
                Some(Frame::Ok)
            });
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        seen += take;
        match &mut too_large {
            Some(s) => s.feed(&chunk[..take]),
            None if buf.len() + take > limit + 1 => {
                // Over the limit: what was read so far and the rest are only sniffed
                // for the message's id, so the refusal can name it.
                let mut s = Sniffer::default();
                s.feed(buf);
                s.feed(&chunk[..take]);
                buf.clear();
                too_large = Some(s);
            }
            None => buf.extend_from_slice(&chunk[..take]),
        }
        r.consume(take);
        if done {
            if let Some(s) = too_large {
                return Ok(Some(Frame::Refused(
                    FrameError::TooLarge(seen, limit),
                    Box::new(s),
                )));
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
            return Ok(Some(Frame::Ok));
        }
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    out
}

fn line_bytes(original: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(original.len() + 1);
    b.extend_from_slice(original);
    b.push(b'\n');
    b
}

/// What one frame's messages came to: the bytes to pass on (the original bytes if no
/// message changed: byte-for-byte passthrough) and the replies to its sender.
fn settle_frame(
    original: &[u8],
    steps: Vec<Step>,
    is_batch: bool,
    sanitized: bool,
) -> (Option<Vec<u8>>, Vec<Value>) {
    let mut forward = Vec::with_capacity(steps.len());
    let mut replies = Vec::new();
    let mut modified = is_batch && steps.len() > 1 || sanitized;
    let n = steps.len();
    for s in steps {
        match s {
            Step::Pass(v) => forward.push(v),
            Step::Changed(v) => {
                modified = true;
                forward.push(v);
            }
            Step::Reply(v) => replies.push(v),
            Step::Drop => {}
        }
    }
    if forward.len() != n {
        modified = true;
    }
    let bytes = if forward.is_empty() {
        None
    } else if !modified {
        Some(line_bytes(original))
    } else if is_batch {
        Some(line(&Value::Array(forward)))
    } else {
        forward.pop().map(|v| line(&v))
    };
    (bytes, replies)
}

enum Out {
    Bytes(Vec<u8>),
    /// Close the stream (the server's input, once the client has closed its own).
    Shutdown,
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    broken: Arc<AtomicBool>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Out::Bytes(bytes) => {
                if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
                    broken.store(true, Ordering::SeqCst);
                    break;
                }
            }
            Out::Shutdown => break,
        }
    }
    let _ = w.shutdown().await;
}

#[derive(Clone)]
struct Sides {
    to_client: mpsc::UnboundedSender<Out>,
    to_server: mpsc::UnboundedSender<Out>,
}

impl Sides {
    fn emit(&self, emits: Vec<Emit>) {
        for e in emits {
            let _ = match e {
                Emit::ToClient(v) => self.to_client.send(Out::Bytes(line(&v))),
                Emit::ToServer(v) => self.to_server.send(Out::Bytes(line(&v))),
            };
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Runs the proxy until the session ends. The caller owns the server process.
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
    let (to_client, client_rx) = mpsc::unbounded_channel::<Out>();
    let (to_server, server_rx) = mpsc::unbounded_channel::<Out>();
    let client_broken = Arc::new(AtomicBool::new(false));
    let server_broken = Arc::new(AtomicBool::new(false));
    let mut client_writer = tokio::spawn(writer(client_out, client_rx, client_broken.clone()));
    let server_writer = tokio::spawn(writer(server_in, server_rx, server_broken));
    let sides = Sides {
        to_client,
        to_server,
    };
    let (session, recorder) = Session::new(gate.clone(), Arc::new(opts.rules.clone()));
    let opts = Arc::new(opts);

    let watcher = tokio::spawn(watch(session.clone(), opts.stop_poll, sides.clone()));
    let mut from_client = tokio::spawn(pump(
        Side::Client,
        session.clone(),
        opts.max_frame,
        client_in,
        sides.clone(),
    ));
    let mut from_server = tokio::spawn(pump(
        Side::Server,
        session.clone(),
        opts.max_server_frame,
        server_out,
        sides.clone(),
    ));

    let mut client_gone = false;
    let mut exit = tokio::select! {
        _ = &mut from_client => Exit::ClientClosed,
        _ = &mut from_server => Exit::ServerClosed,
        _ = &mut client_writer => {
            // The writer only ends this early when the client stopped reading.
            client_gone = true;
            Exit::ClientClosed
        }
    };
    if exit == Exit::ClientClosed && !client_gone {
        // The client closed its input. What it already asked is still answered: the
        // server's input is closed behind the last forwarded message, and its answers
        // are relayed until none is owed, the server exits, or the call timeout passes.
        let _ = sides.to_server.send(Out::Shutdown);
        let drain = async {
            loop {
                if session.pending_client_requests() == 0 || client_broken.load(Ordering::SeqCst) {
                    return false;
                }
                tokio::select! {
                    _ = &mut from_server => return true,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        if let Ok(true) = tokio::time::timeout(opts.rules.call_timeout, drain).await {
            exit = Exit::ServerClosed;
        }
    }
    watcher.abort();
    let leftovers = match exit {
        Exit::ClientClosed => {
            session
                .finish_all(None, "cancelled", "client disconnected", true)
                .await
        }
        Exit::ServerClosed => {
            session
                .finish_all(None, "upstream-failed", "MCP server exited", false)
                .await
        }
    };
    sides.emit(leftovers);
    from_client.abort();
    from_server.abort();
    let stats = session.stats();
    // The recorder ends once the session's last handle is gone; let it finish writing.
    session.close();
    drop(session);
    let _ = tokio::time::timeout(Duration::from_secs(10), recorder).await;
    let _ = sides.to_server.send(Out::Shutdown);
    let _ = sides.to_client.send(Out::Shutdown);
    drop(sides);
    if !client_gone {
        let _ = tokio::time::timeout(Duration::from_secs(2), client_writer).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), server_writer).await;
    (exit, stats)
}

/// Reads one side's frames and hands their messages to the session. Messages that need
/// the gate are finished in tasks of their own; at the end of input the pump waits for
/// them, so nothing the side sent is lost.
async fn pump<G: Gate, R: AsyncBufRead + Unpin>(
    from: Side,
    session: Arc<Session<G>>,
    limit: usize,
    mut input: R,
    sides: Sides,
) {
    let mut buf = Vec::new();
    let mut later = JoinSet::new();
    let (back, on) = match from {
        Side::Client => (&sides.to_client, &sides.to_server),
        Side::Server => (&sides.to_server, &sides.to_client),
    };
    loop {
        // Reap finished tasks as we go, so the set does not grow with the session.
        while later.try_join_next().is_some() {}
        let frame = match read_frame(&mut input, &mut buf, limit).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => break,
        };
        if let Frame::Refused(e, sniffed) = frame {
            session.note_rejected_frame();
            match from {
                Side::Client => {
                    let step = session.oversized(&sniffed, &e).await;
                    if let Step::Reply(r) = step {
                        let _ = back.send(Out::Bytes(line(&r)));
                    }
                }
                Side::Server => {
                    // The request it answers gets an error instead, so the client is
                    // not left waiting.
                    sides.emit(session.oversized_answer(&sniffed, &e).await);
                }
            }
            continue;
        }
        let (bytes, sanitized) = match sanitize(&buf) {
            Some(clean) => (clean, true),
            None => (std::mem::take(&mut buf), false),
        };
        let (value, is_batch) = match parse_frame(&bytes, usize::MAX) {
            Ok(v) => v,
            Err(e) => {
                session.note_rejected_frame();
                if from == Side::Client {
                    let mut s = Sniffer::default();
                    s.feed(&bytes);
                    let id = s.id().unwrap_or(Value::Null);
                    let _ = back.send(Out::Bytes(line(&error_response(
                        &id,
                        e.code(),
                        &e.to_string(),
                    ))));
                } else {
                    tracing::warn!(error = %e, "dropped an unreadable frame from the MCP server");
                }
                buf = bytes;
                continue;
            }
        };
        let mut now = Vec::new();
        let mut pending = Vec::new();
        for (i, msg) in into_messages(value).into_iter().enumerate() {
            let admitted = match from {
                Side::Client => session.admit_client(msg),
                Side::Server => session.admit_server(msg),
            };
            match admitted {
                Admit::Now(step) => now.push((i, step)),
                Admit::Later(p) => pending.push((i, p)),
            }
        }
        if pending.is_empty() {
            let steps = now.into_iter().map(|(_, s)| s).collect();
            if !deliver(&bytes, steps, is_batch, sanitized, back, on) {
                break;
            }
        } else {
            let session = session.clone();
            let (back, on) = (back.clone(), on.clone());
            let original = bytes.clone();
            later.spawn(async move {
                let mut steps = now;
                for (i, p) in pending {
                    let gate = session.gate().clone();
                    steps.push((i, session.finish(gate.as_ref(), p).await));
                }
                steps.sort_by_key(|(i, _)| *i);
                let steps = steps.into_iter().map(|(_, s)| s).collect();
                deliver(&original, steps, is_batch, sanitized, &back, &on);
            });
        }
        buf = bytes;
    }
    while later.join_next().await.is_some() {}
}

fn deliver(
    original: &[u8],
    steps: Vec<Step>,
    is_batch: bool,
    sanitized: bool,
    back: &mpsc::UnboundedSender<Out>,
    on: &mpsc::UnboundedSender<Out>,
) -> bool {
    let (bytes, replies) = settle_frame(original, steps, is_batch, sanitized);
    for r in replies {
        let _ = back.send(Out::Bytes(line(&r)));
    }
    match bytes {
        Some(b) => on.send(Out::Bytes(b)).is_ok(),
        None => true,
    }
}

/// While anything is in flight: stop it if the agent is stopped or it ran too long.
async fn watch<G: Gate>(session: Arc<Session<G>>, every: Duration, sides: Sides) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if session.busy() {
            sides.emit(session.sweep(session.gate().as_ref(), None).await);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{Outcome, ToolCall, Verdict};
    use crate::message::{CALL_CANCELLED, CALL_TIMED_OUT};
    use crate::tools::ToolMap;
    use serde_json::json;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use tokio::io::{duplex, AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

    #[derive(Default)]
    struct FakeGate {
        checked: Mutex<Vec<String>>,
        refusals: Mutex<Vec<String>>,
        arguments: Mutex<Vec<Value>>,
        outcomes: Mutex<Vec<(String, &'static str)>>,
        stopped: AtomicBool,
        /// Calls to actions ending in `slow` wait for this.
        release: tokio::sync::Notify,
    }

    impl Gate for FakeGate {
        async fn check(&self, call: ToolCall) -> Verdict {
            if call.action.ends_with("slow") {
                self.release.notified().await;
            }
            if let Some(r) = &call.refusal {
                self.refusals.lock().unwrap().push(r.message.clone());
            }
            self.arguments.lock().unwrap().push(call.arguments.clone());
            let n = {
                let mut c = self.checked.lock().unwrap();
                c.push(call.action.clone());
                c.len()
            };
            let permit = !call.action.ends_with("forbidden")
                && call.refusal.is_none()
                && !self.stopped.load(Ordering::SeqCst);
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
            let _: &Outcome = &o;
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
        let opts = Options {
            rules: Rules {
                map: ToolMap::new("srv", Default::default()),
                ..opts.rules
            },
            ..opts
        };
        let gate = Arc::new(FakeGate::default());
        let (client_tx, proxy_client_in) = duplex(1 << 20);
        let (proxy_client_out, client_rx) = duplex(1 << 20);
        let (server_tx, proxy_server_out) = duplex(1 << 20);
        let (proxy_server_in, server_rx) = duplex(1 << 20);
        let task = tokio::spawn(run(
            gate.clone(),
            opts,
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

    fn opts() -> Options {
        Options::new(Rules::new(ToolMap::new("srv", Default::default())))
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
        let mut h = start(opts());
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
        let mut h = start(opts());
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
        let mut h = start(opts());
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
            ..opts()
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
        // an unknown method is decided like any other (policy denies what it does not
        // know); this gate permits it, so the server gets it
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":5,"method":"no/such"}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["method"], "no/such");
        assert_eq!(
            *h.gate.checked.lock().unwrap(),
            vec!["srv/no/such".to_string()]
        );
    }

    #[tokio::test]
    async fn a_kill_cancels_the_call_in_flight() {
        let mut h = start(Options {
            stop_poll: Duration::from_millis(20),
            ..opts()
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
        // revived: the session goes on, and its calls are not cancelled by a stale stop
        h.gate.stopped.store(false, Ordering::SeqCst);
        send(&mut h.client_tx, call(3, "echo")).await;
        assert_eq!(recv(&mut h.server_rx).await["id"], 3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":3,"result":{"content":[]}}),
        )
        .await;
        let resp = recv(&mut h.client_rx).await;
        assert_eq!(
            (resp["id"].clone(), resp["result"]["content"].clone()),
            (json!(3), json!([]))
        );
    }

    #[tokio::test]
    async fn a_hanging_server_times_out_and_a_crashing_one_answers_every_waiter() {
        let mut o = opts();
        o.rules.call_timeout = Duration::from_millis(100);
        o.stop_poll = Duration::from_millis(20);
        let mut h = start(o);
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

    /// Regression: closing stdin after sending dropped answers still pending (even
    /// `initialize`'s). The client may still be reading: what it asked is answered.
    #[tokio::test]
    async fn closing_input_still_delivers_what_is_pending() {
        let mut h = start(opts());
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}),
        )
        .await;
        send(&mut h.client_tx, call(1, "echo")).await;
        drop(h.client_tx);
        assert_eq!(recv(&mut h.server_rx).await["id"], 0);
        assert_eq!(recv(&mut h.server_rx).await["id"], 1);
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-11-25"}}),
        )
        .await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{"content":[]}}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["id"], 0);
        assert_eq!(recv(&mut h.client_rx).await["id"], 1);
        let (exit, _) = h.task.await.unwrap();
        assert_eq!(exit, Exit::ClientClosed);
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "ok")]
        );
    }

    /// A client that stops reading has left: its calls are cancelled upstream.
    #[tokio::test]
    async fn a_client_that_stops_reading_has_its_calls_cancelled() {
        let mut h = start(opts());
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        drop(h.client_rx);
        // The next thing for the client cannot be written: the proxy notices it left.
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","method":"notifications/message","params":{}}),
        )
        .await;
        let cancel = recv(&mut h.server_rx).await;
        assert_eq!(cancel["method"], "notifications/cancelled");
        assert_eq!(cancel["params"]["requestId"], 1);
        let (exit, _) = h.task.await.unwrap();
        assert_eq!(exit, Exit::ClientClosed);
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "cancelled")]
        );
    }

    /// A decision that waits (a call held for review) holds up nothing else: pings,
    /// other calls and a cancellation of the held call all go on meanwhile.
    #[tokio::test]
    async fn a_pending_decision_blocks_nothing_else() {
        let mut h = start(opts());
        send(&mut h.client_tx, call(1, "slow")).await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":2,"method":"ping"}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["id"], 2);
        send(&mut h.client_tx, call(3, "echo")).await;
        assert_eq!(recv(&mut h.server_rx).await["id"], 3);
        // the client gives up on the held call; when its decision comes, it goes nowhere
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}),
        )
        .await;
        h.gate.release.notify_one();
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":4,"method":"ping"}),
        )
        .await;
        assert_eq!(
            recv(&mut h.server_rx).await["id"],
            4,
            "the cancelled call was not forwarded"
        );
        drop(h.client_tx);
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":3,"result":{"content":[]}}),
        )
        .await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":2,"result":{}}),
        )
        .await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":4,"result":{}}),
        )
        .await;
        h.task.await.unwrap();
        let mut outcomes = h.gate.outcomes.lock().unwrap().clone();
        outcomes.sort();
        assert_eq!(outcomes.len(), 2, "{outcomes:?}");
        assert!(
            outcomes.contains(&("call-2".to_string(), "ok"))
                || outcomes.contains(&("call-1".to_string(), "ok"))
        );
        assert!(outcomes.iter().any(|(_, s)| *s == "cancelled"));
    }

    /// Regression: only `tools/call` was governed. Every other request is decided as
    /// `<server>/<method>`; a denied one never reaches the server.
    #[tokio::test]
    async fn every_method_is_decided_and_a_denied_one_never_reaches_the_server() {
        let mut h = start(opts());
        send(&mut h.client_tx, json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/shadow","_meta":{"rationale":"r"}}})).await;
        let fwd = recv(&mut h.server_rx).await;
        assert_eq!(fwd["params"]["uri"], "file:///etc/shadow");
        assert!(fwd["params"]["_meta"]["traceparent"].is_string());
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"forbidden"}}),
        )
        .await;
        let denied = recv(&mut h.client_rx).await;
        assert_eq!(
            (denied["id"].clone(), denied["error"]["code"].clone()),
            (json!(2), json!(crate::engine::DENIED))
        );
        assert_eq!(
            denied["error"]["data"]["warden"]["reason"],
            "TOOL_NOT_PERMITTED"
        );
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":3,"method":"completion/complete","params":{}}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["id"], 3);
        assert_eq!(
            *h.gate.checked.lock().unwrap(),
            vec![
                "srv/resources/read".to_string(),
                "srv/prompts/get/forbidden".into(),
                "srv/completion/complete".into()
            ]
        );
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{"contents":[]}}),
        )
        .await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":3,"result":{"completion":{"values":[]}}}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["id"], 1);
        assert_eq!(recv(&mut h.client_rx).await["id"], 3);
        // a stopped agent gets nothing, not even a ping
        h.gate.stopped.store(true, Ordering::SeqCst);
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":4,"method":"ping"}),
        )
        .await;
        let e = recv(&mut h.client_rx).await;
        assert_eq!(
            (e["id"].clone(), e["error"]["code"].clone()),
            (json!(4), json!(crate::engine::AGENT_STOPPED))
        );
        // nor a list
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":5,"method":"tools/list"}),
        )
        .await;
        let e = recv(&mut h.client_rx).await;
        assert_eq!(
            (e["id"].clone(), e["error"]["code"].clone()),
            (json!(5), json!(crate::engine::AGENT_STOPPED))
        );
    }

    /// Regression: an answer `"1"` to request `1` was dropped and the call timed out.
    /// Ids match as the official SDKs match them; the client gets its own id back.
    #[tokio::test]
    async fn string_and_number_ids_match_as_the_sdks_match_them() {
        let mut h = start(opts());
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":"1","result":{"content":[]}}),
        )
        .await;
        let r = recv(&mut h.client_rx).await;
        assert_eq!(r["id"], json!(1));
        assert_eq!(r["result"]["content"], json!([]));
    }

    /// Regression: a ping reusing the id of a call in flight replaced the call's outcome
    /// with the ping's answer. A request id already in flight is refused.
    #[tokio::test]
    async fn an_id_already_in_flight_is_refused() {
        let mut h = start(opts());
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"1","method":"ping"}),
        )
        .await;
        let e = recv(&mut h.client_rx).await;
        assert_eq!(
            (e["id"].clone(), e["error"]["code"].clone()),
            (json!("1"), json!(-32600))
        );
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"real"}]}}),
        )
        .await;
        assert_eq!(
            recv(&mut h.client_rx).await["result"]["content"][0]["text"],
            "real"
        );
    }

    /// What Warden does not change passes byte for byte, odd spacing and key order
    /// included: a ping (which waits for a standing check) and a notification.
    #[tokio::test]
    async fn untouched_messages_pass_byte_for_byte() {
        let mut h = start(opts());
        let ping = r#"{ "id" : 1 , "method":"ping","jsonrpc":"2.0" ,"params":{"z":1,"a":2}}"#;
        h.client_tx
            .write_all(format!("{ping}\n").as_bytes())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), h.server_rx.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, ping);
    }

    /// Arguments are typed by the tool's own input schema from `tools/list` before policy
    /// sees them: an integer for a number becomes a number (Cedar: decimal), a `null`
    /// optional is absent; the server gets them as sent (both forms are equal to the
    /// schema); arguments that do not fit are refused naming the argument, what was
    /// expected and what came.
    #[tokio::test]
    async fn arguments_are_typed_from_the_tools_own_schema() {
        let mut h = start(opts());
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"l","method":"tools/list"}),
        )
        .await;
        recv(&mut h.server_rx).await;
        let schema = json!({"type":"object","properties":{"amount":{"type":"number"},"memo":{"type":"string"}},"required":["amount"]});
        send(&mut h.server_tx, json!({"jsonrpc":"2.0","id":"l","result":{"tools":[{"name":"echo","inputSchema":schema}]}})).await;
        recv(&mut h.client_rx).await;
        let mut c = call(1, "echo");
        c["params"]["arguments"] = json!({"amount": 5, "memo": null});
        send(&mut h.client_tx, c).await;
        let fwd = recv(&mut h.server_rx).await;
        let judged = h.gate.arguments.lock().unwrap()[0].clone();
        assert_eq!(
            fwd["params"]["arguments"],
            json!({"amount": 5, "memo": null}),
            "the server gets the arguments as sent"
        );
        assert!(
            judged["amount"].is_f64(),
            "a number, not an integer: {judged}"
        );
        assert!(judged.get("memo").is_none());
        let mut c = call(2, "echo");
        c["params"]["arguments"] = json!({"amount": "12"});
        send(&mut h.client_tx, c).await;
        let r = recv(&mut h.client_rx).await;
        assert_eq!(
            (r["id"].clone(), r["result"]["isError"].clone()),
            (json!(2), json!(true))
        );
        let refusal = h.gate.refusals.lock().unwrap()[0].clone();
        assert!(
            refusal.contains("/amount") && refusal.contains("number"),
            "{refusal}"
        );
    }

    /// `warden.*` baggage comes from Warden only, on every message.
    #[tokio::test]
    async fn warden_baggage_is_stripped_from_every_message() {
        let mut h = start(opts());
        send(&mut h.client_tx, json!({"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":{"baggage":"warden.agent_id=root,team=a, Warden.call_id=x"}}})).await;
        assert_eq!(
            recv(&mut h.server_rx).await["params"]["_meta"]["baggage"],
            "team=a"
        );
        send(&mut h.client_tx, json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"_meta":{"baggage":"warden.agent_id=root"}}})).await;
        assert_eq!(
            recv(&mut h.server_rx).await["params"]["_meta"]["baggage"],
            ""
        );
    }

    /// Regression: an over-limit message got an error with `id: null`. It is answered
    /// with its own id, and a governed one is decided as refused, so it is audited.
    #[tokio::test]
    async fn an_over_limit_message_is_answered_with_its_id_and_audited() {
        let mut h = start(Options {
            max_frame: 256,
            ..opts()
        });
        let big = json!({"jsonrpc":"2.0","id":"big","method":"tools/call","params":{"name":"echo","arguments":{"x":"y".repeat(1000)}}});
        send(&mut h.client_tx, big).await;
        let r = recv(&mut h.client_rx).await;
        assert_eq!(r["id"], "big");
        assert_eq!(r["result"]["isError"], true);
        assert_eq!(
            *h.gate.checked.lock().unwrap(),
            vec!["srv/echo".to_string()]
        );
        assert!(h.gate.refusals.lock().unwrap()[0].contains("exceeds the limit"));
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":2,"method":"ping","params":{"pad":"z".repeat(1000)}}),
        )
        .await;
        let r = recv(&mut h.client_rx).await;
        assert_eq!(
            (r["id"].clone(), r["error"]["code"].clone()),
            (json!(2), json!(-32600))
        );
    }

    /// Regression: a server answer over the limit was dropped and the call waited for
    /// its timeout. The client gets an error for it at once, and the outcome is recorded.
    #[tokio::test]
    async fn a_large_answer_passes_and_an_over_limit_one_is_answered() {
        let mut h = start(Options {
            max_server_frame: 8 * 1024 * 1024,
            ..opts()
        });
        send(&mut h.client_tx, call(1, "echo")).await;
        recv(&mut h.server_rx).await;
        // 5 MiB: normal for file and database servers, above the old 4 MiB limit
        let text = "a".repeat(5 * 1024 * 1024);
        send(
            &mut h.server_tx,
            json!({"result":{"content":[{"type":"text","text":text}]},"jsonrpc":"2.0","id":1}),
        )
        .await;
        let r = tokio::time::timeout(Duration::from_secs(10), h.client_rx.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let r: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(
            r["result"]["content"][0]["text"].as_str().map(str::len),
            Some(5 * 1024 * 1024)
        );
        send(&mut h.client_tx, call(2, "echo")).await;
        recv(&mut h.server_rx).await;
        let text = "a".repeat(9 * 1024 * 1024);
        send(
            &mut h.server_tx,
            json!({"result":{"content":[{"type":"text","text":text}]},"jsonrpc":"2.0","id":2}),
        )
        .await;
        let r = recv(&mut h.client_rx).await;
        assert_eq!(
            (r["id"].clone(), r["error"]["code"].clone()),
            (json!(2), json!(crate::message::UPSTREAM_UNAVAILABLE))
        );
        assert_eq!(
            h.gate.outcomes.lock().unwrap()[1],
            ("call-2".to_string(), "upstream-failed")
        );
    }

    /// Regression: a lone surrogate escape (what `json.dumps` writes for half an emoji)
    /// and invalid UTF-8 got unanswerable errors; the reference server accepts them.
    /// They are repaired to U+FFFD, and what is judged is what is forwarded.
    #[tokio::test]
    async fn lone_surrogates_and_invalid_utf8_are_repaired_not_refused() {
        let mut h = start(opts());
        h.client_tx.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"t\":\"half \\ud83d emoji \xff\"}}}\n").await.unwrap();
        let fwd = recv(&mut h.server_rx).await;
        assert_eq!(
            fwd["params"]["arguments"]["t"],
            "half \u{FFFD} emoji \u{FFFD}"
        );
    }

    /// A tools/call run as a task is followed to its real result; a kill cancels the
    /// task upstream and records it; task methods name only this session's tasks.
    #[tokio::test]
    async fn tasks_are_followed_to_their_result_and_cancelled_on_kill() {
        let mut h = start(Options {
            stop_poll: Duration::from_millis(20),
            ..opts()
        });
        let mut c = call(1, "echo");
        c["params"]["task"] = json!({"ttl": 60000});
        send(&mut h.client_tx, c.clone()).await;
        recv(&mut h.server_rx).await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":"t1","status":"working"}}}),
        )
        .await;
        assert_eq!(
            recv(&mut h.client_rx).await["result"]["task"]["taskId"],
            "t1"
        );
        assert!(
            h.gate.outcomes.lock().unwrap().is_empty(),
            "the task handle is not the outcome"
        );
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId":"other"}}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["error"]["code"], -32602);
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":3,"method":"tasks/result","params":{"taskId":"t1"}}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["method"], "tasks/result");
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"done"}]}}),
        )
        .await;
        recv(&mut h.client_rx).await;
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "ok")]
        );
        // a second task, then a kill: tasks/cancel goes upstream
        c["id"] = json!(4);
        send(&mut h.client_tx, c).await;
        recv(&mut h.server_rx).await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":4,"result":{"task":{"taskId":"t2","status":"working"}}}),
        )
        .await;
        recv(&mut h.client_rx).await;
        h.gate.stopped.store(true, Ordering::SeqCst);
        let cancel = recv(&mut h.server_rx).await;
        assert_eq!(
            (cancel["method"].clone(), cancel["params"]["taskId"].clone()),
            (json!("tasks/cancel"), json!("t2"))
        );
        assert_eq!(
            h.gate.outcomes.lock().unwrap()[1],
            ("call-2".to_string(), "cancelled")
        );
    }

    /// A client cannot answer a server request Warden has not passed on yet (it may be
    /// refused): such an answer is dropped; once passed on, the real answer goes through.
    #[tokio::test]
    async fn a_server_request_cannot_be_answered_before_it_is_decided() {
        let mut h = start(opts());
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":"s1","method":"sampling/slow","params":{}}),
        )
        .await;
        // the client guesses the id and answers while the decision waits
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"s1","result":{"forged":true}}),
        )
        .await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":1,"method":"ping"}),
        )
        .await;
        assert_eq!(
            recv(&mut h.server_rx).await["id"],
            1,
            "the early answer was dropped"
        );
        h.gate.release.notify_one();
        assert_eq!(recv(&mut h.client_rx).await["id"], "s1");
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"s1","result":{"real":true}}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["result"]["real"], true);
    }

    /// A task the client cancels is settled as `cancelled` once the server confirms.
    #[tokio::test]
    async fn a_cancelled_task_is_settled() {
        let mut h = start(opts());
        let mut c = call(1, "echo");
        c["params"]["task"] = json!({"ttl": 60000});
        send(&mut h.client_tx, c).await;
        recv(&mut h.server_rx).await;
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":"t1","status":"working"}}}),
        )
        .await;
        recv(&mut h.client_rx).await;
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":2,"method":"tasks/cancel","params":{"taskId":"t1"}}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["method"], "tasks/cancel");
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":2,"result":{"taskId":"t1","status":"cancelled"}}),
        )
        .await;
        recv(&mut h.client_rx).await;
        // the task is gone from the session: its methods no longer name it
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{"taskId":"t1"}}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["error"]["code"], -32602);
        drop(h.client_tx);
        h.task.await.unwrap();
        assert_eq!(
            *h.gate.outcomes.lock().unwrap(),
            vec![("call-1".to_string(), "cancelled")]
        );
    }

    /// Server-to-client requests are decided for the agent: a denied one is answered
    /// to the server and never reaches the client.
    #[tokio::test]
    async fn server_requests_are_decided() {
        let mut h = start(opts());
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":"s1","method":"sampling/forbidden","params":{}}),
        )
        .await;
        let e = recv(&mut h.server_rx).await;
        assert_eq!(
            (e["id"].clone(), e["error"]["code"].clone()),
            (json!("s1"), json!(crate::engine::DENIED))
        );
        send(
            &mut h.server_tx,
            json!({"jsonrpc":"2.0","id":"s2","method":"sampling/createMessage","params":{}}),
        )
        .await;
        assert_eq!(recv(&mut h.client_rx).await["id"], "s2");
        send(
            &mut h.client_tx,
            json!({"jsonrpc":"2.0","id":"s2","result":{"role":"assistant"}}),
        )
        .await;
        assert_eq!(recv(&mut h.server_rx).await["id"], "s2");
        assert_eq!(
            *h.gate.checked.lock().unwrap(),
            vec![
                "srv/sampling/forbidden".to_string(),
                "srv/sampling/createMessage".into()
            ]
        );
    }

    #[tokio::test]
    async fn server_requests_and_client_answers_pass_through() {
        let mut h = start(opts());
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
        let mut h = start(opts());
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
        let mut h = start(opts());
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
            Some(Frame::Refused(FrameError::TooLarge(3, 2), _))
        ));
        let mut r = tokio::io::BufReader::new(&b"{}"[..]);
        assert!(matches!(
            read_frame(&mut r, &mut buf, 2).await.unwrap(),
            Some(Frame::Ok)
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
                let mut h = start(Options { max_frame: 128, ..opts() });
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
