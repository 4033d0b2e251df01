//! An incremental Server-Sent Events parser, for a gateway that inspects an event
//! stream as it passes through.
//!
//! Streamable HTTP answers a request with `text/event-stream` whose events carry JSON-RPC
//! messages in their `data:` lines. A gateway must not wait for the stream to end (a
//! progress notification is worth nothing an hour late), and it must pass on unchanged
//! what it does not change: comments, keep-alives, `id:` and `retry:` lines, events
//! without data. So the parser hands back every block it completes together with the
//! exact bytes it came in, and the caller either re-emits those bytes or writes a new
//! event with [`Event::with_data`].
//!
//! Framing follows the HTML Living Standard: lines end with CRLF, LF or CR; an empty
//! line ends an event; `data:` lines are joined with `\n`; a single space after the
//! colon is not part of the value; lines starting with `:` are comments.

/// One block of the stream, up to and including the empty line that ended it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The bytes as they arrived, terminator included.
    pub raw: Vec<u8>,
    /// The `data:` lines joined with `\n`; `None` if the block had none (a comment or a
    /// keep-alive).
    pub data: Option<String>,
    pub id: Option<String>,
    /// The `event:` field; absent means `message`.
    pub event: Option<String>,
    pub retry: Option<String>,
}

impl Event {
    /// The same event (type, id, retry) carrying `data` instead of its own. Comments
    /// are not kept: they mean nothing to the client.
    pub fn with_data(&self, data: &str) -> Vec<u8> {
        encode(
            self.event.as_deref(),
            self.id.as_deref(),
            self.retry.as_deref(),
            data,
        )
    }
}

/// Writes one event. `data` may span lines; each becomes its own `data:` line.
pub fn encode(event: Option<&str>, id: Option<&str>, retry: Option<&str>, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    // Field values cannot contain line breaks: a value that does would inject fields.
    let clean = |s: &str| s.replace(['\r', '\n'], "");
    if let Some(e) = event {
        out.extend_from_slice(format!("event: {}\n", clean(e)).as_bytes());
    }
    if let Some(i) = id {
        out.extend_from_slice(format!("id: {}\n", clean(i)).as_bytes());
    }
    if let Some(r) = retry {
        out.extend_from_slice(format!("retry: {}\n", clean(r)).as_bytes());
    }
    // Every line ending SSE knows (CRLF, LF, a bare CR) starts a new data line; splitting
    // on LF alone let a bare CR smuggle `event:` or `id:` fields into the stream.
    let normalized = data.replace("\r\n", "\n");
    for line in normalized.split(['\r', '\n']) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event grew past the limit of {0} bytes without ending")]
    TooLarge(usize),
}

/// Feeds on chunks as they arrive; yields each event once its blank line is seen.
#[derive(Debug)]
pub struct Parser {
    limit: usize,
    /// The unfinished event: complete lines, then the start of the current line.
    buf: Vec<u8>,
    /// Where the current (incomplete) line starts in `buf`.
    line_start: usize,
    /// Where to resume looking for a line end, so a long line arriving in small chunks
    /// is scanned once.
    scan: usize,
    current: Event,
    data: Vec<String>,
}

