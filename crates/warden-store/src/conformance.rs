//! What every [`Store`] must do, as plain functions over `&dyn Store`.
//!
//! The trait's documentation states the contract; these functions check it, so each
//! backend (SQLite now, PostgreSQL later) runs the same suite from its own tests and
//! cannot drift from the others. They panic on the first broken expectation, like
//! `assert!`, and are meant to be called from `#[test]` functions only.
//!
//! Each function uses its own agent ids, credential ids and kill targets, and measures
//! the audit chain relative to where it finds it, so they can run one after another on
//! one store; [`run_all`] does exactly that.
#![expect(
    clippy::expect_used,
    reason = "a test suite: failing loudly on a broken expectation is its job"
)]

use std::collections::{BTreeMap, BTreeSet};

use warden_core::audit::{ChainError, ChainVerifier, Entry, EntryKind, Record, GENESIS};
use warden_core::clock::{Nanos, NANOS_PER_SEC};
use warden_core::control::{KillSwitch, KillTarget};
use warden_core::identity::{Agent, AgentStatus};
use warden_core::operator::{new_account, Operator, Role};
use warden_core::store::{ControlChange, Credential, Store, StoreError};

/// A plausible "now": 2023-11-14, in nanoseconds.
pub const NOW: Nanos = 1_700_000_000 * NANOS_PER_SEC;

/// Runs the whole suite. `open` must return handles on one store that starts empty;
/// it is called more than once, to check that what was written survives a reopen.
pub fn run_all(open: &dyn Fn() -> Box<dyn Store>) {
    let store = open();
    agents_round_trip(&*store);
    status_and_credentials(&*store);
    rotation(&*store);
    kill_switches(&*store);
    version_bumps_on_every_mutation(&*store);
    control_changes_are_recorded_with_their_entry(&*store);
    one_outcome_per_call(&*store);
    audit_append_and_read(&*store);
    operators(&*store);
    declared_agents(&*store);
    drop(store);
    let reopened = open();
    assert_eq!(
        reopened
            .operators()
            .expect("operators after reopen")
            .accounts
            .len(),
        3,
        "operator accounts survive a reopen"
    );
    drop(reopened);
    audit_chain_spans_batches_and_reopen(open);
}

/// An agent with the given id and some non-trivial fields.
pub fn sample_agent(id: &str) -> Agent {
    Agent {
        id: id.to_owned(),
        owner: "claims-team".to_owned(),
        tier: 2,
        scopes: ["claims:read".to_owned(), "claims:write".to_owned()].into(),
        rotation_ns: 3600 * NANOS_PER_SEC,
        status: AgentStatus::Active,
    }
}

/// An entry whose fields all vary with `i`, options present or absent by turns.
pub fn sample_entry(i: u64, call_id: &str) -> Entry {
    Entry {
        ts_ns: NOW + i,
        kind: match i % 4 {
            0 => EntryKind::Decision,
            1 => EntryKind::Outcome,
            2 => EntryKind::Control,
            _ => EntryKind::Summary,
        },
        call_id: call_id.to_owned(),
        trace_id: format!("trace-{i}"),
        span_id: format!("span-{i}"),
        agent_id: if i % 5 == 4 {
            String::new()
        } else {
            format!("agent-{}", i % 4)
        },
        delegation_id: (i % 2 != 1).then(|| format!("deleg-{i}")),
        action: "get_claim".to_owned(),
        input_hash: (i % 3 != 2).then(|| format!("{i:064x}")),
        output_hash: (i % 3 == 1).then(|| "ab".repeat(32)),
        decision: if i % 7 == 6 { "deny" } else { "permit" }.to_owned(),
        reason: "PERMITTED".to_owned(),
        rules: (0..i % 4).map(|r| format!("rule-{r}")).collect(),
        cost: (i % 2 == 1).then(|| i as f64 / 7.0),
        duration_ns: (i % 3 == 1).then_some(i * 1_000),
        rationale: matches!(i % 4, 1..=3).then(|| format!("because ✓ {i}")),
    }
}

/// Reads the whole chain in pages of `page` and verifies it from the first record.
/// Returns how many records verified.
pub fn verify_chain(store: &dyn Store, page: usize) -> Result<u64, ChainError> {
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let records = store.read_audit(after, page).expect("read_audit");
        let Some(last) = records.last() else {
            return Ok(verifier.verified());
        };
        after = last.seq;
        for r in &records {
            verifier.push(r)?;
        }
    }
}

fn head(store: &dyn Store) -> (u64, [u8; 32]) {
    let tail = store.tail_audit(1).expect("tail_audit");
    tail.last().map_or((0, GENESIS), |r| (r.seq, r.hash))
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict(_)))
}

