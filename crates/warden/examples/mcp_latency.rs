//! Latency of `tools/call` over stdio, to measure what `warden mcp-proxy` adds.
//!
//! Starts SESSIONS copies of the given command (an MCP server, or `warden mcp-proxy ... --
//! <server>`), performs the MCP handshake on each, then has every session make CALLS
//! sequential `tools/call`s (all sessions at once) and reports p50/p90/p99 per call.
//! Run it once against the server directly and once through the proxy; the difference
//! is the proxy's cost. `scripts/bench-mcp.sh` does both.
//!
//!     mcp_latency --sessions 1 --calls 1000 --tool echo --args '{"message":"hi"}' -- node server.js stdio

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Args {
    sessions: usize,
    calls: usize,
    warmup: usize,
    tool: String,
    args: Value,
    command: Vec<String>,
}

fn parse() -> Args {
    let mut a = Args {
        sessions: 1,
        calls: 1000,
        warmup: 50,
        tool: "echo".into(),
        args: json!({"message": "hi"}),
        command: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--sessions" => a.sessions = it.next().unwrap().parse().unwrap(),
            "--calls" => a.calls = it.next().unwrap().parse().unwrap(),
            "--warmup" => a.warmup = it.next().unwrap().parse().unwrap(),
            "--tool" => a.tool = it.next().unwrap(),
            "--args" => a.args = serde_json::from_str(&it.next().unwrap()).unwrap(),
            "--" => {
                a.command = it.by_ref().collect();
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.command.is_empty(), "give the command after --");
    a
}

fn session(a: &Args, barrier: &Barrier) -> Vec<Duration> {
    let mut child = Command::new(&a.command[0])
        .args(&a.command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the command");
    let mut input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut request =
        |id: u64, method: &str, params: Value, input: &mut std::process::ChildStdin| -> Value {
            let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            writeln!(input, "{msg}").unwrap();
            input.flush().unwrap();
            loop {
                line.clear();
                assert!(
                    output.read_line(&mut line).unwrap() > 0,
                    "the server closed its output"
                );
                let v: Value = serde_json::from_str(&line).unwrap();
                if v.get("id") == Some(&json!(id)) {
                    return v;
                }
            }
        };
    let init = json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "mcp_latency", "version": "1"}});
    request(0, "initialize", init, &mut input);
    writeln!(
        input,
        "{}",
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
    )
    .unwrap();
    let call = json!({"name": a.tool, "arguments": a.args});
    for i in 0..a.warmup {
        let r = request(1 + i as u64, "tools/call", call.clone(), &mut input);
        assert!(
            r.get("result").is_some_and(|r| r["isError"] != true),
            "warm-up call failed: {r}"
        );
    }
    barrier.wait();
    let mut lat = Vec::with_capacity(a.calls);
    for i in 0..a.calls {
        let t = Instant::now();
        let r = request(10_000 + i as u64, "tools/call", call.clone(), &mut input);
        lat.push(t.elapsed());
        assert!(
            r.get("result").is_some_and(|r| r["isError"] != true),
            "call failed: {r}"
        );
    }
    drop(input);
    let _ = child.wait();
    lat
}

fn main() {
    let a = Arc::new(parse());
    let barrier = Arc::new(Barrier::new(a.sessions + 1));
    let handles: Vec<_> = (0..a.sessions)
        .map(|_| {
            let (a, b) = (a.clone(), barrier.clone());
            std::thread::spawn(move || session(&a, &b))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let wall = start.elapsed();
    all.sort();
    let n = all.len();
    let pct = |p: f64| all[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e3;
    println!(
        "sessions={} calls={} p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms throughput={:.0}/s",
        a.sessions,
        n,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        all[n - 1].as_secs_f64() * 1e3,
        n as f64 / wall.as_secs_f64()
    );
}
