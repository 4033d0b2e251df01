//! The policy layer: Cedar decides, deny by default.
//!
//! The agent is the principal (`Agent::"<id>"`, with its owner, tier and scopes as
//! attributes), the tool is the action (`Action::"<tool>"`), the resource is the tool
//! (`Tool::"<tool>"`), and the context is `{ params: <the call's arguments>, call: Call }`
//! where `Call` carries the data class, time, delegation depth and cost estimate.
//! Arguments are parsed against the action's declared context, so a missing or
//! wrong-typed argument is a `CONSTRAINT_VIOLATION` before any rule runs.
//!
//! Rule ids come from an `@id("...")` annotation (else `<file>#<n>`). A forbid rule that
//! matches denies with `CONSTRAINT_VIOLATION` unless it carries
//! `@reason("<CODE>")`; `@message("...")` gives the text the agent reads. No matching
//! permit means `TOOL_NOT_PERMITTED`. A rule that fails to evaluate denies the call: Cedar
//! skips erroring policies, which would let a broken forbid rule allow a call.
//!
//! A [`PolicyBundle`] is built only from sources that parse and validate (strict mode)
//! against the schema; the caller swaps bundles whole, so there is never a moment with
//! no policy.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use miette::Diagnostic;
use sha2::{Digest, Sha256};

use crate::config::{Classification, Tool};
use crate::decision::Reason;
use crate::identity::Agent;

/// A named source text (a file's path and contents).
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy rejected:\n  {}", .problems.join("\n  "))]
pub struct PolicyError {
    pub problems: Vec<String>,
}

impl PolicyError {
    fn one(p: String) -> Self {
        Self { problems: vec![p] }
    }
}

#[derive(Clone, Debug)]
struct RuleMeta {
    reason: Option<Reason>,
    message: Option<String>,
    /// Position in the policy files: Cedar reports deciding rules as a set, and the
    /// first of them by position picks the reason code, so the answer is the same on
    /// every call.
    order: usize,
}

/// What Cedar said about one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Permit {
        rules: Vec<String>,
    },
    Deny {
        reason: Reason,
        rules: Vec<String>,
        message: String,
    },
}

/// Schema and policies, parsed and validated together.
pub struct PolicyBundle {
    schema: Schema,
    /// For each action, the rules whose scope can match it. Cedar would find the others
    /// not applicable anyway; leaving them out makes evaluation several times cheaper.
    by_action: HashMap<String, PolicySet>,
    meta: HashMap<String, RuleMeta>,
    actions: HashSet<String>,
    action_entities: Vec<Entity>,
    zero_cost: RestrictedExpression,
    /// Keys of the argument shapes (see [`shape_of`]) that passed schema validation, per
    /// tool. Fixed-size keys keep an entry's cost independent of the arguments' size.
    valid_shapes: RwLock<HashSet<ShapeKey>>,
    /// Each agent's entity store, rebuilt only when the agent's attributes change.
    entities: RwLock<HashMap<String, (Agent, Arc<Entities>)>>,
    authorizer: Authorizer,
    agent_type: EntityTypeName,
    tool_type: EntityTypeName,
    action_type: EntityTypeName,
    digest: String,
    rule_ids: Vec<String>,
}

impl std::fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("digest", &self.digest)
            .field("rules", &self.rule_ids)
            .finish_non_exhaustive()
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// Renders a Cedar diagnostic with the file and line of its first label.
fn describe(name: &str, text: &str, d: &dyn Diagnostic, msg: String) -> String {
    let at = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| {
            let (line, col) = line_col(text, l.offset());
            format!("{name}:{line}:{col}")
        })
        .unwrap_or_else(|| name.to_owned());
    match d.help() {
        Some(help) => format!("{at}: {msg} (help: {help})"),
        None => format!("{at}: {msg}"),
    }
}

fn type_name(s: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(s)
        .map_err(|e| PolicyError::one(format!("internal: bad type name `{s}`: {e}")))
}

