//! The audit trail: one append-only entry per decision and per outcome, hash-chained.
//!
//! Each entry's hash is SHA-256 over the previous entry's hash followed by the entry's
//! canonical encoding ([`encode_v1`]): an explicit, versioned byte layout written by hand,
//! not whatever a serializer happens to emit, so the chain stays verifiable across
//! versions of serde, SQLite or this code. Sequence numbers are contiguous from 1, so a
//! deleted entry shows up as a gap and an edited one as a hash mismatch.

use sha2::{Digest, Sha256};

use crate::clock::Nanos;

pub type Hash = [u8; 32];
pub const GENESIS: Hash = [0; 32];
const DOMAIN_V1: &[u8] = b"warden.audit.v1\0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A decision of the pipeline: permit or deny.
    Decision,
    /// The result of a permitted call, reported after the tool ran.
    Outcome,
    /// An operator action on the governance plane (kill, revive, revoke, policy reload).
    Control,
    /// Denials of unauthenticated callers that were counted rather than recorded one by
    /// one (a flood), for one source, reason and window: see [`Entry::summary`].
    Summary,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Decision => "decision",
            EntryKind::Outcome => "outcome",
            EntryKind::Control => "control",
            EntryKind::Summary => "summary",
        }
    }
    pub fn parse(s: &str) -> Option<EntryKind> {
        match s {
            "decision" => Some(EntryKind::Decision),
            "outcome" => Some(EntryKind::Outcome),
            "control" => Some(EntryKind::Control),
            "summary" => Some(EntryKind::Summary),
            _ => None,
        }
    }
    fn tag(self) -> u8 {
        match self {
            EntryKind::Decision => 1,
            EntryKind::Outcome => 2,
            EntryKind::Control => 3,
            EntryKind::Summary => 4,
        }
    }
}

/// An entry before the store gives it its place in the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub ts_ns: Nanos,
    pub kind: EntryKind,
    pub call_id: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty when the caller could not be authenticated.
    pub agent_id: String,
    pub delegation_id: Option<String>,
    /// The tool (or, for control entries, the operator action).
    pub action: String,
    /// SHA-256 of the call's arguments (hex); raw payloads are not kept.
    pub input_hash: Option<String>,
    /// SHA-256 of the tool's output (hex), on outcome entries.
    pub output_hash: Option<String>,
    /// `permit`/`deny` on decisions, `ok`/`error` on outcomes, the action on control.
    pub decision: String,
    /// The reason code, or for control entries who did it.
    pub reason: String,
    pub rules: Vec<String>,
    /// Estimated cost on decisions, actual cost on outcomes.
    pub cost: Option<f64>,
    pub duration_ns: Option<u64>,
    /// The agent's stated reasoning, or the operator's reason.
    pub rationale: Option<String>,
}

impl Entry {
    /// An operator action on the governance plane: `action` (e.g. `kill`), by `who`, with
    /// details such as the target and the stated reason.
    pub fn control(ts_ns: Nanos, id: String, action: &str, who: &str, detail: String) -> Entry {
        Entry {
            ts_ns,
            kind: EntryKind::Control,
            call_id: id,
            trace_id: String::new(),
            span_id: String::new(),
            agent_id: String::new(),
            delegation_id: None,
            action: action.to_owned(),
            input_hash: None,
            output_hash: None,
            decision: action.to_owned(),
            reason: who.to_owned(),
            rules: Vec::new(),
            cost: None,
            duration_ns: None,
            rationale: Some(detail),
        }
    }
}

impl Entry {
    /// `count` denials for `reason` from `source` in the `window_ns` just ended that have
    /// no entry of their own. The count leads the rationale, which reads as a sentence:
    /// "412 more UNAUTHENTICATED from 10.0.0.1 in the last 10 s".
    pub fn summary(
        ts_ns: Nanos,
        id: String,
        source: &str,
        reason: &str,
        count: u64,
        window_ns: Nanos,
    ) -> Entry {
        let secs = window_ns.div_ceil(crate::clock::NANOS_PER_SEC);
        Entry {
            ts_ns,
            kind: EntryKind::Summary,
            call_id: id,
            trace_id: String::new(),
            span_id: String::new(),
            agent_id: String::new(),
            delegation_id: None,
            action: String::new(),
            input_hash: None,
            output_hash: None,
            decision: "deny".to_owned(),
            reason: reason.to_owned(),
            rules: vec![SAMPLED_RULE.to_owned()],
            cost: None,
            duration_ns: Some(window_ns),
            rationale: Some(format!(
                "{count} more {reason} from {source} in the last {secs} s"
            )),
        }
    }

