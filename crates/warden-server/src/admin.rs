//! The operator plane: agents, credentials, kill switches, policy reload, audit reads.
//!
//! Every route is declared once, in [`table`], with the [`Access`] it requires; the router
//! is built from that table and nothing else, and the privilege tests walk the same
//! table, so a route cannot be added without its access rule or escape the tests. A new
//! admin route goes into [`table`]; there is no other way to mount one.
//!
//! Who may act: the bootstrap operator token (an admin) and operator accounts, each with
//! a role (see [`warden_core::operator`]). Anything else (no token, an agent token, a
//! forged, expired or removed credential) is refused with 401 before the body is read; a
//! known operator whose role the route does not admit, with 403 naming the roles it needs.
//!
//! Every change to agents, credentials and kill switches is written in one store
//! transaction with the audit entry that records it, naming the operator by their
//! credential ([`Principal::who`]), never by what the request body claims.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use warden_core::audit::{verify_store, Record};
use warden_core::clock::NANOS_PER_SEC;
use warden_core::config::{parse_duration, parse_overlap};
use warden_core::control::{KillSwitch, KillTarget};
use warden_core::identity::{self, issue_credential, validate_agent_id, Agent, AgentStatus};
use warden_core::operator::{self, ct_eq, Access, Operator, Role};
use warden_core::store::{Acting, ControlChange, Credential, StoreError};

use crate::api::{bearer, json_body};
use crate::error::{close_connection, declares_body, ApiError};
use crate::ids::random_hex;
use crate::{blocking, App};

/// One admin route: what it answers, and who may call it.
pub struct Route {
    pub method: Method,
    /// The axum path, with `{name}` for each path parameter.
    pub path: &'static str,
    pub access: Access,
    handler: MethodRouter<Arc<App>>,
}

fn get_route<H, T>(path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    Route {
        method: Method::GET,
        path,
        access,
        handler: get(handler),
    }
}

fn post_route<H, T>(path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    Route {
        method: Method::POST,
        path,
        access,
        handler: post(handler),
    }
}

/// Every admin route with the access it requires. THE router: [`routes`] mounts these and
/// only these, each behind [`authorize`] with its access.
pub fn table() -> Vec<Route> {
    use Access::{Admin, Audit, Stop};
    vec![
        get_route("/admin/v1/agents", Admin, list_agents),
        post_route("/admin/v1/agents", Admin, register_agent),
        get_route("/admin/v1/agents/{id}", Admin, show_agent),
        post_route("/admin/v1/agents/{id}/tokens", Admin, issue_token),
        post_route("/admin/v1/agents/{id}/revoke", Admin, revoke),
        post_route("/admin/v1/agents/{id}/rotate", Admin, rotate),
        post_route("/admin/v1/agents/{id}/suspend", Admin, suspend),
        post_route("/admin/v1/agents/{id}/resume", Admin, resume),
        post_route("/admin/v1/agents/{id}/retire", Admin, retire),
        get_route("/admin/v1/kills", Stop, list_kills),
        post_route("/admin/v1/kills", Stop, kill),
        post_route("/admin/v1/revive", Admin, revive),
        get_route("/admin/v1/policy", Admin, show_policy),
        post_route("/admin/v1/policy/reload", Admin, reload_policy),
        get_route("/admin/v1/audit", Audit, read_audit),
        get_route("/admin/v1/audit/verify", Audit, verify_audit),
        get_route("/admin/v1/operators", Admin, list_operators),
        post_route("/admin/v1/operators", Admin, add_operator),
        post_route("/admin/v1/operators/{id}/remove", Admin, remove_operator),
        post_route("/admin/v1/bootstrap/disable", Admin, disable_bootstrap),
    ]
}

pub fn routes(app: Arc<App>) -> Router {
    let limit = app.settings.max_body_bytes;
    let mut router = Router::new();
    for r in table() {
        let gate = Gate {
            app: app.clone(),
            access: r.access,
        };
        // Several methods on one path merge into one method router.
        router = router.route(
            r.path,
            r.handler
                .route_layer(middleware::from_fn_with_state(gate, authorize)),
        );
    }
    router.layer(DefaultBodyLimit::max(limit)).with_state(app)
}

