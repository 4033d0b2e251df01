//! The decision pipeline: control, identity, tool scope, data boundary, argument types,
//! Cedar, limits, composed in that order, with an audit entry for every outcome.
//!
//! INVARIANT: the kill switch is checked before policy; a global kill is checked before
//! the caller is even authenticated.
//! INVARIANT: [`Pipeline::check`] never fails; every error becomes a deny with a reason.
//! INVARIANT: rate-limit budget is spent only by calls every other layer permits.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::args::{ArgError, SchemaError};
use crate::audit::{cap_text, hash_json, Entry, EntryKind, MAX_ACTION_KEPT};
use crate::clock::{Clock, Nanos, NANOS_PER_MILLI, NANOS_PER_SEC};
use crate::config::{Classification, Settings, Tool};
use crate::control::KillSet;
use crate::decision::{Decision, Reason};
use crate::identity::{check_issued, Agent, AgentStatus, Claims, Verifier};
use crate::limits::{LimitError, Limiter};
use crate::policy::{CallFacts, PolicyBundle, Verdict};
use crate::store::{Credential, StateSnapshot};

/// Built-in rule ids, reported in decisions like Cedar policy ids.
pub mod rules {
    pub const CONTROL_STALE: &str = "warden.control.stale";
    pub const KILL_SWITCH: &str = "warden.control.kill-switch";
    pub const IDENTITY: &str = "warden.identity";
    /// A validly signed token whose jti this node's view does not hold: never issued, or
    /// issued after the view was loaded (see [`super::Pipeline::needs_newer_view`]).
    pub const UNISSUED_CREDENTIAL: &str = "warden.identity.unissued";
    pub const TOOL_CATALOG: &str = "warden.tool-catalog";
    pub const SCOPE: &str = "warden.scope";
    pub const DATA_BOUNDARY: &str = "warden.data-boundary";
    pub const POLICY_DEFAULT_DENY: &str = "warden.policy.default-deny";
    /// A gateway's refusal of an argument it could not resolve (a file path).
    pub const GATEWAY_REFUSAL: &str = "warden.gateway.arguments";
    /// Arguments that do not fit the tool's input schema (the catalog's, or the one an
    /// MCP server declared, applied by its gateway).
    pub const ARGUMENT_SCHEMA: &str = "warden.arguments.schema";
    pub const REQUEST: &str = "warden.request";
}

/// What the caller says about the call beyond tool and arguments.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    /// The highest data class among the call's inputs, as the caller labels them.
    pub classification: Option<Classification>,
    pub cost_estimate: Option<f64>,
    /// The agent's stated reasoning for this call.
    pub rationale: Option<String>,
    pub delegation_id: Option<String>,
    pub delegation_depth: u32,
    /// Set by a gateway that found the call unfit to judge (a file-path argument that
    /// does not resolve, arguments that do not fit the server's input schema): the call
    /// is denied `CONSTRAINT_VIOLATION` under the refusal's rule, after authentication,
    /// so the audit entry names the agent.
    pub refusal: Option<Refusal>,
    /// The network peer that sent the call, if it came over a network. It decides
    /// nothing; floods of failures are sampled per peer.
    pub peer: Option<std::net::IpAddr>,
}

/// Why a gateway refused to have a call judged, and the rule that names it in the
/// decision and the audit entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub rule: RefusalRule,
    pub message: String,
}

/// The rules a gateway may refuse a call under: a closed set, so that whoever sends a
/// refusal (a remote gateway, over `/v1/check`) cannot write another rule's id into the
/// record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RefusalRule {
    /// [`rules::GATEWAY_REFUSAL`]: an argument the gateway could not resolve.
    #[serde(rename = "warden.gateway.arguments")]
    GatewayArguments,
    /// [`rules::ARGUMENT_SCHEMA`]: arguments that do not fit the tool's input schema.
    #[serde(rename = "warden.arguments.schema")]
    ArgumentSchema,
}

impl RefusalRule {
    pub fn id(self) -> &'static str {
        match self {
            RefusalRule::GatewayArguments => rules::GATEWAY_REFUSAL,
            RefusalRule::ArgumentSchema => rules::ARGUMENT_SCHEMA,
        }
    }
}

impl Refusal {
    /// An argument the gateway could not resolve (a file path).
    pub fn unresolved(message: impl Into<String>) -> Self {
        Refusal {
            rule: RefusalRule::GatewayArguments,
            message: message.into(),
        }
    }

    /// Arguments of `tool` that do not fit its input schema; the same message the
    /// pipeline gives for the catalog's schema.
    pub fn misfit(tool: &str, e: &ArgError) -> Self {
        Refusal {
            rule: RefusalRule::ArgumentSchema,
            message: misfit_message(tool, e),
        }
    }

    /// A tool whose declared input schema cannot be compiled: its calls cannot be typed,
    /// so they are refused rather than judged untyped.
    pub fn unusable_schema(tool: &str, e: &SchemaError) -> Self {
        Refusal {
            rule: RefusalRule::ArgumentSchema,
            message: format!("the input schema of `{tool}` cannot be used: {e}"),
        }
    }
}

fn misfit_message(tool: &str, e: &ArgError) -> String {
    format!("arguments of `{tool}` do not fit its input schema: {e}")
}

/// One tool call to decide.
#[derive(Clone, Copy, Debug)]
pub struct CallRequest<'a> {
    pub credential: Option<&'a str>,
    pub tool: &'a str,
    pub params: &'a serde_json::Value,
    pub context: &'a CallContext,
}

/// Identifiers the transport assigns to the call.
#[derive(Clone, Debug)]
pub struct CallIds {
    pub call_id: String,
    pub trace_id: String,
    pub span_id: String,
}

/// The pipeline's answer and the audit entry that must be durable before it is returned.
#[derive(Clone, Debug)]
pub struct Checked {
    pub decision: Decision,
    pub entry: Entry,
    /// Whether the caller proved who it is (its failures are never sampled).
    pub authenticated: bool,
}

/// An authenticated agent that no kill switch covers, as its credential lets it act: its
/// `scopes` are those the credential carries and the agent still holds.
#[derive(Clone, Debug)]
pub struct Standing {
    pub agent: Agent,
}

/// The in-memory view of agents, issued credentials and kill switches.
#[derive(Debug, Default)]
pub struct ControlState {
    pub version: u64,
    pub agents: HashMap<String, Agent>,
    /// Credentials not yet expired when the view was read, revoked or not, by jti.
    pub credentials: HashMap<String, Credential>,
    pub kills: KillSet,
}

