//! AgentDojo's recorded tool calls typed by their tools' own schemas (the data and its
//! provenance: `tests/data/agentdojo/README.md`).
//!
//! The recorded calls are well-formed for the tools that ran them, so every one must
//! normalize; and the banking suite's amounts are where Cedar used to refuse them: a
//! schema `number` a policy author types as `decimal`, sent as `100`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};
use warden_core::args::Schema;
use warden_core::config::Classification;
use warden_core::identity::{Agent, AgentStatus};
use warden_core::policy::{CallFacts, PolicyBundle, Source, Verdict};
use warden_core::Reason;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/agentdojo");

#[derive(Deserialize)]
struct ToolDecl {
    name: String,
    parameters: Value,
}

#[derive(Deserialize)]
struct Call {
    suite: String,
    tool: String,
    args: Value,
    count: usize,
}

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(DATA).join(name)).unwrap()
}

/// Every tool's schema, compiled, by suite and name.
fn schemas() -> HashMap<(String, String), Schema> {
    let mut out = HashMap::new();
    for suite in ["banking", "workspace"] {
        let tools: Vec<ToolDecl> =
            serde_json::from_str(&read(&format!("{suite}-tools.json"))).unwrap();
        for t in tools {
            let s = Schema::compile(&t.parameters)
                .unwrap_or_else(|e| panic!("{suite}/{}: {e}", t.name));
            out.insert((suite.to_owned(), t.name), s);
        }
    }
    out
}

fn calls() -> Vec<Call> {
    read("calls.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_recorded_call_fits_its_tools_schema() {
    let schemas = schemas();
    assert_eq!(schemas.len(), 11 + 24, "banking and workspace tools");
    let (mut fit, mut changed, mut total) = (0, 0, 0);
    let mut misfits = Vec::new();
    for c in calls() {
        total += c.count;
        let s = &schemas[&(c.suite.clone(), c.tool.clone())];
        match s.normalized(&c.args) {
            Ok(out) => {
                fit += c.count;
                if *out != c.args {
                    changed += c.count;
                }
            }
            Err(e) => misfits.push(format!("{}/{}: {e}", c.suite, c.tool)),
        }
    }
    println!("{fit} of {total} recorded calls fit their tools' schemas; {changed} were retyped");
    assert!(misfits.is_empty(), "{misfits:#?}");
    assert_eq!((fit, total), (1510, 1510));
    // The integer amounts of the banking suite, and nothing else.
    assert_eq!(changed, 104);
}

const BANKING_CEDAR: &str = r#"
entity Agent = { owner: String, tier: Long, scopes: Set<String> };
entity Tool;
type Call = { classification: String, hour: Long, weekday: Long, delegation_depth: Long, cost_estimate: decimal };
action send_money appliesTo { principal: Agent, resource: Tool, context: {
    params: { recipient: String, amount: decimal, subject: String, date: String }, call: Call } };
action schedule_transaction appliesTo { principal: Agent, resource: Tool, context: {
    params: { recipient: String, amount: decimal, subject: String, date: String, recurring: Bool }, call: Call } };
action update_scheduled_transaction appliesTo { principal: Agent, resource: Tool, context: {
    params: { id: Long, recipient?: String, amount?: decimal, subject?: String, date?: String, recurring?: Bool }, call: Call } };
"#;

/// A careful policy on the money tools: amounts are compared as decimals. (A rule written
/// for this test, from the tools' declarations; no attack trace informed it.)
const BANKING_POLICY: &str = r#"
@id("payments")
permit (principal, action in [Action::"send_money", Action::"schedule_transaction", Action::"update_scheduled_transaction"], resource);

@id("large-payments")
forbid (principal, action in [Action::"send_money", Action::"schedule_transaction", Action::"update_scheduled_transaction"], resource)
when { context.params has amount && context.params.amount.greaterThan(decimal("10000.0")) };
"#;

#[test]
fn recorded_payments_reach_a_decimal_policy_once_typed() {
    let schemas = schemas();
    let bundle = PolicyBundle::load(
        &Source {
            name: "banking.cedarschema".into(),
            text: BANKING_CEDAR.into(),
        },
        &[Source {
            name: "banking.cedar".into(),
            text: BANKING_POLICY.into(),
        }],
        [],
    )
    .unwrap();
    let agent = Agent {
        id: "banking-assistant".into(),
        owner: "user".into(),
        tier: 1,
        scopes: Default::default(),
        rotation_ns: 1,
        status: AgentStatus::Active,
    };
    let facts = CallFacts {
        classification: Classification::Internal,
        hour: 10,
        weekday: 1,
        delegation_depth: 0,
        cost_estimate: 0.0,
    };
    let (mut raw_denied, mut typed_permitted, mut typed_forbidden, mut money) = (0, 0, 0, 0);
    for c in calls() {
        if !bundle.has_action(&c.tool) {
            continue;
        }
        money += c.count;
        let typed = schemas[&(c.suite.clone(), c.tool.clone())]
            .normalized(&c.args)
            .unwrap();
        // As a remote gateway sends the typed arguments to `/v1/check` and the node
        // reads them back: a retyped amount stays a float, so Cedar still sees a decimal.
        let wire = serde_json::to_vec(&*typed).unwrap();
        let typed = warden_core::json::from_slice_strict(&wire).unwrap();
        // Typed, every call is decided by the rules, none by its types.
        match bundle.evaluate(&agent, &c.tool, &typed, &facts) {
            Verdict::Permit { .. } => typed_permitted += c.count,
            Verdict::Deny { rules, .. } if rules == ["large-payments"] => {
                typed_forbidden += c.count
            }
            v => panic!("{} {}: {v:?}", c.tool, typed),
        }
        if let Verdict::Deny {
            reason: Reason::ConstraintViolation,
            message,
            ..
        } = bundle.evaluate(&agent, &c.tool, &c.args, &facts)
        {
            assert!(message.contains("do not fit its schema"), "{message}");
            raw_denied += c.count;
        }
    }
    println!(
        "money calls: {money}; untyped, Cedar refused {raw_denied} for their types; typed, \
         {typed_permitted} permitted and {typed_forbidden} forbidden as over 10000.0"
    );
    assert_eq!(money, 204 + 10 + 56);
    assert_eq!(typed_permitted + typed_forbidden, money);
    // The attacker's 1,000,000 transfers: an integer amount, so untyped they were
    // refused only by accident of type; typed, the amount rule catches them.
    assert!(typed_forbidden > 0);
    // Untyped, Cedar refused exactly the integer amounts (the recordings hold no nulls).
    assert_eq!(raw_denied, 104);
    // And a call the recordings do not have: a model's `null` for an optional amount.
    let s = &schemas[&(
        "banking".to_owned(),
        "update_scheduled_transaction".to_owned(),
    )];
    let sent = json!({"id": 7, "amount": null, "recipient": "UK1"});
    let typed = s.normalized(&sent).unwrap();
    assert!(matches!(
        bundle.evaluate(&agent, "update_scheduled_transaction", &typed, &facts),
        Verdict::Permit { .. }
    ));
    assert!(matches!(
        bundle.evaluate(&agent, "update_scheduled_transaction", &sent, &facts),
        Verdict::Deny { .. }
    ));
}