    /// How many denials a summary entry stands for.
    pub fn summarised(&self) -> Option<u64> {
        if self.kind != EntryKind::Summary {
            return None;
        }
        self.rationale.as_deref()?.split(' ').next()?.parse().ok()
    }
}

/// The rule id on summary entries.
pub const SAMPLED_RULE: &str = "warden.audit.sampled";

/// Bounds on what callers can make the audit store, in one place (`[audit]` in the
/// config): how much agent-supplied text an entry keeps, and how floods of failures from
/// unauthenticated callers are sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditLimits {
    /// Longest rationale kept, in bytes; see [`cap_text`].
    pub max_rationale_bytes: usize,
    /// Length of a sampling window.
    pub failure_window_ns: Nanos,
    /// Failures per source and reason recorded in full per window; the rest are counted.
    pub failure_full_entries: u32,
    /// Failures recorded in full per window from all sources together; past it, every
    /// source's failures are counted, so many sources cannot multiply the full entries.
    pub failure_max_entries: u32,
}

pub const DEFAULT_MAX_RATIONALE: usize = 2048;
/// Longest tool name kept in an entry of a refused (invalid) request: the longest a
/// valid one may be.
pub const MAX_ACTION_KEPT: usize = crate::tool::MAX_NAME_BYTES;

impl Default for AuditLimits {
    fn default() -> Self {
        Self {
            max_rationale_bytes: DEFAULT_MAX_RATIONALE,
            failure_window_ns: 10 * crate::clock::NANOS_PER_SEC,
            failure_full_entries: 20,
            failure_max_entries: 1000,
        }
    }
}

/// Agent-supplied text as an entry keeps it: at most `max` bytes (cut at a character
/// boundary), and if cut, a marker with the original length. Cut rather than refused:
/// the text explains a call but does not decide it, so a long explanation should not
/// turn into a denied call, while the store must not grow with what a caller sends.
pub fn cap_text(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… [truncated from {} bytes]",
        s.get(..end).unwrap_or_default(),
        s.len()
    )
}

/// An entry with its place in the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub prev_hash: Hash,
    pub hash: Hash,
    pub entry: Entry,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // INVARIANT: fields are bounded far below 4 GiB by the request size limit.
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => buf.push(0),
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
    }
}

/// The canonical encoding, version 1. Field order and widths are fixed; strings are
/// length-prefixed (u32, big-endian); optional fields carry a presence byte.
pub fn encode_v1(seq: u64, e: &Entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(DOMAIN_V1);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&e.ts_ns.to_be_bytes());
    b.push(e.kind.tag());
    put_str(&mut b, &e.call_id);
    put_str(&mut b, &e.trace_id);
    put_str(&mut b, &e.span_id);
    put_str(&mut b, &e.agent_id);
    put_opt_str(&mut b, e.delegation_id.as_deref());
    put_str(&mut b, &e.action);
    put_opt_str(&mut b, e.input_hash.as_deref());
    put_opt_str(&mut b, e.output_hash.as_deref());
    put_str(&mut b, &e.decision);
    put_str(&mut b, &e.reason);
    b.extend_from_slice(&(e.rules.len() as u32).to_be_bytes());
    for r in &e.rules {
        put_str(&mut b, r);
    }
    match e.cost {
        None => b.push(0),
        Some(c) => {
            b.push(1);
            b.extend_from_slice(&c.to_bits().to_be_bytes());
        }
    }
    match e.duration_ns {
        None => b.push(0),
        Some(d) => {
            b.push(1);
            b.extend_from_slice(&d.to_be_bytes());
        }
    }
    put_opt_str(&mut b, e.rationale.as_deref());
    b
}

pub fn chain_hash(prev: &Hash, seq: u64, e: &Entry) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(encode_v1(seq, e));
    h.finalize().into()
}

/// Seals entries onto the end of a chain whose last record has `last_seq`/`last_hash`.
pub fn seal(
    last_seq: u64,
    last_hash: Hash,
    entries: impl IntoIterator<Item = Entry>,
) -> Vec<Record> {
    let mut prev = last_hash;
    let mut seq = last_seq;
    entries
        .into_iter()
        .map(|mut entry| {
            // Hash only what every backend can store exactly: NaN has no SQL form and
            // -0.0 comes back as 0.0, either of which would later read as an edit.
            entry.cost = entry
                .cost
                .filter(|c| !c.is_nan())
                .map(|c| if c == 0.0 { 0.0 } else { c });
            seq += 1;
            let hash = chain_hash(&prev, seq, &entry);
            let rec = Record {
                seq,
                prev_hash: prev,
                hash,
                entry,
            };
            prev = hash;
            rec
        })
        .collect()
}