impl PolicyBundle {
    /// Parses and validates a schema and policy files, and checks that every tool in the
    /// catalog is an action of the schema.
    pub fn load<'a>(
        schema_src: &Source,
        policy_srcs: &[Source],
        tools: impl IntoIterator<Item = &'a Tool>,
    ) -> Result<PolicyBundle, PolicyError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_src.text).map_err(|e| {
            PolicyError::one(describe(
                &schema_src.name,
                &schema_src.text,
                &e,
                format!("schema does not parse: {e}"),
            ))
        })?;

        let mut problems = Vec::new();
        let mut policies = PolicySet::new();
        let mut meta = HashMap::new();
        let mut rule_ids = Vec::new();
        // Which file a rule came from, to point validation errors at it.
        let mut origin: HashMap<String, usize> = HashMap::new();
        for (fi, src) in policy_srcs.iter().enumerate() {
            let set = match PolicySet::from_str(&src.text) {
                Ok(s) => s,
                Err(e) => {
                    for err in e.errors_as_strings_with_location(&src.name, &src.text) {
                        problems.push(err);
                    }
                    continue;
                }
            };
            let mut parsed: Vec<_> = set.policies().cloned().collect();
            // from_str names policies policy0, policy1, ... in source order.
            parsed.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            for (n, p) in parsed.into_iter().enumerate() {
                let id = p
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{}#{n}", src.name));
                let reason = match p.annotation("reason") {
                    None => None,
                    Some(code) => {
                        match Reason::from_code(code) {
                            Some(r) if r != Reason::Permitted && r != Reason::Internal => Some(r),
                            _ => {
                                problems.push(format!("{}: rule `{id}`: `@reason(\"{code}\")` is not a deny reason code", src.name));
                                None
                            }
                        }
                    }
                };
                meta.insert(
                    id.clone(),
                    RuleMeta {
                        reason,
                        message: p.annotation("message").map(str::to_owned),
                        order: meta.len(),
                    },
                );
                if origin.insert(id.clone(), fi).is_some() {
                    problems.push(format!(
                        "{}: rule id `{id}` is used twice; rule ids must be unique",
                        src.name
                    ));
                    continue;
                }
                if let Err(e) = policies.add(p.new_id(PolicyId::new(&id))) {
                    problems.push(format!("{}: rule `{id}`: {e}", src.name));
                }
                rule_ids.push(id);
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }

        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        for e in result.validation_errors() {
            let id = e.policy_id().to_string();
            let (name, text) = origin
                .get(&id)
                .and_then(|i| policy_srcs.get(*i))
                .map_or(("policies", ""), |s| (s.name.as_str(), s.text.as_str()));
            problems.push(describe(name, text, e, format!("rule `{id}`: {e}")));
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }

        let agent_type = type_name("Agent")?;
        let tool_type = type_name("Tool")?;
        let action_type = type_name("Action")?;
        let actions: HashSet<String> = schema
            .actions()
            .filter(|a| a.type_name() == &action_type)
            .map(|a| a.id().unescaped().to_owned())
            .collect();
        for t in tools {
            if !actions.contains(&t.name) {
                problems.push(format!(
                    "{}: tool `{}` is in the config but the schema has no `action \"{}\"`; add it to the schema",
                    schema_src.name, t.name, t.name
                ));
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }
        let all_actions = schema
            .action_entities()
            .map_err(|e| PolicyError::one(format!("{}: {e}", schema_src.name)))?;
        let grouped = schema.actions().any(|a| {
            all_actions
                .ancestors(a)
                .is_some_and(|mut p| p.next().is_some())
        });
        let action_entities: Vec<Entity> = if grouped {
            all_actions.into_iter().collect()
        } else {
            Vec::new()
        };
        let mut by_action = HashMap::new();
        for uid in schema.actions().filter(|a| a.type_name() == &action_type) {
            let mut set = PolicySet::new();
            for p in policies.policies() {
                let applies = match p.action_constraint() {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(a) => &a == uid,
                    // With action groups, `in` may reach this action through a parent.
                    ActionConstraint::In(list) => grouped || list.iter().any(|a| a == uid),
                };
                if applies {
                    set.add(p.clone())
                        .map_err(|e| PolicyError::one(format!("internal: {e}")))?;
                }
            }
            by_action.insert(uid.id().unescaped().to_owned(), set);
        }

        let mut h = Sha256::new();
        h.update(schema_src.text.as_bytes());
        for s in policy_srcs {
            h.update((s.text.len() as u64).to_be_bytes());
            h.update(s.text.as_bytes());
        }
        Ok(PolicyBundle {
            schema,
            by_action,
            meta,
            actions,
            action_entities,
            zero_cost: RestrictedExpression::new_decimal("0.0000"),
            entities: RwLock::new(HashMap::new()),
            valid_shapes: RwLock::new(HashSet::new()),
            authorizer: Authorizer::new(),
            agent_type,
            tool_type,
            action_type,
            digest: hex::encode(&h.finalize()[..16]),
            rule_ids,
        })
    }

    /// A short fingerprint of the sources this bundle was built from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn rule_ids(&self) -> &[String] {
        &self.rule_ids
    }

    pub fn has_action(&self, tool: &str) -> bool {
        self.actions.contains(tool)
    }

    /// Whether any permit rule could apply to this action (its conditions aside). With
    /// none, every call to it is denied by default.
    pub fn may_permit(&self, tool: &str) -> bool {
        self.by_action.get(tool).is_some_and(|set| {
            set.policies()
                .any(|p| p.effect() == cedar_policy::Effect::Permit)
        })
    }

    /// Asks Cedar about one call.
    pub fn evaluate(
        &self,
        agent: &Agent,
        tool: &str,
        params: &serde_json::Value,
        call: &CallFacts,
    ) -> Verdict {
        let deny = |reason: Reason, message: String| Verdict::Deny {
            reason,
            rules: Vec::new(),
            message,
        };
        let principal =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(&agent.id));
        let action =
            EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(tool));
        let resource =
            EntityUid::from_type_name_and_id(self.tool_type.clone(), EntityId::new(tool));
        // The context is built directly as Cedar values (parsing it from JSON costs several
        // times more) and then type-checked against the action's schema by Request::new.
        let shape = shape_of(params, tool);
        let params = match to_cedar(params, "params") {
            Ok(p) => p,
            Err(m) => {
                return deny(
                    Reason::ConstraintViolation,
                    format!("arguments of `{tool}` do not fit its schema: {m}"),
                )
            }
        };
        let call = RestrictedExpression::new_record([
            (
                "classification".to_owned(),
                RestrictedExpression::new_string(call.classification.as_str().to_owned()),
            ),
            (
                "hour".to_owned(),
                RestrictedExpression::new_long(i64::from(call.hour)),
            ),
            (
                "weekday".to_owned(),
                RestrictedExpression::new_long(i64::from(call.weekday)),
            ),
            (
                "delegation_depth".to_owned(),
                RestrictedExpression::new_long(i64::from(call.delegation_depth)),
            ),
            (
                "cost_estimate".to_owned(),
                if call.cost_estimate == 0.0 {
                    self.zero_cost.clone()
                } else {
                    RestrictedExpression::new_decimal(format!("{:.4}", call.cost_estimate))
                },
            ),
        ]);
        let context = call.map_err(|e| e.to_string()).and_then(|call| {
            Context::from_pairs([("params".to_owned(), params), ("call".to_owned(), call)])
                .map_err(|e| e.to_string())
        });
        let context = match context {
            Ok(c) => c,
            Err(e) => {
                return deny(
                    Reason::ConstraintViolation,
                    format!("arguments of `{tool}` do not fit its schema: {e}"),
                )
            }
        };
        // Schema-checking a context costs more than evaluating the rules, and its verdict
        // depends only on the shape of the arguments (which keys, which JSON types), not
        // on their values: `call` has one fixed shape and strings, integers and decimals
        // are valid whatever they hold. So a shape that passed once for this tool skips
        // the check; a new shape is checked in full.
        let known = self.valid_shapes.read().is_ok_and(|v| v.contains(&shape));
        let schema = if known { None } else { Some(&self.schema) };
        let request = match Request::new(principal.clone(), action, resource, context, schema) {
            Ok(r) => {
                if !known {
                    self.note_valid_shape(shape);
                }
                r
            }
            Err(e) => {
                return deny(
                    Reason::ConstraintViolation,
                    format!(
                        "arguments of `{tool}` do not fit its schema: {}",
                        error_chain(&e)
                    ),
                )
            }
        };
        let entities = match self.entities_for(agent, principal) {
            Ok(e) => e,
            Err(e) => {
                return deny(
                    Reason::Internal,
                    format!("could not build policy entities: {e}"),
                )
            }
        };
        let Some(policies) = self.by_action.get(tool) else {
            return deny(
                Reason::ToolNotPermitted,
                format!("the schema has no action `{tool}`"),
            );
        };
        let response = self
            .authorizer
            .is_authorized(&request, policies, entities.as_ref());
        let diag = response.diagnostics();
        let errors: Vec<String> = diag.errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            // Fail closed: a rule that could not be evaluated might have been a forbid.
            return Verdict::Deny {
                reason: Reason::ConstraintViolation,
                rules: self.in_file_order(diag.errors().map(erroring_policy).collect()),
                message: format!(
                    "a rule could not be evaluated, so the call is denied: {}",
                    errors.join("; ")
                ),
            };
        }
        let rules = self.in_file_order(diag.reason().map(|id| id.to_string()).collect());
        match response.decision() {
            CedarDecision::Allow => Verdict::Permit { rules },
            CedarDecision::Deny if rules.is_empty() => Verdict::Deny {
                reason: Reason::ToolNotPermitted,
                rules,
                message: format!("no policy permits agent `{}` to call `{tool}`", agent.id),
            },
            CedarDecision::Deny => {
                let first = rules.first().and_then(|r| self.meta.get(r));
                let reason = first
                    .and_then(|m| m.reason)
                    .unwrap_or(Reason::ConstraintViolation);
                let message = first
                    .and_then(|m| m.message.clone())
                    .unwrap_or_else(|| format!("forbidden by rule `{}`", rules.join("`, `")));
                Verdict::Deny {
                    reason,
                    rules,
                    message,
                }
            }
        }
    }
}

