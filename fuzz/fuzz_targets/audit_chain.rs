//! The audit chain: arbitrary entries sealed with `audit::seal` verify with
//! `ChainVerifier`, and any one edit to one sealed record is caught at that record.
//!
//! Checked:
//! - a sealed chain verifies in full, with contiguous sequence numbers from 1;
//! - the canonical encoding is injective: an edit that changes the entry changes its
//!   encoding (so moving a character from one field to the next, `None` to `Some("")`,
//!   or splitting one rule into two never hashes the same);
//! - an edited record fails with `BadHash` at its own sequence number, after exactly the
//!   records before it verified; a dropped record shows up as a gap.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use warden_core::audit::{
    encode_v1, seal, ChainError, ChainVerifier, Entry, EntryKind, Record, GENESIS,
};

#[derive(Arbitrary, Debug)]
struct ArbEntry {
    ts_ns: u64,
    kind: u8,
    call_id: String,
    trace_id: String,
    span_id: String,
    agent_id: String,
    delegation_id: Option<String>,
    action: String,
    input_hash: Option<String>,
    output_hash: Option<String>,
    decision: String,
    reason: String,
    rules: Vec<String>,
    cost: Option<f64>,
    duration_ns: Option<u64>,
    rationale: Option<String>,
}

impl From<ArbEntry> for Entry {
    fn from(a: ArbEntry) -> Entry {
        Entry {
            ts_ns: a.ts_ns,
            kind: match a.kind % 4 {
                0 => EntryKind::Decision,
                1 => EntryKind::Outcome,
                2 => EntryKind::Control,
                _ => EntryKind::Summary,
            },
            call_id: a.call_id,
            trace_id: a.trace_id,
            span_id: a.span_id,
            agent_id: a.agent_id,
            delegation_id: a.delegation_id,
            action: a.action,
            input_hash: a.input_hash,
            output_hash: a.output_hash,
            decision: a.decision,
            reason: a.reason,
            rules: a.rules,
            cost: a.cost,
            duration_ns: a.duration_ns,
            rationale: a.rationale,
        }
    }
}

/// One edit to one record.
#[derive(Arbitrary, Debug)]
enum Edit {
    /// Replaces one character of a string field with a different one.
    FlipChar {
        field: u8,
        at: u16,
    },
    /// Moves the last character of a string field to the front of the next one.
    ShiftBoundary {
        field: u8,
    },
    /// `None` becomes `Some("")` and back.
    ToggleOption {
        field: u8,
    },
    /// Splits a rule in two at a character, or joins two adjacent rules.
    SplitRule {
        rule: u8,
        at: u16,
    },
    FlipNumber {
        field: u8,
        bit: u8,
    },
    NextKind,
    /// Drops the record from the chain.
    Drop,
}

const STRINGS: usize = 14;

/// The entry's string slots in encoding order; `None` where an optional one is absent.
fn string_mut(e: &mut Entry, i: usize) -> Option<&mut String> {
    match i % STRINGS {
        0 => Some(&mut e.call_id),
        1 => Some(&mut e.trace_id),
        2 => Some(&mut e.span_id),
        3 => Some(&mut e.agent_id),
        4 => e.delegation_id.as_mut(),
        5 => Some(&mut e.action),
        6 => e.input_hash.as_mut(),
        7 => e.output_hash.as_mut(),
        8 => Some(&mut e.decision),
        9 => Some(&mut e.reason),
        10 => e.rules.first_mut(),
        11 => e.rules.last_mut(),
        12 => e.rationale.as_mut(),
        _ => Some(&mut e.call_id),
    }
}

fn option_mut(e: &mut Entry, i: u8) -> &mut Option<String> {
    match i % 4 {
        0 => &mut e.delegation_id,
        1 => &mut e.input_hash,
        2 => &mut e.output_hash,
        _ => &mut e.rationale,
    }
}

