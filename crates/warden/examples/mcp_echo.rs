//! A tiny MCP server for benchmarks: the upstream whose own latency should be as small
//! and steady as possible, so that what a gateway adds is not lost in the server's jitter.
//!
//! It answers `initialize`, `ping`, `tools/list`, `tools/call` of its one tool `echo`
//! (`{"message": String}`, answered as `Echo: <message>`), `resources/list` and
//! `resources/read` (any `uri`, answered with a fixed text), and refuses any other request
//! with "method not found". Notifications and responses are read and ignored.
//!
//! Two transports, the same answers:
//!
//!     mcp_echo                        # stdio: one JSON-RPC message (or batch) per line
//!     mcp_echo --http 127.0.0.1:0     # Streamable HTTP at any path; prints `listening on ADDR`
//!
//! Over HTTP it is a plain HTTP/1.1 keep-alive server, one thread per connection, that
//! answers every POST with `application/json` (never SSE), gives `initialize` an
//! `Mcp-Session-Id` and writes each response in one `write` with TCP_NODELAY on: nothing
//! in it waits on a timer. It is not a general MCP server (no SSE stream on GET, no
//! chunked request bodies); it is the smallest thing the gateways can talk to.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The largest request body read over HTTP; the benchmark's messages are tiny.
const MAX_BODY: usize = 1 << 20;

#[derive(Deserialize)]
struct Incoming {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Params,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    protocol_version: Option<String>,
    arguments: Option<EchoArgs>,
    uri: Option<String>,
}

#[derive(Deserialize)]
struct EchoArgs {
    #[serde(default)]
    message: String,
}