impl PolicyBundle {
    /// Remembers a shape that passed the schema check. Bounded by bytes: a client
    /// inventing shapes only gets full checks, and the cache starts over when full.
    fn note_valid_shape(&self, shape: ShapeKey) {
        if let Ok(mut v) = self.valid_shapes.write() {
            if (v.len() + 1) * SHAPE_ENTRY_BYTES > SHAPE_CACHE_BYTES {
                v.clear();
            }
            v.insert(shape);
        }
    }

    /// What the shape cache holds, in bytes (keys plus the table's overhead per entry).
    pub fn shape_cache_bytes(&self) -> usize {
        self.valid_shapes
            .read()
            .map_or(0, |v| v.len() * SHAPE_ENTRY_BYTES)
    }

    fn in_file_order(&self, mut rules: Vec<String>) -> Vec<String> {
        rules.sort_by_key(|r| self.meta.get(r).map_or(usize::MAX, |m| m.order));
        rules.dedup();
        rules
    }

    fn entities_for(&self, agent: &Agent, principal: EntityUid) -> Result<Arc<Entities>, String> {
        if let Some((cached, e)) = self
            .entities
            .read()
            .ok()
            .as_ref()
            .and_then(|m| m.get(&agent.id))
        {
            if cached == agent {
                return Ok(e.clone());
            }
        }
        let attrs = HashMap::from([
            (
                "owner".to_owned(),
                RestrictedExpression::new_string(agent.owner.clone()),
            ),
            (
                "tier".to_owned(),
                RestrictedExpression::new_long(i64::from(agent.tier)),
            ),
            (
                "scopes".to_owned(),
                RestrictedExpression::new_set(
                    agent
                        .scopes
                        .iter()
                        .map(|s| RestrictedExpression::new_string(s.clone())),
                ),
            ),
        ]);
        let agent_entity =
            Entity::new(principal, attrs, HashSet::new()).map_err(|e| e.to_string())?;
        // Action entities matter only when the schema groups actions; without groups,
        // `action in [...]` is plain equality and the entities would be dead weight.
        let entities = Arc::new(
            Entities::from_entities(
                self.action_entities.iter().cloned().chain([agent_entity]),
                None,
            )
            .map_err(|e| e.to_string())?,
        );
        if let Ok(mut m) = self.entities.write() {
            // Bounded: agents are registered, but a runaway registry must not grow this.
            if m.len() >= 100_000 {
                m.clear();
            }
            m.insert(agent.id.clone(), (agent.clone(), entities.clone()));
        }
        Ok(entities)
    }
}