/// Applies the edit; `false` if it does not apply to this entry (nothing changed).
fn edit(e: &mut Entry, how: &Edit) -> bool {
    match *how {
        Edit::FlipChar { field, at } => {
            let Some(s) = string_mut(e, usize::from(field)) else {
                return false;
            };
            let Some((i, c)) = s
                .char_indices()
                .nth(usize::from(at) % s.chars().count().max(1))
            else {
                s.push('x');
                return true;
            };
            let new = if c.is_ascii() {
                char::from(c as u8 ^ 1)
            } else {
                'a'
            };
            s.replace_range(i..i + c.len_utf8(), new.encode_utf8(&mut [0; 4]));
            true
        }
        Edit::ShiftBoundary { field } => {
            // Adjacent, always-present string fields in encoding order.
            let (a, b): (&mut String, &mut String) = match field % 3 {
                0 => (&mut e.call_id, &mut e.trace_id),
                1 => (&mut e.trace_id, &mut e.span_id),
                _ => (&mut e.decision, &mut e.reason),
            };
            let Some(c) = a.pop() else { return false };
            b.insert(0, c);
            true
        }
        Edit::ToggleOption { field } => {
            let o = option_mut(e, field);
            *o = match o.take() {
                None => Some(String::new()),
                Some(_) => None,
            };
            true
        }
        Edit::SplitRule { rule, at } => {
            let n = e.rules.len();
            if n == 0 {
                e.rules.push(String::new());
                return true;
            }
            let r = usize::from(rule) % n;
            let s = &e.rules[r];
            let chars = s.chars().count();
            if chars >= 1 {
                let k = usize::from(at) % (chars + 1);
                let byte = s.char_indices().nth(k).map_or(s.len(), |(i, _)| i);
                let tail = s[byte..].to_owned();
                e.rules[r].truncate(byte);
                e.rules.insert(r + 1, tail);
            } else if r + 1 < n {
                let next = e.rules.remove(r + 1);
                e.rules[r].push_str(&next);
            } else {
                e.rules.remove(r);
            }
            true
        }
        Edit::FlipNumber { field, bit } => {
            let mask = 1u64 << (bit % 64);
            match field % 3 {
                0 => e.ts_ns ^= mask,
                1 => match &mut e.cost {
                    Some(c) => *c = f64::from_bits(c.to_bits() ^ mask),
                    None => e.cost = Some(0.0),
                },
                _ => match &mut e.duration_ns {
                    Some(d) => *d ^= mask,
                    None => e.duration_ns = Some(0),
                },
            }
            true
        }
        Edit::NextKind => {
            e.kind = match e.kind {
                EntryKind::Decision => EntryKind::Outcome,
                EntryKind::Outcome => EntryKind::Control,
                EntryKind::Control => EntryKind::Summary,
                EntryKind::Summary => EntryKind::Decision,
            };
            true
        }
        Edit::Drop => false,
    }
}

/// An entry's contents, with the cost as its bits.
fn identity(e: &Entry) -> (String, Option<u64>) {
    (format!("{e:?}"), e.cost.map(f64::to_bits))
}

fn verify(chain: &[Record]) -> (u64, Option<ChainError>) {
    let mut v = ChainVerifier::default();
    for r in chain {
        if let Err(e) = v.push(r) {
            return (v.verified(), Some(e));
        }
    }
    (v.verified(), None)
}

fuzz_target!(|input: (Vec<ArbEntry>, u8, Edit)| {
    let (entries, which, how) = input;
    let entries: Vec<Entry> = entries.into_iter().map(Entry::from).collect();
    let n = entries.len();
    let mut chain = seal(0, GENESIS, entries);
    assert_eq!(chain.len(), n);
    for (i, r) in chain.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert!(
            r.entry.cost.is_none_or(|c| !c.is_nan()),
            "seal kept a NaN cost"
        );
    }
    assert_eq!(
        verify(&chain),
        (n as u64, None),
        "a freshly sealed chain does not verify"
    );
    if n == 0 {
        return;
    }

    let i = usize::from(which) % n;
    let seq = i as u64 + 1;
    if let Edit::Drop = how {
        chain.remove(i);
        let expect = (i < n - 1).then_some(ChainError::Gap {
            seq,
            found: seq + 1,
        });
        assert_eq!(verify(&chain), (i as u64, expect), "dropping record {seq}");
        return;
    }
    let before = chain[i].entry.clone();
    if !edit(&mut chain[i].entry, &how) {
        return;
    }
    let after = &chain[i].entry;
    // Every edit changes something; compared bit for bit, since `0.0 == -0.0`.
    assert_ne!(
        identity(&before),
        identity(after),
        "the edit {how:?} changed nothing"
    );
    assert_ne!(
        encode_v1(seq, &before),
        encode_v1(seq, after),
        "two different entries encode the same:\n{before:?}\n{after:?}"
    );
    assert_eq!(
        verify(&chain),
        (i as u64, Some(ChainError::BadHash { seq })),
        "an edit to record {seq} ({how:?}) went unnoticed"
    );
});