#[derive(Serialize)]
struct Outgoing {
    jsonrpc: &'static str,
    id: Value,
    #[serde(flatten)]
    body: Body,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Body {
    Result(Answer),
    Error(RpcError),
}

#[derive(Serialize)]
struct RpcError {
    code: i64,
    message: String,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    Initialize(InitializeResult),
    Tools(ToolsList),
    Call(CallToolResult),
    Resources(ResourcesList),
    Read(ReadResourceResult),
    Empty(Empty),
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InitializeResult {
    protocol_version: String,
    capabilities: Capabilities,
    server_info: Implementation,
}

#[derive(Serialize)]
struct Capabilities {
    tools: Empty,
    resources: Empty,
}

#[derive(Serialize)]
struct Implementation {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct ToolsList {
    tools: Vec<Tool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tool {
    name: &'static str,
    description: &'static str,
    input_schema: Schema,
}

#[derive(Serialize)]
struct Schema {
    #[serde(rename = "type")]
    kind: &'static str,
    properties: EchoProperties,
    required: [&'static str; 1],
}

#[derive(Serialize)]
struct EchoProperties {
    message: Property,
}

#[derive(Serialize)]
struct Property {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct CallToolResult {
    content: Vec<TextContent>,
}

#[derive(Serialize)]
struct TextContent {
    #[serde(rename = "type")]
    kind: &'static str,
    text: String,
}

#[derive(Serialize)]
struct ResourcesList {
    resources: Vec<Resource>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    uri: &'static str,
    name: &'static str,
    mime_type: &'static str,
}

#[derive(Serialize)]
struct ReadResourceResult {
    contents: Vec<ResourceText>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceText {
    uri: String,
    mime_type: &'static str,
    text: &'static str,
}

const RESOURCE_URI: &str = "bench://resource";
const RESOURCE_TEXT: &str = "a fixed resource for benchmarks";

fn answer(msg: Incoming) -> Option<Outgoing> {
    // No id (a notification) or no method (a response to us): nothing to answer.
    let id = msg.id.filter(|id| !id.is_null())?;
    let method = msg.method?;
    let p = msg.params;
    let result = match method.as_str() {
        "initialize" => Answer::Initialize(InitializeResult {
            protocol_version: p.protocol_version.unwrap_or_else(|| "2025-06-18".into()),
            capabilities: Capabilities {
                tools: Empty {},
                resources: Empty {},
            },
            server_info: Implementation {
                name: "mcp_echo",
                version: "1",
            },
        }),
        "ping" => Answer::Empty(Empty {}),
        "tools/list" => Answer::Tools(ToolsList {
            tools: vec![Tool {
                name: "echo",
                description: "Echoes the message back",
                input_schema: Schema {
                    kind: "object",
                    properties: EchoProperties {
                        message: Property { kind: "string" },
                    },
                    required: ["message"],
                },
            }],
        }),
        "tools/call" => Answer::Call(CallToolResult {
            content: vec![TextContent {
                kind: "text",
                text: format!(
                    "Echo: {}",
                    p.arguments.map(|a| a.message).unwrap_or_default()
                ),
            }],
        }),
        "resources/list" => Answer::Resources(ResourcesList {
            resources: vec![Resource {
                uri: RESOURCE_URI,
                name: "bench",
                mime_type: "text/plain",
            }],
        }),
        "resources/read" => Answer::Read(ReadResourceResult {
            contents: vec![ResourceText {
                uri: p.uri.unwrap_or_else(|| RESOURCE_URI.into()),
                mime_type: "text/plain",
                text: RESOURCE_TEXT,
            }],
        }),
        other => {
            return Some(Outgoing {
                jsonrpc: "2.0",
                id,
                body: Body::Error(RpcError {
                    code: -32601,
                    message: format!("method not found: {other}"),
                }),
            })
        }
    };
    Some(Outgoing {
        jsonrpc: "2.0",
        id,
        body: Body::Result(result),
    })
}

/// The answer to one frame (a message or a batch), serialized; `None` when nothing in it
/// asked for one.
fn answer_frame(frame: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let first = frame.iter().find(|b| !b.is_ascii_whitespace());
    let out = if first == Some(&b'[') {
        let batch: Vec<Incoming> =
            serde_json::from_slice(frame).map_err(|e| format!("bad batch: {e}"))?;
        let answers: Vec<Outgoing> = batch.into_iter().filter_map(answer).collect();
        if answers.is_empty() {
            return Ok(None);
        }
        serde_json::to_vec(&answers)
    } else {
        let msg: Incoming =
            serde_json::from_slice(frame).map_err(|e| format!("bad message: {e}"))?;
        match answer(msg) {
            Some(a) => serde_json::to_vec(&a),
            None => return Ok(None),
        }
    };
    out.map(Some)
        .map_err(|e| format!("cannot serialize an answer: {e}"))
}

fn serve_stdio() -> io::Result<()> {
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let stdout = io::stdout();
    let mut output = stdout.lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match answer_frame(&line) {
            Ok(Some(mut out)) => {
                out.push(b'\n');
                output.write_all(&out)?;
                output.flush()?;
            }
            Ok(None) => {}
            Err(e) => eprintln!("mcp_echo: {e}"),
        }
    }
}

/// One parsed HTTP/1.1 request head.
struct Head {
    method: String,
    content_length: usize,
    close: bool,
    chunked: bool,
}

/// Reads a request head; `None` at a clean end of the connection.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let method = line.split(' ').next().unwrap_or_default().to_owned();
    let mut head = Head {
        method,
        content_length: 0,
        close: false,
        chunked: false,
    };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a request head",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(Some(head));
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                head.content_length = value
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?
            }
            "connection" => head.close = value.eq_ignore_ascii_case("close"),
            "transfer-encoding" => head.chunked = true,
            _ => {}
        }
    }
}

fn respond(
    w: &mut TcpStream,
    status: &str,
    extra: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        out.push_str(&format!("content-type: {ct}\r\n"));
    }
    out.push_str(extra);
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    // One write: with TCP_NODELAY it leaves at once as one segment.
    w.write_all(&bytes)
}

fn serve_conn(stream: TcpStream, sessions: &AtomicU64) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    while let Some(head) = read_head(&mut r)? {
        if head.chunked || head.content_length > MAX_BODY {
            respond(
                &mut w,
                "411 Length Required",
                "connection: close\r\n",
                None,
                b"",
            )?;
            return Ok(());
        }
        let mut body = vec![0; head.content_length];
        r.read_exact(&mut body)?;
        match head.method.as_str() {
            "POST" => match answer_frame(&body) {
                Ok(Some(out)) => {
                    let opens = serde_json::from_slice::<Incoming>(&body)
                        .is_ok_and(|m| m.method.as_deref() == Some("initialize"));
                    let extra = if opens {
                        let n = sessions.fetch_add(1, Ordering::Relaxed);
                        format!("mcp-session-id: bench-{n}\r\n")
                    } else {
                        String::new()
                    };
                    respond(&mut w, "200 OK", &extra, Some("application/json"), &out)?
                }
                Ok(None) => respond(&mut w, "202 Accepted", "", None, b"")?,
                Err(e) => respond(
                    &mut w,
                    "400 Bad Request",
                    "",
                    Some("text/plain"),
                    e.as_bytes(),
                )?,
            },
            "DELETE" => respond(&mut w, "200 OK", "", None, b"")?,
            _ => respond(
                &mut w,
                "405 Method Not Allowed",
                "allow: POST, DELETE\r\n",
                None,
                b"",
            )?,
        }
        if head.close {
            return Ok(());
        }
    }
    Ok(())
}

fn serve_http(addr: &str) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    let sessions = Arc::new(AtomicU64::new(1));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mcp_echo: accept failed: {e}");
                continue;
            }
        };
        let sessions = sessions.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_conn(stream, &sessions) {
                if e.kind() != io::ErrorKind::UnexpectedEof
                    && e.kind() != io::ErrorKind::ConnectionReset
                {
                    eprintln!("mcp_echo: connection: {e}");
                }
            }
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => serve_stdio(),
        [flag, addr] if flag == "--http" => serve_http(addr),
        _ => {
            eprintln!("usage: mcp_echo [--http ADDR]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp_echo: {e}");
            ExitCode::FAILURE
        }
    }
}
