//! Latency of MCP requests over stdio or Streamable HTTP, to measure what Warden's
//! gateways add.
//!
//! Opens SESSIONS MCP sessions, performs the handshake on each, makes WARMUP unmeasured
//! requests per session, then has every session make CALLS sequential requests (all
//! sessions at once) and reports p50/p90/p99 per request and the throughput. Each request
//! is timed from just before its bytes are written to just after its answer is read.
//! Run it against the server directly and through a gateway; the difference is the
//! gateway's cost. `scripts/bench-mcp.sh` does that for every mode.
//!
//! Two transports:
//!
//!     mcp_latency [options] -- COMMAND ...     # stdio: SESSIONS copies of COMMAND
//!     mcp_latency [options] --url URL          # Streamable HTTP: SESSIONS connections
//!
//! Over HTTP each session is its own keep-alive connection and MCP session; requests are
//! written in one `write` with TCP_NODELAY on, so the client adds no Nagle wait of its
//! own. The bearer token is `$WARDEN_TOKEN` when set (a server that does not care
//! ignores it). Answers may be JSON or an SSE stream.
//!
//! CPU: besides latency it reports the CPU time (user + system) per measured request of
//! the processes it started (with their descendants: a proxy and its server) and of the
//! processes named by `--watch-pid` (a `warden serve`, an HTTP upstream), read from
//! `/proc` once every session has warmed up and again when all are done.
//!
//! Options: --sessions N (1), --calls N (1000), --warmup N (50), --tool NAME (echo),
//! --args JSON ({"message":"hi"}), --resource URI (make `resources/read` of URI instead of
//! `tools/call`), --watch-pid PID (repeatable), --clock-ticks N (`getconf CLK_TCK`, 100).
//! A request that fails (an error, a tool result marked `isError`) is counted and the
//! first one shown; only a failed handshake or first request stops the run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

const PROTOCOL_VERSION: &str = "2025-06-18";

struct Args {
    sessions: usize,
    calls: usize,
    warmup: usize,
    request: Request,
    target: Target,
    /// Processes whose CPU (with their descendants') counts toward each request: the
    /// servers a request passes through besides the ones this harness starts.
    watch: Vec<u32>,
    clock_ticks: f64,
}

/// What each measured request asks.
#[derive(Clone)]
enum Request {
    Call { tool: String, args: Value },
    Read { uri: String },
}

enum Target {
    Command(Vec<String>),
    Url(String),
}

fn parse() -> Args {
    let mut sessions = 1;
    let mut calls = 1000;
    let mut warmup = 50;
    let mut tool = "echo".to_owned();
    let mut args = serde_json::json!({"message": "hi"});
    let mut resource = None;
    let mut target = None;
    let mut watch = Vec::new();
    let mut clock_ticks = 100.0;
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{x} needs a value"));
        match x.as_str() {
            "--sessions" => sessions = value().parse().unwrap(),
            "--calls" => calls = value().parse().unwrap(),
            "--warmup" => warmup = value().parse().unwrap(),
            "--tool" => tool = value(),
            "--args" => args = serde_json::from_str(&value()).unwrap(),
            "--resource" => resource = Some(value()),
            "--url" => target = Some(Target::Url(value())),
            "--watch-pid" => watch.push(value().parse().unwrap()),
            "--clock-ticks" => clock_ticks = value().parse().unwrap(),
            "--" => target = Some(Target::Command(it.by_ref().collect())),
            other => panic!("unknown argument {other}"),
        }
    }
    let target = match target {
        Some(Target::Command(c)) if c.is_empty() => panic!("give the command after --"),
        Some(t) => t,
        None => panic!("give --url URL or a command after --"),
    };
    let request = match resource {
        Some(uri) => Request::Read { uri },
        None => Request::Call { tool, args },
    };
    Args {
        sessions,
        calls,
        warmup,
        request,
        target,
        watch,
        clock_ticks,
    }
}

#[derive(Serialize)]
struct Message<'a, P: Serialize> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    method: &'a str,
    params: P,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InitializeParams {
    protocol_version: &'static str,
    capabilities: Empty,
    client_info: ClientInfo,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct ClientInfo {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct CallParams<'a> {
    name: &'a str,
    arguments: &'a Value,
}

#[derive(Serialize)]
struct ReadParams<'a> {
    uri: &'a str,
}

fn frame<P: Serialize>(id: Option<u64>, method: &str, params: P) -> Vec<u8> {
    serde_json::to_vec(&Message {
        jsonrpc: "2.0",
        id,
        method,
        params,
    })
    .unwrap()
}

/// One MCP session, over whichever transport.
trait Transport: Send {
    /// Sends a request and returns its answer (a JSON-RPC response with this id).
    fn request(&mut self, id: u64, body: &[u8]) -> Value;
    /// Sends a notification.
    fn notify(&mut self, body: &[u8]);
    /// The process this session started, if any.
    fn pid(&self) -> Option<u32>;
    fn close(self: Box<Self>);
}

struct Pipes {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    line: String,
}