pub fn agents_round_trip(store: &dyn Store) {
    let a = sample_agent("rt-a");
    let b = Agent {
        id: "rt-b".to_owned(),
        owner: "ünïcode team".to_owned(),
        tier: u8::MAX,
        scopes: BTreeSet::new(),
        rotation_ns: u64::MAX,
        status: AgentStatus::Revoked,
    };
    store.upsert_agent(&a).expect("upsert a");
    store.upsert_agent(&b).expect("upsert b");
    assert_eq!(store.get_agent("rt-a").expect("get a"), Some(a.clone()));
    assert_eq!(
        store.get_agent("rt-b").expect("get b"),
        Some(b.clone()),
        "extreme values must round-trip"
    );
    assert_eq!(store.get_agent("rt-missing").expect("get missing"), None);

    let listed: Vec<Agent> = store
        .list_agents()
        .expect("list")
        .into_iter()
        .filter(|x| x.id.starts_with("rt-"))
        .collect();
    assert_eq!(listed, vec![a.clone(), b.clone()]);

    // An upsert replaces owner, tier, scopes and rotation, and leaves the status alone.
    let changed = Agent {
        owner: "other-team".to_owned(),
        tier: 0,
        scopes: ["x:y".to_owned()].into(),
        rotation_ns: 60 * NANOS_PER_SEC,
        status: AgentStatus::Revoked,
        ..a.clone()
    };
    store.upsert_agent(&changed).expect("re-upsert a");
    let got = store.get_agent("rt-a").expect("get a").expect("a exists");
    assert_eq!(
        got,
        Agent {
            status: AgentStatus::Active,
            ..changed
        }
    );
    let revived = Agent {
        status: AgentStatus::Active,
        ..b.clone()
    };
    store.upsert_agent(&revived).expect("re-upsert b");
    assert_eq!(
        store.get_agent("rt-b").expect("get b"),
        Some(b),
        "upsert must not revive a revoked agent"
    );

    let snap = store.snapshot(NOW).expect("snapshot");
    assert!(snap
        .agents
        .iter()
        .any(|x| x.id == "rt-a" && x.owner == "other-team"));
}

/// Applies `change` with a control entry, as an operator action does.
pub fn control(store: &dyn Store, change: ControlChange) -> Result<Record, StoreError> {
    let entry = Entry::control(
        NOW,
        "ctl-entry".to_owned(),
        "test-change",
        "operator:conformance",
        format!("{change:?}"),
    );
    store.apply_control(&change, entry)
}

fn set_status(store: &dyn Store, id: &str, status: AgentStatus) -> Result<Record, StoreError> {
    control(
        store,
        ControlChange::SetAgentStatus {
            agent_id: id.to_owned(),
            status,
            at: NOW,
        },
    )
}

fn revoke_cred(store: &dyn Store, agent: &str, jti: &str, at: Nanos) -> Result<Record, StoreError> {
    control(
        store,
        ControlChange::RevokeCredential {
            agent_id: agent.to_owned(),
            jti: jti.to_owned(),
            at,
        },
    )
}

fn set_kill(store: &dyn Store, kill: &KillSwitch) -> Result<Record, StoreError> {
    control(
        store,
        ControlChange::SetKill {
            kill: kill.clone(),
            pre_emptive: false,
        },
    )
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotFound(_)))
}