/// The operator a request acts as, established by [`authorize`] from the credential.
/// Handlers take it as an extension; a handler mounted without the gate would find none
/// and fail the request.
#[derive(Clone, Debug)]
pub struct Principal {
    /// How audit entries name the operator (`operator:<8 hex>` for the bootstrap token).
    pub who: String,
    pub role: Role,
}

#[derive(Clone)]
struct Gate {
    app: Arc<App>,
    access: Access,
}

/// The operator holding `token`, or why the token is no operator credential. The roster
/// is read from the store on every request (the admin plane is not a hot path), so a
/// removed account or a disabled bootstrap token is refused on its next request, on
/// every node, whoever changed it.
async fn principal(app: &Arc<App>, token: &str) -> Result<Principal, ApiError> {
    let bootstrap = app
        .operator_token()
        .is_some_and(|o| ct_eq(token.as_bytes(), o.as_bytes()));
    let account = operator::parse_token(token);
    if !bootstrap && account.is_none() {
        return Err(ApiError::Unauthorized(
            "this is not a valid operator credential; the admin API takes only operator credentials, never agent tokens".into(),
        ));
    }
    let store = app.store.clone();
    let roster = blocking(move || store.operators()).await?;
    if bootstrap {
        if roster.bootstrap_disabled {
            return Err(ApiError::Unauthorized(
                "the bootstrap operator token is disabled; use an operator account's credential"
                    .into(),
            ));
        }
        return Ok(Principal {
            who: app.operator_id().to_owned(),
            role: Role::Admin,
        });
    }
    let unknown = || {
        ApiError::Unauthorized(
            "this is not a valid operator credential (no such account, or a wrong secret)".into(),
        )
    };
    let (id, secret) = account.ok_or_else(unknown)?;
    let op = roster.get(id).ok_or_else(unknown)?;
    if !op.secret_matches(secret) {
        return Err(unknown());
    }
    op.standing(app.pipeline.clock().now_ns())
        .map_err(ApiError::Unauthorized)?;
    Ok(Principal {
        who: op.who(),
        role: op.role,
    })
}

async fn authorize(State(gate): State<Gate>, mut req: Request, next: Next) -> Response {
    let outcome = match bearer(req.headers()) {
        None => Err(ApiError::Unauthorized(
            "the admin API needs an operator credential as `Authorization: Bearer <token>`".into(),
        )),
        Some(t) => principal(&gate.app, t).await,
    }
    .and_then(|p| {
        if gate.access.admits(p.role) {
            Ok(p)
        } else {
            Err(ApiError::Forbidden(format!(
                "`{}` has the {} role; this route needs the {} role",
                p.who,
                p.role,
                gate.access.describe()
            )))
        }
    });
    let mut refused = match outcome {
        Ok(p) => {
            req.extensions_mut().insert(p);
            return next.run(req).await;
        }
        Err(e) => e.into_response(),
    };
    // Refused before the body was read (an unauthenticated peer's body is not worth
    // reading), so this connection ends here.
    if declares_body(req.headers()) {
        close_connection(&mut refused);
    }
    refused
}

/// The acting operator for one change: named by the credential, with a fresh entry id.
fn acting(app: &App, p: &Principal) -> Result<Acting, ApiError> {
    Ok(Acting {
        who: p.who.clone(),
        at: app.pipeline.clock().now_ns(),
        entry_id: random_hex(16)
            .map_err(|e| ApiError::Unavailable(format!("no randomness: {e}")))?,
    })
}

/// Refuses a body that names an operator other than the credential's holder: the audit
/// names who acted from the credential, and a request claiming otherwise is a mistake or
/// a forgery.
fn check_by(p: &Principal, by: Option<&str>) -> Result<(), ApiError> {
    match by {
        Some(b) if b != p.who => Err(ApiError::BadRequest(format!(
            "`by` names `{b}`, but the acting operator is taken from the credential (`{}`); drop the field",
            p.who
        ))),
        _ => Ok(()),
    }
}