/// What Warden knows about a call, beyond its arguments: `context.call` in policies.
#[derive(Clone, Copy, Debug)]
pub struct CallFacts {
    pub classification: Classification,
    /// UTC hour, 0-23.
    pub hour: u8,
    /// 0 = Monday.
    pub weekday: u8,
    pub delegation_depth: u32,
    /// Non-negative, below 10^12 (Cedar decimals hold four places).
    pub cost_estimate: f64,
}

/// A 128-bit digest of an argument shape (see [`shape_of`]).
type ShapeKey = [u8; 16];
/// The shape cache's budget: 1 MiB, about 32,000 shapes.
const SHAPE_CACHE_BYTES: usize = 1 << 20;
/// What one cached shape costs: its key plus the hash table's control byte and spare
/// capacity, rounded up.
const SHAPE_ENTRY_BYTES: usize = 32;

/// The type shape of a call's arguments, with the tool, as a SHA-256 digest cut to 128
/// bits: object keys (sorted) with the shapes of their values; `s` string, `l` integer,
/// `d` decimal, `b` boolean, `n` null, and an array as the set of its elements' distinct
/// shapes, so `[1, 2, ..., 10000]` has the shape of `[1]`. Two argument values with the
/// same shape pass or fail Cedar's schema check alike: a Cedar set conforms when each of
/// its elements does, so only which element shapes occur matters, not how often or in
/// what order. A collision-resistant digest, because a collision would skip the schema
/// check for a shape never checked (Cedar would then still fail closed on a type error,
/// but the cache should not be what an attacker aims at).
fn shape_of(v: &serde_json::Value, tool: &str) -> ShapeKey {
    let mut h = Sha256::new();
    h.update(b"warden.shape.v1\0");
    h.update((tool.len() as u64).to_be_bytes());
    h.update(tool.as_bytes());
    feed_shape(v, &mut h);
    cut(h)
}