pub fn status_and_credentials(store: &dyn Store) {
    let agent = sample_agent("sc-agent");
    store.upsert_agent(&agent).expect("upsert");

    store
        .upsert_agent(&sample_agent("sc-gone"))
        .expect("upsert");
    set_status(store, "sc-gone", AgentStatus::Revoked).expect("revoke agent");
    assert_eq!(
        store.get_agent("sc-gone").expect("get").map(|a| a.status),
        Some(AgentStatus::Revoked)
    );
    store
        .upsert_agent(&sample_agent("sc-gone"))
        .expect("upsert again");
    assert_eq!(
        store.get_agent("sc-gone").expect("get").map(|a| a.status),
        Some(AgentStatus::Revoked),
        "upsert must keep the status"
    );
    assert!(
        is_conflict(control(
            store,
            ControlChange::IssueCredential(Credential {
                jti: "sc-to-revoked".to_owned(),
                agent_id: "sc-gone".to_owned(),
                issued_at_ns: NOW,
                expires_at_ns: NOW + 1,
                revoked_at_ns: None,
                replaced_by: None,
            })
        )),
        "a revoked agent must not be issued credentials"
    );
    assert!(
        is_conflict(set_status(store, "sc-gone", AgentStatus::Active)),
        "a revoked agent must not come back: its old tokens would work again"
    );
    // Suspension is undone by resuming, and nothing else is; retirement is final.
    set_status(store, "sc-agent", AgentStatus::Suspended).expect("suspend");
    assert!(
        is_conflict(set_status(store, "sc-agent", AgentStatus::Suspended)),
        "suspending twice must be a conflict"
    );
    assert!(
        is_conflict(control(
            store,
            ControlChange::IssueCredential(Credential {
                jti: "sc-to-suspended".to_owned(),
                agent_id: "sc-agent".to_owned(),
                issued_at_ns: NOW,
                expires_at_ns: NOW + 1,
                revoked_at_ns: None,
                replaced_by: None,
            })
        )),
        "a suspended agent must not be issued credentials"
    );
    set_status(store, "sc-agent", AgentStatus::Active).expect("resume");
    assert_eq!(
        store.get_agent("sc-agent").expect("get").map(|a| a.status),
        Some(AgentStatus::Active)
    );
    assert!(
        is_conflict(set_status(store, "sc-agent", AgentStatus::Active)),
        "resuming an active agent must be a conflict"
    );
    set_status(store, "sc-gone", AgentStatus::Retired).expect("retire a revoked agent");
    for to in [
        AgentStatus::Active,
        AgentStatus::Suspended,
        AgentStatus::Revoked,
        AgentStatus::Retired,
    ] {
        assert!(
            is_conflict(set_status(store, "sc-gone", to)),
            "a retired agent must stay retired, not become {to:?}"
        );
    }
    assert!(is_not_found(set_status(
        store,
        "sc-missing",
        AgentStatus::Revoked
    )));
    assert_eq!(
        store.get_agent("sc-missing").expect("get missing"),
        None,
        "no agent may be created by a status change"
    );
    assert!(
        is_conflict(control(store, ControlChange::RegisterAgent(agent.clone()))),
        "registering an agent twice must be a conflict"
    );

    let hour = 3600 * NANOS_PER_SEC;
    let cred = |jti: &str, expires_at_ns: Nanos| Credential {
        jti: jti.to_owned(),
        agent_id: "sc-agent".to_owned(),
        issued_at_ns: NOW - hour,
        expires_at_ns,
        revoked_at_ns: None,
        replaced_by: None,
    };
    let live = cred("sc-live", NOW + hour);
    let kept = cred("sc-kept", NOW + 2 * hour);
    let expired = cred("sc-expired", NOW - 1);
    let boundary = cred("sc-boundary", NOW);
    let far = cred("sc-far", u64::MAX);
    for c in [&live, &kept, &expired, &boundary, &far] {
        control(store, ControlChange::IssueCredential(c.clone())).expect("issue credential");
    }
    assert!(
        is_conflict(control(store, ControlChange::IssueCredential(live.clone()))),
        "a duplicate jti must be a conflict"
    );
    assert!(
        is_conflict(control(
            store,
            ControlChange::IssueCredential(Credential {
                agent_id: "sc-nobody".to_owned(),
                ..cred("sc-orphan", NOW + hour)
            })
        )),
        "a credential of an unknown agent must be a conflict"
    );

    let listed = store
        .list_credentials("sc-agent")
        .expect("list credentials");
    let by_jti: BTreeMap<&str, &Credential> = listed.iter().map(|c| (c.jti.as_str(), c)).collect();
    assert_eq!(listed.len(), 5);
    assert_eq!(by_jti.get("sc-live"), Some(&&live));
    assert_eq!(by_jti.get("sc-far"), Some(&&far));
    assert!(store
        .list_credentials("sc-missing")
        .expect("list for missing")
        .is_empty());

    store
        .upsert_agent(&sample_agent("sc-other"))
        .expect("upsert other");
    assert!(
        is_not_found(revoke_cred(store, "sc-other", "sc-live", NOW)),
        "a credential revoked under another agent's id must stay valid"
    );
    for c in [&live, &expired, &boundary, &far] {
        revoke_cred(store, "sc-agent", &c.jti, NOW).expect("revoke");
    }
    assert!(
        is_not_found(revoke_cred(store, "sc-agent", "sc-live", NOW + 1)),
        "a second revoke must be refused"
    );
    assert!(is_not_found(revoke_cred(
        store, "sc-agent", "sc-never", NOW
    )));

    let listed = store
        .list_credentials("sc-agent")
        .expect("list credentials");
    let revoked_at = |jti: &str| {
        listed
            .iter()
            .find(|c| c.jti == jti)
            .and_then(|c| c.revoked_at_ns)
    };
    assert_eq!(
        revoked_at("sc-live"),
        Some(NOW),
        "a second revoke must not move the revocation time"
    );
    assert_eq!(revoked_at("sc-kept"), None);

    let snap = store.snapshot(NOW).expect("snapshot");
    let mine: BTreeMap<&str, &Credential> = snap
        .credentials
        .iter()
        .filter(|(j, _)| j.starts_with("sc-"))
        .map(|(j, c)| (j.as_str(), c))
        .collect();
    assert_eq!(
        mine.keys().copied().collect::<BTreeSet<&str>>(),
        ["sc-far", "sc-kept", "sc-live"].into(),
        "unexpired only, revoked or not: not those expired at or before now"
    );
    assert_eq!(mine.get("sc-kept"), Some(&&kept));
    assert_eq!(
        mine.get("sc-live").and_then(|c| c.revoked_at_ns),
        Some(NOW),
        "the snapshot must say which are revoked"
    );
    let earlier = store.snapshot(NOW - 1).expect("snapshot");
    assert!(earlier.credentials.contains_key("sc-boundary"));
    assert!(!earlier.credentials.contains_key("sc-expired"));
}

