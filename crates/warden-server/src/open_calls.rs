//! The calls this node permitted whose outcome has not been reported yet.
//!
//! An outcome copies its call's trace, action and input hash from the decision, and may
//! only be recorded for a permitted call of the agent that reports it. The node that
//! decided knows all of that already; reading it back from the store on every outcome
//! cost about a tenth of the MCP gateway's CPU. So a permit, once durable, is remembered
//! here until its outcome takes it. What is not here (decided by another node or before a
//! restart, or pushed out because the table is full) is read from the store as before,
//! and the store's own rule (one outcome per call, checked under its write lock) still
//! settles two reports that race.
//!
//! Bounded: calls whose outcome never comes (an HTTP API client that never reports) are
//! forgotten oldest first once [`OpenCalls::CAPACITY`] are remembered.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use warden_core::audit::Entry;

/// What an outcome copies from its call's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Permitted {
    pub agent_id: String,
    pub trace_id: String,
    pub span_id: String,
    pub delegation_id: Option<String>,
    pub action: String,
    pub input_hash: Option<String>,
}

impl Permitted {
    pub fn of(decision: &Entry) -> Self {
        Self {
            agent_id: decision.agent_id.clone(),
            trace_id: decision.trace_id.clone(),
            span_id: decision.span_id.clone(),
            delegation_id: decision.delegation_id.clone(),
            action: decision.action.clone(),
            input_hash: decision.input_hash.clone(),
        }
    }
}

/// What the table knows of a call, as seen by an agent reporting its outcome.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// A permitted call of this agent, now taken from the table.
    Mine(Permitted),
    /// A permitted call of another agent; left where it is.
    Foreign,
    /// Not remembered here: ask the store.
    Unknown,
}

#[derive(Default)]
pub struct OpenCalls {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    calls: HashMap<String, Permitted>,
    /// Call ids in the order they were permitted; ids already taken are skipped when
    /// met, and swept out when they outnumber the live ones.
    order: VecDeque<String>,
}

impl OpenCalls {
    pub const CAPACITY: usize = 16_384;

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the table consistent; a panic elsewhere cannot break it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a durable permit.
    pub fn insert(&self, call_id: &str, call: Permitted) {
        let mut t = self.lock();
        if t.calls.insert(call_id.to_owned(), call).is_some() {
            return;
        }
        t.order.push_back(call_id.to_owned());
        while t.calls.len() > Self::CAPACITY {
            match t.order.pop_front() {
                Some(old) => {
                    t.calls.remove(&old);
                }
                None => break,
            }
        }
        if t.order.len() > 2 * Self::CAPACITY {
            let Inner { calls, order } = &mut *t;
            order.retain(|id| calls.contains_key(id));
        }
    }

    /// Takes the call for `agent_id`'s outcome.
    pub fn take(&self, call_id: &str, agent_id: &str) -> Lookup {
        let mut t = self.lock();
        match t.calls.get(call_id) {
            None => Lookup::Unknown,
            Some(p) if p.agent_id != agent_id => Lookup::Foreign,
            Some(_) => t
                .calls
                .remove(call_id)
                .map_or(Lookup::Unknown, Lookup::Mine),
        }
    }

    /// Forgets a call taken by [`OpenCalls::take`] whose outcome could not be written, so
    /// that a retry finds it again.
    pub fn put_back(&self, call_id: &str, call: Permitted) {
        self.insert(call_id, call);
    }

    pub fn len(&self) -> usize {
        self.lock().calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permitted(agent: &str) -> Permitted {
        Permitted {
            agent_id: agent.into(),
            trace_id: "t".into(),
            span_id: "s".into(),
            delegation_id: None,
            action: "srv/echo".into(),
            input_hash: Some("h".into()),
        }
    }

    #[test]
    fn an_outcome_takes_its_call_once_and_only_for_its_agent() {
        let t = OpenCalls::default();
        t.insert("c1", permitted("a"));
        assert_eq!(t.take("c1", "b"), Lookup::Foreign);
        assert_eq!(t.take("c1", "a"), Lookup::Mine(permitted("a")));
        assert_eq!(t.take("c1", "a"), Lookup::Unknown);
        assert!(t.is_empty());
    }

    #[test]
    fn the_oldest_calls_are_forgotten_past_capacity() {
        let t = OpenCalls::default();
        let n = OpenCalls::CAPACITY + 10;
        for i in 0..n {
            t.insert(&format!("c{i}"), permitted("a"));
        }
        assert_eq!(t.len(), OpenCalls::CAPACITY);
        assert_eq!(t.take("c0", "a"), Lookup::Unknown);
        assert_eq!(t.take("c9", "a"), Lookup::Unknown);
        assert!(matches!(t.take("c10", "a"), Lookup::Mine(_)));
        assert!(matches!(
            t.take(&format!("c{}", n - 1), "a"),
            Lookup::Mine(_)
        ));
    }

    #[test]
    fn taken_calls_do_not_grow_the_order_without_bound() {
        let t = OpenCalls::default();
        for i in 0..(5 * OpenCalls::CAPACITY) {
            let id = format!("c{i}");
            t.insert(&id, permitted("a"));
            assert!(matches!(t.take(&id, "a"), Lookup::Mine(_)));
        }
        assert!(t.lock().order.len() <= 2 * OpenCalls::CAPACITY + 1);
        assert!(t.is_empty());
    }
}