fn cut(h: Sha256) -> ShapeKey {
    let full = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&full[..16]);
    key
}

/// An array element's shape: scalars by their tag (no hashing), the rest by digest.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum ElementShape {
    Scalar(u8),
    Nested(ShapeKey),
}

fn scalar_tag(v: &serde_json::Value) -> Option<u8> {
    use serde_json::Value;
    match v {
        Value::Null => Some(b'n'),
        Value::Bool(_) => Some(b'b'),
        Value::Number(n) => Some(if n.as_i64().is_some() { b'l' } else { b'd' }),
        Value::String(_) => Some(b's'),
        Value::Array(_) | Value::Object(_) => None,
    }
}

fn feed_shape(v: &serde_json::Value, h: &mut Sha256) {
    use serde_json::Value;
    if let Some(tag) = scalar_tag(v) {
        h.update([tag]);
        return;
    }
    match v {
        Value::Array(items) => {
            let distinct: BTreeSet<ElementShape> = items
                .iter()
                .map(|x| match scalar_tag(x) {
                    Some(tag) => ElementShape::Scalar(tag),
                    None => {
                        let mut sub = Sha256::new();
                        feed_shape(x, &mut sub);
                        ElementShape::Nested(cut(sub))
                    }
                })
                .collect();
            h.update(b"[");
            for e in &distinct {
                match e {
                    ElementShape::Scalar(tag) => h.update([0, *tag]),
                    ElementShape::Nested(key) => {
                        h.update([1]);
                        h.update(key);
                    }
                }
            }
            h.update(b"]");
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                // Length-prefixed, so no key can imitate the bytes of another's shape.
                h.update((k.len() as u64).to_be_bytes());
                h.update(k.as_bytes());
                if let Some(x) = m.get(k) {
                    feed_shape(x, h);
                }
            }
            h.update(b"}");
        }
        _ => {}
    }
}

/// Converts JSON arguments to Cedar values. Integers become `Long`; numbers with at most
/// four decimal places become `decimal`; `null` is refused (omit optional arguments).
fn to_cedar(v: &serde_json::Value, path: &str) -> Result<RestrictedExpression, String> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => {
            return Err(format!(
                "`{path}` is null; leave optional arguments out instead"
            ))
        }
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => {
            match n.as_i64() {
                Some(i) => RestrictedExpression::new_long(i),
                None => {
                    let text = n.to_string();
                    let decimal = text.split_once('.').is_some_and(|(int, frac)| {
                        int.trim_start_matches('-').len() <= 15
                            && !int.trim_start_matches('-').is_empty()
                            && (1..=4).contains(&frac.len())
                            && frac.bytes().all(|b| b.is_ascii_digit())
                    });
                    if !decimal {
                        return Err(format!("`{path}` is {text}: not an integer, nor a decimal with at most 4 places"));
                    }
                    RestrictedExpression::new_decimal(text)
                }
            }
        }
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Array(items) => RestrictedExpression::new_set(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| to_cedar(x, &format!("{path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(m) => RestrictedExpression::new_record(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), to_cedar(x, &format!("{path}.{k}"))?)))
                .collect::<Result<Vec<_>, String>>()?,
        )
        .map_err(|e| e.to_string())?,
    })
}