/// A rotation issues the new credential and ends the agent's other live ones at the end
/// of the overlap, naming their replacement; it leaves earlier ends and other agents alone.
pub fn rotation(store: &dyn Store) {
    let hour = 3600 * NANOS_PER_SEC;
    store
        .upsert_agent(&sample_agent("rot-agent"))
        .expect("upsert");
    store
        .upsert_agent(&sample_agent("rot-other"))
        .expect("upsert");
    let cred = |agent: &str, jti: &str, issued_at_ns: Nanos| Credential {
        jti: jti.to_owned(),
        agent_id: agent.to_owned(),
        issued_at_ns,
        expires_at_ns: issued_at_ns + 2 * hour,
        revoked_at_ns: None,
        replaced_by: None,
    };
    let old = cred("rot-agent", "rot-old", NOW - hour);
    let soon = Credential {
        revoked_at_ns: Some(NOW + 60),
        ..cred("rot-agent", "rot-soon", NOW - hour)
    };
    let dead = cred("rot-agent", "rot-dead", NOW - 3 * hour);
    let others = cred("rot-other", "rot-others", NOW - hour);
    for c in [&old, &soon, &dead, &others] {
        control(store, ControlChange::IssueCredential(c.clone())).expect("issue");
    }
    let new = cred("rot-agent", "rot-new", NOW);
    let until = NOW + 600;
    control(
        store,
        ControlChange::RotateCredential {
            new: new.clone(),
            overlap_until: until,
        },
    )
    .expect("rotate");
    let listed = store.list_credentials("rot-agent").expect("list");
    let get = |jti: &str| listed.iter().find(|c| c.jti == jti).cloned();
    assert_eq!(get("rot-new"), Some(new.clone()), "the new one is live");
    let rotated = get("rot-old").expect("old is listed");
    assert_eq!(
        (rotated.revoked_at_ns, rotated.replaced_by.as_deref()),
        (Some(until), Some("rot-new")),
        "the old one ends with the overlap and names its replacement"
    );
    assert!(!rotated.revoked_at(until - 1) && rotated.revoked_at(until));
    assert_eq!(
        get("rot-soon").map(|c| (c.revoked_at_ns, c.replaced_by)),
        Some((Some(NOW + 60), None)),
        "an earlier revocation stays as it was"
    );
    assert_eq!(
        get("rot-dead"),
        Some(dead),
        "an expired credential is left alone"
    );
    assert_eq!(
        store.list_credentials("rot-other").expect("list"),
        vec![others],
        "another agent's credentials are untouched"
    );
    // An operator may still revoke a credential in its overlap, at once.
    revoke_cred(store, "rot-agent", "rot-old", NOW + 1).expect("revoke in the overlap");
    let revoked = store
        .list_credentials("rot-agent")
        .expect("list")
        .into_iter()
        .find(|c| c.jti == "rot-old")
        .expect("listed");
    assert_eq!(
        (revoked.revoked_at_ns, revoked.replaced_by),
        (Some(NOW + 1), None),
        "revoked now, and no longer counted as rotated"
    );
    assert!(
        is_conflict(control(
            store,
            ControlChange::RotateCredential {
                new: new.clone(),
                overlap_until: until,
            },
        )),
        "a rotation reusing a jti must be refused"
    );
    set_status(store, "rot-agent", AgentStatus::Suspended).expect("suspend");
    let before = store.list_credentials("rot-agent").expect("list");
    assert!(
        is_conflict(control(
            store,
            ControlChange::RotateCredential {
                new: cred("rot-agent", "rot-newer", NOW),
                overlap_until: until,
            },
        )),
        "a suspended agent must not be rotated"
    );
    assert_eq!(
        store.list_credentials("rot-agent").expect("list"),
        before,
        "a refused rotation changes nothing"
    );
}

