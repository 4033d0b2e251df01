//! Rate limits and budgets: stateful, beside Cedar, declared in config.
//!
//! Each limit is a GCRA (generic cell rate algorithm) bucket: `rate` calls per `window`
//! with a burst of `burst`, kept as one "theoretical arrival time" per key, so state is
//! one integer per (limit, agent or owner). All limits that apply to a call are checked
//! together and consumed only if every one of them allows the call: a call refused by
//! one limit does not spend another's budget.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::{Nanos, NANOS_PER_MILLI};
use crate::config::{LimitKey, LimitSpec};

/// A limit that refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub limit_id: String,
    pub retry_after_ns: Nanos,
    pub message: String,
}

/// Why a call was refused by the limiter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{}", .0.message)]
    Exceeded(Exceeded),
    /// The limiter's state is unusable (a panic poisoned it): refuse, but not as a rate
    /// limit, which would tell the caller to retry later.
    #[error("rate-limit state is unavailable")]
    Unavailable,
}

pub struct Limiter {
    specs: Vec<LimitSpec>,
    /// (index into specs, key) -> theoretical arrival time.
    state: Mutex<HashMap<(usize, String), Nanos>>,
}

impl Limiter {
    pub fn new(specs: Vec<LimitSpec>) -> Self {
        Self {
            specs,
            state: Mutex::new(HashMap::new()),
        }
    }

    pub fn specs(&self) -> &[LimitSpec] {
        &self.specs
    }

