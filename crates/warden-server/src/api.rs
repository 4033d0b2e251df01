//! The agent plane: `POST /v1/check`, `POST /v1/calls/{id}/outcome`, health probes.
//!
//! A deny is a normal answer (200) unless the caller failed to authenticate (401) or
//! Warden could not decide safely (503); the body has the same shape in every case, so
//! a client that only reads `decision` still fails closed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use std::net::IpAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use warden_core::audit::{hash_json, Entry, EntryKind};
use warden_core::clock::{Nanos, NANOS_PER_MILLI};
use warden_core::config::Classification;
use warden_core::pipeline::{CallContext, CallIds, CallRequest, Checked, Refusal, RefusalRule};
use warden_core::tool::check_name;
use warden_core::{Decision, Effect, Reason};

use crate::audit_writer::AuditError;
use crate::error::ApiError;
use crate::flood::{Admit, Source, Suppressed};
use crate::ids::{self, call_id, random_hex};
use crate::open_calls::{Lookup, Permitted};
use crate::wire::{
    CheckRequest, DecisionAnswer, Jwk, JwkSet, OutcomeAnswer, OutcomeRequest, Standing, Stopped,
};
use crate::{blocking, App};
use warden_core::trace::parse_traceparent;

pub fn routes(app: Arc<App>) -> Router {
    let limit = app.settings.max_body_bytes;
    Router::new()
        .route("/v1/check", post(check))
        .route("/v1/calls/{call_id}/outcome", post(outcome))
        .route("/v1/agent", get(agent_standing))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/.well-known/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// The bearer token of a request, if it sent one.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Parses a JSON body with errors that say what is wrong and where.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(limit)
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {r}"))
        }
    })?;
    warden_core::json::parse_strict(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid: {e}")))
}

/// The network peer of a request, as the listener records it (absent when a router is
/// called directly, as some unit tests do).
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts.extensions.get::<ConnectInfo<IpAddr>>().map(|c| c.0),
        ))
    }
}

fn decision_answer(d: &Decided) -> DecisionAnswer {
    DecisionAnswer {
        agent_id: (!d.agent_id.is_empty()).then(|| d.agent_id.clone()),
        decision: d.decision.effect.as_str().to_owned(),
        reason: d.decision.reason.code().to_owned(),
        rules: d.decision.rules.clone(),
        call_id: d.call_id.clone(),
        message: d.decision.message.clone(),
        trace_id: d.trace_id.clone(),
        span_id: d.span_id.clone(),
        retry_after_ms: d.decision.retry_after_ms,
    }
}