pub fn kill_switches(store: &dyn Store) {
    let ks = |target: KillTarget, reason: &str| KillSwitch {
        target,
        reason: reason.to_owned(),
        set_by: "operator@example.com".to_owned(),
        set_at_ns: NOW,
    };
    let mine = |store: &dyn Store| -> Vec<KillSwitch> {
        let mut kills: Vec<KillSwitch> = store
            .snapshot(NOW)
            .expect("snapshot")
            .kills
            .into_iter()
            .filter(|k| match &k.target {
                KillTarget::All => true,
                KillTarget::Owner(n) | KillTarget::Agent(n) => n.starts_with("ks-"),
            })
            .collect();
        kills.sort_by(|a, b| a.target.cmp(&b.target));
        kills
    };
    store
        .upsert_agent(&Agent {
            owner: "ks-team".to_owned(),
            ..sample_agent("ks-agent")
        })
        .expect("upsert");

    let all = ks(KillTarget::All, "incident 42");
    let owner = ks(KillTarget::Owner("ks-team".to_owned()), "runaway spend");
    let agent = ks(KillTarget::Agent("ks-agent".to_owned()), "loop");
    // An owner and an agent with the same name are different targets; no agent has
    // the id `ks-team`, so that one is set pre-emptively.
    let same_name = ks(KillTarget::Agent("ks-team".to_owned()), "same name");
    for k in [&agent, &owner, &all] {
        set_kill(store, k).expect("set kill");
    }
    assert!(
        is_not_found(set_kill(store, &same_name)),
        "a kill of an unknown agent must be refused unless pre-emptive"
    );
    assert!(
        is_not_found(set_kill(
            store,
            &ks(KillTarget::Owner("ks-nobody".to_owned()), "typo")
        )),
        "a kill of an owner no agent has must be refused unless pre-emptive"
    );
    control(
        store,
        ControlChange::SetKill {
            kill: same_name.clone(),
            pre_emptive: true,
        },
    )
    .expect("pre-emptive kill");
    assert_eq!(
        mine(store),
        vec![all.clone(), owner.clone(), agent.clone(), same_name.clone()]
    );

    let replaced = KillSwitch {
        reason: "loop, again".to_owned(),
        set_by: "someone-else".to_owned(),
        set_at_ns: NOW + 5,
        ..agent.clone()
    };
    set_kill(store, &replaced).expect("replace kill");
    assert_eq!(
        mine(store),
        vec![
            all.clone(),
            owner.clone(),
            replaced.clone(),
            same_name.clone()
        ]
    );

    let clear = |t: &KillTarget| control(store, ControlChange::ClearKill(t.clone()));
    clear(&owner.target).expect("clear owner");
    assert!(is_not_found(clear(&owner.target)), "clear owner twice");
    assert!(is_not_found(clear(&KillTarget::Agent(
        "ks-never".to_owned()
    ))));
    assert_eq!(
        mine(store),
        vec![all.clone(), replaced.clone(), same_name.clone()]
    );

    clear(&KillTarget::All).expect("clear all");
    clear(&same_name.target).expect("clear same name");
    clear(&replaced.target).expect("clear agent");
    assert_eq!(mine(store), Vec::<KillSwitch>::new());
}