fn erroring_policy(e: &cedar_policy::AuthorizationError) -> String {
    match e {
        cedar_policy::AuthorizationError::PolicyEvaluationError(p) => p.policy_id().to_string(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

trait ParseErrorsExt {
    fn errors_as_strings_with_location(&self, name: &str, text: &str) -> Vec<String>;
}

impl ParseErrorsExt for cedar_policy::ParseErrors {
    fn errors_as_strings_with_location(&self, name: &str, text: &str) -> Vec<String> {
        self.iter()
            .map(|e| describe(name, text, e, format!("does not parse: {e}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Classification;
    use crate::identity::AgentStatus;
    use serde_json::json;

    pub const SCHEMA: &str = r#"
entity Agent = { owner: String, tier: Long, scopes: Set<String> };
entity Tool;
type Call = { classification: String, hour: Long, weekday: Long, delegation_depth: Long, cost_estimate: decimal };
action get_claim appliesTo { principal: Agent, resource: Tool, context: { params: { claim_id: String }, call: Call } };
action update_claim appliesTo { principal: Agent, resource: Tool, context: { params: { claim_id: String, amount: Long }, call: Call } };
action tag_claim appliesTo { principal: Agent, resource: Tool, context: { params: { claim_id: String, tags: Set<Long> }, call: Call } };
"#;

    fn src(name: &str, text: &str) -> Source {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            scope: "s".into(),
            classification: Classification::Internal,
            description: None,
            input_schema: None,
        }
    }

    fn agent() -> Agent {
        Agent {
            id: "a".into(),
            owner: "team".into(),
            tier: 2,
            scopes: ["claims:read".to_string()].into(),
            rotation_ns: 1,
            status: AgentStatus::Active,
        }
    }

    const FACTS: CallFacts = CallFacts {
        classification: Classification::Internal,
        hour: 10,
        weekday: 2,
        delegation_depth: 0,
        cost_estimate: 0.0,
    };

    fn eval(b: &PolicyBundle, a: &Agent, tool: &str, params: serde_json::Value) -> Verdict {
        b.evaluate(a, tool, &params, &FACTS)
    }

    const POLICIES: &str = r#"
@id("permit-claims")
permit (principal, action in [Action::"get_claim", Action::"update_claim", Action::"tag_claim"], resource)
when { principal.scopes.contains("claims:read") };

@id("big-updates-need-review")
@reason("CONSTRAINT_VIOLATION")
@message("updates over 10000 need a human")
forbid (principal, action == Action::"update_claim", resource)
when { context.params.amount > 10000 };
"#;

    fn bundle() -> PolicyBundle {
        PolicyBundle::load(
            &src("s.cedarschema", SCHEMA),
            &[src("p.cedar", POLICIES)],
            [&tool("get_claim")],
        )
        .unwrap()
    }

    #[test]
    fn permit_forbid_and_default_deny() {
        let b = bundle();
        assert_eq!(
            eval(&b, &agent(), "get_claim", json!({"claim_id": "c1"})),
            Verdict::Permit {
                rules: vec!["permit-claims".into()]
            }
        );
        match eval(
            &b,
            &agent(),
            "update_claim",
            json!({"claim_id": "c1", "amount": 20000}),
        ) {
            Verdict::Deny {
                reason,
                rules,
                message,
            } => {
                assert_eq!(reason, Reason::ConstraintViolation);
                assert_eq!(rules, vec!["big-updates-need-review"]);
                assert_eq!(message, "updates over 10000 need a human");
            }
            v => panic!("{v:?}"),
        }
        let mut a = agent();
        a.scopes.clear();
        assert!(matches!(
            eval(&b, &a, "get_claim", json!({"claim_id": "c1"})),
            Verdict::Deny {
                reason: Reason::ToolNotPermitted,
                ..
            }
        ));
    }

    #[test]
    fn arguments_are_typed_by_the_schema() {
        let b = bundle();
        for bad in [
            json!({}),
            json!({"claim_id": 5}),
            json!({"claim_id": "c", "extra": 1}),
            json!("str"),
            json!({"claim_id": null}),
            json!({"claim_id": 1.23456}),
        ] {
            match eval(&b, &agent(), "get_claim", bad.clone()) {
                Verdict::Deny {
                    reason: Reason::ConstraintViolation,
                    message,
                    ..
                } => {
                    assert!(message.contains("get_claim"), "{message}")
                }
                v => panic!("{bad}: {v:?}"),
            }
        }
    }

    #[test]
    fn broken_sources_are_rejected_with_location() {
        let e = PolicyBundle::load(
            &src("s", SCHEMA),
            &[src("p.cedar", "permit (principal, action, resource")],
            [],
        )
        .unwrap_err();
        assert!(e.problems[0].starts_with("p.cedar:1:"), "{e}");
        // schema error: attribute that does not exist
        let e = PolicyBundle::load(
            &src("s", SCHEMA),
            &[src(
                "p.cedar",
                "\n@id(\"x\")\npermit (principal, action, resource) when { principal.nope == 1 };",
            )],
            [],
        )
        .unwrap_err();
        assert!(
            e.problems[0].contains("p.cedar:3") && e.problems[0].contains("`x`"),
            "{e}"
        );
        // duplicate ids
        let dup = "@id(\"d\") permit (principal, action, resource);\n@id(\"d\") forbid (principal, action, resource);";
        assert!(PolicyBundle::load(&src("s", SCHEMA), &[src("p", dup)], []).is_err());
        // tool without action
        let e = PolicyBundle::load(&src("s", SCHEMA), &[], [&tool("delete_claim")]).unwrap_err();
        assert!(e.problems[0].contains("delete_claim"), "{e}");
        // bad @reason
        let r = "@reason(\"PERMITTED\") forbid (principal, action, resource);";
        assert!(PolicyBundle::load(&src("s", SCHEMA), &[src("p", r)], []).is_err());
        assert!(PolicyBundle::load(&src("s", "entity ;"), &[], []).is_err());
    }

    /// The shape cache must never change a verdict: a bundle that has seen many shapes
    /// answers every call as a fresh bundle (which checks every call in full) does.
    mod shape_cache {
        use super::*;
        use proptest::prelude::*;

        fn arg() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                Just(json!("c")),
                Just(json!(7)),
                Just(json!(12000)),
                Just(json!(1.5)),
                Just(json!(true)),
                Just(json!(null)),
                Just(json!(["a"])),
                Just(json!({"x": 1})),
            ]
        }

        fn params() -> impl Strategy<Value = serde_json::Value> {
            proptest::collection::btree_map(
                prop_oneof![Just("claim_id"), Just("amount"), Just("extra")],
                arg(),
                0..3,
            )
            .prop_map(|m| json!(m))
        }

        proptest! {
            // Each case parses a fresh bundle per call: few cases, many calls each.
            #![proptest_config(ProptestConfig::with_cases(24))]
            #[test]
            fn cached_and_fresh_bundles_agree(calls in proptest::collection::vec((any::<bool>(), params()), 1..40)) {
                let warm = bundle();
                for (update, p) in calls {
                    let tool = if update { "update_claim" } else { "get_claim" };
                    let fresh = bundle();
                    prop_assert_eq!(eval(&warm, &agent(), tool, p.clone()), eval(&fresh, &agent(), tool, p));
                }
            }
        }
    }

    /// Arrays are described by their distinct element shapes, so the cache must still
    /// tell a homogeneous set from a mixed one, an empty one, and nested ones.
    mod shape_cache_arrays {
        use super::*;
        use proptest::prelude::*;

        fn element() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                (0i64..5).prop_map(|i| json!(i)),
                Just(json!("x")),
                Just(json!(1.5)),
                Just(json!(null)),
                Just(json!([1])),
                Just(json!([])),
                Just(json!({"a": 1})),
            ]
        }

        fn params() -> impl Strategy<Value = serde_json::Value> {
            (proptest::collection::vec(element(), 0..5), any::<bool>()).prop_map(
                |(tags, with_claim)| {
                    if with_claim {
                        json!({"claim_id": "c", "tags": tags})
                    } else {
                        json!({"tags": tags})
                    }
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            #[test]
            fn cached_and_fresh_bundles_agree_on_arrays(calls in proptest::collection::vec(params(), 1..40)) {
                let warm = bundle();
                for p in calls {
                    let fresh = bundle();
                    prop_assert_eq!(eval(&warm, &agent(), "tag_claim", p.clone()), eval(&fresh, &agent(), "tag_claim", p));
                }
            }
        }
    }

    #[test]
    fn a_long_array_has_the_shape_of_one_element() {
        let long: Vec<i64> = (0..10_000).collect();
        assert_eq!(
            shape_of(&json!({"tags": long}), "tag_claim"),
            shape_of(&json!({"tags": [1]}), "tag_claim")
        );
        assert_ne!(
            shape_of(&json!({"tags": [1, "x"]}), "tag_claim"),
            shape_of(&json!({"tags": [1]}), "tag_claim")
        );
        assert_ne!(
            shape_of(&json!({"tags": []}), "tag_claim"),
            shape_of(&json!({"tags": [1]}), "tag_claim")
        );
        assert_ne!(
            shape_of(&json!({"tags": [1]}), "get_claim"),
            shape_of(&json!({"tags": [1]}), "tag_claim")
        );
    }

    /// Regression: the cache kept each shape as a full string, so array arguments grew
    /// it by their length (563 MB RSS measured).
    #[test]
    fn a_ten_thousand_element_array_adds_a_small_bounded_amount_to_the_shape_cache() {
        let b = bundle();
        let before = b.shape_cache_bytes();
        let long: Vec<i64> = (0..10_000).collect();
        assert!(matches!(
            eval(
                &b,
                &agent(),
                "tag_claim",
                json!({"claim_id": "c", "tags": long})
            ),
            Verdict::Permit { .. }
        ));
        let grown = b.shape_cache_bytes() - before;
        assert!(grown > 0 && grown <= 64, "grew by {grown} bytes");
    }

    #[test]
    fn the_shape_cache_stays_within_its_byte_budget() {
        let b = bundle();
        for i in 0..(SHAPE_CACHE_BYTES / SHAPE_ENTRY_BYTES + 100) {
            b.note_valid_shape(shape_of(&json!({ format!("v{i}"): 1 }), "get_claim"));
        }
        assert!(b.shape_cache_bytes() <= SHAPE_CACHE_BYTES);
    }

    /// Regression (found by fuzzing): with two forbid rules matching, the reason code and
    /// the rule order came from a hash set and changed from call to call.
    #[test]
    fn two_matching_forbids_give_the_same_answer_every_time() {
        let text = r#"
@id("p") permit (principal, action, resource);
@id("first") @reason("RATE_LIMITED") @message("one") forbid (principal, action == Action::"get_claim", resource);
@id("second") @reason("DATA_BOUNDARY_VIOLATION") @message("two") forbid (principal, action == Action::"get_claim", resource);
@id("third") forbid (principal, action, resource) when { context.params.claim_id == "c" };
"#;
        for _ in 0..20 {
            let b = PolicyBundle::load(&src("s", SCHEMA), &[src("p", text)], []).unwrap();
            for _ in 0..5 {
                assert_eq!(
                    eval(&b, &agent(), "get_claim", json!({"claim_id": "c"})),
                    Verdict::Deny {
                        reason: Reason::RateLimited,
                        rules: vec!["first".into(), "second".into(), "third".into()],
                        message: "one".into()
                    }
                );
            }
        }
    }

    #[test]
    fn unannotated_rules_get_file_based_ids() {
        let b = PolicyBundle::load(
            &src("s", SCHEMA),
            &[src("p.cedar", "permit (principal, action, resource);\nforbid (principal, action == Action::\"update_claim\", resource);")],
            [],
        )
        .unwrap();
        assert_eq!(b.rule_ids(), ["p.cedar#0", "p.cedar#1"]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const RULES: [&str; 8] = [
            "permit (principal, action, resource);",
            "permit (principal, action == Action::\"get_claim\", resource);",
            "permit (principal, action, resource) when { principal.tier >= 2 };",
            "permit (principal, action == Action::\"update_claim\", resource) when { context.params.amount < 500 };",
            "forbid (principal, action == Action::\"update_claim\", resource) when { context.params.amount > 100 };",
            "forbid (principal, action, resource) when { principal.owner == \"other\" };",
            "forbid (principal, action == Action::\"get_claim\", resource) when { context.params.claim_id like \"x*\" };",
            "forbid (principal, action, resource) when { context.call.hour > 20 };",
        ];

        fn bundle_of(rules: &[usize]) -> PolicyBundle {
            let text: Vec<String> = rules
                .iter()
                .enumerate()
                .map(|(i, r)| format!("@id(\"r{i}\") {}", RULES[*r]))
                .collect();
            PolicyBundle::load(&src("s", SCHEMA), &[src("p", &text.join("\n"))], []).unwrap()
        }

        proptest! {
            /// Adding a forbid rule never turns a deny into a permit, whatever else the
            /// policy holds and whatever the call.
            #[test]
            fn adding_a_forbid_never_permits_more(
                base in proptest::collection::vec(0usize..8, 0..5),
                extra in 4usize..8,
                amount in 0i64..1000,
                claim in "[a-z]{0,3}",
                tier in 1i64..4,
                owner in prop_oneof!["team", "other"],
                update in any::<bool>(),
            ) {
                let mut a = agent();
                a.tier = tier as u8;
                a.owner = owner.to_string();
                let (tool, params) = if update {
                    ("update_claim", json!({"claim_id": claim, "amount": amount}))
                } else {
                    ("get_claim", json!({"claim_id": claim}))
                };
                let before = bundle_of(&base).evaluate(&a, tool, &params, &FACTS);
                let mut more = base.clone();
                more.push(extra);
                let after = bundle_of(&more).evaluate(&a, tool, &params, &FACTS);
                if matches!(before, Verdict::Deny { .. }) {
                    prop_assert!(matches!(after, Verdict::Deny { .. }), "{:?} -> {:?}", before, after);
                }
            }
        }
    }
}
