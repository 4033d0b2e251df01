//! Sampling of failure floods: a peer that cannot authenticate must not be able to fill
//! the disk with audit entries, yet every failure must stay on the record.
//!
//! Failures of unauthenticated callers are grouped per source (the peer's address; an
//! IPv6 peer by its /64, which one host can fill at will) and reason code, in windows of
//! a fixed length. The first few of each group per window get full entries; the rest are
//! only counted, and when the window ends one summary entry records how many there were.
//! So every failure is either its own entry or counted in exactly one summary.
//!
//! Two bounds hold however many addresses a caller has: at most
//! `[audit] failure_max_entries` full entries per window from all sources together
//! (past it every failure is counted), and at most [`MAX_GROUPS`] groups, so at most that
//! many summaries per window (sources beyond share one group per reason).
//!
//! Calls of authenticated agents are never sampled: each keeps its own entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use warden_core::audit::AuditLimits;
use warden_core::clock::Nanos;
use warden_core::Reason;

/// Groups tracked at most. Past this, new sources share one group per reason, so a
/// caller with many addresses cannot grow this table, nor the summaries of a window
/// (one per group) past this many.
const MAX_GROUPS: usize = 1_000;

/// Where a failure came from, as far as sampling cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A network peer (IPv6 reduced to its /64).
    Peer(IpAddr),
    /// In-process callers (the embedded stdio proxy), or a peer whose address is unknown.
    Local,
    /// Sources beyond [`MAX_GROUPS`], counted together.
    Others,
}

/// The address one peer is counted under: an IPv4 address (also when it arrives
/// IPv4-mapped) or an IPv6 /64, since a host owns its whole /64 and could otherwise
/// present a new address per connection. Used by the flood sampler and the listener's
/// per-address connection cap alike.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

impl Source {
    pub fn of(peer: Option<IpAddr>) -> Source {
        peer.map_or(Source::Local, |ip| Source::Peer(peer_key(ip)))
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Peer(IpAddr::V4(a)) => write!(f, "{a}"),
            Source::Peer(IpAddr::V6(a)) => write!(f, "{a}/64"),
            Source::Local => f.write_str("local callers"),
            Source::Others => f.write_str("other sources"),
        }
    }
}

/// Failures counted but not recorded one by one, due for a summary entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Suppressed {
    pub source: Source,
    pub reason: Reason,
    pub count: u64,
    pub window_start_ns: Nanos,
    pub window_ns: Nanos,
}

/// Whether a failure gets its own entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Record,
    Count,
}

struct Group {
    start_ns: Nanos,
    recorded: u32,
    counted: u64,
}

pub struct FailureSampler {
    window_ns: Nanos,
    full: u32,
    max: u32,
    groups: Mutex<Groups>,
}

#[derive(Default)]
struct Groups {
    by_key: HashMap<(Source, Reason), Group>,
    /// The current window for all sources together, and its full entries so far.
    all_start_ns: Nanos,
    all_recorded: u32,
}

impl FailureSampler {
    pub fn new(limits: &AuditLimits) -> Self {
        Self {
            window_ns: limits.failure_window_ns.max(1),
            full: limits.failure_full_entries,
            max: limits.failure_max_entries,
            groups: Mutex::new(Groups::default()),
        }
    }

    fn groups(&self) -> MutexGuard<'_, Groups> {
        // A poisoned lock only means a panic elsewhere mid-update; the counts are still
        // the best there are.
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides whether this failure gets a full entry. When the failure opens a new
    /// window for its group, the previous window's count (if any) is returned, to be
    /// recorded before this failure's entry.
    pub fn admit(&self, source: Source, reason: Reason, now: Nanos) -> (Admit, Option<Suppressed>) {
        let mut groups = self.groups();
        let mut key = (source, reason);
        if !groups.by_key.contains_key(&key) && groups.by_key.len() >= MAX_GROUPS {
            key = (Source::Others, reason);
        }
        let mut ended = None;
        if let Some(g) = groups.by_key.get(&key) {
            if now.saturating_sub(g.start_ns) >= self.window_ns {
                ended = groups
                    .by_key
                    .remove(&key)
                    .and_then(|g| self.suppressed(key, g, now));
            }
        }
        if now.saturating_sub(groups.all_start_ns) >= self.window_ns {
            groups.all_start_ns = now;
            groups.all_recorded = 0;
        }
        let room = groups.all_recorded < self.max;
        let g = groups.by_key.entry(key).or_insert(Group {
            start_ns: now,
            recorded: 0,
            counted: 0,
        });
        let admit = if room && g.recorded < self.full {
            g.recorded += 1;
            Admit::Record
        } else {
            g.counted += 1;
            Admit::Count
        };
        if admit == Admit::Record {
            groups.all_recorded += 1;
        }
        (admit, ended)
    }