/// After a change to agents, credentials or kill switches: reload the control view now,
/// so the change holds from the very next call on this node.
async fn refresh(app: &Arc<App>) -> Result<(), ApiError> {
    let a = app.clone();
    blocking(move || a.refresh_state())
        .await
        .map_err(ApiError::from)
}

fn agent_json(a: &Agent, killed: Option<&KillSwitch>) -> Value {
    json!({
        "id": a.id,
        "owner": a.owner,
        "tier": a.tier,
        "scopes": a.scopes,
        "rotation_secs": a.rotation_ns / NANOS_PER_SEC,
        "status": a.status.as_str(),
        "killed": killed.map(|k| json!({ "target": k.target.to_string(), "reason": k.reason, "set_by": k.set_by })),
    })
}

fn credential_json(c: &Credential) -> Value {
    json!({
        "jti": c.jti,
        "issued_at": c.issued_at_ns / NANOS_PER_SEC,
        "expires_at": c.expires_at_ns / NANOS_PER_SEC,
        "revoked": c.revoked_at_ns.is_some(),
        "ends_at": c.revoked_at_ns.map(|r| r / NANOS_PER_SEC),
        "replaced_by": c.replaced_by,
    })
}

async fn list_agents(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let agents = blocking(move || store.list_agents()).await?;
    let state = app.pipeline.state();
    let out: Vec<Value> = agents
        .iter()
        .map(|a| {
            agent_json(
                a,
                state
                    .as_ref()
                    .and_then(|s| s.kills.covering(&a.id, &a.owner)),
            )
        })
        .collect();
    Ok(Json(json!({ "agents": out })))
}

async fn show_agent(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let aid = id.clone();
    let (agent, creds) =
        blocking(move || Ok((store.get_agent(&aid)?, store.list_credentials(&aid)?))).await?;
    let agent = agent.ok_or_else(|| ApiError::NotFound(format!("no agent `{id}`")))?;
    let state = app.pipeline.state();
    let mut v = agent_json(
        &agent,
        state
            .as_ref()
            .and_then(|s| s.kills.covering(&agent.id, &agent.owner)),
    );
    v["credentials"] = creds.iter().map(credential_json).collect();
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    id: String,
    owner: String,
    tier: u8,
    scopes: Vec<String>,
    rotation: Option<String>,
}

async fn issue(app: &Arc<App>, p: &Principal, agent: Agent) -> Result<Value, ApiError> {
    let jti = random_hex(16).map_err(|e| ApiError::Unavailable(format!("no randomness: {e}")))?;
    let store = app.store.clone();
    let key = app.key.clone().ok_or_else(|| {
        ApiError::Unavailable(
            "this node holds no signing key, so it cannot issue credentials".into(),
        )
    })?;
    let issuer = app.settings.issuer.clone();
    let by = acting(app, p)?;
    let (token, cred) =
        blocking(move || issue_credential(store.as_ref(), &key, &issuer, &agent, jti, &by)).await?;
    Ok(json!({ "token": token, "credential": credential_json(&cred) }))
}