impl From<StateSnapshot> for ControlState {
    fn from(s: StateSnapshot) -> Self {
        ControlState {
            version: s.version,
            agents: s.agents.into_iter().map(|a| (a.id.clone(), a)).collect(),
            credentials: s.credentials,
            kills: KillSet::new(s.kills),
        }
    }
}

pub struct Pipeline {
    clock: Arc<dyn Clock>,
    tools: HashMap<String, Tool>,
    tiers: BTreeMap<u8, Classification>,
    stale_after_ns: Nanos,
    max_rationale: usize,
    verifier: Verifier,
    limiter: Limiter,
    policy: RwLock<Arc<PolicyBundle>>,
    /// The control view in force; `None` until the first snapshot is installed.
    state: RwLock<Option<Arc<ControlState>>>,
    /// When the control view was last confirmed against the store (0: never).
    fresh_at: AtomicU64,
}

impl Pipeline {
    pub fn new(
        settings: &Settings,
        policy: PolicyBundle,
        verifier: Verifier,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            tools: settings
                .tools
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            tiers: settings.tiers.clone(),
            stale_after_ns: settings.control_stale_after_ns,
            max_rationale: settings.audit_limits.max_rationale_bytes,
            verifier,
            limiter: Limiter::new(settings.limits.clone()),
            policy: RwLock::new(Arc::new(policy)),
            state: RwLock::new(None),
            fresh_at: AtomicU64::new(0),
            clock,
        }
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// The verifier of agent tokens, whose keys the JWKS publishes.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The policy in force.
    pub fn policy(&self) -> Option<Arc<PolicyBundle>> {
        self.policy.read().ok().map(|p| p.clone())
    }

    /// Swaps in a new, already validated policy; calls in flight finish on the old one.
    pub fn install_policy(&self, bundle: PolicyBundle) {
        if let Ok(mut p) = self.policy.write() {
            *p = Arc::new(bundle);
        }
    }

    /// The control view in force, or `None` before the first snapshot.
    pub fn state(&self) -> Option<Arc<ControlState>> {
        self.state.read().ok().and_then(|s| s.clone())
    }

    /// Installs a snapshot the store produced from a read that began at `read_at`, if it
    /// is newer than the view in force, and confirms the view as of `read_at`. Returns
    /// whether it was installed.
    ///
    /// Refreshes run concurrently (the background loop, an admin change, a lookup on an
    /// unknown credential), so a slow one can finish after a faster one that read a newer
    /// version. Installing only strictly newer versions keeps it from putting back a view
    /// from before a kill or a registration.
    pub fn apply_snapshot(&self, snapshot: StateSnapshot, read_at: Nanos) -> bool {
        let version = snapshot.version;
        let installed = match self.state.write() {
            Ok(mut s) => {
                let newer = s.as_ref().is_none_or(|cur| version > cur.version);
                if newer {
                    *s = Some(Arc::new(snapshot.into()));
                }
                newer
            }
            Err(_) => false,
        };
        self.confirm_current(version, read_at);
        installed
    }