pub fn version_bumps_on_every_mutation(store: &dyn Store) {
    let check = |what: &str, expect_bump: bool, op: &dyn Fn()| {
        let before = store.state_version().expect("state_version");
        op();
        let after = store.state_version().expect("state_version");
        if expect_bump {
            assert!(
                after > before,
                "{what} must bump the version ({before} -> {after})"
            );
        } else {
            assert_eq!(
                after, before,
                "{what} changed nothing and must not bump the version"
            );
        }
        assert_eq!(
            store.snapshot(NOW).expect("snapshot").version,
            after,
            "snapshot must carry the version"
        );
    };
    let agent = sample_agent("vb-agent");
    let cred = Credential {
        jti: "vb-cred".to_owned(),
        agent_id: "vb-agent".to_owned(),
        issued_at_ns: NOW,
        expires_at_ns: NOW + NANOS_PER_SEC,
        revoked_at_ns: None,
        replaced_by: None,
    };
    let kill = KillSwitch {
        target: KillTarget::Agent("vb-agent".to_owned()),
        reason: "r".to_owned(),
        set_by: "op".to_owned(),
        set_at_ns: NOW,
    };
    check("inserting an agent", true, &|| {
        store.upsert_agent(&agent).expect("upsert")
    });
    check("updating an agent", true, &|| {
        store
            .upsert_agent(&Agent {
                tier: 3,
                ..agent.clone()
            })
            .expect("upsert")
    });
    check("registering an agent", true, &|| {
        control(
            store,
            ControlChange::RegisterAgent(sample_agent("vb-registered")),
        )
        .expect("register");
    });
    check("suspending an agent", true, &|| {
        set_status(store, "vb-agent", AgentStatus::Suspended).expect("status");
    });
    check("resuming an agent", true, &|| {
        set_status(store, "vb-agent", AgentStatus::Active).expect("status");
    });
    check("issuing a credential", true, &|| {
        control(store, ControlChange::IssueCredential(cred.clone())).expect("issue");
    });
    check("revoking a credential", true, &|| {
        revoke_cred(store, "vb-agent", "vb-cred", NOW).expect("revoke");
    });
    check("setting a kill switch", true, &|| {
        set_kill(store, &kill).expect("set kill");
    });
    check("replacing a kill switch", true, &|| {
        set_kill(
            store,
            &KillSwitch {
                reason: "r2".to_owned(),
                ..kill.clone()
            },
        )
        .expect("set kill");
    });
    check("clearing a kill switch", true, &|| {
        control(store, ControlChange::ClearKill(kill.target.clone())).expect("clear");
    });

    check("a status change of a missing agent", false, &|| {
        assert!(set_status(store, "vb-missing", AgentStatus::Revoked).is_err());
    });
    check(
        "a status change the agent's status does not allow",
        false,
        &|| {
            assert!(set_status(store, "vb-agent", AgentStatus::Active).is_err());
        },
    );
    check("revoking a revoked credential", false, &|| {
        assert!(revoke_cred(store, "vb-agent", "vb-cred", NOW).is_err());
    });
    check("clearing a kill switch that is not set", false, &|| {
        assert!(control(store, ControlChange::ClearKill(kill.target.clone())).is_err());
    });
    check("a refused credential", false, &|| {
        assert!(control(store, ControlChange::IssueCredential(cred.clone())).is_err());
    });
    check("a refused registration", false, &|| {
        assert!(control(store, ControlChange::RegisterAgent(agent.clone())).is_err());
    });
    check("appending audit entries", false, &|| {
        store
            .append_audit(vec![sample_entry(1, "vb-call")])
            .expect("append");
    });
}

/// Each applied change appends exactly its entry; each refused one appends nothing.
pub fn control_changes_are_recorded_with_their_entry(store: &dyn Store) {
    store
        .upsert_agent(&sample_agent("ce-agent"))
        .expect("upsert");
    let kill = KillSwitch {
        target: KillTarget::Agent("ce-agent".to_owned()),
        reason: "r".to_owned(),
        set_by: "operator:ce".to_owned(),
        set_at_ns: NOW,
    };
    let (seq, hash) = head(store);
    let entry = Entry::control(
        NOW + 7,
        "ce-entry".to_owned(),
        "kill",
        "operator:ce",
        "agent `ce-agent`: r".to_owned(),
    );
    let record = store
        .apply_control(
            &ControlChange::SetKill {
                kill: kill.clone(),
                pre_emptive: false,
            },
            entry.clone(),
        )
        .expect("kill");
    assert_eq!(
        (record.seq, record.prev_hash, &record.entry),
        (seq + 1, hash, &entry)
    );
    assert_eq!(store.tail_audit(1).expect("tail"), vec![record.clone()]);
    assert!(store.snapshot(NOW).expect("snapshot").kills.contains(&kill));

    for refused in [
        ControlChange::ClearKill(KillTarget::Agent("ce-nobody".to_owned())),
        ControlChange::RegisterAgent(sample_agent("ce-agent")),
        ControlChange::SetAgentStatus {
            agent_id: "ce-nobody".to_owned(),
            status: AgentStatus::Revoked,
            at: NOW,
        },
    ] {
        assert!(store.apply_control(&refused, entry.clone()).is_err());
        assert_eq!(
            store.tail_audit(1).expect("tail"),
            vec![record.clone()],
            "a refused change must write no entry: {refused:?}"
        );
    }
    assert!(verify_chain(store, 1000).is_ok());
}

/// A call has one outcome: a second is refused, stored or in the same batch, and the
/// refused batch writes nothing.
pub fn one_outcome_per_call(store: &dyn Store) {
    let outcome = |call: &str, i: u64| Entry {
        kind: EntryKind::Outcome,
        ..sample_entry(i, call)
    };
    let decision = |call: &str, i: u64| Entry {
        kind: EntryKind::Decision,
        ..sample_entry(i, call)
    };
    store
        .append_audit(vec![decision("oo-1", 0), outcome("oo-1", 1)])
        .expect("first outcome");
    let (seq, _) = head(store);
    assert!(is_conflict(
        store.append_audit(vec![decision("oo-2", 2), outcome("oo-1", 3)])
    ));
    assert!(is_conflict(
        store.append_audit(vec![outcome("oo-3", 4), outcome("oo-3", 5)])
    ));
    assert_eq!(head(store).0, seq, "a refused batch must write nothing");
    // decisions and control entries may share a call id; outcomes of other calls pass
    store
        .append_audit(vec![
            decision("oo-1", 6),
            outcome("oo-2", 7),
            outcome("oo-3", 8),
        ])
        .expect("other calls");
    assert_eq!(store.call_records("oo-1").expect("records").len(), 3);
}