async fn register_agent(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: RegisterBody = json_body(body, app.settings.max_body_bytes)?;
    validate_agent_id(&b.id).map_err(ApiError::BadRequest)?;
    if !app.settings.tiers.contains_key(&b.tier) {
        return Err(ApiError::BadRequest(format!(
            "tier {} is not declared in the config",
            b.tier
        )));
    }
    let rotation_ns =
        parse_duration(b.rotation.as_deref().unwrap_or("90d")).map_err(ApiError::BadRequest)?;
    let agent = Agent {
        id: b.id,
        owner: b.owner,
        tier: b.tier,
        scopes: b.scopes.into_iter().collect(),
        rotation_ns,
        status: AgentStatus::Active,
    };
    let store = app.store.clone();
    let a = agent.clone();
    let by = acting(&app, &p)?;
    blocking(move || identity::register_agent(store.as_ref(), &a, &by)).await?;
    // The agent is registered whatever happens to its first token: the view learns of
    // it either way, and the operator can issue a token with `…/tokens`.
    let issued = issue(&app, &p, agent.clone()).await;
    refresh(&app).await?;
    let mut out = issued?;
    out["agent"] = agent_json(&agent, None);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn issue_token(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let aid = id.clone();
    let agent = blocking(move || store.get_agent(&aid))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no agent `{id}`")))?;
    let out = issue(&app, &p, agent).await?;
    refresh(&app).await?;
    Ok(Json(out))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// One credential; without it, the agent and all its credentials.
    jti: Option<String>,
}

async fn revoke(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b: RevokeBody = match &body {
        Ok(bytes) if bytes.is_empty() => RevokeBody::default(),
        _ => json_body(body, app.settings.max_body_bytes)?,
    };
    let store = app.store.clone();
    let by = acting(&app, &p)?;
    let jti = b.jti;
    let what = blocking(move || identity::revoke(store.as_ref(), &id, jti.as_deref(), &by)).await?;
    refresh(&app).await?;
    Ok(Json(json!({ "revoked": what })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the agent's other credentials keep working, e.g. `15m`; `0s` ends them
    /// at once. Default: `[identity] rotation_overlap`.
    overlap: Option<String>,
}

#[derive(Serialize)]
struct Rotated {
    token: String,
    credential: Value,
    /// When the agent's other credentials stop working (seconds since the epoch).
    others_end_at: u64,
}

async fn rotate(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Rotated>, ApiError> {
    let b: RotateBody = match &body {
        Ok(bytes) if bytes.is_empty() => RotateBody::default(),
        _ => json_body(body, app.settings.max_body_bytes)?,
    };
    let overlap_ns = match b.overlap.as_deref() {
        Some(o) => parse_overlap(o).map_err(|m| ApiError::BadRequest(format!("`overlap`: {m}")))?,
        None => app.settings.rotation_overlap_ns,
    };
    let jti = random_hex(16).map_err(|e| ApiError::Unavailable(format!("no randomness: {e}")))?;
    let key = app.key.clone().ok_or_else(|| {
        ApiError::Unavailable(
            "this node holds no signing key, so it cannot issue credentials".into(),
        )
    })?;
    let store = app.store.clone();
    let issuer = app.settings.issuer.clone();
    let by = acting(&app, &p)?;
    let others_end_at = by.at.saturating_add(overlap_ns) / NANOS_PER_SEC;
    let (token, cred) = blocking(move || {
        let agent = store
            .get_agent(&id)?
            .ok_or_else(|| StoreError::NotFound(format!("no agent `{id}`")))?;
        identity::rotate_credential(store.as_ref(), &key, &issuer, &agent, jti, overlap_ns, &by)
    })
    .await?;
    refresh(&app).await?;
    Ok(Json(Rotated {
        token,
        credential: credential_json(&cred),
        others_end_at,
    }))
}

#[derive(Serialize)]
struct StatusChanged {
    agent: String,
    status: &'static str,
}

/// Suspend, resume, retire: a status change with its audit entry, in force on this node
/// from the next call (the view is refreshed before answering) and on others at their
/// next control refresh. A body, if any, must be an empty JSON object.
async fn change_status(
    app: Arc<App>,
    p: Principal,
    id: String,
    body: Result<Bytes, BytesRejection>,
    to: AgentStatus,
) -> Result<Json<StatusChanged>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if !matches!(&body, Ok(b) if b.is_empty()) {
        let _: Empty = json_body(body, app.settings.max_body_bytes)?;
    }
    let store = app.store.clone();
    let by = acting(&app, &p)?;
    let aid = id.clone();
    blocking(move || identity::set_agent_status(store.as_ref(), &aid, to, &by)).await?;
    refresh(&app).await?;
    Ok(Json(StatusChanged {
        agent: id,
        status: to.as_str(),
    }))
}

async fn suspend(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StatusChanged>, ApiError> {
    change_status(app, p, id, body, AgentStatus::Suspended).await
}

async fn resume(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StatusChanged>, ApiError> {
    change_status(app, p, id, body, AgentStatus::Active).await
}

async fn retire(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StatusChanged>, ApiError> {
    change_status(app, p, id, body, AgentStatus::Retired).await
}

async fn list_kills(State(app): State<Arc<App>>) -> Json<Value> {
    let kills: Vec<Value> = app
        .pipeline
        .state()
        .map(|s| {
            s.kills
                .iter()
                .map(|k| json!({ "target": k.target.parts().0, "name": k.target.parts().1, "reason": k.reason, "set_by": k.set_by, "set_at": k.set_at_ns / NANOS_PER_SEC }))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({ "kills": kills }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    /// `all`, `owner:TEAM` or `agent:ID`.
    target: String,
    #[serde(default)]
    reason: Option<String>,
    /// Refused unless it names the credential's holder (see [`check_by`]).
    #[serde(default)]
    by: Option<String>,
    /// Set the switch even though no registered agent matches the target yet.
    #[serde(default)]
    pre_emptive: bool,
}

async fn kill(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b: KillBody = json_body(body, app.settings.max_body_bytes)?;
    let target: KillTarget = b.target.parse().map_err(ApiError::BadRequest)?;
    check_by(&p, b.by.as_deref())?;
    let by = acting(&app, &p)?;
    let kill = KillSwitch {
        target: target.clone(),
        reason: b.reason.unwrap_or_else(|| "no reason given".into()),
        set_by: by.who.clone(),
        set_at_ns: by.at,
    };
    let entry = by.entry("kill", format!("{target}: {}", kill.reason));
    let change = ControlChange::SetKill {
        kill,
        pre_emptive: b.pre_emptive,
    };
    let store = app.store.clone();
    blocking(move || store.apply_control(&change, entry)).await?;
    refresh(&app).await?;
    Ok(Json(json!({ "killed": target.to_string() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviveBody {
    target: String,
    #[serde(default)]
    by: Option<String>,
}

async fn revive(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b: ReviveBody = json_body(body, app.settings.max_body_bytes)?;
    let target: KillTarget = b.target.parse().map_err(ApiError::BadRequest)?;
    check_by(&p, b.by.as_deref())?;
    let entry = acting(&app, &p)?.entry("revive", target.to_string());
    let change = ControlChange::ClearKill(target.clone());
    let store = app.store.clone();
    blocking(move || store.apply_control(&change, entry)).await?;
    refresh(&app).await?;
    Ok(Json(json!({ "revived": target.to_string() })))
}

async fn show_policy(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let p = app
        .pipeline
        .policy()
        .ok_or_else(|| ApiError::Unavailable("no policy loaded".into()))?;
    Ok(Json(json!({ "digest": p.digest(), "rules": p.rule_ids() })))
}

async fn reload_policy(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    match app.reload_policy(&p.who).await {
        Ok(digest) => Ok(Json(json!({ "reloaded": true, "digest": digest }))),
        Err(e) => Err(ApiError::Unprocessable {
            message: format!(
                "new policy rejected; the policy in force ({}) stays",
                app.pipeline
                    .policy()
                    .map(|p| p.digest().to_owned())
                    .unwrap_or_default()
            ),
            problems: e.problems,
        }),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// The wire form of an audit record (the core's types are not `Serialize`).
pub fn record_json(r: &Record) -> Value {
    let e = &r.entry;
    json!({
        "seq": r.seq,
        "ts_ns": e.ts_ns,
        "kind": e.kind.as_str(),
        "call_id": e.call_id,
        "trace_id": e.trace_id,
        "span_id": e.span_id,
        "agent_id": e.agent_id,
        "delegation_id": e.delegation_id,
        "action": e.action,
        "input_hash": e.input_hash,
        "output_hash": e.output_hash,
        "decision": e.decision,
        "reason": e.reason,
        "rules": e.rules,
        "cost": e.cost,
        "duration_ns": e.duration_ns,
        "rationale": e.rationale,
        "prev_hash": hex::encode(r.prev_hash),
        "hash": hex::encode(r.hash),
    })
}

async fn read_audit(
    State(app): State<Arc<App>>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let recs = blocking(move || store.read_audit(q.after.unwrap_or(0), limit)).await?;
    Ok(Json(
        json!({ "records": recs.iter().map(record_json).collect::<Vec<_>>() }),
    ))
}

async fn verify_audit(State(app): State<Arc<App>>, _h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let report = blocking(move || verify_store(store.as_ref())).await?;
    Ok(Json(json!({
        "ok": report.error.is_none(),
        "verified": report.verified,
        "head": report.head,
        "first_error": report.error.as_ref().map(|e| json!({ "seq": e.seq(), "message": e.to_string() })),
    })))
}

/// An operator account on the wire; never its secret or hash.
#[derive(Serialize)]
pub struct OperatorView {
    pub id: String,
    pub name: String,
    pub role: &'static str,
    /// As audit entries name the operator.
    pub who: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub removed: bool,
}

impl From<&Operator> for OperatorView {
    fn from(o: &Operator) -> Self {
        OperatorView {
            id: o.id.clone(),
            name: o.name.clone(),
            role: o.role.as_str(),
            who: o.who(),
            created_at: o.created_at_ns / NANOS_PER_SEC,
            expires_at: o.expires_at_ns.map(|e| e / NANOS_PER_SEC),
            removed: o.removed_at_ns.is_some(),
        }
    }
}

#[derive(Serialize)]
struct OperatorList {
    operators: Vec<OperatorView>,
    bootstrap_disabled: bool,
}

async fn list_operators(State(app): State<Arc<App>>) -> Result<Json<OperatorList>, ApiError> {
    let store = app.store.clone();
    let roster = blocking(move || store.operators()).await?;
    Ok(Json(OperatorList {
        operators: roster.accounts.iter().map(OperatorView::from).collect(),
        bootstrap_disabled: roster.bootstrap_disabled,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddOperatorBody {
    name: String,
    role: String,
    /// How long the credential works, e.g. `90d`; without it, until removed.
    #[serde(default)]
    expires_in: Option<String>,
}

#[derive(Serialize)]
struct AddedOperator {
    operator: OperatorView,
    /// Shown this once; the store keeps only its hash.
    token: String,
}

async fn add_operator(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: AddOperatorBody = json_body(body, app.settings.max_body_bytes)?;
    let role: Role = b.role.parse().map_err(ApiError::BadRequest)?;
    let lifetime = b
        .expires_in
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|m| ApiError::BadRequest(format!("`expires_in`: {m}")))?;
    let no_random = |e: getrandom::Error| ApiError::Unavailable(format!("no randomness: {e}"));
    let id = random_hex(4).map_err(no_random)?;
    let secret = random_hex(32).map_err(no_random)?;
    let by = acting(&app, &p)?;
    let (op, token) = operator::new_account(&b.name, role, id, &secret, by.at, lifetime)
        .map_err(ApiError::BadRequest)?;
    let entry = by.entry("operator-add", format!("{} as {role}", op.who()));
    let store = app.store.clone();
    let change = ControlChange::AddOperator(op.clone());
    blocking(move || store.apply_control(&change, entry)).await?;
    let out = AddedOperator {
        operator: OperatorView::from(&op),
        token,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[derive(Serialize)]
struct OperatorChanged {
    removed: Option<String>,
    bootstrap_disabled: bool,
}

async fn remove_operator(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<OperatorChanged>, ApiError> {
    let by = acting(&app, &p)?;
    let entry = by.entry("operator-remove", format!("operator account {id}"));
    let change = ControlChange::RemoveOperator {
        id: id.clone(),
        at: by.at,
    };
    let store = app.store.clone();
    let roster = blocking(move || {
        store.apply_control(&change, entry)?;
        store.operators()
    })
    .await?;
    Ok(Json(OperatorChanged {
        removed: Some(id),
        bootstrap_disabled: roster.bootstrap_disabled,
    }))
}

async fn disable_bootstrap(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<OperatorChanged>, ApiError> {
    let by = acting(&app, &p)?;
    let entry = by.entry("bootstrap-disable", "the bootstrap operator token".into());
    let change = ControlChange::DisableBootstrap { at: by.at };
    let store = app.store.clone();
    blocking(move || store.apply_control(&change, entry)).await?;
    Ok(Json(OperatorChanged {
        removed: None,
        bootstrap_disabled: true,
    }))
}