    /// Records that the store's state version was `version` during a read that began at
    /// `read_at`. The view counts as confirmed from `read_at` only if it is at least that
    /// new; an older view is not current, whatever the store said, and stays unconfirmed
    /// until a newer snapshot is installed. Returns whether the view was confirmed.
    pub fn confirm_current(&self, version: u64, read_at: Nanos) -> bool {
        // Views only ever get newer, so one that is new enough now stays so.
        let current = self.state().map(|s| s.version);
        if current.is_some_and(|v| v >= version) {
            // `fetch_max`: a slow read must not move the confirmation back in time.
            self.fresh_at.fetch_max(read_at.max(1), Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// How long ago the view was last confirmed, if ever.
    pub fn staleness(&self) -> Option<Nanos> {
        match self.fresh_at.load(Ordering::Acquire) {
            0 => None,
            t => Some(self.clock.now_ns().saturating_sub(t)),
        }
    }

    pub fn is_fresh(&self) -> bool {
        self.staleness().is_some_and(|s| s <= self.stale_after_ns)
    }

    /// Whether a deny may be only this node's view lagging the store: a validly signed
    /// token naming an agent or a credential the view does not hold yet (registered or
    /// issued by another process since the last refresh). A caller that can reach the
    /// store refreshes once and decides again; the second answer stands. Only holders of
    /// the signing key can produce such a token, so this is no lever for anyone else.
    pub fn needs_newer_view(decision: &Decision) -> bool {
        decision.reason == Reason::UnknownAgent
            || decision
                .rules
                .iter()
                .any(|r| r == rules::UNISSUED_CREDENTIAL)
    }

    /// Decides one call. Never fails: every problem is a deny with a reason code.
    pub fn check(&self, req: &CallRequest<'_>, ids: CallIds) -> Checked {
        let now = self.clock.now_ns();
        let mut agent_id = String::new();
        let (decision, authenticated) = self.decide(req, now, &mut agent_id);
        self.checked(req, ids, now, agent_id, decision, authenticated)
    }

    /// The entry for a request that was refused before it could be decided because it is
    /// invalid: a deny `INVALID_REQUEST` with `problem` as its message, for the agent
    /// the credential names if it is valid. Never fails, like [`Pipeline::check`].
    pub fn refuse_invalid(&self, req: &CallRequest<'_>, ids: CallIds, problem: &str) -> Checked {
        let now = self.clock.now_ns();
        let agent = self
            .state()
            .and_then(|s| self.attribute(&s, req.credential, now));
        let authenticated = agent.is_some();
        let decision = Decision::deny_builtin(Reason::InvalidRequest, rules::REQUEST, problem);
        self.checked(
            req,
            ids,
            now,
            agent.unwrap_or_default(),
            decision,
            authenticated,
        )
    }

    /// The one place a decision becomes its audit entry. Agent-supplied text is capped
    /// here (a valid tool name is never cut: `tool::check_name` allows no more).
    fn checked(
        &self,
        req: &CallRequest<'_>,
        ids: CallIds,
        now: Nanos,
        agent_id: String,
        decision: Decision,
        authenticated: bool,
    ) -> Checked {
        let entry = Entry {
            ts_ns: now,
            kind: EntryKind::Decision,
            call_id: ids.call_id,
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            agent_id,
            delegation_id: req.context.delegation_id.clone(),
            action: cap_text(req.tool, MAX_ACTION_KEPT),
            input_hash: Some(hash_json(req.params)),
            output_hash: None,
            decision: decision.effect.as_str().to_owned(),
            reason: decision.reason.code().to_owned(),
            rules: decision.rules.clone(),
            cost: req.context.cost_estimate,
            duration_ns: None,
            rationale: req
                .context
                .rationale
                .as_deref()
                .map(|r| cap_text(r, self.max_rationale)),
        };
        Checked {
            decision,
            entry,
            authenticated,
        }
    }

    /// The decision, and whether the caller authenticated.
    fn decide(
        &self,
        req: &CallRequest<'_>,
        now: Nanos,
        agent_out: &mut String,
    ) -> (Decision, bool) {
        let agent = match self.standing_at(req.credential, now) {
            Ok(a) => a,
            Err((d, sub)) => {
                // Denials that come with the caller's id were reached after (or, for a
                // global kill and a stale view, beside) a verified credential.
                let authenticated =
                    matches!(d.reason, Reason::Killed | Reason::Internal) && sub.is_some();
                if let Some(sub) = sub {
                    *agent_out = sub;
                }
                return (d, authenticated);
            }
        };
        *agent_out = agent.agent.id.clone();
        if let Some(why) = &req.context.refusal {
            return (
                Decision::deny_builtin(
                    Reason::ConstraintViolation,
                    why.rule.id(),
                    why.message.clone(),
                ),
                true,
            );
        }
        (self.authorize(&agent.agent, req, now), true)
    }

    /// Whether this credential may act at all right now: the control view is fresh, no
    /// kill switch covers the agent, and the credential is valid. Everything `check` does
    /// before looking at the tool. Used by gateways to cancel calls in flight.
    pub fn standing(&self, credential: Option<&str>) -> Result<Standing, Decision> {
        self.standing_at(credential, self.clock.now_ns())
            .map_err(|(d, _)| d)
    }

    fn standing_at(
        &self,
        credential: Option<&str>,
        now: Nanos,
    ) -> Result<Standing, (Decision, Option<String>)> {
        // Control, part one: is our view of the kill switches trustworthy at all?
        if !self.is_fresh() {
            let age = self.staleness().map_or("never loaded".to_owned(), |s| {
                format!("last confirmed {}ms ago", s / NANOS_PER_MILLI)
            });
            let who = self
                .state()
                .and_then(|state| self.attribute(&state, credential, now));
            return Err((
                Decision::deny_builtin(
                    Reason::Internal,
                    rules::CONTROL_STALE,
                    format!("kill-switch view is stale ({age}); failing closed until the store is reachable"),
                ),
                who,
            ));
        }
        let Some(state) = self.state() else {
            return Err((
                Decision::deny_builtin(
                    Reason::Internal,
                    rules::CONTROL_STALE,
                    "control state is unavailable",
                ),
                None,
            ));
        };
        if let Some(k) = state.kills.global() {
            return Err((killed(k), self.attribute(&state, credential, now)));
        }
        let (claims, agent) = self.authenticate_in(&state, credential, now)?;
        // Control, part two: switches aimed at this agent or its owner.
        if let Some(k) = state.kills.covering(&agent.id, &agent.owner) {
            return Err((killed(k), Some(agent.id.clone())));
        }
        // The token's scopes can only narrow what the agent holds now.
        let mut agent = agent.clone();
        if agent.scopes.iter().any(|s| !claims.scopes.contains(s)) {
            agent.scopes.retain(|s| claims.scopes.contains(s));
        }
        Ok(Standing { agent })
    }

    /// The tools this agent could ever be permitted: in the catalog, within its scopes and
    /// its tier's data ceiling, and named by at least one permit rule. Gateways use it to
    /// hide tools the agent's model should not be offered.
    pub fn visible_tools(&self, standing: &Standing) -> HashSet<String> {
        let ceiling = self.ceiling(standing.agent.tier);
        let policy = self.policy();
        self.tools
            .values()
            .filter(|t| standing.agent.scopes.contains(&t.scope) && t.classification <= ceiling)
            .filter(|t| policy.as_ref().is_some_and(|p| p.may_permit(&t.name)))
            .map(|t| t.name.clone())
            .collect()
    }

    /// Authenticates an agent credential against the current control view: signature,
    /// expiry, registration, agent status and revocation. Used by the outcome route so a
    /// call's result can only be reported by the agent that made it.
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Agent, Decision> {
        let Some(state) = self.state() else {
            return Err(Decision::deny_builtin(
                Reason::Internal,
                rules::CONTROL_STALE,
                "control state is unavailable",
            ));
        };
        self.authenticate_in(&state, credential, self.clock.now_ns())
            .map(|(_, a)| a.clone())
            .map_err(|(d, _)| d)
    }

    /// Who is calling, for the record only, once the answer is already a deny that does
    /// not depend on it (a global kill, a stale view): the entry then names the agent, and
    /// a stranger's calls count as unauthenticated, so a flood of them is sampled rather
    /// than written one entry each. Nothing here can turn the deny into anything else.
    fn attribute(
        &self,
        state: &ControlState,
        credential: Option<&str>,
        now: Nanos,
    ) -> Option<String> {
        self.authenticate_in(state, credential, now)
            .ok()
            .map(|(_, agent)| agent.id.clone())
    }

    #[expect(
        clippy::type_complexity,
        reason = "the claims and agent on success, the deny and claimed subject on failure"
    )]
    fn authenticate_in<'s>(
        &self,
        state: &'s ControlState,
        credential: Option<&str>,
        now: Nanos,
    ) -> Result<(Arc<Claims>, &'s Agent), (Decision, Option<String>)> {
        let Some(token) = credential else {
            return Err((
                Decision::deny_builtin(
                    Reason::Unauthenticated,
                    rules::IDENTITY,
                    "no credential: send the agent token as `Authorization: Bearer <token>`",
                ),
                None,
            ));
        };
        let claims = self.verifier.verify(token, now).map_err(|e| {
            (
                Decision::deny_builtin(e.reason, rules::IDENTITY, e.message),
                None,
            )
        })?;
        let fail = |reason: Reason, message: String| {
            Err((
                Decision::deny_builtin(reason, rules::IDENTITY, message),
                Some(claims.sub.clone()),
            ))
        };
        let Some(agent) = state.agents.get(&claims.sub) else {
            return fail(
                Reason::UnknownAgent,
                format!("agent `{}` is not registered on this server", claims.sub),
            );
        };
        match agent.status {
            AgentStatus::Active => {}
            AgentStatus::Revoked => {
                return fail(
                    Reason::CredentialRevoked,
                    format!(
                        "agent `{}` is revoked; all its credentials are void (register a new agent to replace it)",
                        agent.id
                    ),
                );
            }
            AgentStatus::Suspended => {
                return fail(
                    Reason::AgentSuspended,
                    format!(
                        "agent `{0}` is suspended by an operator; its calls are refused until `warden agent resume {0}`",
                        agent.id
                    ),
                );
            }
            AgentStatus::Retired => {
                return fail(
                    Reason::AgentRetired,
                    format!(
                        "agent `{}` is retired and accepts no calls again; register a new agent to replace it",
                        agent.id
                    ),
                );
            }
        }
        let issued = state.credentials.get(&claims.jti);
        if let Err(e) = check_issued(&claims, issued, agent, now) {
            let rule = if issued.is_none() {
                rules::UNISSUED_CREDENTIAL
            } else {
                rules::IDENTITY
            };
            return Err((
                Decision::deny_builtin(e.reason, rule, e.message),
                Some(claims.sub.clone()),
            ));
        }
        Ok((claims, agent))
    }