    /// Checks every limit that applies to this call and, if all allow it, spends one unit
    /// of each. Returns the ids of the limits that were charged.
    pub fn acquire(
        &self,
        agent: &str,
        owner: &str,
        tier: u8,
        tool: &str,
        now: Nanos,
    ) -> Result<Vec<String>, LimitError> {
        let applicable: Vec<(usize, &LimitSpec)> = self
            .specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.applies_to(agent, tier, tool))
            .collect();
        if applicable.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(mut state) = self.state.lock() else {
            // A poisoned lock means a panic mid-update; refuse rather than guess.
            return Err(LimitError::Unavailable);
        };
        let mut updates = Vec::with_capacity(applicable.len());
        for (i, spec) in &applicable {
            let key = match spec.per {
                LimitKey::Agent => agent,
                LimitKey::Owner => owner,
            };
            let interval = (spec.window_ns / u64::from(spec.rate)).max(1);
            let tolerance = interval.saturating_mul(u64::from(spec.burst) - 1);
            let slot = (*i, key.to_owned());
            let tat = state.get(&slot).copied().unwrap_or(now).max(now);
            let allow_at = tat.saturating_sub(tolerance);
            if now < allow_at {
                let retry = allow_at - now;
                let whom = match spec.per {
                    LimitKey::Agent => format!("agent `{agent}`"),
                    LimitKey::Owner => format!("owner `{owner}`"),
                };
                return Err(LimitError::Exceeded(Exceeded {
                    limit_id: spec.id.clone(),
                    retry_after_ns: retry,
                    message: format!(
                        "rate limit `{}` ({} per {}s) exhausted for {whom}; retry in {}ms",
                        spec.id,
                        spec.rate,
                        spec.window_ns as f64 / 1e9,
                        retry.div_ceil(NANOS_PER_MILLI)
                    ),
                }));
            }
            updates.push((slot, tat + interval));
        }
        let ids = applicable.iter().map(|(_, s)| s.id.clone()).collect();
        for (slot, tat) in updates {
            state.insert(slot, tat);
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS_PER_SEC;
    use proptest::prelude::*;

    fn spec(
        id: &str,
        tools: &[&str],
        per: LimitKey,
        rate: u32,
        window_s: u64,
        burst: u32,
    ) -> LimitSpec {
        LimitSpec {
            id: id.into(),
            tools: tools.iter().map(|s| s.to_string()).collect(),
            agents: Default::default(),
            tiers: Default::default(),
            per,
            rate,
            window_ns: window_s * NANOS_PER_SEC,
            burst,
        }
    }

    fn exceeded(r: Result<Vec<String>, LimitError>) -> Exceeded {
        match r {
            Err(LimitError::Exceeded(e)) => e,
            other => panic!("expected a rate limit, got {other:?}"),
        }
    }

    #[test]
    fn a_poisoned_limiter_refuses_as_unavailable_not_as_a_rate_limit() {
        let l = std::sync::Arc::new(Limiter::new(vec![spec(
            "l",
            &[],
            LimitKey::Agent,
            5,
            60,
            5,
        )]));
        let l2 = l.clone();
        let _ = std::thread::spawn(move || {
            let _guard = l2.state.lock().unwrap();
            panic!("poison the limiter");
        })
        .join();
        assert_eq!(l.acquire("a", "o", 1, "t", 0), Err(LimitError::Unavailable));
    }

    #[test]
    fn allows_burst_then_refuses_then_refills() {
        let l = Limiter::new(vec![spec("l", &["t"], LimitKey::Agent, 3, 60, 3)]);
        let t0 = 1_000 * NANOS_PER_SEC;
        for _ in 0..3 {
            assert!(l.acquire("a", "o", 1, "t", t0).is_ok());
        }
        let e = exceeded(l.acquire("a", "o", 1, "t", t0));
        assert_eq!(e.limit_id, "l");
        assert_eq!(e.retry_after_ns, 20 * NANOS_PER_SEC);
        // another agent has its own budget; another tool is not limited
        assert!(l.acquire("b", "o", 1, "t", t0).is_ok());
        assert!(l.acquire("a", "o", 1, "u", t0).is_ok());
        // one interval later exactly one more call fits
        assert!(l.acquire("a", "o", 1, "t", t0 + 20 * NANOS_PER_SEC).is_ok());
        assert!(l
            .acquire("a", "o", 1, "t", t0 + 20 * NANOS_PER_SEC)
            .is_err());
    }

    #[test]
    fn owner_budget_is_shared() {
        let l = Limiter::new(vec![spec("team", &[], LimitKey::Owner, 2, 60, 2)]);
        assert!(l.acquire("a", "team", 1, "x", 0).is_ok());
        assert!(l.acquire("b", "team", 1, "y", 0).is_ok());
        assert!(l.acquire("c", "team", 1, "z", 0).is_err());
        assert!(l.acquire("d", "other", 1, "z", 0).is_ok());
    }

    #[test]
    fn a_tier_limit_holds_agents_of_that_tier_as_they_are_at_the_call() {
        let tier1 = LimitSpec {
            tiers: [1].into(),
            ..spec("tier-1", &[], LimitKey::Agent, 1, 60, 1)
        };
        let l = Limiter::new(vec![tier1]);
        assert_eq!(l.acquire("a", "o", 1, "t", 0).unwrap(), vec!["tier-1"]);
        assert_eq!(exceeded(l.acquire("a", "o", 1, "t", 0)).limit_id, "tier-1");
        // the same agent, moved to tier 2: that tier has no limit
        assert_eq!(
            l.acquire("a", "o", 2, "t", 0).unwrap(),
            Vec::<String>::new()
        );
        assert!(l.acquire("b", "o", 1, "t", 0).is_ok(), "per agent");
    }

    #[test]
    fn refused_call_spends_no_other_budget() {
        let l = Limiter::new(vec![
            spec("wide", &[], LimitKey::Agent, 10, 60, 10),
            spec("narrow", &["t"], LimitKey::Agent, 1, 60, 1),
        ]);
        assert_eq!(
            l.acquire("a", "o", 1, "t", 0).unwrap(),
            vec!["wide", "narrow"]
        );
        for _ in 0..5 {
            assert_eq!(exceeded(l.acquire("a", "o", 1, "t", 0)).limit_id, "narrow");
        }
        // the 5 refused calls did not spend "wide": 9 remain
        for _ in 0..9 {
            assert!(l.acquire("a", "o", 1, "u", 0).is_ok());
        }
        assert_eq!(exceeded(l.acquire("a", "o", 1, "u", 0)).limit_id, "wide");
    }

    proptest! {
        /// Over any window, no more than burst + rate * elapsed/window calls get through.
        #[test]
        fn never_exceeds_rate(steps in proptest::collection::vec(0u64..5_000, 1..300)) {
            let l = Limiter::new(vec![spec("l", &[], LimitKey::Agent, 5, 1, 5)]);
            let mut now = 0u64;
            let mut allowed = 0u64;
            for s in steps {
                now += s * NANOS_PER_MILLI / 10;
                if l.acquire("a", "o", 1, "t", now).is_ok() { allowed += 1; }
            }
            let bound = 5 + 5 * now / NANOS_PER_SEC + 1;
            prop_assert!(allowed <= bound, "allowed {} > bound {}", allowed, bound);
        }
    }
}