/// SHA-256 of a JSON value over its canonical form: compact, object keys sorted by their
/// UTF-8 bytes (as RFC 8785 orders them for ASCII keys), so equal arguments hash equally
/// whatever order the client sent them in.
pub fn hash_json(v: &serde_json::Value) -> String {
    let mut buf = Vec::with_capacity(128);
    canonical_json(v, &mut buf);
    hex::encode(Sha256::digest(buf))
}

fn canonical_json(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                if let Some(val) = m.get(k) {
                    canonical_json(val, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(x, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("entry {seq}: missing (expected sequence {seq}, found {found})")]
    Gap { seq: u64, found: u64 },
    #[error("entry {seq}: its previous-hash does not match entry {}", seq - 1)]
    BrokenLink { seq: u64 },
    #[error("entry {seq}: contents do not match its hash (edited after it was written)")]
    BadHash { seq: u64 },
}

impl ChainError {
    pub fn seq(&self) -> u64 {
        match self {
            ChainError::Gap { seq, .. }
            | ChainError::BrokenLink { seq }
            | ChainError::BadHash { seq } => *seq,
        }
    }
}

/// Verifies a chain one record at a time, in order, from the first.
#[derive(Debug)]
pub struct ChainVerifier {
    next_seq: u64,
    prev: Hash,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            next_seq: 1,
            prev: GENESIS,
        }
    }
}

impl ChainVerifier {
    pub fn push(&mut self, r: &Record) -> Result<(), ChainError> {
        if r.seq != self.next_seq {
            return Err(ChainError::Gap {
                seq: self.next_seq,
                found: r.seq,
            });
        }
        if r.prev_hash != self.prev {
            return Err(ChainError::BrokenLink { seq: r.seq });
        }
        if chain_hash(&r.prev_hash, r.seq, &r.entry) != r.hash {
            return Err(ChainError::BadHash { seq: r.seq });
        }
        self.prev = r.hash;
        self.next_seq += 1;
        Ok(())
    }

    /// How many records have verified so far.
    pub fn verified(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn head(&self) -> Hash {
        self.prev
    }
}

/// The result of verifying a whole stored chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries that verified, from the first.
    pub verified: u64,
    /// Hex of the last verified hash (the head of the chain).
    pub head: String,
    /// The first broken or missing entry, if any.
    pub error: Option<ChainError>,
}