pub fn audit_append_and_read(store: &dyn Store) {
    let (last_seq, last_hash) = head(store);
    assert!(store
        .append_audit(Vec::new())
        .expect("append nothing")
        .is_empty());
    assert_eq!(
        head(store),
        (last_seq, last_hash),
        "an empty append must write nothing"
    );

    let call = "aa-call-1";
    let mut entries: Vec<Entry> = (0..6)
        .map(|i| sample_entry(i, &format!("aa-call-{i}")))
        .collect();
    // A decision and its outcome share a call id.
    entries[1].kind = EntryKind::Decision;
    entries[4].call_id = call.to_owned();
    entries[4].kind = EntryKind::Outcome;
    // Edge values that must survive storage bit for bit, as the hash covers them.
    entries[5].ts_ns = u64::MAX;
    entries[5].duration_ns = Some(u64::MAX);
    entries[5].cost = Some(f64::MIN_POSITIVE);
    entries[5].rules = vec![
        String::new(),
        "\"quoted\", [json]".to_owned(),
        "nul\0byte".to_owned(),
    ];
    entries[5].rationale = Some(String::new());
    entries[5].agent_id = "ag\u{e9}nt \u{1f916}".to_owned();

    let records = store.append_audit(entries.clone()).expect("append");
    assert_eq!(records.len(), entries.len());
    for (i, (r, e)) in records.iter().zip(&entries).enumerate() {
        assert_eq!(
            r.seq,
            last_seq + 1 + i as u64,
            "sequence numbers must be contiguous"
        );
        assert_eq!(&r.entry, e);
    }
    assert_eq!(
        records[0].prev_hash, last_hash,
        "the batch must chain onto the previous head"
    );
    for w in records.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }

    assert_eq!(
        store.read_audit(last_seq, 100).expect("read"),
        records,
        "read back must equal what was appended"
    );
    assert_eq!(
        store.read_audit(last_seq, 2).expect("read"),
        records[..2].to_vec()
    );
    assert_eq!(
        store.read_audit(last_seq + 2, 2).expect("read"),
        records[2..4].to_vec()
    );
    assert!(store.read_audit(last_seq + 6, 10).expect("read").is_empty());
    assert!(store.read_audit(last_seq, 0).expect("read").is_empty());
    assert_eq!(
        store
            .read_audit(last_seq, usize::MAX)
            .expect("read unbounded"),
        records,
        "a limit beyond the backend's integers means no limit"
    );
    assert!(store
        .read_audit(u64::MAX, 10)
        .expect("read past the end")
        .is_empty());

    let calls = store.call_records(call).expect("call records");
    assert_eq!(
        calls,
        vec![records[1].clone(), records[4].clone()],
        "a call's records, in order"
    );
    assert!(store
        .call_records("aa-no-such-call")
        .expect("call records")
        .is_empty());

    assert_eq!(
        store.tail_audit(3).expect("tail"),
        records[3..].to_vec(),
        "tail is oldest first"
    );
    assert!(store.tail_audit(0).expect("tail").is_empty());
    let everything = store.tail_audit(usize::MAX).expect("tail everything");
    assert_eq!(everything.len() as u64, last_seq + 6);
    assert_eq!(everything.last(), records.last());

    assert_eq!(verify_chain(store, 4), Ok(last_seq + 6));
}

pub fn audit_chain_spans_batches_and_reopen(open: &dyn Fn() -> Box<dyn Store>) {
    let store = open();
    let (start, _) = head(&*store);
    let mut appended = Vec::new();
    let mut i = 0;
    for size in [1, 3, 7, 2] {
        let batch: Vec<Entry> = (0..size)
            .map(|_| {
                i += 1;
                sample_entry(i, &format!("sb-call-{i}"))
            })
            .collect();
        appended.extend(store.append_audit(batch).expect("append batch"));
    }
    drop(store);

    let store = open();
    assert_eq!(
        head(&*store).0,
        start + 13,
        "a reopened store must see every appended record"
    );
    let more = store
        .append_audit(vec![
            sample_entry(100, "sb-after"),
            sample_entry(101, "sb-after"),
        ])
        .expect("append after reopen");
    assert_eq!(
        more[0].seq,
        start + 14,
        "sequence numbers continue across a reopen"
    );
    assert_eq!(
        more[0].prev_hash,
        appended.last().map(|r| r.hash).unwrap_or(GENESIS)
    );
    appended.extend(more);

    assert_eq!(store.read_audit(start, 1000).expect("read"), appended);
    let total = start + appended.len() as u64;
    for page in [1, 5, 1000] {
        assert_eq!(
            verify_chain(&*store, page),
            Ok(total),
            "the chain must verify across batches (page {page})"
        );
    }
}