impl Pipes {
    fn start(command: &[String]) -> Self {
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the command");
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            input,
            output,
            line: String::new(),
        }
    }

    fn send(&mut self, body: &[u8]) {
        let mut buf = Vec::with_capacity(body.len() + 1);
        buf.extend_from_slice(body);
        buf.push(b'\n');
        self.input.write_all(&buf).unwrap();
        self.input.flush().unwrap();
    }
}

impl Transport for Pipes {
    fn request(&mut self, id: u64, body: &[u8]) -> Value {
        self.send(body);
        loop {
            self.line.clear();
            assert!(
                self.output.read_line(&mut self.line).unwrap() > 0,
                "the server closed its output"
            );
            let v: Value = serde_json::from_str(&self.line).unwrap();
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                return v;
            }
        }
    }

    fn notify(&mut self, body: &[u8]) {
        self.send(body);
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn close(mut self: Box<Self>) {
        drop(self.input);
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client: one keep-alive connection, whole requests in one write.
struct Http {
    addr: String,
    path: String,
    token: Option<String>,
    session: Option<String>,
    conn: BufReader<TcpStream>,
}

struct HttpResponse {
    status: u16,
    session: Option<String>,
    sse: bool,
    body: Vec<u8>,
}

impl Http {
    fn connect(url: &str) -> Self {
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("only http:// URLs: {url}"));
        let (addr, path) = match rest.find('/') {
            Some(i) => (rest[..i].to_owned(), rest[i..].to_owned()),
            None => (rest.to_owned(), "/".to_owned()),
        };
        let stream = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        Self {
            addr,
            path,
            token: std::env::var("WARDEN_TOKEN").ok().filter(|t| !t.is_empty()),
            session: None,
            conn: BufReader::new(stream),
        }
    }

    fn post(&mut self, body: &[u8]) -> HttpResponse {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             accept: application/json, text/event-stream\r\ncontent-length: {}\r\n",
            self.path,
            self.addr,
            body.len()
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("authorization: Bearer {t}\r\n"));
        }
        if let Some(s) = &self.session {
            head.push_str(&format!(
                "mcp-session-id: {s}\r\nmcp-protocol-version: {PROTOCOL_VERSION}\r\n"
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        self.conn.get_mut().write_all(&bytes).unwrap();
        let resp = self.read_response();
        if resp.session.is_some() {
            self.session.clone_from(&resp.session);
        }
        resp
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        assert!(
            self.conn.read_line(&mut line).unwrap() > 0,
            "the server closed the connection"
        );
        line.truncate(line.trim_end().len());
        line
    }

    fn read_response(&mut self) -> HttpResponse {
        let status_line = self.read_line();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let (mut length, mut chunked, mut session, mut sse) = (None, false, None, false);
        loop {
            let line = self.read_line();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = Some(value.parse::<usize>().unwrap()),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "mcp-session-id" => session = Some(value.to_owned()),
                "content-type" => sse = value.starts_with("text/event-stream"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size = self.read_line();
                let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
                let start = body.len();
                body.resize(start + size, 0);
                self.conn.read_exact(&mut body[start..]).unwrap();
                self.read_line();
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.conn.read_exact(&mut body).unwrap();
        }
        HttpResponse {
            status,
            session,
            sse,
            body,
        }
    }
}

/// The JSON-RPC messages in an HTTP answer (a JSON message or batch, or SSE events).
fn messages(resp: &HttpResponse) -> Vec<Value> {
    let mut out = Vec::new();
    let mut push = |bytes: &[u8]| match serde_json::from_slice::<Value>(bytes).unwrap() {
        Value::Array(items) => out.extend(items),
        one => out.push(one),
    };
    if resp.sse {
        let text = std::str::from_utf8(&resp.body).unwrap();
        for event in text.split("\n\n") {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if !data.is_empty() {
                push(data.join("\n").as_bytes());
            }
        }
    } else if !resp.body.is_empty() {
        push(&resp.body);
    }
    out
}

impl Http {
    /// Posts and insists on a 2xx: anything else is a broken setup, not a measurement.
    fn post_ok(&mut self, body: &[u8], what: &str) -> HttpResponse {
        let resp = self.post(body);
        assert!(
            (200..300).contains(&resp.status),
            "HTTP {} to {what}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
        resp
    }
}

impl Transport for Http {
    fn request(&mut self, id: u64, body: &[u8]) -> Value {
        let resp = self.post_ok(body, "a request");
        messages(&resp)
            .into_iter()
            .find(|m| m.get("id").and_then(Value::as_u64) == Some(id))
            .unwrap_or_else(|| {
                panic!(
                    "no answer to request {id} in {}",
                    String::from_utf8_lossy(&resp.body)
                )
            })
    }

    fn notify(&mut self, body: &[u8]) {
        self.post_ok(body, "a notification");
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn close(self: Box<Self>) {}
}

fn open(target: &Target) -> Box<dyn Transport> {
    match target {
        Target::Command(c) => Box::new(Pipes::start(c)),
        Target::Url(u) => Box::new(Http::connect(u)),
    }
}

fn request_body(r: &Request, id: u64) -> Vec<u8> {
    match r {
        Request::Call { tool, args } => frame(
            Some(id),
            "tools/call",
            CallParams {
                name: tool,
                arguments: args,
            },
        ),
        Request::Read { uri } => frame(Some(id), "resources/read", ReadParams { uri }),
    }
}

fn succeeded(r: &Request, answer: &Value) -> bool {
    let Some(result) = answer.get("result") else {
        return false;
    };
    match r {
        Request::Call { .. } => result.get("isError") != Some(&Value::Bool(true)),
        Request::Read { .. } => result.get("contents").is_some_and(Value::is_array),
    }
}

/// One session's measured latencies and how many of its requests failed (a gateway that
/// cannot record a decision denies it: that is counted, not hidden, and not fatal).
struct Measured {
    latencies: Vec<Duration>,
    failed: usize,
    /// Kept open until the CPU it used has been read.
    transport: Box<dyn Transport>,
}

/// Counts a failed request; the first one of a session is shown, so the reason is known.
fn report(failed: &mut usize, answer: &Value, phase: &str) {
    if *failed == 0 {
        eprintln!(
            "mcp_latency: a {phase} request failed (further failures only counted): {answer}"
        );
    }
    *failed += 1;
}

fn session(a: &Args, ready: &Barrier, go: &Barrier, pids: &Mutex<Vec<u32>>) -> Measured {
    let mut t = open(&a.target);
    if let Some(pid) = t.pid() {
        pids.lock().unwrap().push(pid);
    }
    let init = InitializeParams {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Empty {},
        client_info: ClientInfo {
            name: "mcp_latency",
            version: "1",
        },
    };
    let answer = t.request(0, &frame(Some(0), "initialize", init));
    assert!(
        answer.get("result").is_some(),
        "initialize failed: {answer}"
    );
    t.notify(&frame(None, "notifications/initialized", Empty {}));
    let mut failed = 0;
    for i in 0..a.warmup {
        let id = 1 + i as u64;
        let r = t.request(id, &request_body(&a.request, id));
        // The first answer must be right: a refusal there is a broken setup, not load.
        assert!(
            i > 0 || succeeded(&a.request, &r),
            "the first request failed: {r}"
        );
        if !succeeded(&a.request, &r) {
            report(&mut failed, &r, "warm-up");
        }
    }
    let warmup_failed = failed;
    // Built before the clock starts, so the timing is the transport's and the server's.
    let bodies: Vec<(u64, Vec<u8>)> = (0..a.calls)
        .map(|i| {
            let id = 10_000 + i as u64;
            (id, request_body(&a.request, id))
        })
        .collect();
    ready.wait();
    go.wait();
    let mut latencies = Vec::with_capacity(a.calls);
    for (id, body) in &bodies {
        let start = Instant::now();
        let r = t.request(*id, body);
        latencies.push(start.elapsed());
        if !succeeded(&a.request, &r) {
            report(&mut failed, &r, "measured");
        }
    }
    Measured {
        latencies,
        failed: failed - warmup_failed,
        transport: t,
    }
}

/// CPU ticks (user + system) used so far by `pid` and its live descendants.
fn tree_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces;
    // utime and stime are the 14th and 15th fields of the line.
    let own: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0);
    let mut children = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in list.split_whitespace().filter_map(|c| c.parse().ok()) {
                children += tree_ticks(child);
            }
        }
    }
    own + children
}

fn cpu_seconds(pids: &[u32], clock_ticks: f64) -> f64 {
    pids.iter().map(|p| tree_ticks(*p)).sum::<u64>() as f64 / clock_ticks
}

fn main() {
    let a = Arc::new(parse());
    let ready = Arc::new(Barrier::new(a.sessions + 1));
    let go = Arc::new(Barrier::new(a.sessions + 1));
    let pids = Arc::new(Mutex::new(a.watch.clone()));
    let handles: Vec<_> = (0..a.sessions)
        .map(|_| {
            let (a, r, g, p) = (a.clone(), ready.clone(), go.clone(), pids.clone());
            std::thread::spawn(move || session(&a, &r, &g, &p))
        })
        .collect();
    // Every session has warmed up: the CPU counted from here is the measured requests'.
    ready.wait();
    let pids = pids.lock().unwrap().clone();
    let cpu_before = cpu_seconds(&pids, a.clock_ticks);
    go.wait();
    let start = Instant::now();
    let measured: Vec<Measured> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let wall = start.elapsed();
    let cpu = cpu_seconds(&pids, a.clock_ticks) - cpu_before;
    let failed: usize = measured.iter().map(|m| m.failed).sum();
    let mut all: Vec<Duration> = Vec::new();
    for m in measured {
        all.extend(m.latencies);
        m.transport.close();
    }
    all.sort();
    let n = all.len();
    let pct = |p: f64| all[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e3;
    println!(
        "sessions={} calls={} failed={} p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms throughput={:.0}/s cpu={:.0}us",
        a.sessions,
        n,
        failed,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        all[n - 1].as_secs_f64() * 1e3,
        n as f64 / wall.as_secs_f64(),
        cpu / n as f64 * 1e6
    );
}
