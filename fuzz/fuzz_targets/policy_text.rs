//! Policy files: arbitrary text (lossy UTF-8) through `PolicyBundle::load`, as a policy
//! file against the example schema and as a schema of its own.
//!
//! Checked:
//! - loading never panics, whatever the text (it either builds a bundle or reports
//!   problems with a location);
//! - a bundle that loads has unique rule ids and answers every call: the same verdict
//!   twice (the second from the entity cache), never `PERMITTED` as a deny reason, and a
//!   permit only for an action the schema has, from a rule that can permit it, in a text
//!   that holds a `permit` rule at all (deny by default).

#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use warden_core::config::{Classification, Tool};
use warden_core::identity::{Agent, AgentStatus};
use warden_core::policy::{CallFacts, PolicyBundle, Source, Verdict};
use warden_core::Reason;

const SCHEMA: &str = include_str!("../../examples/claims/policy/warden.cedarschema");
const PERMIT_ALL: &str = "@id(\"all\") permit (principal, action, resource);";

struct Fixture {
    agent: Agent,
    calls: Vec<(&'static str, Value)>,
    tool: Tool,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        agent: Agent {
            id: "claims-processor-v3".into(),
            owner: "claims-team".into(),
            tier: 3,
            scopes: ["claims:read".to_string(), "claims:write".to_string()].into(),
            rotation_ns: 3600,
            status: AgentStatus::Active,
        },
        calls: vec![
            ("get_claim", json!({"claim_id": "c-1"})),
            ("search_claims", json!({"query": "water", "limit": 5})),
            (
                "update_claim",
                json!({"claim_id": "c-1", "status": "approved", "payout": 20000}),
            ),
            (
                "upload_document",
                json!({"claim_id": "c-1", "filename": "../x", "size_bytes": 10}),
            ),
            ("run_sql", json!({"query": "DROP TABLE claims"})),
            (
                "issue_payment",
                json!({"claim_id": "c-1", "amount": 1.5, "iban": "DE00"}),
            ),
            ("get_policyholder", json!({"policyholder_id": null})),
            ("no_such_tool", json!({})),
        ],
        tool: Tool {
            name: "get_claim".into(),
            scope: "claims:read".into(),
            classification: Classification::Internal,
            description: None,
            input_schema: None,
        },
    })
}

const FACTS: [CallFacts; 2] = [
    CallFacts {
        classification: Classification::Internal,
        hour: 10,
        weekday: 2,
        delegation_depth: 0,
        cost_estimate: 0.0,
    },
    CallFacts {
        classification: Classification::Restricted,
        hour: 23,
        weekday: 6,
        delegation_depth: 3,
        cost_estimate: 12.3456,
    },
];

fn src(name: &str, text: &str) -> Source {
    Source {
        name: name.into(),
        text: text.into(),
    }
}

fn check_bundle(b: &PolicyBundle, policy_text: &str, calls: &[(&str, Value)]) {
    let ids: HashSet<&String> = b.rule_ids().iter().collect();
    assert_eq!(
        ids.len(),
        b.rule_ids().len(),
        "duplicate rule ids: {:?}",
        b.rule_ids()
    );
    let agent = &fixture().agent;
    for (tool, params) in calls {
        for facts in &FACTS {
            let v = b.evaluate(agent, tool, params, facts);
            let again = b.evaluate(agent, tool, params, facts);
            assert_eq!(v, again, "{tool}: a second evaluation disagrees");
            match &v {
                Verdict::Permit { rules } => {
                    assert!(
                        policy_text.contains("permit"),
                        "permitted with no permit rule: {rules:?}"
                    );
                    assert!(
                        b.has_action(tool),
                        "permitted `{tool}`, which the schema lacks"
                    );
                    assert!(
                        b.may_permit(tool),
                        "permitted `{tool}` though no rule may permit it"
                    );
                    assert!(!rules.is_empty(), "a permit names no rule");
                }
                Verdict::Deny { reason, .. } => {
                    assert_ne!(*reason, Reason::Permitted, "{tool}: {v:?}");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let f = fixture();

    // As a policy file against the example schema.
    if let Ok(b) = PolicyBundle::load(
        &src("warden.cedarschema", SCHEMA),
        &[src("fuzz.cedar", &text)],
        [&f.tool],
    ) {
        check_bundle(&b, &text, &f.calls);
    }

    // As a schema: alone, then with a rule that permits everything.
    let schema = src("fuzz.cedarschema", &text);
    if PolicyBundle::load(&schema, &[], []).is_ok() {
        if let Ok(b) = PolicyBundle::load(&schema, &[src("all.cedar", PERMIT_ALL)], []) {
            check_bundle(&b, PERMIT_ALL, &f.calls);
        }
    }
});
