//! What can be said of a message that cannot be parsed whole: its id, method and tool
//! name, read from its bytes as they stream past; and the repair of text the reference
//! servers accept but a strict JSON parser refuses.
//!
//! Hand-written because no JSON library reads a few top-level members out of a byte
//! stream without holding the document: an over-limit message is refused *because* it
//! must not be held, yet its refusal has to name the request's id (an error with
//! `id: null` is one no client can match, so its call would hang until it timed out).

use serde_json::Value;

/// Longest member value kept while sniffing (ids, methods and tool names are short).
const MAX_CAPTURE: usize = 1024;

/// Reads the top-level `id` and `method` and `params.name` of one JSON object fed in
/// pieces. Batches and anything odd yield nothing.
#[derive(Debug, Default, Clone)]
pub struct Sniffer {
    /// `{` or `[` for each open container.
    stack: Vec<u8>,
    started: bool,
    gave_up: bool,
    in_str: bool,
    esc: bool,
    /// The next string in the current object is a key.
    key_mode: bool,
    is_key: bool,
    capture: bool,
    cur: Vec<u8>,
    key1: Vec<u8>,
    key2: Vec<u8>,
    /// A number (or literal) value being read for `id`.
    scalar: Option<Vec<u8>>,
    id: Option<Value>,
    method: Option<String>,
    name: Option<String>,
}

impl Sniffer {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.gave_up {
                return;
            }
            self.byte(b);
        }
    }

    pub fn id(&self) -> Option<Value> {
        self.id.clone().filter(|v| v.is_string() || v.is_number())
    }

    pub fn method(&self) -> Option<&str> {
        self.method.as_deref()
    }

    /// `params.name`: the tool of a `tools/call`, the prompt of a `prompts/get`.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn depth(&self) -> usize {
        self.stack.len()
    }

    fn byte(&mut self, b: u8) {
        if self.in_str {
            if self.esc {
                self.esc = false;
                self.push(b);
            } else if b == b'\\' {
                self.esc = true;
                self.push(b);
            } else if b == b'"' {
                self.in_str = false;
                self.end_string();
            } else {
                self.push(b);
            }
            return;
        }
        if !self.started {
            if b.is_ascii_whitespace() {
                return;
            }
            self.started = true;
            if b != b'{' {
                // A batch, or not an object: nothing to say about it.
                self.gave_up = true;
                return;
            }
        }
        match b {
            b'"' => {
                self.in_str = true;
                self.cur.clear();
                self.is_key = self.key_mode && self.stack.last() == Some(&b'{');
                self.capture = self.is_key || self.wanted();
            }
            b'{' | b'[' => {
                self.end_scalar();
                self.stack.push(b);
                self.key_mode = b == b'{';
            }
            b'}' | b']' => {
                self.end_scalar();
                self.stack.pop();
                if self.depth() == 1 {
                    self.key2.clear();
                }
                self.key_mode = false;
            }
            b':' => self.key_mode = false,
            b',' => {
                self.end_scalar();
                self.key_mode = self.stack.last() == Some(&b'{');
            }
            b if b.is_ascii_whitespace() => self.end_scalar(),
            _ => {
                if self.depth() == 1 && self.key1 == b"id" && !self.key_mode {
                    let s = self.scalar.get_or_insert_with(Vec::new);
                    if s.len() < MAX_CAPTURE {
                        s.push(b);
                    }
                }
            }
        }
    }

    /// Whether the value string about to start is one we keep.
    fn wanted(&self) -> bool {
        (self.depth() == 1 && (self.key1 == b"id" || self.key1 == b"method"))
            || (self.depth() == 2 && self.key1 == b"params" && self.key2 == b"name")
    }

    fn push(&mut self, b: u8) {
        if self.capture && self.cur.len() < MAX_CAPTURE {
            self.cur.push(b);
        }
    }

    fn end_string(&mut self) {
        if !self.capture {
            return;
        }
        let raw = std::mem::take(&mut self.cur);
        if self.is_key {
            match self.depth() {
                1 => self.key1 = raw,
                2 => self.key2 = raw,
                _ => {}
            }
            return;
        }
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(&raw);
        quoted.push(b'"');
        let Ok(text) = serde_json::from_slice::<String>(&quoted) else {
            return;
        };
        match (self.depth(), self.key1.as_slice()) {
            (1, b"id") => self.id = Some(Value::String(text)),
            (1, b"method") => self.method = Some(text),
            (2, _) => self.name = Some(text),
            _ => {}
        }
    }

    fn end_scalar(&mut self) {
        if let Some(s) = self.scalar.take() {
            if let Ok(v) = serde_json::from_slice::<Value>(&s) {
                self.id = Some(v);
            }
        }
    }
}