/// Checks `records` form a contiguous, correctly linked run (not necessarily from 1).
pub fn assert_linked(records: &[Record]) {
    for w in records.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "records must be contiguous");
        assert_eq!(w[1].prev_hash, w[0].hash, "records must link");
    }
}

fn account(name: &str, role: Role, id: &str, lifetime: Option<Nanos>) -> Operator {
    new_account(name, role, id.to_owned(), &"7".repeat(64), NOW, lifetime)
        .expect("a valid account")
        .0
}

/// Operator accounts: added, listed with their hash only, one live account per name,
/// removed once, and the bootstrap token disabled only while an admin account stands.
/// Each change comes with its entry; a refused one writes none.
pub fn operators(store: &dyn Store) {
    let start = store.operators().expect("operators");
    assert!(start.accounts.is_empty());
    assert!(!start.bootstrap_disabled);
    let rita = account("rita", Role::Reviewer, "0000000a", None);
    let (seq0, _) = head(store);
    control(store, ControlChange::AddOperator(rita.clone())).expect("add rita");
    let roster = store.operators().expect("operators");
    assert_eq!(roster.get("0000000a"), Some(&rita));
    assert!(is_conflict(control(
        store,
        ControlChange::AddOperator(account("rita", Role::Admin, "0000000b", None))
    )));
    assert!(is_conflict(control(
        store,
        ControlChange::AddOperator(account("other", Role::Admin, "0000000a", None))
    )));
    // No admin in standing (an expired one does not count): the bootstrap stays.
    control(
        store,
        ControlChange::AddOperator(account("old", Role::Admin, "0000000c", Some(1))),
    )
    .expect("add an expiring admin");
    assert!(is_conflict(control(
        store,
        ControlChange::DisableBootstrap { at: NOW + 10 }
    )));
    control(
        store,
        ControlChange::RemoveOperator {
            id: "0000000a".into(),
            at: NOW + 5,
        },
    )
    .expect("remove rita");
    assert!(is_not_found(control(
        store,
        ControlChange::RemoveOperator {
            id: "0000000a".into(),
            at: NOW + 6,
        }
    )));
    assert_eq!(
        store
            .operators()
            .expect("operators")
            .get("0000000a")
            .and_then(|o| o.removed_at_ns),
        Some(NOW + 5)
    );
    // Her name is free again once she is removed.
    control(
        store,
        ControlChange::AddOperator(account("rita", Role::Admin, "0000000d", None)),
    )
    .expect("a new rita");
    control(store, ControlChange::DisableBootstrap { at: NOW + 10 }).expect("disable");
    assert!(store.operators().expect("operators").bootstrap_disabled);
    assert!(is_conflict(control(
        store,
        ControlChange::DisableBootstrap { at: NOW + 11 }
    )));
    // Five changes went through, each with exactly its entry.
    assert_eq!(head(store).0, seq0 + 5);
}

/// A config-declared agent is inserted when new and updated (owner, tier, scopes,
/// rotation) when not, never its status; with its entry, and a new state version.
pub fn declared_agents(store: &dyn Store) {
    let mut a = sample_agent("declared-1");
    let v0 = store.state_version().expect("version");
    control(store, ControlChange::DeclareAgent(a.clone())).expect("declare new");
    assert_eq!(store.get_agent("declared-1").expect("get"), Some(a.clone()));
    assert!(store.state_version().expect("version") > v0);
    control(
        store,
        ControlChange::SetAgentStatus {
            agent_id: a.id.clone(),
            status: AgentStatus::Suspended,
            at: NOW,
        },
    )
    .expect("suspend");
    a.tier = 3;
    a.owner = "other-team".to_owned();
    a.scopes.insert("payments:send".to_owned());
    let before = store.tail_audit(1).expect("tail")[0].seq;
    control(store, ControlChange::DeclareAgent(a.clone())).expect("declare again");
    let stored = store.get_agent("declared-1").expect("get").expect("agent");
    assert_eq!(
        (stored.tier, &stored.owner, &stored.scopes),
        (3, &a.owner, &a.scopes)
    );
    assert_eq!(
        stored.status,
        AgentStatus::Suspended,
        "the status is the operators'"
    );
    assert_eq!(store.tail_audit(1).expect("tail")[0].seq, before + 1);
}
