//! MCP framing: arbitrary bytes through `read_frame` (the stdio line reader),
//! `parse_frame` (line or HTTP body to messages) and `classify` (message to kind).
//!
//! Input layout: byte 0 picks the frame limit, byte 1 the reader's buffer size (small
//! buffers split lines across `fill_buf` chunks), the rest is the stream.
//!
//! Checked:
//! - `read_frame` returns exactly the frames a plain line-splitting model predicts: every
//!   newline-terminated line, `\r`s stripped, blank lines skipped, a line over the limit
//!   reported as `TooLarge` with its byte count; so no frame is ever longer than the limit
//!   and none contains a newline;
//! - `parse_frame` refuses anything over the limit, and otherwise yields one object or a
//!   non-empty batch;
//! - `classify` never panics, and agrees with the members of the message: a request has a
//!   string `method` and a non-null string or number `id`, a notification has a string
//!   `method` and no `id`, a response has `result` or `error`;
//! - the error replies the proxy sends for a bad frame classify as responses.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokio::io::BufReader;
use warden_mcp::engine::{error_response, IdKey};
use warden_mcp::message::{classify, meta_mut, parse_frame, FrameError, Kind};
use warden_mcp::stdio::{read_frame, Frame as Read};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

#[derive(Debug, PartialEq)]
enum Frame {
    Ok(Vec<u8>),
    TooLarge(usize),
}

/// What `read_frame`'s contract says it returns for `bytes`, one line at a time.
fn model(mut bytes: &[u8], limit: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match bytes.iter().position(|b| *b == b'\n') {
            Some(i) => {
                let mut line = &bytes[..i];
                bytes = &bytes[i + 1..];
                // The limit counts the line's content; its newline comes on top.
                if line.len() > limit {
                    out.push(Frame::TooLarge(i + 1));
                    continue;
                }
                while let [init @ .., b'\r'] = line {
                    line = init;
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                out.push(Frame::Ok(line.to_vec()));
            }
            None => {
                // The last line has no newline: it ends at end of input.
                out.push(if bytes.len() > limit {
                    Frame::TooLarge(bytes.len())
                } else {
                    Frame::Ok(bytes.to_vec())
                });
                bytes = &[];
            }
        }
    }
    out
}

fn read_all(bytes: &[u8], cap: usize, limit: usize) -> Vec<Frame> {
    runtime().block_on(async {
        let mut r = BufReader::with_capacity(cap, bytes);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        // Each call consumes at least one byte, so this ends.
        for _ in 0..=bytes.len() {
            match read_frame(&mut r, &mut buf, limit).await {
                Ok(None) => return out,
                Ok(Some(Read::Ok)) => {
                    assert!(
                        buf.len() <= limit,
                        "read_frame returned a frame of {} bytes over the limit of {limit}",
                        buf.len()
                    );
                    assert!(!buf.contains(&b'\n'), "a frame holds a newline");
                    out.push(Frame::Ok(buf.clone()));
                }
                Ok(Some(Read::Refused(FrameError::TooLarge(seen, l), _))) => {
                    assert_eq!(l, limit);
                    assert!(seen > limit, "TooLarge({seen}, {limit}) is not too large");
                    out.push(Frame::TooLarge(seen));
                }
                Ok(Some(Read::Refused(e, _))) => {
                    panic!("read_frame reported {e:?}, not a framing error")
                }
                Err(e) => panic!("reading from memory failed: {e}"),
            }
        }
        panic!("read_frame did not reach the end of {} bytes", bytes.len());
    })
}

fn check_message(m: &Value) {
    let kind = classify(m);
    let obj = m.as_object();
    let member = |k: &str| obj.and_then(|o| o.get(k));
    match &kind {
        Ok(k) => {
            assert_eq!(member("jsonrpc"), Some(&Value::from("2.0")), "{m}");
            match k {
                Kind::Request { id, method } => {
                    assert_eq!(
                        member("method"),
                        Some(&Value::String(method.clone())),
                        "{m}"
                    );
                    assert_eq!(member("id"), Some(id), "{m}");
                    assert!(id.is_string() || id.is_number(), "request id {id} in {m}");
                    assert!(IdKey::of(id).is_some(), "a request id has a key: {id}");
                    let mut copy = m.clone();
                    let _ = meta_mut(&mut copy);
                }
                Kind::Notification { method } => {
                    assert_eq!(
                        member("method"),
                        Some(&Value::String(method.clone())),
                        "{m}"
                    );
                    assert!(member("id").is_none(), "notification with an id: {m}");
                }
                Kind::Response { id } => {
                    assert!(member("method").is_none(), "response with a method: {m}");
                    assert_eq!(member("id"), Some(id), "{m}");
                    assert!(id.is_string() || id.is_number() || id.is_null(), "{m}");
                    assert!(
                        member("result").is_some() || member("error").is_some(),
                        "response with neither result nor error: {m}"
                    );
                }
            }
        }
        Err(e) => {
            // Completeness: a well-formed request is never refused.
            let id_ok = member("id").is_some_and(|id| id.is_string() || id.is_number());
            let well_formed_request = member("jsonrpc") == Some(&Value::from("2.0"))
                && member("method").is_some_and(Value::is_string)
                && id_ok;
            assert!(!well_formed_request, "refused a valid request ({e}): {m}");
            check_error_reply(e);
        }
    }
}

/// The proxy answers a bad frame with `error_response(null, e.code(), e)` when it cannot
/// tell its id: it must be a well-formed response.
fn check_error_reply(e: &FrameError) {
    let reply = error_response(&Value::Null, e.code(), &e.to_string());
    assert_eq!(
        classify(&reply),
        Ok(Kind::Response { id: Value::Null }),
        "{reply}"
    );
}

fn check_frame(bytes: &[u8], limit: usize) {
    match parse_frame(bytes, limit) {
        Ok((v, batch)) => {
            assert!(
                bytes.len() <= limit,
                "parse_frame accepted {} > {limit} bytes",
                bytes.len()
            );
            if batch {
                let items = v.as_array().expect("a batch is an array");
                assert!(!items.is_empty(), "empty batch accepted");
                items.iter().for_each(check_message);
            } else {
                assert!(v.is_object(), "a single message is an object: {v}");
                check_message(&v);
            }
        }
        Err(e) => {
            if bytes.len() > limit {
                assert_eq!(e, FrameError::TooLarge(bytes.len(), limit));
            } else {
                assert!(
                    !matches!(e, FrameError::TooLarge(..)),
                    "{e} for {} bytes",
                    bytes.len()
                );
            }
            check_error_reply(&e);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [l, c, stream @ ..] = data else { return };
    // 0..=127 exactly, then steps of 32 up to 4096: small limits hit the edges, large
    // ones let real messages through.
    let limit = match *l {
        0..=127 => usize::from(*l),
        big => (usize::from(big) - 127) * 32,
    };
    let cap = 1 + usize::from(*c % 64);

    check_frame(stream, limit);

    let frames = read_all(stream, cap, limit);
    assert_eq!(
        frames,
        model(stream, limit),
        "read_frame disagrees with the line model"
    );
    for f in &frames {
        match f {
            Frame::Ok(bytes) => check_frame(bytes, limit),
            Frame::TooLarge(seen) => check_error_reply(&FrameError::TooLarge(*seen, limit)),
        }
    }
});
