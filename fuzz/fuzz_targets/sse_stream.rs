//! Server-Sent Events from an upstream MCP server: `warden_mcp::sse::Parser` on arbitrary
//! streams cut into arbitrary chunks, and `sse::encode` read back by the parser.
//!
//! Checked:
//! - pass-through is lossless: the events' raw bytes followed by what `finish` leaves
//!   over are the stream, byte for byte;
//! - chunking does not matter: any cut of the stream gives the same events and the same
//!   leftover as pushing it whole;
//! - the limit holds: a push fails exactly when the unfinished event it leaves is longer
//!   than the limit, and each successful push yields the events completed so far;
//! - what `encode` writes parses back to one event with the same fields (line breaks
//!   removed from `event`/`id`/`retry`, an `id` with NUL dropped as the parser does).

#![no_main]


use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use warden_mcp::sse::{encode, Event, Parser, SseError};

#[derive(Arbitrary, Debug)]
struct Input {
    stream: Vec<u8>,
    /// Chunk lengths, cycled; 0 pushes an empty chunk.
    cuts: Vec<u8>,
    limit: u8,
    event: Option<String>,
    id: Option<String>,
    retry: Option<String>,
    data: String,
}

const BIG: usize = 1 << 30;

fn chunks<'a>(stream: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = cuts
            .get(i % cuts.len().max(1))
            .map_or(rest.len(), |c| usize::from(*c));
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
        i += 1;
        if i > stream.len() + cuts.len() {
            // Only empty chunks left in the cycle: push the rest at once.
            out.push(rest);
            break;
        }
    }
    out
}

fn parse(chunks: &[&[u8]]) -> (Vec<Event>, Vec<u8>) {
    let mut p = Parser::new(BIG);
    let mut events = Vec::new();
    for c in chunks {
        events.extend(p.push(c).expect("no event reaches 1 GiB"));
    }
    let (last, rest) = p.finish();
    events.extend(last);
    (events, rest)
}

fn check_stream(input: &Input) {
    let stream = &input.stream;
    let whole = parse(&[stream]);
    let mut joined: Vec<u8> = whole.0.iter().flat_map(|e| e.raw.iter().copied()).collect();
    joined.extend_from_slice(&whole.1);
    assert_eq!(&joined, stream, "raw bytes do not round-trip");
    for e in &whole.0 {
        let last = e.raw.last().copied();
        assert!(
            matches!(last, Some(b'\n' | b'\r')),
            "an event ends without a line end"
        );
    }

    let cut = chunks(stream, &input.cuts);
    assert_eq!(parse(&cut), whole, "chunking changed the events");

    // The limit, against a model built from the whole parse: after a prefix of `n`
    // bytes, the events out are those that ended by `n` (one ending in a CR at `n`
    // waits for the next byte: it may be half a CRLF), and what is left is unfinished.
    let limit = usize::from(input.limit);
    let ends: Vec<usize> = whole
        .0
        .iter()
        .scan(0, |at, e| {
            *at += e.raw.len();
            Some(*at)
        })
        .collect();
    let mut p = Parser::new(limit);
    let mut n = 0;
    let mut out = 0;
    for c in &cut {
        n += c.len();
        let done = ends
            .iter()
            .filter(|&&end| end < n || end == n && stream[end - 1] != b'\r')
            .count();
        let unfinished = n - ends.get(done.wrapping_sub(1)).copied().unwrap_or(0);
        let unfinished = if done == 0 { n } else { unfinished };
        match p.push(c) {
            Ok(evs) => {
                assert!(
                    unfinished <= limit,
                    "{unfinished} bytes kept past the limit {limit}"
                );
                out += evs.len();
                assert_eq!(out, done, "events out after {n} bytes");
                for (e, w) in evs.iter().zip(&whole.0[out - evs.len()..]) {
                    assert_eq!(e, w);
                }
            }
            Err(SseError::TooLarge(l)) => {
                assert_eq!(l, limit);
                assert!(unfinished > limit, "refused {unfinished} <= {limit} bytes");
                return;
            }
        }
    }
}

fn check_encode(input: &Input) {
    let (event, id, retry, data) = (
        input.event.as_deref(),
        input.id.as_deref(),
        input.retry.as_deref(),
        input.data.as_str(),
    );
    let bytes = encode(event, id, retry, data);
    let clean = |s: &str| s.replace(['\r', '\n'], "");
    // Every SSE line ending (CRLF, LF, bare CR) starts a new data line.
    let normalized = data.replace("\r\n", "\n");
    let lines: Vec<&str> = normalized.split(['\r', '\n']).collect();
    let expected = Event {
        raw: bytes.clone(),
        data: Some(lines.join("\n")),
        id: id.map(clean).filter(|i| !i.contains('\0')),
        event: event.map(clean),
        retry: retry.map(clean),
    };
    let (events, rest) = parse(&[&bytes]);
    assert!(
        rest.is_empty(),
        "encode left an unfinished event: {bytes:?}"
    );
    assert_eq!(
        events,
        vec![expected],
        "encode does not read back: {bytes:?}"
    );
}

fuzz_target!(|input: Input| {
    check_stream(&input);
    check_encode(&input);
});