/// Reads the chain from the store in pages and verifies it from the first entry.
pub fn verify_store(
    store: &dyn crate::store::Store,
) -> Result<VerifyReport, crate::store::StoreError> {
    const PAGE: usize = 5_000;
    let mut v = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.read_audit(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            if let Err(e) = v.push(r) {
                return Ok(VerifyReport {
                    verified: v.verified(),
                    head: hex::encode(v.head()),
                    error: Some(e),
                });
            }
        }
    }
    Ok(VerifyReport {
        verified: v.verified(),
        head: hex::encode(v.head()),
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn capped_text_is_cut_on_a_character_boundary_and_says_how_long_it_was() {
        assert_eq!(cap_text("short", 8), "short");
        assert_eq!(cap_text("12345678", 8), "12345678");
        // `é` is two bytes: a cut at 3 bytes keeps one and a half, so it keeps one.
        assert_eq!(cap_text("ééé", 3), "é… [truncated from 6 bytes]");
        assert_eq!(cap_text("ab", 0), "… [truncated from 2 bytes]");
    }

    #[test]
    fn a_summary_says_how_many_it_stands_for() {
        let e = Entry::summary(
            1,
            "id".into(),
            "10.0.0.1",
            "UNAUTHENTICATED",
            412,
            10_000_000_000,
        );
        assert_eq!(e.kind, EntryKind::Summary);
        assert_eq!(e.summarised(), Some(412));
        assert_eq!(
            e.rationale.as_deref(),
            Some("412 more UNAUTHENTICATED from 10.0.0.1 in the last 10 s")
        );
        assert_eq!(entry(2, "x").summarised(), None);
    }

    fn entry(i: u64, s: &str) -> Entry {
        Entry {
            ts_ns: i,
            kind: if i % 2 == 0 {
                EntryKind::Decision
            } else {
                EntryKind::Outcome
            },
            call_id: format!("c{i}"),
            trace_id: "t".into(),
            span_id: "s".into(),
            agent_id: s.into(),
            delegation_id: (i % 3 == 0).then(|| "d".to_string()),
            action: "get_claim".into(),
            input_hash: Some("ab".into()),
            output_hash: None,
            decision: "permit".into(),
            reason: "PERMITTED".into(),
            rules: vec!["r1".into(), s.into()],
            cost: Some(i as f64 / 3.0),
            duration_ns: Some(i),
            rationale: Some(s.into()),
        }
    }

    fn verify_all(rs: &[Record]) -> Result<u64, ChainError> {
        let mut v = ChainVerifier::default();
        for r in rs {
            v.push(r)?;
        }
        Ok(v.verified())
    }

    #[test]
    fn encoding_is_unambiguous_between_adjacent_fields() {
        let mut a = entry(1, "x");
        let mut b = a.clone();
        a.trace_id = "ab".into();
        a.span_id = "c".into();
        b.trace_id = "a".into();
        b.span_id = "bc".into();
        assert_ne!(encode_v1(1, &a), encode_v1(1, &b));
        let mut c = entry(1, "x");
        c.rationale = None;
        let mut d = entry(1, "x");
        d.rationale = Some(String::new());
        assert_ne!(encode_v1(1, &c), encode_v1(1, &d));
    }

    #[test]
    fn detects_gap_and_reorder() {
        let rs = seal(0, GENESIS, (0..5).map(|i| entry(i, "a")));
        assert_eq!(verify_all(&rs), Ok(5));
        let mut gap = rs.clone();
        gap.remove(2);
        assert_eq!(verify_all(&gap), Err(ChainError::Gap { seq: 3, found: 4 }));
        let mut swapped = rs.clone();
        swapped.swap(1, 2);
        assert!(verify_all(&swapped).is_err());
    }

    #[test]
    fn hash_json_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":[1,2]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":[1,2],"b":1}"#).unwrap();
        assert_eq!(hash_json(&a), hash_json(&b));
        let nested_a: serde_json::Value =
            serde_json::from_str(r#"{"x":{"z":1,"y":"\u00e9"}}"#).unwrap();
        let nested_b: serde_json::Value = serde_json::from_str(r#"{"x":{"y":"é","z":1}}"#).unwrap();
        assert_eq!(hash_json(&nested_a), hash_json(&nested_b));
        assert_ne!(hash_json(&a), hash_json(&nested_a));
    }

    proptest! {
        /// Any sequence of appends, in any batch sizes, verifies.
        #[test]
        fn any_appends_verify(names in proptest::collection::vec("[a-z]{0,8}", 1..40), split in 0usize..40) {
            let entries: Vec<Entry> = names.iter().enumerate().map(|(i, s)| entry(i as u64, s)).collect();
            let split = split.min(entries.len());
            let mut rs = seal(0, GENESIS, entries[..split].to_vec());
            let (ls, lh) = rs.last().map(|r| (r.seq, r.hash)).unwrap_or((0, GENESIS));
            rs.extend(seal(ls, lh, entries[split..].to_vec()));
            prop_assert_eq!(verify_all(&rs), Ok(entries.len() as u64));
        }

        /// Flipping any bit of any entry's canonical content breaks verification at or
        /// before that entry.
        #[test]
        fn any_flipped_byte_fails(names in proptest::collection::vec("[a-z]{1,8}", 1..20), which in any::<prop::sample::Index>(), field in 0usize..6, bit in 0u8..8) {
            let mut rs = seal(0, GENESIS, names.iter().enumerate().map(|(i, s)| entry(i as u64, s)));
            let i = which.index(rs.len());
            let e = &mut rs[i].entry;
            let flip = |s: &mut String| {
                let mut b = s.clone().into_bytes();
                if b.is_empty() { b.push(b'x') } else { b[0] ^= 1 << (bit % 7) }
                *s = String::from_utf8_lossy(&b).into_owned();
            };
            match field {
                0 => flip(&mut e.agent_id),
                1 => flip(&mut e.call_id),
                2 => flip(&mut e.decision),
                3 => e.ts_ns ^= 1 << bit,
                4 => flip(&mut e.rules[0]),
                _ => e.cost = e.cost.map(|c| f64::from_bits(c.to_bits() ^ (1 << bit))),
            }
            let err = verify_all(&rs).unwrap_err();
            prop_assert!(err.seq() <= rs[i].seq);
        }
    }
}