    fn suppressed(&self, key: (Source, Reason), g: Group, now: Nanos) -> Option<Suppressed> {
        (g.counted > 0).then(|| Suppressed {
            source: key.0,
            reason: key.1,
            count: g.counted,
            window_start_ns: g.start_ns,
            window_ns: now.saturating_sub(g.start_ns),
        })
    }

    /// Ends the windows that are over (all of them with `all`), returning the counts to
    /// record.
    pub fn due(&self, now: Nanos, all: bool) -> Vec<Suppressed> {
        let mut groups = self.groups();
        let ended: Vec<(Source, Reason)> = groups
            .by_key
            .iter()
            .filter(|(_, g)| all || now.saturating_sub(g.start_ns) >= self.window_ns)
            .map(|(k, _)| *k)
            .collect();
        ended
            .into_iter()
            .filter_map(|k| {
                groups
                    .by_key
                    .remove(&k)
                    .and_then(|g| self.suppressed(k, g, now))
            })
            .collect()
    }

    /// Puts back counts whose summary could not be recorded, so they are tried again.
    pub fn restore(&self, s: Suppressed) {
        let mut groups = self.groups();
        let g = groups.by_key.entry((s.source, s.reason)).or_insert(Group {
            start_ns: s.window_start_ns,
            recorded: self.full,
            counted: 0,
        });
        g.start_ns = g.start_ns.min(s.window_start_ns);
        g.counted += s.count;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Per-group sampling alone (no global budget in the way).
    fn sampler(full: u32) -> FailureSampler {
        FailureSampler::new(&AuditLimits {
            failure_window_ns: 10,
            failure_full_entries: full,
            failure_max_entries: u32::MAX,
            ..AuditLimits::default()
        })
    }

    #[test]
    fn many_sources_together_get_no_more_full_entries_than_the_global_budget() {
        let s = FailureSampler::new(&AuditLimits {
            failure_window_ns: 10,
            failure_full_entries: 2,
            failure_max_entries: 5,
            ..AuditLimits::default()
        });
        let src = |i: u32| Source::of(Some(IpAddr::V4(Ipv4Addr::from(i))));
        let mut recorded = 0;
        for i in 0..100 {
            if s.admit(src(i), Reason::Unauthenticated, 0).0 == Admit::Record {
                recorded += 1;
            }
        }
        assert_eq!(recorded, 5);
        // Every other failure is counted, in its own source's summary.
        let due = s.due(10, false);
        assert_eq!(due.iter().map(|d| d.count).sum::<u64>(), 95);
        assert_eq!(due.len(), 95);
        // A new window has a new budget.
        assert_eq!(
            s.admit(src(0), Reason::Unauthenticated, 10).0,
            Admit::Record
        );
    }

    #[test]
    fn every_failure_is_recorded_or_counted_once() {
        let s = sampler(3);
        let a = Source::of(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        let mut recorded = 0;
        let mut counted = 0;
        for t in 0..95u64 {
            let (admit, ended) = s.admit(a, Reason::Unauthenticated, t);
            if admit == Admit::Record {
                recorded += 1;
            }
            counted += ended.map_or(0, |e| e.count);
        }
        counted += s.due(1000, true).iter().map(|e| e.count).sum::<u64>();
        // Windows of 10 ns: 10 windows, 3 full entries each (the last window has 5 calls).
        assert_eq!(recorded, 30);
        assert_eq!(recorded + counted, 95);
    }

    #[test]
    fn sources_and_reasons_are_sampled_apart_and_ipv6_by_its_64() {
        let s = sampler(1);
        let v6 = |last: u16| {
            Source::of(Some(IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0, 1, 0, 0, 0, last,
            ))))
        };
        assert_eq!(v6(1), v6(2));
        assert_eq!(s.admit(v6(1), Reason::Unauthenticated, 0).0, Admit::Record);
        assert_eq!(s.admit(v6(2), Reason::Unauthenticated, 0).0, Admit::Count);
        assert_eq!(
            s.admit(v6(2), Reason::CredentialInvalid, 0).0,
            Admit::Record
        );
        assert_eq!(
            s.admit(Source::Local, Reason::Unauthenticated, 0).0,
            Admit::Record
        );
        let due = s.due(5, false);
        assert!(due.is_empty(), "{due:?}");
        let due = s.due(10, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 1);
        assert_eq!(due[0].source.to_string(), "2001:db8:0:1::/64");
    }

    #[test]
    fn the_table_is_bounded() {
        let s = sampler(1);
        for i in 0..(MAX_GROUPS as u32 + 50) {
            let src = Source::of(Some(IpAddr::V4(Ipv4Addr::from(i))));
            s.admit(src, Reason::Unauthenticated, 0);
        }
        assert!(s.groups().by_key.len() <= MAX_GROUPS + 1);
        let others = s.due(0, true);
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].source, Source::Others);
        assert_eq!(others[0].count, 49);
    }
}
