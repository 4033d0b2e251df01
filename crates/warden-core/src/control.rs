//! The control layer: kill switches, checked first on every call, from memory.
//!
//! Kill switches are set by operators only (never through the agent plane), per agent,
//! per owner (team) or for the whole fleet. The pipeline holds a [`KillSet`] built from
//! the store; the node refreshes it continuously and, if it cannot confirm the view is
//! fresh within a bound, denies every call (fail closed).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::clock::Nanos;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KillTarget {
    All,
    Owner(String),
    Agent(String),
}

impl KillTarget {
    /// `(scope, name)` as stored: `("all", "")`, `("owner", team)`, `("agent", id)`.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            KillTarget::All => ("all", ""),
            KillTarget::Owner(o) => ("owner", o),
            KillTarget::Agent(a) => ("agent", a),
        }
    }

    pub fn from_parts(scope: &str, name: &str) -> Option<KillTarget> {
        match scope {
            "all" => Some(KillTarget::All),
            "owner" => Some(KillTarget::Owner(name.to_owned())),
            "agent" => Some(KillTarget::Agent(name.to_owned())),
            _ => None,
        }
    }
}

impl fmt::Display for KillTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillTarget::All => f.write_str("all agents"),
            KillTarget::Owner(o) => write!(f, "owner `{o}`"),
            KillTarget::Agent(a) => write!(f, "agent `{a}`"),
        }
    }
}

impl FromStr for KillTarget {
    type Err = String;
    /// `all`, `owner:TEAM` or `agent:ID`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(KillTarget::All);
        }
        match s.split_once(':') {
            Some(("owner", o)) if !o.is_empty() => Ok(KillTarget::Owner(o.to_owned())),
            Some(("agent", a)) if !a.is_empty() => Ok(KillTarget::Agent(a.to_owned())),
            _ => Err(format!(
                "`{s}` is not a kill target; use `all`, `owner:TEAM` or `agent:ID`"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KillSwitch {
    pub target: KillTarget,
    pub reason: String,
    pub set_by: String,
    pub set_at_ns: Nanos,
}

/// The kill switches in force, indexed for the per-call check.
#[derive(Clone, Debug, Default)]
pub struct KillSet {
    all: Option<KillSwitch>,
    owners: HashMap<String, KillSwitch>,
    agents: HashMap<String, KillSwitch>,
}

impl KillSet {
    pub fn new(kills: impl IntoIterator<Item = KillSwitch>) -> Self {
        let mut set = KillSet::default();
        for k in kills {
            match &k.target {
                KillTarget::All => set.all = Some(k),
                KillTarget::Owner(o) => {
                    set.owners.insert(o.clone(), k);
                }
                KillTarget::Agent(a) => {
                    set.agents.insert(a.clone(), k);
                }
            }
        }
        set
    }

    /// The global switch, checked before the caller is even authenticated.
    pub fn global(&self) -> Option<&KillSwitch> {
        self.all.as_ref()
    }

    /// The switch that stops this agent, if any; the most specific wins so the message
    /// names the narrowest cause.
    pub fn covering(&self, agent: &str, owner: &str) -> Option<&KillSwitch> {
        self.agents
            .get(agent)
            .or_else(|| self.owners.get(owner))
            .or(self.all.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = &KillSwitch> {
        self.all
            .iter()
            .chain(self.owners.values())
            .chain(self.agents.values())
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.owners.is_empty() && self.agents.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(t: KillTarget) -> KillSwitch {
        KillSwitch {
            target: t,
            reason: "r".into(),
            set_by: "op".into(),
            set_at_ns: 1,
        }
    }

    #[test]
    fn covering_picks_most_specific() {
        let set = KillSet::new([
            k(KillTarget::Owner("team".into())),
            k(KillTarget::Agent("a".into())),
        ]);
        assert_eq!(
            set.covering("a", "team").unwrap().target,
            KillTarget::Agent("a".into())
        );
        assert_eq!(
            set.covering("b", "team").unwrap().target,
            KillTarget::Owner("team".into())
        );
        assert!(set.covering("b", "other").is_none());
        assert!(set.global().is_none());
        let set = KillSet::new([k(KillTarget::All)]);
        assert!(set.covering("anyone", "any").is_some());
    }

    #[test]
    fn targets_parse() {
        assert_eq!("all".parse::<KillTarget>().unwrap(), KillTarget::All);
        assert_eq!(
            "owner:t".parse::<KillTarget>().unwrap(),
            KillTarget::Owner("t".into())
        );
        assert!("agent:".parse::<KillTarget>().is_err());
        assert!("bogus".parse::<KillTarget>().is_err());
        let t = KillTarget::Agent("x".into());
        let (s, n) = t.parts();
        assert_eq!(KillTarget::from_parts(s, n), Some(t));
    }
}