impl Parser {
    /// `limit` bounds the bytes of one event: the stream comes from a server that may
    /// misbehave, and an event that never ends must not grow without bound.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            buf: Vec::new(),
            line_start: 0,
            scan: 0,
            current: Event::default(),
            data: Vec::new(),
        }
    }

    /// Takes the next chunk and returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Event>, SseError> {
        self.buf.extend_from_slice(chunk);
        let events = self.drain(false);
        if self.buf.len() > self.limit {
            return Err(SseError::TooLarge(self.limit));
        }
        Ok(events)
    }

    /// At the end of the stream: the events a final CR completed, and the bytes of an
    /// unfinished event, which a client would discard.
    pub fn finish(&mut self) -> (Vec<Event>, Vec<u8>) {
        let events = self.drain(true);
        let rest = std::mem::take(&mut self.buf);
        self.line_start = 0;
        self.scan = 0;
        self.current = Event::default();
        self.data.clear();
        (events, rest)
    }

    fn drain(&mut self, eof: bool) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            let Some(rel) = self
                .buf
                .get(self.scan..)
                .and_then(|tail| tail.iter().position(|b| *b == b'\n' || *b == b'\r'))
            else {
                self.scan = self.buf.len();
                break;
            };
            let end = self.scan + rel;
            let next = if self.buf.get(end) == Some(&b'\r') {
                match self.buf.get(end + 1) {
                    Some(b'\n') => end + 2,
                    Some(_) => end + 1,
                    // A CR at the end of what we have may be the first half of a CRLF
                    // split across chunks: wait for the next byte unless there is none.
                    None if eof => end + 1,
                    None => {
                        self.scan = end;
                        break;
                    }
                }
            } else {
                end + 1
            };
            if end == self.line_start {
                let raw: Vec<u8> = self.buf.drain(..next).collect();
                let mut ev = std::mem::take(&mut self.current);
                ev.raw = raw;
                if !self.data.is_empty() {
                    ev.data = Some(self.data.join("\n"));
                    self.data.clear();
                }
                out.push(ev);
                self.line_start = 0;
                self.scan = 0;
            } else {
                let line = String::from_utf8_lossy(&self.buf[self.line_start..end]).into_owned();
                self.field(&line);
                self.line_start = next;
                self.scan = next;
            }
        }
        out
    }

    fn field(&mut self, line: &str) {
        if line.starts_with(':') {
            return;
        }
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match name {
            "data" => self.data.push(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            // An id with a NUL is ignored by clients; so do we.
            "id" if !value.contains('\0') => self.current.id = Some(value.to_owned()),
            "retry" => self.current.retry = Some(value.to_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c).unwrap());
        }
        out.extend(p.finish().0);
        out
    }

    #[test]
    fn one_event_with_fields() {
        let evs = all(&[b"event: message\nid: 7\nretry: 1000\ndata: {\"a\":1}\n\n"]);
        assert_eq!(evs.len(), 1);
        let e = &evs[0];
        assert_eq!(e.event.as_deref(), Some("message"));
        assert_eq!(e.id.as_deref(), Some("7"));
        assert_eq!(e.retry.as_deref(), Some("1000"));
        assert_eq!(e.data.as_deref(), Some("{\"a\":1}"));
        assert_eq!(
            e.raw,
            b"event: message\nid: 7\nretry: 1000\ndata: {\"a\":1}\n\n".to_vec()
        );
    }

    #[test]
    fn split_at_every_byte_gives_the_same_events() {
        let stream: &[u8] =
            b": hello\r\n\r\nid: 1\r\ndata: a\r\ndata:b\r\n\r\ndata: c\rdata: d\r\revent: x\ndata\n\n";
        let whole = all(&[stream]);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(all(&[a, b]), whole, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(all(&bytewise), whole);
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[0].data, None, "a comment-only block carries no data");
        assert_eq!(whole[0].raw, b": hello\r\n\r\n".to_vec());
        assert_eq!(
            whole[1].data.as_deref(),
            Some("a\nb"),
            "data lines are joined"
        );
        assert_eq!(whole[1].id.as_deref(), Some("1"));
        assert_eq!(whole[2].data.as_deref(), Some("c\nd"), "bare CR ends lines");
        assert_eq!(
            whole[3].data.as_deref(),
            Some(""),
            "`data` with no colon is empty"
        );
        assert_eq!(whole[3].event.as_deref(), Some("x"));
        let raw: Vec<u8> = whole.iter().flat_map(|e| e.raw.clone()).collect();
        assert_eq!(raw, stream, "raw bytes round-trip exactly");
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let evs = all(&[b"data: x\r", b"\n\r", b"\n"]);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data.as_deref(), Some("x"));
        assert_eq!(evs[0].raw, b"data: x\r\n\r\n".to_vec());
    }

    #[test]
    fn events_come_out_as_soon_as_they_end() {
        let mut p = Parser::new(1 << 20);
        assert!(p.push(b"data: one\n").unwrap().is_empty());
        let evs = p.push(b"\ndata: tw").unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data.as_deref(), Some("one"));
        assert!(p.push(b"o\n").unwrap().is_empty());
        let (evs, rest) = p.finish();
        assert!(evs.is_empty(), "an unfinished event is not dispatched");
        assert_eq!(rest, b"data: two\n".to_vec());
    }

    #[test]
    fn a_final_cr_ends_the_event_at_eof() {
        let mut p = Parser::new(1 << 20);
        assert!(p.push(b"data: z\r\r").unwrap().is_empty());
        let (evs, rest) = p.finish();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data.as_deref(), Some("z"));
        assert!(rest.is_empty());
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut p = Parser::new(64);
        assert!(p.push(&[b'a'; 60]).is_ok());
        assert_eq!(p.push(&[b'a'; 10]), Err(SseError::TooLarge(64)));
    }

    #[test]
    fn encode_and_reencode() {
        let evs = all(&[b"event: message\nid: 9\ndata: old\n\n"]);
        let re = evs[0].with_data("{\"new\":true}\nsecond");
        assert_eq!(
            re,
            b"event: message\nid: 9\ndata: {\"new\":true}\ndata: second\n\n".to_vec()
        );
        let back = all(&[&re]);
        assert_eq!(back[0].data.as_deref(), Some("{\"new\":true}\nsecond"));
        // a field value cannot smuggle in another field
        let e = encode(Some("message\ndata: x"), None, None, "{}");
        assert_eq!(all(&[&e])[0].data.as_deref(), Some("{}"));
    }

    /// Regression (found by fuzzing): a bare CR in data injected fields.
    #[test]
    fn a_bare_cr_in_data_cannot_inject_fields() {
        let bytes = encode(None, None, None, "{\"ok\":true}\revent: evil\rid: 666");
        let mut p = Parser::new(1 << 16);
        let events = p.push(&bytes).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, None);
        assert_eq!(events[0].id, None);
        assert_eq!(
            events[0].data.as_deref(),
            Some("{\"ok\":true}\nevent: evil\nid: 666")
        );
    }
}