/// Repairs what Node's `JSON.parse` (the reference servers) accepts and serde_json
/// refuses: bytes that are not UTF-8 become U+FFFD, as Node's decoder makes them, and a
/// `\uD800`-style escape of half a surrogate pair (what Python's `json.dumps` writes for
/// a broken emoji) becomes `\uFFFD`. `None` if nothing needed repair: the fast path for
/// every well-formed message. The repaired text is what is judged and what is forwarded,
/// so both see the same characters.
pub fn sanitize(bytes: &[u8]) -> Option<Vec<u8>> {
    let utf8 = std::str::from_utf8(bytes).is_ok();
    if utf8 && !may_hold_surrogate_escape(bytes) {
        return None;
    }
    let text = String::from_utf8_lossy(bytes);
    let (fixed, changed) = fix_surrogates(&text);
    (changed || !utf8).then(|| fixed.into_bytes())
}

fn may_hold_surrogate_escape(b: &[u8]) -> bool {
    b.windows(3)
        .any(|w| w[0] == b'\\' && (w[1] == b'u') && (w[2] == b'd' || w[2] == b'D'))
}

fn hex4(s: &[u8]) -> Option<u16> {
    let t = std::str::from_utf8(s.get(..4)?).ok()?;
    u16::from_str_radix(t, 16).ok()
}

/// Replaces lone surrogate escapes inside JSON strings with `\uFFFD`.
fn fix_surrogates(text: &str) -> (String, bool) {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut in_str = false;
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                in_str = !in_str;
                i += 1;
            }
            b'\\' if in_str => {
                if b.get(i + 1) == Some(&b'u') {
                    let code = hex4(&b[i + 2..]);
                    match code {
                        Some(hi @ 0xD800..=0xDBFF) => {
                            let lo = (b.get(i + 6) == Some(&b'\\') && b.get(i + 7) == Some(&b'u'))
                                .then(|| hex4(&b[i + 8..]))
                                .flatten();
                            let _ = hi;
                            if matches!(lo, Some(0xDC00..=0xDFFF)) {
                                i += 12;
                            } else {
                                out.push_str(&text[last..i]);
                                out.push_str("\\uFFFD");
                                changed = true;
                                i += 6;
                                last = i;
                            }
                        }
                        Some(0xDC00..=0xDFFF) => {
                            out.push_str(&text[last..i]);
                            out.push_str("\\uFFFD");
                            changed = true;
                            i += 6;
                            last = i;
                        }
                        _ => i += 2,
                    }
                } else {
                    i += 2;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[last.min(text.len())..]);
    (out, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sniff(s: &str) -> Sniffer {
        let mut n = Sniffer::default();
        // Fed one byte at a time: the state must carry across pieces.
        for b in s.as_bytes() {
            n.feed(std::slice::from_ref(b));
        }
        n
    }

    #[test]
    fn reads_id_method_and_name_wherever_they_are() {
        let s = sniff(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"id":9,"name":"x","method":"m"}}}"#,
        );
        assert_eq!(
            (s.id(), s.method(), s.name()),
            (Some(json!(7)), Some("tools/call"), Some("echo"))
        );
        // TypeScript writes the id last, after a large result.
        let s = sniff(
            r#"{"result":{"content":[{"type":"text","text":"a \"quoted\" } ] { text"}]},"jsonrpc":"2.0","id":"a\"b"}"#,
        );
        assert_eq!(s.id(), Some(json!("a\"b")));
        assert_eq!(s.method(), None);
        let s = sniff(r#"  { "id" : -12 , "method" : "ping" }"#);
        assert_eq!((s.id(), s.method()), (Some(json!(-12)), Some("ping")));
        assert_eq!(sniff(r#"[{"id":1}]"#).id(), None);
        assert_eq!(sniff(r#"{"id":{"x":1}}"#).id(), None);
    }

    #[test]
    fn repairs_lone_surrogates_and_bad_utf8_only() {
        assert_eq!(sanitize(br#"{"a":"\ud83d\ude00"}"#), None);
        assert_eq!(sanitize(br#"{"a":"plain"}"#), None);
        let fixed = sanitize(br#"{"a":"x\ud800y","b":"\\ud800"}"#).unwrap();
        assert_eq!(
            std::str::from_utf8(&fixed).unwrap(),
            r#"{"a":"x\uFFFDy","b":"\\ud800"}"#
        );
        let v: Value = serde_json::from_slice(&fixed).unwrap();
        assert_eq!(v["a"], "x\u{FFFD}y");
        let fixed = sanitize(b"{\"a\":\"\xff\"}").unwrap();
        let v: Value = serde_json::from_slice(&fixed).unwrap();
        assert_eq!(v["a"], "\u{FFFD}");
        let fixed = sanitize(br#"{"a":"\udc00"}"#).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&fixed).unwrap()["a"],
            "\u{FFFD}"
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, sniffing never panics, and a repaired frame is UTF-8.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut s = Sniffer::default();
            s.feed(&bytes);
            let _ = s.id();
            if let Some(fixed) = sanitize(&bytes) {
                proptest::prop_assert!(std::str::from_utf8(&fixed).is_ok());
            }
        }
    }
}