    /// The highest data class agents of this tier may touch; an undeclared tier may
    /// touch only public data.
    fn ceiling(&self, tier: u8) -> Classification {
        self.tiers
            .get(&tier)
            .copied()
            .unwrap_or(Classification::Public)
    }

    /// Everything after authentication: catalog, scope, data boundary, argument types
    /// (the catalog's input schema), Cedar, limits.
    /// Public so that `warden policy test` runs the same rules as a live call.
    /// `agent` carries the scopes this call may use (see [`Standing`]).
    pub fn authorize(&self, agent: &Agent, req: &CallRequest<'_>, now: Nanos) -> Decision {
        let Some(tool) = self.tools.get(req.tool) else {
            return Decision::deny_builtin(
                Reason::ToolNotPermitted,
                rules::TOOL_CATALOG,
                format!("`{}` is not a tool this server governs", req.tool),
            );
        };
        if !agent.scopes.contains(&tool.scope) {
            return Decision::deny_builtin(
                Reason::ToolNotPermitted,
                rules::SCOPE,
                format!(
                    "agent `{}` lacks scope `{}` needed for `{}`",
                    agent.id, tool.scope, tool.name
                ),
            );
        }
        let class = req
            .context
            .classification
            .map_or(tool.classification, |c| c.max(tool.classification));
        let ceiling = self.ceiling(agent.tier);
        if class > ceiling {
            return Decision::deny_builtin(
                Reason::DataBoundaryViolation,
                rules::DATA_BOUNDARY,
                format!(
                    "`{}` touches {class} data; agent `{}` (tier {}) may touch at most {ceiling}",
                    tool.name, agent.id, agent.tier
                ),
            );
        }

        // Typed from the catalog's schema, policy reads the arguments as the tool takes
        // them: `5` for a number is the decimal `5.0`, a null optional is absent.
        let params = match &tool.input_schema {
            None => Cow::Borrowed(req.params),
            Some(schema) => match schema.normalized(req.params) {
                Ok(p) => p,
                Err(e) => {
                    return Decision::deny_builtin(
                        Reason::ConstraintViolation,
                        rules::ARGUMENT_SCHEMA,
                        misfit_message(&tool.name, &e),
                    )
                }
            },
        };

        let Some(policy) = self.policy() else {
            return Decision::deny_builtin(
                Reason::Internal,
                rules::POLICY_DEFAULT_DENY,
                "policy is unavailable",
            );
        };
        let secs = now / NANOS_PER_SEC;
        let cost = req.context.cost_estimate.unwrap_or(0.0);
        if !(0.0..=1e12).contains(&cost) {
            return Decision::deny_builtin(
                Reason::ConstraintViolation,
                rules::POLICY_DEFAULT_DENY,
                format!("cost estimate {cost} is out of range"),
            );
        }
        let facts = CallFacts {
            classification: class,
            hour: ((secs / 3600) % 24) as u8,
            // 1970-01-01 was a Thursday; 0 = Monday.
            weekday: ((secs / 86_400 + 3) % 7) as u8,
            delegation_depth: req.context.delegation_depth,
            cost_estimate: cost,
        };
        let rules = match policy.evaluate(agent, &tool.name, &params, &facts) {
            Verdict::Permit { rules } => rules,
            Verdict::Deny {
                reason,
                rules,
                message,
            } => {
                let rules = if rules.is_empty() {
                    vec![rules::POLICY_DEFAULT_DENY.to_owned()]
                } else {
                    rules
                };
                return Decision::deny(reason, rules, message);
            }
        };

        match self
            .limiter
            .acquire(&agent.id, &agent.owner, agent.tier, &tool.name, now)
        {
            Ok(_) => Decision::permit(
                rules,
                format!("`{}` permitted for agent `{}`", tool.name, agent.id),
            ),
            Err(LimitError::Exceeded(e)) => Decision {
                retry_after_ms: Some(e.retry_after_ns.div_ceil(NANOS_PER_MILLI)),
                ..Decision::deny(Reason::RateLimited, vec![e.limit_id], e.message)
            },
            Err(e @ LimitError::Unavailable) => {
                Decision::deny_builtin(Reason::Internal, "warden.limits", e.to_string())
            }
        }
    }
}