fn decision_status(d: &Decision) -> StatusCode {
    if d.reason.is_authentication_failure() {
        StatusCode::UNAUTHORIZED
    } else if d.reason == Reason::Internal {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn check(
    State(app): State<Arc<App>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CheckRequest = json_body(body, app.settings.max_body_bytes)?;
    let mut problems = Vec::new();
    if let Err(e) = check_name(&body.tool) {
        problems.push(e.to_string());
    }
    let classification = match body.context.classification.as_deref() {
        None => None,
        Some(c) => match c.parse::<Classification>() {
            Ok(c) => Some(c),
            Err(m) => {
                problems.push(format!("context.classification: {m}"));
                None
            }
        },
    };
    let cost_estimate = match body.context.cost_estimate {
        Some(c) if !c.is_finite() || c < 0.0 => {
            problems.push("context.cost_estimate must be a non-negative number".to_owned());
            None
        }
        c => c,
    };
    if body.context.refusal_rule.is_some() && body.context.refusal.is_none() {
        problems.push("context.refusal_rule is set but context.refusal is not".to_owned());
    }
    let refusal = body.context.refusal.map(|message| Refusal {
        rule: body
            .context
            .refusal_rule
            .unwrap_or(RefusalRule::GatewayArguments),
        message,
    });
    let ctx = CallContext {
        classification,
        cost_estimate,
        rationale: body.context.rationale,
        refusal,
        peer,
        ..CallContext::default()
    };
    let trace_hint = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
        .map(|(t, _)| t)
        .or(body.context.trace_id);
    let call = Call {
        credential: bearer(&headers),
        tool: &body.tool,
        params: &body.params,
        ctx: &ctx,
        trace_hint: trace_hint.as_deref(),
    };
    if !problems.is_empty() {
        // A body that parses but asks for something invalid is still an attempt: it is
        // audited as a deny like any other call, and answered 400.
        let message = problems.join("; ");
        app.refuse_invalid(call, &message).await;
        return Err(ApiError::BadRequest(message));
    }
    let d = app.decide_call(call).await;
    let status = decision_status(&d.decision);
    Ok((status, Json(decision_answer(&d))).into_response())
}

/// One call as a transport received it, before it is decided.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub credential: Option<&'a str>,
    pub tool: &'a str,
    pub params: &'a Value,
    pub ctx: &'a CallContext,
    pub trace_hint: Option<&'a str>,
}

/// A decided and durably recorded call.
pub struct Decided {
    pub decision: Decision,
    pub call_id: String,
    pub trace_id: String,
    pub span_id: String,
    pub agent_id: String,
}

impl App {
    /// Decides one call and waits until its audit entry is durable. Every transport (the
    /// HTTP API, both MCP gateways) goes through here, so they decide and record alike.
    pub async fn decide(
        self: &Arc<Self>,
        credential: Option<&str>,
        tool: &str,
        params: &Value,
        ctx: &CallContext,
        trace_hint: Option<&str>,
    ) -> Decided {
        self.decide_call(Call {
            credential,
            tool,
            params,
            ctx,
            trace_hint,
        })
        .await
    }

    /// [`App::decide`] with the call in one struct.
    pub async fn decide_call(self: &Arc<Self>, call: Call<'_>) -> Decided {
        self.judge(call, None).await
    }

    /// Records a call whose request was well-formed JSON but invalid (an unknown data
    /// class, a negative cost, an unusable tool name) as a deny `INVALID_REQUEST`, through
    /// the same path as every decision. The caller answers 400.
    pub async fn refuse_invalid(self: &Arc<Self>, call: Call<'_>, problem: &str) -> Decided {
        self.judge(call, Some(problem)).await
    }

    async fn judge(self: &Arc<Self>, call: Call<'_>, invalid: Option<&str>) -> Decided {
        let ids = match new_ids(call.trace_hint, self.pipeline.clock().now_ns()) {
            Ok(ids) => ids,
            Err(e) => {
                return Decided {
                    decision: Decision::deny_builtin(
                        Reason::Internal,
                        "warden.ids",
                        format!("cannot create call ids: {e}"),
                    ),
                    call_id: String::new(),
                    trace_id: String::new(),
                    span_id: String::new(),
                    agent_id: String::new(),
                }
            }
        };
        let req = CallRequest {
            credential: call.credential,
            tool: call.tool,
            params: call.params,
            context: call.ctx,
        };
        // Every transport's tool name passes the one check here, so the MCP gateways
        // refuse (and record) a name that could not be shown or stored safely exactly
        // as /v1/check does.
        let bad_name = match invalid {
            Some(_) => None,
            None => check_name(call.tool).err().map(|e| e.to_string()),
        };
        let invalid = invalid.or(bad_name.as_deref());
        let mut checked = match invalid {
            None => self.pipeline.check(&req, ids),
            Some(problem) => self.pipeline.refuse_invalid(&req, ids, problem),
        };
        // A token issued by another process (`warden agent token`) since the last refresh
        // is refused once here, refreshed for, and decided again; only the second
        // decision is recorded.
        if invalid.is_none() && self.refreshed_for(&checked.decision).await {
            let ids = CallIds {
                call_id: checked.entry.call_id.clone(),
                trace_id: checked.entry.trace_id.clone(),
                span_id: checked.entry.span_id.clone(),
            };
            checked = self.pipeline.check(&req, ids);
        }
        self.record(checked, call.ctx.peer).await
    }

    /// Makes a decision durable (no audit, no action), or, for a failure of an
    /// unauthenticated caller past its group's quota, counts it for a summary entry.
    async fn record(self: &Arc<Self>, checked: Checked, peer: Option<IpAddr>) -> Decided {
        let Checked {
            decision,
            entry,
            authenticated,
        } = checked;
        let mut out = Decided {
            decision,
            call_id: entry.call_id.clone(),
            trace_id: entry.trace_id.clone(),
            span_id: entry.span_id.clone(),
            agent_id: entry.agent_id.clone(),
        };
        if let Some(reason) = sampled(&out.decision, authenticated) {
            let (admit, ended) = self.failures.admit(Source::of(peer), reason, entry.ts_ns);
            if let Some(s) = ended {
                // Out of this request's future: a request timeout that dropped it between
                // taking the counts and appending them would lose them.
                let app = self.clone();
                tokio::spawn(async move { app.record_suppressed(s).await });
            }
            if admit == Admit::Count {
                // Denied either way; the count reaches the audit in the window's summary.
                return out;
            }
        }
        let permitted = out.decision.is_permit().then(|| Permitted::of(&entry));
        // No audit, no action: the answer waits for the entry to be durable.
        match self.audit.append(entry).await {
            Ok(_) => {
                if let Some(p) = permitted {
                    self.open_calls.insert(&out.call_id, p);
                }
            }
            Err(e) => {
                out.decision = Decision::deny_builtin(
                    Reason::Internal,
                    "warden.audit",
                    format!("the decision could not be recorded ({e}); no audit, no action"),
                );
            }
        }
        out
    }

    /// Appends the summary of failures that were counted, not recorded one by one. If it
    /// cannot be appended the counts are kept for the next try.
    pub(crate) async fn record_suppressed(&self, s: Suppressed) {
        let id = ids::random_hex(16).unwrap_or_default();
        let entry = Entry::summary(
            self.pipeline.clock().now_ns(),
            id,
            &s.source.to_string(),
            s.reason.code(),
            s.count,
            s.window_ns,
        );
        if let Err(e) = self.audit.append_lingering(entry).await {
            tracing::error!(error = %e, count = s.count, reason = %s.reason, "could not record a summary of failures; keeping the counts");
            self.failures.restore(s);
        }
    }

    /// Records the failure counts of windows that have ended (of all windows with
    /// `all`, at shutdown).
    pub async fn flush_failure_counts(&self, all: bool) {
        let now = self.pipeline.clock().now_ns();
        for s in self.failures.due(now, all) {
            self.record_suppressed(s).await;
        }
    }

    /// Appends the outcome of a permitted call made by `agent_id`. Refuses calls the agent
    /// did not make, calls that were denied, and a second outcome. With `linger`, the
    /// entry may wait up to `[audit] linger` to share a commit with a decision (for
    /// reporters nobody waits on, such as the MCP gateways).
    pub async fn record_outcome(
        self: &Arc<Self>,
        agent_id: &str,
        call_id: &str,
        outcome: OutcomeRecord,
        linger: bool,
    ) -> Result<u64, ApiError> {
        if call_id.len() > 64 {
            return Err(ApiError::NotFound("no such call".into()));
        }
        let call = match self.open_calls.take(call_id, agent_id) {
            Lookup::Mine(p) => p,
            Lookup::Foreign => return Err(no_such_call(agent_id, call_id)),
            Lookup::Unknown => self.permitted_in_store(agent_id, call_id).await?,
        };
        let entry = Entry {
            ts_ns: self.pipeline.clock().now_ns(),
            kind: EntryKind::Outcome,
            call_id: call_id.to_owned(),
            trace_id: call.trace_id.clone(),
            span_id: call.span_id.clone(),
            agent_id: agent_id.to_owned(),
            delegation_id: call.delegation_id.clone(),
            action: call.action.clone(),
            input_hash: call.input_hash.clone(),
            output_hash: outcome.output_hash,
            decision: outcome.status.to_owned(),
            reason: String::new(),
            rules: Vec::new(),
            cost: outcome.cost,
            duration_ns: outcome.duration_ns,
            rationale: None,
        };
        // The checks answer the common mistakes early; the store's own rule decides
        // between concurrent reports, and only one of them is written.
        let appended = if linger {
            self.audit.append_lingering(entry).await
        } else {
            self.audit.append(entry).await
        };
        appended.map(|r| r.seq).map_err(|e| match e {
            AuditError::Refused(m) => ApiError::Conflict(m),
            AuditError::Failed(m) => {
                // Not written: a retry must find the call again.
                self.open_calls.put_back(call_id, call);
                ApiError::Unavailable(format!("outcome could not be recorded: {m}"))
            }
        })
    }

    /// The decision an outcome reports on, read from the store: the call must be
    /// `agent_id`'s, permitted, and without an outcome yet.
    async fn permitted_in_store(
        &self,
        agent_id: &str,
        call_id: &str,
    ) -> Result<Permitted, ApiError> {
        let store = self.store.clone();
        let cid = call_id.to_owned();
        let records = blocking(move || store.call_records(&cid)).await?;
        let decision = records
            .iter()
            .find(|r| r.entry.kind == EntryKind::Decision && r.entry.agent_id == agent_id)
            .ok_or_else(|| no_such_call(agent_id, call_id))?;
        if decision.entry.decision != "permit" {
            return Err(ApiError::Conflict(format!(
                "call `{call_id}` was denied; nothing ran, so there is no outcome"
            )));
        }
        if records.iter().any(|r| r.entry.kind == EntryKind::Outcome) {
            return Err(ApiError::Conflict(format!(
                "call `{call_id}` already has an outcome"
            )));
        }
        Ok(Permitted::of(&decision.entry))
    }
}

fn no_such_call(agent_id: &str, call_id: &str) -> ApiError {
    ApiError::NotFound(format!("agent `{agent_id}` made no call `{call_id}`"))
}

/// The reason under which a decision is sampled rather than always recorded: every
/// denial of a caller that did not authenticate (bad or missing credentials, invalid
/// requests, and a stranger's calls under a global kill or a stale control view). A
/// permit needs a verified credential, so it is never sampled.
fn sampled(d: &Decision, authenticated: bool) -> Option<Reason> {
    (!authenticated && d.effect != Effect::Permit).then_some(d.reason)
}

/// What happened to a permitted call.
pub struct OutcomeRecord {
    /// One of [`OUTCOME_STATUSES`].
    pub status: &'static str,
    pub output_hash: Option<String>,
    pub cost: Option<f64>,
    pub duration_ns: Option<u64>,
}

/// `ok` and `error` as the tool reported; the rest are set by gateways when a call ends
/// without a result.
pub const OUTCOME_STATUSES: [&str; 5] = ["ok", "error", "cancelled", "timeout", "upstream-failed"];

fn new_ids(trace_hint: Option<&str>, now_ns: Nanos) -> Result<CallIds, getrandom::Error> {
    let hint = trace_hint
        .filter(|t| {
            t.len() == 32
                && t.bytes().all(|b| b.is_ascii_hexdigit())
                && t.bytes().any(|b| b != b'0')
        })
        .map(str::to_ascii_lowercase);
    let trace_id = match hint {
        Some(t) => t,
        None => random_hex(16)?,
    };
    Ok(CallIds {
        call_id: call_id(now_ns)?,
        trace_id,
        span_id: random_hex(8)?,
    })
}

async fn outcome(
    State(app): State<Arc<App>>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let agent = app
        .authenticate(bearer(&headers))
        .await
        .map_err(|d| ApiError::Unauthorized(format!("{}: {}", d.reason.code(), d.message)))?;
    let body: OutcomeRequest = json_body(body, app.settings.max_body_bytes)?;
    let Some(status) = OUTCOME_STATUSES.into_iter().find(|s| *s == body.status) else {
        return Err(ApiError::BadRequest(format!(
            "`status` is `{}`; use one of {}",
            body.status,
            OUTCOME_STATUSES.join(", ")
        )));
    };
    let output_hash = match (body.output_hash, body.output) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "send `output_hash` or `output`, not both".into(),
            ))
        }
        (Some(h), None) => {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::BadRequest(
                    "`output_hash` must be 64 hex digits (SHA-256)".into(),
                ));
            }
            Some(h.to_ascii_lowercase())
        }
        // The output itself is hashed and dropped: no raw payloads in the audit.
        (None, Some(v)) => Some(hash_json(&v)),
        (None, None) => None,
    };
    if body.cost.is_some_and(|c| !c.is_finite() || c < 0.0) {
        return Err(ApiError::BadRequest(
            "`cost` must be a non-negative number".into(),
        ));
    }
    let duration_ns = match body.duration_ms {
        Some(ms) if ms.is_finite() && ms >= 0.0 => Some((ms * NANOS_PER_MILLI as f64) as u64),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "`duration_ms` must be a non-negative number".into(),
            ))
        }
        None => None,
    };
    let seq = app
        .record_outcome(
            &agent.id,
            &call_id,
            OutcomeRecord {
                status,
                output_hash,
                cost: body.cost,
                duration_ns,
            },
            body.linger,
        )
        .await?;
    Ok((
        StatusCode::OK,
        Json(OutcomeAnswer {
            recorded: true,
            call_id,
            seq,
        }),
    )
        .into_response())
}