fn killed(k: &crate::control::KillSwitch) -> Decision {
    Decision::deny_builtin(
        Reason::Killed,
        rules::KILL_SWITCH,
        format!(
            "kill switch for {} is set (by `{}`: {})",
            k.target, k.set_by, k.reason
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use crate::control::{KillSwitch, KillTarget};
    use crate::identity::{new_claims, SigningKeyPair};
    use crate::policy::Source;
    use serde_json::{json, Value};
    use std::path::Path;

    const CONFIG: &str = r#"
[policy]
schema = "s"
policies = "p"
[control]
refresh = "100ms"
stale_after = "1s"
[[tiers]]
tier = 1
max_classification = "internal"
[[tiers]]
tier = 2
max_classification = "confidential"
[[tools]]
name = "read"
scope = "r"
classification = "internal"
[[tools]]
name = "write"
scope = "w"
classification = "internal"
[[tools]]
name = "pay"
scope = "p"
classification = "internal"
[tools.input_schema]
type = "object"
required = ["amount"]
properties = { amount = { type = "number" }, note = { anyOf = [{ type = "string" }, { type = "null" }] } }
[[agents]]
id = "a"
owner = "team"
tier = 1
scopes = ["r", "w"]
rotation = "1h"
[[agents]]
id = "c"
owner = "team"
tier = 1
scopes = ["p"]
rotation = "1h"
[[agents]]
id = "b"
owner = "team"
tier = 2
scopes = ["r"]
rotation = "1h"
[[limits]]
id = "write-rate"
tools = ["write"]
rate = 2
window = "1m"
[[limits]]
id = "tier-2-writes"
tools = ["write"]
tiers = [2]
rate = 1
window = "1m"
"#;
    const SCHEMA: &str = r#"
entity Agent = { owner: String, tier: Long, scopes: Set<String> };
entity Tool;
type Call = { classification: String, hour: Long, weekday: Long, delegation_depth: Long, cost_estimate: decimal };
action read appliesTo { principal: Agent, resource: Tool, context: { params: { id: String }, call: Call } };
action write appliesTo { principal: Agent, resource: Tool, context: { params: { id: String }, call: Call } };
action pay appliesTo { principal: Agent, resource: Tool, context: { params: { amount: decimal, note?: String }, call: Call } };
"#;
    const POLICY: &str = r#"
@id("all") permit (principal, action, resource);
@id("no-x") forbid (principal, action == Action::"write", resource) when { context.params.id == "x" };
@id("big-pay") forbid (principal, action == Action::"pay", resource) when { context.params.amount.greaterThan(decimal("100.0")) };
"#;
    const T0: Nanos = 1_800_000_000 * NANOS_PER_SEC;

    struct Fixture {
        clock: Arc<FakeClock>,
        pipeline: Pipeline,
        key: SigningKeyPair,
        settings: Settings,
        /// What the store has issued, as `token` records it.
        issued: std::sync::Mutex<HashMap<String, Credential>>,
    }

    fn fixture() -> Fixture {
        let settings = Settings::from_toml(CONFIG, "w.toml", Path::new("."), &|_| None).unwrap();
        let bundle = PolicyBundle::load(
            &Source {
                name: "s".into(),
                text: SCHEMA.into(),
            },
            &[Source {
                name: "p".into(),
                text: POLICY.into(),
            }],
            settings.tools.values(),
        )
        .unwrap();
        let key = SigningKeyPair::from_seed([1; 32]);
        let clock = Arc::new(FakeClock::new(T0));
        let pipeline = Pipeline::new(
            &settings,
            bundle,
            Verifier::new("warden", [key.verifying_key()], 64),
            clock.clone(),
        );
        pipeline.apply_snapshot(
            StateSnapshot {
                version: 1,
                agents: settings.agents.clone(),
                ..Default::default()
            },
            T0,
        );
        Fixture {
            clock,
            pipeline,
            key,
            settings,
            issued: Default::default(),
        }
    }

    impl Fixture {
        /// Issues a token as the store would (recording its credential) and installs a
        /// view that holds it, keeping the agents and kill switches in force.
        fn token(&self, agent: &str) -> String {
            let a = self.settings.agents.iter().find(|x| x.id == agent).unwrap();
            let claims = new_claims("warden", a, format!("jti-{agent}"), self.clock.now_ns());
            self.issued.lock().unwrap().insert(
                claims.jti.clone(),
                Credential {
                    jti: claims.jti.clone(),
                    agent_id: agent.to_owned(),
                    issued_at_ns: claims.iat * NANOS_PER_SEC,
                    expires_at_ns: claims.exp * NANOS_PER_SEC,
                    revoked_at_ns: None,
                    replaced_by: None,
                },
            );
            let state = self.pipeline.state().unwrap();
            self.install(StateSnapshot {
                agents: state.agents.values().cloned().collect(),
                kills: state.kills.iter().cloned().collect(),
                ..Default::default()
            });
            self.key.sign(&claims)
        }
        /// The issued credentials, with those named revoked (for good).
        fn credentials(&self, revoked: &[&str]) -> HashMap<String, Credential> {
            let mut issued = self.issued.lock().unwrap();
            for jti in revoked {
                issued.get_mut(*jti).unwrap().revoked_at_ns = Some(self.clock.now_ns());
            }
            issued.clone()
        }
        fn check(&self, token: &str, tool: &str, id: &str) -> Decision {
            let params = json!({ "id": id });
            let ctx = CallContext::default();
            let req = CallRequest {
                credential: Some(token),
                tool,
                params: &params,
                context: &ctx,
            };
            let ids = CallIds {
                call_id: "c".into(),
                trace_id: "t".into(),
                span_id: "s".into(),
            };
            self.pipeline.check(&req, ids).decision
        }
        fn snapshot(&self, kills: Vec<KillSwitch>, revoked: &[&str]) {
            self.install(StateSnapshot {
                agents: self.settings.agents.clone(),
                credentials: self.credentials(revoked),
                kills,
                ..Default::default()
            });
        }
        /// Installs `snap`, with the issued credentials, as the next version, read now.
        fn install(&self, snap: StateSnapshot) {
            let version = self.pipeline.state().map_or(0, |s| s.version) + 1;
            let snap = StateSnapshot {
                version,
                credentials: self.credentials(&[]),
                ..snap
            };
            assert!(self.pipeline.apply_snapshot(snap, self.clock.now_ns()));
        }
        /// The store confirms the view in force, now.
        fn confirm(&self) {
            let version = self.pipeline.state().unwrap().version;
            assert!(self.pipeline.confirm_current(version, self.clock.now_ns()));
        }
    }

    fn kill(t: KillTarget) -> KillSwitch {
        KillSwitch {
            target: t,
            reason: "r".into(),
            set_by: "op".into(),
            set_at_ns: T0,
        }
    }

    #[test]
    fn stale_control_view_denies_until_confirmed() {
        let f = fixture();
        let t = f.token("a");
        assert!(f.check(&t, "read", "1").is_permit());
        f.clock.advance(NANOS_PER_SEC + 1);
        let d = f.check(&t, "read", "1");
        assert_eq!(
            (d.reason, d.rules[0].as_str()),
            (Reason::Internal, rules::CONTROL_STALE)
        );
        f.confirm();
        assert!(f.check(&t, "read", "1").is_permit());
    }

    #[test]
    fn kill_switch_is_checked_before_policy_and_identity_order_holds() {
        let f = fixture();
        let t = f.token("a");
        f.snapshot(vec![kill(KillTarget::Owner("team".into()))], &[]);
        // even a call policy would forbid reports KILLED: the kill switch comes first
        assert_eq!(f.check(&t, "write", "x").reason, Reason::Killed);
        assert_eq!(f.check(&t, "nope", "1").reason, Reason::Killed);
        // a global kill answers before the credential is looked at
        f.snapshot(vec![kill(KillTarget::All)], &[]);
        assert_eq!(f.check("garbage", "read", "1").reason, Reason::Killed);
        f.snapshot(vec![], &["jti-a"]);
        assert_eq!(f.check(&t, "read", "1").reason, Reason::CredentialRevoked);
        assert_eq!(
            f.check("garbage", "read", "1").reason,
            Reason::CredentialMalformed
        );
    }

    #[test]
    fn credential_expires_on_the_fake_clock() {
        let f = fixture();
        let t = f.token("a");
        f.clock.advance(3599 * NANOS_PER_SEC);
        f.confirm();
        assert!(f.check(&t, "read", "1").is_permit());
        f.clock.advance(NANOS_PER_SEC);
        f.confirm();
        assert_eq!(f.check(&t, "read", "1").reason, Reason::CredentialExpired);
    }

    #[test]
    fn scopes_tiers_forbid_and_limits() {
        let f = fixture();
        let b = f.token("b");
        assert_eq!(
            f.check(&b, "write", "1").rules,
            vec![rules::SCOPE.to_owned()]
        );
        let a = f.token("a");
        let d = f.check(&a, "write", "x");
        assert_eq!(
            (d.reason, d.rules.clone()),
            (Reason::ConstraintViolation, vec!["no-x".to_owned()])
        );
        // forbidden calls did not spend the write budget
        assert!(f.check(&a, "write", "1").is_permit());
        assert!(f.check(&a, "write", "2").is_permit());
        let d = f.check(&a, "write", "3");
        assert_eq!(d.reason, Reason::RateLimited);
        assert_eq!(d.retry_after_ms, Some(30_000));
        f.clock.advance(30 * NANOS_PER_SEC);
        f.confirm();
        assert!(f.check(&a, "write", "4").is_permit());

        // data boundary: the caller labels the inputs restricted; tier 1 stops at internal
        let params = json!({ "id": "1" });
        let ctx = CallContext {
            classification: Some(Classification::Confidential),
            ..Default::default()
        };
        let req = CallRequest {
            credential: Some(&a),
            tool: "read",
            params: &params,
            context: &ctx,
        };
        let ids = CallIds {
            call_id: "c".into(),
            trace_id: "t".into(),
            span_id: "s".into(),
        };
        assert_eq!(
            f.pipeline.check(&req, ids.clone()).decision.reason,
            Reason::DataBoundaryViolation
        );
        let req_b = CallRequest {
            credential: Some(&b),
            ..req
        };
        assert!(f.pipeline.check(&req_b, ids).decision.is_permit());
    }

    #[test]
    fn token_scopes_only_narrow_the_agents_current_scopes() {
        let f = fixture();
        let t = f.token("a");
        // the registry drops scope `w` from agent a: its old token no longer carries it
        let mut agents = f.settings.agents.clone();
        agents[0].scopes.remove("w");
        f.install(StateSnapshot {
            agents,
            ..Default::default()
        });
        assert_eq!(
            f.check(&t, "write", "1").rules,
            vec![rules::SCOPE.to_owned()]
        );
        assert!(f.check(&t, "read", "1").is_permit());
    }

    #[test]
    fn visible_tools_follow_scopes_and_standing() {
        let f = fixture();
        let a = f.pipeline.standing(Some(&f.token("a"))).unwrap();
        let b = f.pipeline.standing(Some(&f.token("b"))).unwrap();
        assert_eq!(
            f.pipeline.visible_tools(&a),
            ["read".to_string(), "write".to_string()].into()
        );
        assert_eq!(f.pipeline.visible_tools(&b), ["read".to_string()].into());
        f.snapshot(vec![kill(KillTarget::Agent("a".into()))], &[]);
        assert_eq!(
            f.pipeline.standing(Some(&f.token("a"))).unwrap_err().reason,
            Reason::Killed
        );
        assert!(f.pipeline.standing(Some(&f.token("b"))).is_ok());
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let f = fixture();
        let t = f.token("a");
        f.snapshot(vec![kill(KillTarget::Agent("a".into()))], &[]);
        let killed_at = f.pipeline.state().unwrap().version;
        // a slow refresh that read the store before the kill finishes now
        let before = StateSnapshot {
            version: killed_at - 1,
            agents: f.settings.agents.clone(),
            credentials: f.credentials(&[]),
            ..Default::default()
        };
        assert!(!f.pipeline.apply_snapshot(before, f.clock.now_ns()));
        assert_eq!(f.check(&t, "read", "1").reason, Reason::Killed);
        // and the same version twice is not a change either
        let same = StateSnapshot {
            version: killed_at,
            agents: f.settings.agents.clone(),
            credentials: f.credentials(&[]),
            ..Default::default()
        };
        assert!(!f.pipeline.apply_snapshot(same, f.clock.now_ns()));
        assert_eq!(f.check(&t, "read", "1").reason, Reason::Killed);
    }

    #[test]
    fn a_store_newer_than_the_view_does_not_confirm_it() {
        let f = fixture();
        let t = f.token("a");
        let version = f.pipeline.state().unwrap().version;
        f.clock.advance(NANOS_PER_SEC + 1);
        // the store has moved on (a kill, say) but its snapshot has not arrived
        assert!(!f.pipeline.confirm_current(version + 1, f.clock.now_ns()));
        assert_eq!(f.check(&t, "read", "1").reason, Reason::Internal);
        assert!(f.pipeline.confirm_current(version, f.clock.now_ns()));
        assert!(f.check(&t, "read", "1").is_permit());
        // a slow read that began long ago does not move the confirmation back
        assert!(f.pipeline.confirm_current(version, T0));
        assert!(f.check(&t, "read", "1").is_permit());
    }

    #[test]
    fn refreshes_racing_a_kill_never_undo_it() {
        use std::sync::atomic::AtomicBool;
        let f = Arc::new(fixture());
        let t = f.token("a");
        for round in 0..200u64 {
            // version 2 * round + 1: agent a may act; the kill comes as the next version
            let base = f.pipeline.state().unwrap().version;
            let open = StateSnapshot {
                version: base + 1,
                agents: f.settings.agents.clone(),
                credentials: f.credentials(&[]),
                ..Default::default()
            };
            assert!(f.pipeline.apply_snapshot(open.clone(), f.clock.now_ns()));
            let stop = Arc::new(AtomicBool::new(false));
            let racers: Vec<_> = (0..3)
                .map(|_| {
                    let (f, open, stop) = (f.clone(), open.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            f.pipeline.apply_snapshot(open.clone(), f.clock.now_ns());
                        }
                    })
                })
                .collect();
            let killed = StateSnapshot {
                version: base + 2,
                agents: f.settings.agents.clone(),
                credentials: f.credentials(&[]),
                kills: vec![kill(KillTarget::Agent("a".into()))],
            };
            assert!(f.pipeline.apply_snapshot(killed, f.clock.now_ns()));
            // from here on, while stale refreshes keep arriving, no call is permitted
            for i in 0..50 {
                let d = f.check(&t, "read", "1");
                assert_eq!(d.reason, Reason::Killed, "round {round}, call {i}: {d:?}");
            }
            stop.store(true, Ordering::Relaxed);
            for r in racers {
                r.join().unwrap();
            }
        }
    }

    #[test]
    fn suspended_retired_and_revoked_agents_are_refused_each_with_its_own_reason() {
        let f = fixture();
        let t = f.token("a");
        assert!(f.check(&t, "read", "1").is_permit());
        let with_status = |status: AgentStatus| {
            let mut agents = f.settings.agents.clone();
            agents
                .iter_mut()
                .filter(|a| a.id == "a")
                .for_each(|a| a.status = status);
            f.install(StateSnapshot {
                agents,
                ..Default::default()
            });
            f.check(&t, "read", "1")
        };
        let d = with_status(AgentStatus::Suspended);
        assert_eq!(d.reason, Reason::AgentSuspended, "{d:?}");
        assert!(d.message.contains("warden agent resume a"), "{d:?}");
        assert!(with_status(AgentStatus::Active).is_permit());
        let d = with_status(AgentStatus::Retired);
        assert_eq!(d.reason, Reason::AgentRetired, "{d:?}");
        assert!(d.message.contains("register a new agent"), "{d:?}");
        let d = with_status(AgentStatus::Revoked);
        assert_eq!(d.reason, Reason::CredentialRevoked, "{d:?}");
    }

    #[test]
    fn a_rotated_out_credential_works_through_the_overlap_and_not_a_nanosecond_longer() {
        let f = fixture();
        let old = f.token("a");
        let until = f.clock.now_ns() + 600 * NANOS_PER_SEC;
        {
            let mut issued = f.issued.lock().unwrap();
            let c = issued.get_mut("jti-a").unwrap();
            c.revoked_at_ns = Some(until);
            c.replaced_by = Some("jti-new".into());
        }
        f.snapshot(vec![], &[]);
        f.clock.set(until - 1);
        f.confirm();
        assert!(f.check(&old, "read", "1").is_permit());
        f.clock.set(until);
        f.confirm();
        let d = f.check(&old, "read", "1");
        assert_eq!(d.reason, Reason::CredentialExpired, "{d:?}");
        assert!(d.message.contains("rotated out"), "{d:?}");
        assert!(d.message.contains("jti-new"), "{d:?}");
        assert!(d.message.contains("warden agent rotate a"), "{d:?}");
        // an operator's revocation (no replacement) is a revocation, not an expiry
        f.issued
            .lock()
            .unwrap()
            .get_mut("jti-a")
            .unwrap()
            .replaced_by = None;
        f.snapshot(vec![], &[]);
        let d = f.check(&old, "read", "1");
        assert_eq!(d.reason, Reason::CredentialRevoked, "{d:?}");
        assert!(d.message.contains("warden agent rotate a"), "{d:?}");
    }

    #[test]
    fn an_agent_moved_to_another_tier_has_that_tiers_limits_on_its_next_call() {
        let f = fixture();
        let t = f.token("a");
        let move_to = |tier: u8| {
            let mut agents = f.settings.agents.clone();
            agents
                .iter_mut()
                .filter(|a| a.id == "a")
                .for_each(|a| a.tier = tier);
            f.install(StateSnapshot {
                agents,
                ..Default::default()
            });
        };
        move_to(2);
        assert!(f.check(&t, "write", "1").is_permit());
        let d = f.check(&t, "write", "2");
        assert_eq!(d.reason, Reason::RateLimited, "{d:?}");
        assert_eq!(d.rules, vec!["tier-2-writes"], "{d:?}");
        // back in tier 1, only `write-rate` (2 a minute, one spent) holds it
        move_to(1);
        assert!(f.check(&t, "write", "3").is_permit());
        assert_eq!(f.check(&t, "write", "4").rules, vec!["write-rate"]);
    }

    #[test]
    fn a_validly_signed_token_the_store_never_issued_is_refused() {
        let f = fixture();
        let a = &f.settings.agents[0];
        // signed with the key, a jti nobody issued, valid until the end of time
        let mut forever = new_claims("warden", a, "never-issued".into(), T0);
        forever.exp = u64::MAX;
        let d = f.check(&f.key.sign(&forever), "read", "1");
        assert_eq!(
            (d.reason, d.rules.clone()),
            (
                Reason::CredentialInvalid,
                vec![rules::UNISSUED_CREDENTIAL.to_owned()]
            ),
            "{d:?}"
        );
        assert!(d.message.contains("warden agent rotate a"), "{d:?}");
        assert!(Pipeline::needs_newer_view(&d));

        // an issued jti with a longer expiry than the store recorded is not that credential
        let t = f.token("a");
        assert!(f.check(&t, "read", "1").is_permit());
        let mut stretched = new_claims("warden", a, "jti-a".into(), T0);
        stretched.exp += 1;
        let d = f.check(&f.key.sign(&stretched), "read", "1");
        assert_eq!(
            (d.reason, d.rules.clone()),
            (Reason::CredentialInvalid, vec![rules::IDENTITY.to_owned()])
        );
        assert!(!Pipeline::needs_newer_view(&d));
        // nor is it another agent's
        let b = &f.settings.agents[1];
        let d = f.check(
            &f.key.sign(&new_claims("warden", b, "jti-a".into(), T0)),
            "read",
            "1",
        );
        assert_eq!(d.reason, Reason::CredentialInvalid);
    }

    #[test]
    fn a_token_outliving_the_agents_rotation_is_refused() {
        let f = fixture();
        let t = f.token("a");
        assert!(f.check(&t, "read", "1").is_permit());
        // the operator shortens agent a's rotation from 1h to 1m: its 1h token is void
        let mut agents = f.settings.agents.clone();
        agents[0].rotation_ns = 60 * NANOS_PER_SEC;
        f.install(StateSnapshot {
            agents,
            ..Default::default()
        });
        let d = f.check(&t, "read", "1");
        assert_eq!(d.reason, Reason::CredentialInvalid, "{d:?}");
        assert!(d.message.contains("rotation period"), "{d:?}");
    }

    fn check_with(
        f: &Fixture,
        token: &str,
        tool: &str,
        params: Value,
        ctx: &CallContext,
    ) -> Checked {
        let req = CallRequest {
            credential: Some(token),
            tool,
            params: &params,
            context: ctx,
        };
        let ids = CallIds {
            call_id: "c".into(),
            trace_id: "t".into(),
            span_id: "s".into(),
        };
        f.pipeline.check(&req, ids)
    }

    #[test]
    fn the_catalog_schema_types_arguments_before_policy() {
        let f = fixture();
        let c = f.token("c");
        let ctx = CallContext::default();
        // An integer where the schema says number reaches the decimal rule as a decimal.
        let d = check_with(&f, &c, "pay", json!({"amount": 5}), &ctx).decision;
        assert!(d.is_permit(), "{d:?}");
        let d = check_with(&f, &c, "pay", json!({"amount": 500}), &ctx).decision;
        assert_eq!(d.rules, vec!["big-pay".to_owned()], "{d:?}");
        // A null for an optional argument is an absent one.
        let d = check_with(&f, &c, "pay", json!({"amount": 5, "note": null}), &ctx).decision;
        assert!(d.is_permit(), "{d:?}");
        let d = check_with(&f, &c, "pay", json!({"amount": 5.5, "note": "n"}), &ctx).decision;
        assert!(d.is_permit(), "{d:?}");
        // What does not fit is denied under its own rule, naming the argument, and the
        // entry names the agent and hashes what it sent.
        let sent = json!({"amount": "5"});
        let checked = check_with(&f, &c, "pay", sent.clone(), &ctx);
        let d = &checked.decision;
        assert_eq!(
            (d.reason, d.rules.clone()),
            (
                Reason::ConstraintViolation,
                vec![rules::ARGUMENT_SCHEMA.to_owned()]
            )
        );
        assert_eq!(
            d.message,
            "arguments of `pay` do not fit its input schema: argument `/amount`: expected number, got string \"5\""
        );
        assert_eq!(checked.entry.agent_id, "c");
        assert_eq!(
            checked.entry.input_hash.as_deref(),
            Some(crate::audit::hash_json(&sent).as_str())
        );
        // Scope comes first: an agent without it learns nothing about the schema.
        let a = f.token("a");
        let d = check_with(&f, &a, "pay", json!({"amount": "5"}), &ctx).decision;
        assert_eq!(d.rules, vec![rules::SCOPE.to_owned()]);
        // Without a catalog schema, Cedar alone types the call, strictly: `read`'s
        // `id` must be a string, and a null is refused.
        let d = check_with(&f, &a, "read", json!({"id": null}), &ctx).decision;
        assert_eq!(
            d.rules,
            vec![rules::POLICY_DEFAULT_DENY.to_owned()],
            "{d:?}"
        );
    }

    #[test]
    fn a_gateway_refusal_is_recorded_under_the_rule_it_names() {
        let f = fixture();
        let a = f.token("a");
        for (refusal, rule) in [
            (
                Refusal::unresolved("argument `path`: no such file"),
                rules::GATEWAY_REFUSAL,
            ),
            (
                Refusal::misfit(
                    "read",
                    &crate::args::ArgError {
                        pointer: "/id".into(),
                        expected: "string".into(),
                        got: "number 5".into(),
                    },
                ),
                rules::ARGUMENT_SCHEMA,
            ),
        ] {
            let ctx = CallContext {
                refusal: Some(refusal.clone()),
                ..Default::default()
            };
            let checked = check_with(&f, &a, "read", json!({"id": "1"}), &ctx);
            assert_eq!(
                (checked.decision.reason, checked.decision.rules.clone()),
                (Reason::ConstraintViolation, vec![rule.to_owned()])
            );
            assert_eq!(checked.decision.message, refusal.message);
            assert_eq!(checked.entry.agent_id, "a");
            assert_eq!(checked.entry.rules, vec![rule.to_owned()]);
        }
        let ctx = CallContext {
            refusal: Some(Refusal::misfit(
                "read",
                &crate::args::ArgError {
                    pointer: "/id".into(),
                    expected: "string".into(),
                    got: "number 5".into(),
                },
            )),
            ..Default::default()
        };
        assert_eq!(
            check_with(&f, &a, "read", json!({}), &ctx).decision.message,
            "arguments of `read` do not fit its input schema: argument `/id`: expected string, got number 5"
        );
    }

    #[test]
    fn every_decision_yields_an_entry_with_its_reason() {
        let f = fixture();
        let params = json!({ "id": "1" });
        let ctx = CallContext {
            rationale: Some("why".into()),
            ..Default::default()
        };
        let req = CallRequest {
            credential: None,
            tool: "read",
            params: &params,
            context: &ctx,
        };
        let ids = CallIds {
            call_id: "c1".into(),
            trace_id: "t".into(),
            span_id: "s".into(),
        };
        let checked = f.pipeline.check(&req, ids);
        assert_eq!(checked.entry.decision, "deny");
        assert_eq!(checked.entry.reason, "UNAUTHENTICATED");
        assert_eq!(checked.entry.call_id, "c1");
        assert_eq!(checked.entry.rationale.as_deref(), Some("why"));
        assert_eq!(
            checked.entry.input_hash.as_deref(),
            Some(crate::audit::hash_json(&params).as_str())
        );
    }
}