/// The calling agent's standing: whether it may act now, and which tools it could ever
/// be permitted. Gateways poll this to cancel calls in flight and to filter tool lists.
async fn agent_standing(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match app.standing(bearer(&headers)).await {
        Ok(s) => {
            let mut tools: Vec<String> = app.pipeline.visible_tools(&s).into_iter().collect();
            tools.sort();
            Json(Standing {
                agent_id: Some(s.agent.id.clone()),
                stopped: None,
                tools: Some(tools),
            })
            .into_response()
        }
        Err(d) => {
            let status = decision_status(&d);
            let body = Standing {
                agent_id: None,
                stopped: Some(Stopped {
                    reason: d.reason.code().to_owned(),
                    message: d.message,
                }),
                tools: None,
            };
            (status, Json(body)).into_response()
        }
    }
}

/// How long a tool server may cache the key set. Short beside any rotation overlap (a
/// retired key stays listed for the whole overlap), so a verifier learns of a new key
/// long before a token it signed could be refused for want of it.
const JWKS_MAX_AGE_SECS: u64 = 300;

/// The public keys that verify agent tokens, for tool servers that check tokens
/// themselves: the current key and those a rotation retired, while they still verify.
/// Public (a public key is no secret) and cacheable.
async fn jwks(State(app): State<Arc<App>>) -> Response {
    let now = app.pipeline.clock().now_ns();
    let keys = app
        .pipeline
        .verifier()
        .keys_at(now)
        .into_iter()
        .map(|(kid, k)| Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: k.x(),
            kid: kid.to_owned(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        })
        .collect();
    (
        [(
            axum::http::header::CACHE_CONTROL,
            format!("public, max-age={JWKS_MAX_AGE_SECS}"),
        )],
        Json(JwkSet { keys }),
    )
        .into_response()
}

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when this node would decide calls rather than fail closed; otherwise 503 with
/// every reason (see [`crate::health`]).
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
    let readiness = app.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}
