//! The real server on an ephemeral port with a temporary SQLite file, driven over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
#[path = "support/store.rs"]
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use warden_core::audit::{verify_store, Entry, EntryKind, Record};
use warden_core::clock::{Clock, SystemClock, NANOS_PER_SEC};
use warden_core::config::Settings;
use warden_core::control::{KillSwitch, KillTarget};
use warden_core::identity::{new_claims, Agent, AgentStatus, SigningKeyPair};
use warden_core::operator::Role;
use warden_core::store::{Acting, ControlChange, StateSnapshot, Store, StoreError};
use warden_server::api::OutcomeRecord;
use warden_server::error::ApiError;
use warden_server::{App, Running};
use warden_store::SqliteStore;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/claims");

struct Node {
    dir: tempfile::TempDir,
    running: Option<Running>,
    base: String,
    http: reqwest::Client,
    operator: String,
}

fn copy_example(dir: &Path) {
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    for f in [
        "warden.toml",
        "policy/warden.cedarschema",
        "policy/claims.cedar",
        "policy/database.cedar",
    ] {
        let text = std::fs::read_to_string(Path::new(EXAMPLE).join(f)).unwrap();
        // Faster refresh so tests of propagation and staleness run quickly.
        let text = text
            .replace("refresh = \"250ms\"", "refresh = \"50ms\"")
            .replace("stale_after = \"2s\"", "stale_after = \"600ms\"");
        std::fs::write(dir.join(f), text).unwrap();
    }
    // Written as `warden init` does (0600): a secret others may read is refused.
    warden_server::setup::write_secret(
        &dir.join("operator.token"),
        "wop_test_operator_token_0123456789\n",
    )
    .unwrap();
}

fn settings(dir: &Path) -> Settings {
    let text = std::fs::read_to_string(dir.join("warden.toml")).unwrap();
    Settings::from_toml(&text, "warden.toml", dir, &|_| None).unwrap()
}

/// An operator acting from another process on the same store, as the CLI does.
fn cli_acting() -> Acting {
    Acting {
        who: "cli:test".into(),
        at: SystemClock.now_ns(),
        entry_id: "cli-entry".into(),
    }
}

impl Node {
    async fn start() -> Node {
        Self::start_with(|s| Arc::new(SqliteStore::open(&s.store_path).unwrap())).await
    }

    async fn start_with(make_store: impl FnOnce(&Settings) -> Arc<dyn Store>) -> Node {
        Self::start_configured(|_| {}, make_store).await
    }

    async fn start_configured(
        configure: impl FnOnce(&mut Settings),
        make_store: impl FnOnce(&Settings) -> Arc<dyn Store>,
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        copy_example(dir.path());
        let mut s = settings(dir.path());
        configure(&mut s);
        let store = make_store(&s);
        let app = App::build_with_store(s, store, Arc::new(SystemClock)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = warden_server::start_app(app, listener).await.unwrap();
        let base = format!("http://{}", running.addr);
        Node {
            dir,
            running: Some(running),
            base,
            http: reqwest::Client::new(),
            operator: "wop_test_operator_token_0123456789".into(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn app(&self) -> &Arc<App> {
        &self.running.as_ref().unwrap().app
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.operator);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn token(&self, agent: &str) -> String {
        let (st, v) = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/v1/agents/{agent}/tokens"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    async fn check(&self, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/check", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    async fn readiness(&self) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// Polls `/readyz` until it answers `want`, and returns its body.
    async fn until_readiness(&self, want: StatusCode) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, v) = self.readiness().await;
            if status == want {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz still {status}, not {want}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
        self.dir
    }
}

fn get_claim() -> Value {
    json!({"tool": "get_claim", "params": {"claim_id": "CLM-1001"}, "context": {"rationale": "customer asked"}})
}

fn assert_decision(v: &Value, decision: &str, reason: &str) {
    assert_eq!(v["decision"], decision, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    assert!(v["call_id"].as_str().is_some_and(|c| c.len() == 32), "{v}");
}

#[tokio::test]
async fn permits_and_denies_with_every_policy_reason() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;

    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::OK);
    assert_decision(&v, "permit", "PERMITTED");
    assert_eq!(v["rules"], json!(["claims-read"]));

    let (_, v) = node
        .check(
            Some(&t),
            json!({"tool": "run_sql", "params": {"query": "SELECT 1"}}),
        )
        .await;
    assert_decision(&v, "deny", "TOOL_NOT_PERMITTED");
    assert_eq!(v["rules"], json!(["warden.scope"]));

    let (_, v) = node
        .check(Some(&t), json!({"tool": "nope", "params": {}}))
        .await;
    assert_decision(&v, "deny", "TOOL_NOT_PERMITTED");
    assert_eq!(v["rules"], json!(["warden.tool-catalog"]));

    let big = json!({"tool": "update_claim", "params": {"claim_id": "C", "status": "approved", "payout": 25000}});
    let (st, v) = node.check(Some(&t), big).await;
    assert_eq!(st, StatusCode::OK);
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");
    assert_eq!(v["rules"], json!(["large-payout-needs-human"]));
    assert!(v["message"].as_str().unwrap().contains("human"), "{v}");

    let wrong_type = json!({"tool": "get_claim", "params": {"claim_id": 7}});
    let (_, v) = node.check(Some(&t), wrong_type).await;
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");

    let restricted = json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {"classification": "restricted"}});
    let (_, v) = node.check(Some(&t), restricted).await;
    assert_decision(&v, "deny", "DATA_BOUNDARY_VIOLATION");

    let upd = json!({"tool": "update_claim", "params": {"claim_id": "C", "status": "open"}});
    for _ in 0..5 {
        let (_, v) = node.check(Some(&t), upd.clone()).await;
        assert_decision(&v, "permit", "PERMITTED");
    }
    let (_, v) = node.check(Some(&t), upd.clone()).await;
    assert_decision(&v, "deny", "RATE_LIMITED");
    assert_eq!(v["rules"], json!(["update-claim-rate"]));
    assert!(v["retry_after_ms"].as_u64().unwrap() > 1000, "{v}");
    // another agent's budget is its own
    let f = node.token("fraud-analyst").await;
    let (_, v) = node
        .check(
            Some(&f),
            json!({"tool": "run_sql", "params": {"query": "TRUNCATE claims"}}),
        )
        .await;
    // only listed reports run: everything else falls to the default deny
    assert_decision(&v, "deny", "TOOL_NOT_PERMITTED");
    assert_eq!(v["rules"], json!(["warden.policy.default-deny"]));
    node.stop().await;
}

#[tokio::test]
async fn refuses_bad_credentials_with_distinct_reasons() {
    let node = Node::start().await;
    let good = node.token("claims-processor-v3").await;

    let (st, v) = node.check(None, get_claim()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_decision(&v, "deny", "UNAUTHENTICATED");

    let (st, v) = node.check(Some("not-a-token"), get_claim()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_decision(&v, "deny", "CREDENTIAL_MALFORMED");

    // signed by another server's key
    let other = SigningKeyPair::from_seed([42; 32]);
    let agent = Agent {
        id: "claims-processor-v3".into(),
        owner: "claims-team".into(),
        tier: 2,
        scopes: ["claims:read".to_string()].into(),
        rotation_ns: 3600 * NANOS_PER_SEC,
        status: AgentStatus::Active,
    };
    let now = SystemClock.now_ns();
    let forged = other.sign(&new_claims(
        "warden-claims-example",
        &agent,
        "x".into(),
        now,
    ));
    let (_, v) = node.check(Some(&forged), get_claim()).await;
    assert_decision(&v, "deny", "CREDENTIAL_INVALID");

    // our key but another issuer (a token for another server)
    let key = node.app().key.clone().unwrap();
    let elsewhere = key.sign(&new_claims("other-warden", &agent, "y".into(), now));
    let (_, v) = node.check(Some(&elsewhere), get_claim()).await;
    assert_decision(&v, "deny", "CREDENTIAL_INVALID");

    // a valid signature for an agent nobody registered
    let ghost = Agent {
        id: "ghost".into(),
        ..agent.clone()
    };
    let t = key.sign(&new_claims(
        "warden-claims-example",
        &ghost,
        "z".into(),
        now,
    ));
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "deny", "UNKNOWN_AGENT");

    // expired: an agent whose credentials live one second
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents",
            Some(json!({"id": "shortlived", "owner": "claims-team", "tier": 2, "scopes": ["claims:read"], "rotation": "1s"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let short = v["token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (st, v) = node.check(Some(&short), get_claim()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_decision(&v, "deny", "CREDENTIAL_EXPIRED");

    // revoked: one credential, then the whole agent
    let (_, v) = node.check(Some(&good), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let (_, shown) = node
        .admin(
            reqwest::Method::GET,
            "/admin/v1/agents/claims-processor-v3",
            None,
        )
        .await;
    let jti = shown["credentials"][0]["jti"].as_str().unwrap().to_owned();
    let second = node.token("claims-processor-v3").await;
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/claims-processor-v3/revoke",
            Some(json!({"jti": jti})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = node.check(Some(&good), get_claim()).await;
    assert_decision(&v, "deny", "CREDENTIAL_REVOKED");
    let (_, v) = node.check(Some(&second), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/claims-processor-v3/revoke",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = node.check(Some(&second), get_claim()).await;
    assert_decision(&v, "deny", "CREDENTIAL_REVOKED");
    node.stop().await;
}

#[tokio::test]
async fn a_credential_is_revoked_only_under_its_own_agent() {
    let node = Node::start().await;
    let f = node.token("fraud-analyst").await;
    let (_, shown) = node
        .admin(reqwest::Method::GET, "/admin/v1/agents/fraud-analyst", None)
        .await;
    let jti = shown["credentials"][0]["jti"].as_str().unwrap().to_owned();
    // the right jti under the wrong agent: nothing is revoked
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/claims-processor-v3/revoke",
            Some(json!({"jti": jti})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let call = json!({"tool": "get_claim", "params": {"claim_id": "C"}});
    let (_, v) = node.check(Some(&f), call.clone()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/nobody/revoke",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/fraud-analyst/revoke",
            Some(json!({"jti": jti})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, v) = node.check(Some(&f), call).await;
    assert_decision(&v, "deny", "CREDENTIAL_REVOKED");
    node.stop().await;
}

#[tokio::test]
async fn kill_switch_by_agent_owner_and_all_then_revive() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let f = node.token("fraud-analyst").await;
    let fraud_call = json!({"tool": "get_claim", "params": {"claim_id": "C"}});

    for (target, claims_killed, fraud_killed) in [
        ("agent:claims-processor-v3", true, false),
        ("owner:risk-team", false, true),
        ("all", true, true),
    ] {
        let (st, v) = node
            .admin(
                reqwest::Method::POST,
                "/admin/v1/kills",
                Some(json!({"target": target, "reason": "incident 42"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let (_, v) = node.check(Some(&t), get_claim()).await;
        assert_eq!(v["reason"] == "KILLED", claims_killed, "{target}: {v}");
        if claims_killed {
            assert!(
                v["message"].as_str().unwrap().contains("incident 42"),
                "{v}"
            );
        }
        let (_, v) = node.check(Some(&f), fraud_call.clone()).await;
        assert_eq!(v["reason"] == "KILLED", fraud_killed, "{target}: {v}");
        let (st, _) = node
            .admin(
                reqwest::Method::POST,
                "/admin/v1/revive",
                Some(json!({"target": target})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (_, v) = node.check(Some(&t), get_claim()).await;
        assert_decision(&v, "permit", "PERMITTED");
    }
    // a global kill stops even unauthenticated probing before identity is checked
    node.admin(
        reqwest::Method::POST,
        "/admin/v1/kills",
        Some(json!({"target": "all"})),
    )
    .await;
    let (_, v) = node.check(None, get_claim()).await;
    assert_decision(&v, "deny", "KILLED");
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/revive",
            Some(json!({"target": "all"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/revive",
            Some(json!({"target": "all"})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // set by another process on the same store (as `warden kill` does): seen within the
    // refresh interval, without any call to this node's admin API
    let other = SqliteStore::open(&node.app().settings.store_path).unwrap();
    let kill = KillSwitch {
        target: KillTarget::Agent("claims-processor-v3".into()),
        reason: "from the cli".into(),
        set_by: "cli:test".into(),
        set_at_ns: SystemClock.now_ns(),
    };
    other
        .apply_control(
            &ControlChange::SetKill {
                kill: kill.clone(),
                pre_emptive: false,
            },
            cli_acting().entry("kill", "from the cli".into()),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = node.check(Some(&t), get_claim()).await;
        if v["reason"] == "KILLED" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kill from another process never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

/// What a credential presented to the admin API must get from every route.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Not an operator credential: 401 on every route, whatever its access.
    Unauthenticated,
    /// An operator with this role: past authorization where the route admits the role,
    /// 403 naming the roles it needs everywhere else.
    Acts(Role),
}

/// One credential and what it must get. Adding a kind of credential is one line in
/// [`presented_credentials`].
struct Presented {
    what: &'static str,
    bearer: Option<String>,
    expect: Expect,
}

impl Presented {
    fn new(what: &'static str, bearer: Option<String>, expect: Expect) -> Presented {
        Presented {
            what,
            bearer,
            expect,
        }
    }
}

/// Every kind of credential the privilege test presents to every admin route.
async fn presented_credentials(node: &Node) -> Vec<Presented> {
    use Expect::{Acts, Unauthenticated};
    let agent_token = node.token("claims-processor-v3").await;
    let agent = node
        .app()
        .store
        .get_agent("claims-processor-v3")
        .unwrap()
        .unwrap();
    let foreign_key = SigningKeyPair::from_seed([42; 32]);
    let foreign = foreign_key.sign(&new_claims(
        &node.app().settings.issuer,
        &agent,
        "foreign".into(),
        SystemClock.now_ns(),
    ));
    let account = |name: &str, role: &str| {
        let (name, role) = (name.to_owned(), role.to_owned());
        async move {
            let (st, v) = node
                .admin(
                    reqwest::Method::POST,
                    "/admin/v1/operators",
                    Some(json!({"name": name, "role": role})),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            (
                v["token"].as_str().unwrap().to_owned(),
                v["operator"]["id"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (admin, _) = account("ada", "admin").await;
    let (reviewer, _) = account("rita", "reviewer").await;
    let (auditor, _) = account("otto", "auditor").await;
    let (removed, removed_id) = account("gone", "admin").await;
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            &format!("/admin/v1/operators/{removed_id}/remove"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // An account whose credential expired a second ago.
    let now = SystemClock.now_ns();
    let (old, expired) = warden_core::operator::new_account(
        "expired",
        Role::Admin,
        "e0e0e0e0".into(),
        &"5".repeat(64),
        now - 10 * NANOS_PER_SEC,
        Some(9 * NANOS_PER_SEC),
    )
    .unwrap();
    node.app()
        .store
        .apply_control(
            &ControlChange::AddOperator(old),
            cli_acting().entry("operator-add", "expired".into()),
        )
        .unwrap();
    let tampered = format!("{}0", &admin[..admin.len() - 1]);
    vec![
        // First: the passes run in this order, and the admin's disable the bootstrap token.
        Presented::new(
            "the bootstrap token",
            Some(node.operator.clone()),
            Acts(Role::Admin),
        ),
        Presented::new("an admin account", Some(admin), Acts(Role::Admin)),
        Presented::new("a reviewer account", Some(reviewer), Acts(Role::Reviewer)),
        Presented::new("an auditor account", Some(auditor), Acts(Role::Auditor)),
        Presented::new("a removed admin account", Some(removed), Unauthenticated),
        Presented::new("an expired admin account", Some(expired), Unauthenticated),
        Presented::new(
            "an admin account's token, tampered",
            Some(tampered),
            Unauthenticated,
        ),
        Presented::new("no credential", None, Unauthenticated),
        Presented::new("garbage", Some("not-a-token".into()), Unauthenticated),
        Presented::new("an agent token", Some(agent_token), Unauthenticated),
        Presented::new(
            "an agent token signed by another key",
            Some(foreign),
            Unauthenticated,
        ),
        Presented::new(
            "an operator token of no account",
            Some(format!("wdo1.0a1b2c3d.{}", "f".repeat(64))),
            Unauthenticated,
        ),
        Presented::new(
            "the bootstrap token with a byte changed",
            Some(node.operator.replace('0', "1")),
            Unauthenticated,
        ),
        // Delegated tokens are not built yet: add them here when they land.
    ]
}

/// The route's path with every `{param}` replaced by a sample value.
fn sample_path(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').unwrap() + open;
        out.push_str("no-such-thing");
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The access of every admin route, written out once more by hand: the privilege test
/// below proves the gate enforces whatever the table says, and this pins what it says, so
/// a route added or loosened by mistake (an agent-management route open to reviewers, an
/// audit route to nobody) fails here and has to be decided on purpose.
#[test]
fn every_admin_routes_access_is_the_one_decided() {
    use warden_core::operator::Access::{Admin, Audit, Stop};
    let expected = [
        ("GET", "/admin/v1/agents", Admin),
        ("POST", "/admin/v1/agents", Admin),
        ("GET", "/admin/v1/agents/{id}", Admin),
        ("POST", "/admin/v1/agents/{id}/tokens", Admin),
        ("POST", "/admin/v1/agents/{id}/revoke", Admin),
        ("POST", "/admin/v1/agents/{id}/rotate", Admin),
        ("POST", "/admin/v1/agents/{id}/suspend", Admin),
        ("POST", "/admin/v1/agents/{id}/resume", Admin),
        ("POST", "/admin/v1/agents/{id}/retire", Admin),
        ("GET", "/admin/v1/kills", Stop),
        ("POST", "/admin/v1/kills", Stop),
        ("POST", "/admin/v1/revive", Admin),
        ("GET", "/admin/v1/policy", Admin),
        ("POST", "/admin/v1/policy/reload", Admin),
        ("GET", "/admin/v1/audit", Audit),
        ("GET", "/admin/v1/audit/verify", Audit),
        ("GET", "/admin/v1/operators", Admin),
        ("POST", "/admin/v1/operators", Admin),
        ("POST", "/admin/v1/operators/{id}/remove", Admin),
        ("POST", "/admin/v1/bootstrap/disable", Admin),
    ];
    let mut table: Vec<(String, &str, warden_core::operator::Access)> =
        warden_server::admin::table()
            .iter()
            .map(|r| (r.method.to_string(), r.path, r.access))
            .collect();
    let mut expected: Vec<(String, &str, warden_core::operator::Access)> = expected
        .iter()
        .map(|(m, p, a)| (m.to_string(), *p, *a))
        .collect();
    let key = |r: &(String, &str, warden_core::operator::Access)| (r.1.to_owned(), r.0.clone());
    table.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(table, expected);
}

/// Privilege separation, from the route table itself: every admin route, with every kind
/// of credential, is refused or admitted exactly as its access says. Refused requests
/// leave nothing behind, so an agent cannot change its scopes, tier, policies, kill
/// switch or audit entries through the admin API.
#[tokio::test]
async fn every_admin_route_admits_exactly_the_roles_its_table_entry_names() {
    let node = Node::start().await;
    // The agent is killed first: its token must not be able to clear its own switch.
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/kills",
            Some(json!({"target": "agent:claims-processor-v3", "reason": "test"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let credentials = presented_credentials(&node).await;
    let store = node.app().store.clone();
    let agent_before = store.get_agent("claims-processor-v3").unwrap().unwrap();
    let policy_before = node.app().pipeline.policy().unwrap().digest().to_owned();
    let head_before = store.tail_audit(1).unwrap()[0].seq;
    let roster_before = store.operators().unwrap();

    let table = warden_server::admin::table();
    assert!(table.len() >= 12, "the route table lost routes");
    let send = |method: &reqwest::Method, path: &str, bearer: Option<&String>| {
        let mut req = node
            .http
            .request(
                method.clone(),
                format!("{}{}", node.base, sample_path(path)),
            )
            .json(&json!({}));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        req.send()
    };
    // Refusals first, while nothing has been done with the credentials that pass.
    for c in &credentials {
        for r in &table {
            let want = match c.expect {
                Expect::Unauthenticated => StatusCode::UNAUTHORIZED,
                Expect::Acts(role) if r.access.admits(role) => continue,
                Expect::Acts(_) => StatusCode::FORBIDDEN,
            };
            let resp = send(&r.method, r.path, c.bearer.as_ref()).await.unwrap();
            assert_eq!(
                resp.status(),
                want,
                "{} {} with {}",
                r.method,
                r.path,
                c.what
            );
            let body: Value = resp.json().await.unwrap();
            let message = body["message"].as_str().unwrap_or_default();
            if want == StatusCode::FORBIDDEN {
                assert!(
                    message.contains(&format!("needs the {} role", r.access.describe())),
                    "{} {} with {}: {body}",
                    r.method,
                    r.path,
                    c.what
                );
            } else {
                assert_eq!(body["error"], "UNAUTHORIZED", "{body}");
                assert!(
                    ["operator credential", "removed", "expired"]
                        .iter()
                        .any(|m| message.contains(m)),
                    "{body}"
                );
            }
        }
    }
    // Nothing refused left a trace: the agent, its kill switch, the policy and the audit
    // trail are as they were.
    assert_eq!(
        store.get_agent("claims-processor-v3").unwrap().unwrap(),
        agent_before
    );
    assert!(node
        .app()
        .pipeline
        .state()
        .unwrap()
        .kills
        .covering("claims-processor-v3", "claims-team")
        .is_some());
    assert_eq!(
        node.app().pipeline.policy().unwrap().digest(),
        policy_before
    );
    assert_eq!(store.tail_audit(1).unwrap()[0].seq, head_before);
    assert_eq!(store.operators().unwrap(), roster_before);
    assert!(verify_store(store.as_ref()).unwrap().error.is_none());

    // And each role gets past authorization wherever its access admits it.
    for c in &credentials {
        let Expect::Acts(role) = c.expect else {
            continue;
        };
        for r in table.iter().filter(|r| r.access.admits(role)) {
            let resp = send(&r.method, r.path, c.bearer.as_ref()).await.unwrap();
            let st = resp.status();
            assert!(
                st != StatusCode::UNAUTHORIZED && st != StatusCode::FORBIDDEN,
                "{} {} with {} ({role}) was refused: {st} {}",
                r.method,
                r.path,
                c.what,
                resp.text().await.unwrap()
            );
        }
    }
    node.stop().await;
}

/// The life of operator accounts over the admin API: each acts in its role, the audit
/// names it, and a removed account or a disabled bootstrap token is refused at once.
#[tokio::test]
async fn operator_accounts_act_in_their_roles_and_are_refused_once_removed() {
    let node = Node::start().await;
    let as_ = |token: String, method: reqwest::Method, path: &'static str, body: Value| {
        let req = node
            .http
            .request(method, format!("{}{path}", node.base))
            .bearer_auth(token)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // Without an admin account the bootstrap token cannot be disabled: nobody could
    // administer the node over the API.
    let (st, v) = node
        .admin(reqwest::Method::POST, "/admin/v1/bootstrap/disable", None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/operators",
            Some(json!({"name": "rita", "role": "reviewer"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let rita = v["token"].as_str().unwrap().to_owned();
    let rita_id = v["operator"]["id"].as_str().unwrap().to_owned();
    // A second live account with the same name is refused; a bad role too.
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/operators",
            Some(json!({"name": "rita", "role": "auditor"})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/operators",
            Some(json!({"name": "root", "role": "superuser"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // The reviewer kills; the switch and the audit entry name her account.
    let (st, v) = as_(
        rita.clone(),
        reqwest::Method::POST,
        "/admin/v1/kills",
        json!({"target": "agent:claims-processor-v3", "reason": "odd"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let who = format!("operator:rita/{rita_id}");
    let kills = node.app().pipeline.state().unwrap().kills.clone();
    assert_eq!(kills.iter().next().unwrap().set_by, who);
    let last = node.app().store.tail_audit(1).unwrap().pop().unwrap();
    assert_eq!(last.entry.action, "kill");
    assert_eq!(last.entry.reason, who, "{:?}", last.entry);
    // She may not revive, nor read the audit, nor claim to be someone else.
    let (st, v) = as_(
        rita.clone(),
        reqwest::Method::POST,
        "/admin/v1/revive",
        json!({"target": "agent:claims-processor-v3"}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("needs the admin role"),
        "{v}"
    );
    let (st, _) = as_(
        rita.clone(),
        reqwest::Method::GET,
        "/admin/v1/audit",
        json!({}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // The list shows accounts, never secrets.
    let (st, v) = node
        .admin(reqwest::Method::GET, "/admin/v1/operators", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["operators"][0]["who"], who.as_str(), "{v}");
    assert!(!v.to_string().contains("secret"), "{v}");
    assert!(
        !v.to_string().contains(rita.rsplit('.').next().unwrap()),
        "{v}"
    );

    // Removed: refused on the very next request.
    let path = format!("/admin/v1/operators/{rita_id}/remove");
    let (st, v) = node.admin(reqwest::Method::POST, &path, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = as_(rita, reqwest::Method::GET, "/admin/v1/kills", json!({})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["message"].as_str().unwrap().contains("removed"), "{v}");

    // An admin account, then the bootstrap token off: it is refused, the account works.
    let (_, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/operators",
            Some(json!({"name": "ada", "role": "admin", "expires_in": "30d"})),
        )
        .await;
    let ada = v["token"].as_str().unwrap().to_owned();
    let (st, v) = node
        .admin(reqwest::Method::POST, "/admin/v1/bootstrap/disable", None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = node
        .admin(reqwest::Method::GET, "/admin/v1/agents", None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["message"].as_str().unwrap().contains("disabled"), "{v}");
    let (st, v) = as_(
        ada,
        reqwest::Method::POST,
        "/admin/v1/revive",
        json!({"target": "agent:claims-processor-v3"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(verify_store(node.app().store.as_ref())
        .unwrap()
        .error
        .is_none());
    node.stop().await;
}

#[test]
fn the_route_table_names_each_method_and_path_once() {
    let table = warden_server::admin::table();
    let mut seen = std::collections::HashSet::new();
    for r in &table {
        assert!(r.path.starts_with("/admin/v1/"), "{}", r.path);
        assert!(
            seen.insert((r.method.clone(), r.path)),
            "{} {} twice",
            r.method,
            r.path
        );
    }
}

#[tokio::test]
async fn broken_policy_is_rejected_and_the_old_one_stays() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let (_, before) = node
        .admin(reqwest::Method::GET, "/admin/v1/policy", None)
        .await;
    let claims = node.path().join("policy/claims.cedar");
    let original = std::fs::read_to_string(&claims).unwrap();

    // syntax error
    std::fs::write(
        &claims,
        format!("{original}\npermit (principal, action, resource"),
    )
    .unwrap();
    let (st, v) = node
        .admin(reqwest::Method::POST, "/admin/v1/policy/reload", None)
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["problems"][0].as_str().unwrap().contains("claims.cedar"),
        "{v}"
    );
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");

    // schema error: an attribute agents do not have
    std::fs::write(&claims, format!("{original}\n@id(\"bad\") permit (principal, action, resource) when {{ principal.salary > 1 }};")).unwrap();
    let (st, v) = node
        .admin(reqwest::Method::POST, "/admin/v1/policy/reload", None)
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // let the file watcher see the broken file too: it must not unload anything
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, after) = node
        .admin(reqwest::Method::GET, "/admin/v1/policy", None)
        .await;
    assert_eq!(before["digest"], after["digest"]);
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");

    // a valid change is picked up by the file watcher, with no reload request
    std::fs::write(
        &claims,
        format!("{original}\n@id(\"reads-frozen\") forbid (principal, action == Action::\"get_claim\", resource);"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let v = loop {
        let (_, v) = node.check(Some(&t), get_claim()).await;
        if v["decision"] == "deny" {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "file watcher never reloaded the policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");
    assert_eq!(v["rules"], json!(["reads-frozen"]));

    // and the admin API reloads on request
    std::fs::write(&claims, &original).unwrap();
    let (st, v) = node
        .admin(reqwest::Method::POST, "/admin/v1/policy/reload", None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["digest"], before["digest"]);
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    node.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let post = |body: String| {
        node.http
            .post(format!("{}/v1/check", node.base))
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, status) in [
        ("{not json".to_string(), StatusCode::BAD_REQUEST),
        ("{}".to_string(), StatusCode::BAD_REQUEST),
        (r#"{"tool": 5}"#.to_string(), StatusCode::BAD_REQUEST),
        (
            r#"{"tool": "get_claim", "bogus": 1}"#.to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"tool": "get_claim", "context": {"classification": "secret"}}"#.to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"tool": "get_claim", "context": {"cost_estimate": -1}}"#.to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!(
                r#"{{"tool": "get_claim", "params": {{"claim_id": "{}"}}}}"#,
                "x".repeat(100_000)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ] {
        let resp = post(body.clone()).await.unwrap();
        assert_eq!(resp.status(), status, "{}", &body[..body.len().min(80)]);
        let v: Value = resp.json().await.unwrap();
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    node.stop().await;
}

#[tokio::test]
async fn outcomes_attach_to_their_permitted_call_only() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let f = node.token("fraud-analyst").await;
    let (_, v) = node.check(Some(&t), get_claim()).await;
    let call = v["call_id"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/calls/{call}/outcome", node.base);
    let body = json!({"status": "ok", "output": {"claim": "CLM-1001", "amount": 10}, "cost": 0.002, "duration_ms": 12.5});

    let resp = node
        .http
        .post(&url)
        .bearer_auth(&f)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "another agent cannot report it"
    );
    let resp = node.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = node
        .http
        .post(&url)
        .bearer_auth(&t)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = node
        .http
        .post(&url)
        .bearer_auth(&t)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT, "one outcome per call");

    let (_, v) = node
        .check(
            Some(&t),
            json!({"tool": "run_sql", "params": {"query": "x"}}),
        )
        .await;
    let denied = v["call_id"].as_str().unwrap();
    let resp = node
        .http
        .post(format!("{}/v1/calls/{denied}/outcome", node.base))
        .bearer_auth(&t)
        .json(&json!({"status": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);

    let records = node.app().store.call_records(&call).unwrap();
    assert_eq!(records.len(), 2);
    let outcome = &records[1].entry;
    assert_eq!(outcome.decision, "ok");
    assert_eq!(outcome.output_hash.as_deref().map(str::len), Some(64));
    assert_eq!(outcome.duration_ns, Some(12_500_000));
    assert_eq!(
        records[0].entry.rationale.as_deref(),
        Some("customer asked")
    );
    node.stop().await;
}

#[tokio::test]
async fn audit_has_one_entry_per_decision_and_detects_a_changed_byte() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let checks = [
        get_claim(),
        json!({"tool": "run_sql", "params": {"query": "SELECT 1"}}),
        json!({"tool": "update_claim", "params": {"claim_id": "C", "status": "approved", "payout": 99999}}),
    ];
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for c in &checks {
        node.http
            .post(format!("{}/v1/check", node.base))
            .bearer_auth(&t)
            .header("traceparent", traceparent)
            .json(c)
            .send()
            .await
            .unwrap();
    }
    node.check(None, get_claim()).await; // unauthenticated: audited too
    let (st, v) = node
        .admin(reqwest::Method::GET, "/admin/v1/audit/verify", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["ok"], true, "{v}");
    let (_, v) = node
        .admin(reqwest::Method::GET, "/admin/v1/audit?limit=1000", None)
        .await;
    let decisions: Vec<&Value> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 4);
    assert_eq!(
        decisions.iter().filter(|r| r["decision"] == "deny").count(),
        3
    );
    assert_eq!(decisions[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(decisions[0]["agent_id"], "claims-processor-v3");
    assert!(decisions[0]["input_hash"].as_str().unwrap().len() == 64);
    assert_eq!(decisions[2]["rules"], json!(["large-payout-needs-human"]));

    let dir = node.stop().await;
    let db = dir.path().join("warden.db");
    let store = SqliteStore::open(&db).unwrap();
    let report = verify_store(&store).unwrap();
    assert!(report.error.is_none());
    let target = decisions[1]["seq"].as_u64().unwrap();
    drop(store);
    // change one byte of one entry, as an attacker with the file would
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE audit SET reason = 'PERMITTED', decision = 'permit' WHERE seq = ?1",
        [target as i64],
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&db).unwrap();
    let report = verify_store(&store).unwrap();
    assert_eq!(report.error.map(|e| e.seq()), Some(target));
}

/// A store whose writes or reads can be made to fail, to prove the node fails closed.
struct FaultyStore {
    inner: SqliteStore,
    fail_audit: AtomicBool,
    fail_reads: AtomicBool,
    /// Hold each snapshot a moment after reading it, as a refresh on a busy machine does.
    slow_snapshots: AtomicBool,
    snapshots: std::sync::atomic::AtomicU64,
    panic_audit: AtomicBool,
}

impl FaultyStore {
    fn down(&self, flag: &AtomicBool) -> Result<(), StoreError> {
        if flag.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "injected fault: database is locked".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Store for FaultyStore {
    pass_to_inner!(
        operators,
        upsert_agent,
        get_agent,
        list_agents,
        list_credentials,
        apply_control,
        read_audit,
        call_records,
        tail_audit,
    );

    fn state_version(&self) -> Result<u64, StoreError> {
        self.down(&self.fail_reads)?;
        self.inner.state_version()
    }
    fn snapshot(&self, now: u64) -> Result<StateSnapshot, StoreError> {
        self.down(&self.fail_reads)?;
        let snap = self.inner.snapshot(now);
        if self.slow_snapshots.load(Ordering::SeqCst) {
            // 0 to 9 ms by turns, so reads overtake one another
            let n = self.snapshots.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(n % 4 * 3));
        }
        snap
    }
    fn append_audit(&self, e: Vec<Entry>) -> Result<Vec<Record>, StoreError> {
        if self.panic_audit.load(Ordering::SeqCst) {
            panic!("injected fault: the store panicked");
        }
        self.down(&self.fail_audit)?;
        self.inner.append_audit(e)
    }
}

/// A node on a [`FaultyStore`], and a handle on that store.
async fn faulty_node() -> (Node, Arc<FaultyStore>) {
    let faulty: Arc<std::sync::OnceLock<Arc<FaultyStore>>> = Arc::new(std::sync::OnceLock::new());
    let slot = faulty.clone();
    let node = Node::start_with(move |s| {
        let f = Arc::new(FaultyStore {
            inner: SqliteStore::open(&s.store_path).unwrap(),
            fail_audit: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            slow_snapshots: AtomicBool::new(false),
            snapshots: Default::default(),
            panic_audit: AtomicBool::new(false),
        });
        let _ = slot.set(f.clone());
        f
    })
    .await;
    let store = faulty.get().unwrap().clone();
    (node, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_refreshes_racing_a_kill_never_undo_it() {
    let (node, store) = faulty_node().await;
    let t = node.token("claims-processor-v3").await;
    store.slow_snapshots.store(true, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let (app, stop) = (node.app().clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let _ = app.refresh_state();
                }
            })
        })
        .collect();
    for round in 0..30 {
        let (st, v) = node
            .admin(
                reqwest::Method::POST,
                "/admin/v1/kills",
                Some(json!({"target": "agent:claims-processor-v3", "reason": "race"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        // the kill's refresh has completed: no call may be permitted from here on
        for i in 0..5 {
            let (_, v) = node.check(Some(&t), get_claim()).await;
            assert_eq!(v["reason"], "KILLED", "round {round}, call {i}: {v}");
        }
        let (st, v) = node
            .admin(
                reqwest::Method::POST,
                "/admin/v1/revive",
                Some(json!({"target": "agent:claims-processor-v3"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let (_, v) = node.check(Some(&t), get_claim()).await;
        assert_decision(&v, "permit", "PERMITTED");
    }
    stop.store(true, Ordering::SeqCst);
    for r in racers {
        r.join().unwrap();
    }
    node.stop().await;
}

/// The codes of the reasons a `/readyz` body gives for not being ready.
fn unready_codes(v: &Value) -> Vec<&str> {
    v["reasons"]
        .as_array()
        .unwrap_or_else(|| panic!("no reasons in {v}"))
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn fails_closed_when_the_store_fails_and_recovers() {
    let (node, store) = faulty_node().await;
    let t = node.token("claims-processor-v3").await;

    // audit write fails: no audit, no action
    store.fail_audit.store(true, Ordering::SeqCst);
    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_decision(&v, "deny", "INTERNAL");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no audit, no action"),
        "{v}"
    );
    store.fail_audit.store(false, Ordering::SeqCst);
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");

    // the store stops answering: once the kill-switch view is older than its bound, deny
    store.fail_reads.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_decision(&v, "deny", "INTERNAL");
    assert!(v["message"].as_str().unwrap().contains("stale"), "{v}");
    let ready = node
        .http
        .get(format!("{}/readyz", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    store.fail_reads.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let ready = node
        .http
        .get(format!("{}/readyz", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // the denials were audited once the store came back; the chain holds
    let report = verify_store(&store.inner).unwrap();
    assert!(report.error.is_none(), "{report:?}");
    node.stop().await;
}

/// The embedded `warden mcp-proxy` builds its node this way: it must decide with the
/// public key file alone, never open or create the signing key, and admit nobody to
/// the admin plane.
#[tokio::test]
async fn a_verify_only_node_checks_tokens_with_the_public_key_alone() {
    let node = Node::start().await;
    let token = node.token("claims-processor-v3").await;
    let operator = node.operator.clone();
    let dir = node.stop().await;
    let d = dir.path();
    assert!(
        d.join("warden.pub").is_file(),
        "the server writes the public key beside the signing key"
    );
    std::fs::remove_file(d.join("warden.key")).unwrap();
    std::fs::remove_file(d.join("operator.token")).unwrap();

    let app = App::build_verify_only(settings(d), Arc::new(SystemClock)).unwrap();
    assert!(app.key.is_none());
    assert!(
        !d.join("warden.key").exists(),
        "a verify-only node created a signing key"
    );
    let decided = app
        .decide(
            Some(&token),
            "get_claim",
            &json!({"claim_id": "CLM-1001"}),
            &warden_core::pipeline::CallContext::default(),
            None,
        )
        .await;
    assert!(decided.decision.is_permit(), "{:?}", decided.decision);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = warden_server::start_app(app, listener).await.unwrap();
    let resp = reqwest::Client::new()
        .get(format!("http://{}/admin/v1/agents", running.addr))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    running.stop().await.unwrap();

    // Without the public key file it refuses to start, saying where the key goes.
    std::fs::remove_file(d.join("warden.pub")).unwrap();
    let e = App::build_verify_only(settings(d), Arc::new(SystemClock))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no public key at") && e.contains("warden.pub"),
        "{e}"
    );
    assert!(!d.join("warden.key").exists());
}

#[tokio::test]
async fn failing_audit_appends_deny_and_make_the_node_unready_until_appends_work() {
    let (node, store) = faulty_node().await;
    let t = node.token("claims-processor-v3").await;
    let v = node.until_readiness(StatusCode::OK).await;
    assert_eq!(v["reasons"], json!([]), "{v}");

    store.fail_audit.store(true, Ordering::SeqCst);
    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_decision(&v, "deny", "INTERNAL");
    let (st, v) = node.readiness().await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["ready"], false);
    assert_eq!(unready_codes(&v), ["AUDIT_APPEND_FAILING"], "{v}");
    assert!(
        v["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("injected fault"),
        "{v}"
    );

    // Appends work again: the node notices by itself, with no call to prove it.
    store.fail_audit.store(false, Ordering::SeqCst);
    let v = node.until_readiness(StatusCode::OK).await;
    assert_eq!(v["ready"], true, "{v}");
    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::OK);
    assert_decision(&v, "permit", "PERMITTED");
    node.stop().await;
}

/// A panic inside the store used to end the audit writer's thread, after which every
/// call was denied "audit writer has stopped" for the life of the process.
#[tokio::test]
async fn a_store_that_panics_mid_append_does_not_stop_the_audit_writer() {
    let (node, store) = faulty_node().await;
    let t = node.token("claims-processor-v3").await;

    store.panic_audit.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let (st, v) = node.check(Some(&t), get_claim()).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_decision(&v, "deny", "INTERNAL");
        assert!(v["message"].as_str().unwrap().contains("panicked"), "{v}");
    }
    let v = node.until_readiness(StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(unready_codes(&v).contains(&"AUDIT_APPEND_FAILING"), "{v}");

    store.panic_audit.store(false, Ordering::SeqCst);
    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_decision(&v, "permit", "PERMITTED");
    node.until_readiness(StatusCode::OK).await;
    node.stop().await;
}

/// Another process holding SQLite's write lock for longer than the busy timeout (5 s):
/// the calls waiting on it are denied, the node is unready, and both recover once the
/// lock is released.
#[tokio::test]
async fn a_write_lock_held_past_the_busy_timeout_denies_then_the_node_recovers() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let db = node.app().settings.store_path.clone();
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO state (k, v) VALUES ('held', 1);")
        .unwrap();

    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_decision(&v, "deny", "INTERNAL");
    assert!(v["message"].as_str().unwrap().contains("locked"), "{v}");
    let (st, v) = node.readiness().await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(unready_codes(&v).contains(&"AUDIT_APPEND_FAILING"), "{v}");

    blocker.execute_batch("ROLLBACK").unwrap();
    node.until_readiness(StatusCode::OK).await;
    let (st, v) = node.check(Some(&t), get_claim()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_decision(&v, "permit", "PERMITTED");
    let report = verify_store(node.app().store.as_ref()).unwrap();
    assert!(report.error.is_none(), "{report:?}");
    node.stop().await;
}

/// Once the node has noticed (it polls), no call is permitted: `/readyz` is 503 naming the
/// store, and every check is denied INTERNAL, however often it is tried.
async fn assert_fails_closed_on_a_lost_store(node: &Node, token: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let v = loop {
        let (st, v) = node.readiness().await;
        if st == StatusCode::SERVICE_UNAVAILABLE && v.to_string().contains(what) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{st} {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(unready_codes(&v).contains(&"STORE_UNAVAILABLE"), "{v}");
    let db = node.app().settings.store_path.display().to_string();
    assert!(v.to_string().contains(&db), "{v}");
    for _ in 0..5 {
        let (st, v) = node.check(Some(token), get_claim()).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_decision(&v, "deny", "INTERNAL");
        assert!(v["message"].as_str().unwrap().contains(what), "{v}");
    }
    let (st, _) = node.readiness().await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn deleting_the_store_file_while_serving_fails_closed() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");

    let db = node.app().settings.store_path.clone();
    std::fs::remove_file(&db).unwrap();
    assert_fails_closed_on_a_lost_store(&node, &t, "deleted").await;

    // A CLI that then creates a fresh store at the path (and writes a kill there) does
    // not bring the node back to permitting from a file it never opened.
    drop(SqliteStore::open(&db).unwrap());
    assert_fails_closed_on_a_lost_store(&node, &t, "replaced").await;
    node.stop().await;
}

#[tokio::test]
async fn replacing_the_store_file_while_serving_fails_closed() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");

    let db = node.app().settings.store_path.clone();
    let other = node.path().join("other.db");
    drop(SqliteStore::open(&other).unwrap());
    std::fs::rename(&other, &db).unwrap();
    assert_fails_closed_on_a_lost_store(&node, &t, "replaced").await;
    node.stop().await;
}

#[tokio::test]
async fn free_space_below_the_threshold_makes_the_node_unready() {
    let node = Node::start_configured(
        |s| s.store_min_free_bytes = Some(u64::MAX),
        |s| Arc::new(SqliteStore::open(&s.store_path).unwrap()),
    )
    .await;
    let v = node.until_readiness(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(unready_codes(&v), ["LOW_DISK_SPACE"], "{v}");
    assert!(
        v["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("min_free_bytes"),
        "{v}"
    );
    node.stop().await;
}

fn sqlite(s: &Settings) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&s.store_path).unwrap())
}

fn read_all(dir: &Path) -> Vec<Record> {
    SqliteStore::open(&dir.join("warden.db"))
        .unwrap()
        .read_audit(0, 1_000_000)
        .unwrap()
}

/// Regression: a client without a token wrote a full audit entry per request (30 MB/s
/// with large rationales). Now the first K failures per source, reason and window get
/// entries and the rest are counted in a summary entry, so the record stays complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unauthenticated_checks_write_k_entries_and_a_summary_that_counts_the_rest() {
    let node = Node::start_configured(
        |s| {
            s.audit_limits.failure_window_ns = 3600 * NANOS_PER_SEC;
            s.audit_limits.failure_full_entries = 7;
        },
        sqlite,
    )
    .await;
    for _ in 0..1000 {
        let (st, v) = node.check(None, get_claim()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_decision(&v, "deny", "UNAUTHENTICATED");
    }
    let dir = node.stop().await;
    let records = read_all(dir.path());
    let full: Vec<&Record> = records
        .iter()
        .filter(|r| r.entry.kind == EntryKind::Decision)
        .collect();
    let summaries: Vec<&Record> = records
        .iter()
        .filter(|r| r.entry.kind == EntryKind::Summary)
        .collect();
    assert_eq!(full.len(), 7);
    assert!(full.iter().all(|r| r.entry.reason == "UNAUTHENTICATED"));
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    let s = &summaries[0].entry;
    assert_eq!(s.reason, "UNAUTHENTICATED");
    assert_eq!(s.summarised(), Some(993));
    assert!(
        s.rationale.as_deref().unwrap().contains("from 127.0.0.1"),
        "{s:?}"
    );
    assert_eq!(full.len() as u64 + s.summarised().unwrap(), 1000);
}

/// A window's summary is written when the window ends, while the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_window_is_summarised_when_it_ends() {
    let node = Node::start_configured(
        |s| {
            s.audit_limits.failure_window_ns = NANOS_PER_SEC / 5;
            s.audit_limits.failure_full_entries = 2;
        },
        sqlite,
    )
    .await;
    for _ in 0..5 {
        node.check(Some("not-a-token"), get_claim()).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let recs = node.app().store.read_audit(0, 1000).unwrap();
        let counted: u64 = recs.iter().filter_map(|r| r.entry.summarised()).sum();
        let full = recs
            .iter()
            .filter(|r| r.entry.kind == EntryKind::Decision)
            .count() as u64;
        if counted > 0 {
            assert_eq!(full + counted, 5, "{recs:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no summary: {recs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

/// Authenticated agents' calls are never sampled: each keeps its own entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_denials_are_never_sampled() {
    let node = Node::start_configured(|s| s.audit_limits.failure_full_entries = 1, sqlite).await;
    let t = node.token("claims-processor-v3").await;
    for _ in 0..30 {
        let (_, v) = node
            .check(Some(&t), json!({"tool": "nope", "params": {}}))
            .await;
        assert_decision(&v, "deny", "TOOL_NOT_PERMITTED");
    }
    let dir = node.stop().await;
    let records = read_all(dir.path());
    assert_eq!(
        records
            .iter()
            .filter(|r| r.entry.reason == "TOOL_NOT_PERMITTED")
            .count(),
        30
    );
    assert!(records.iter().all(|r| r.entry.kind != EntryKind::Summary));
}

/// Regression: under a global kill the answer came before authentication, so every
/// caller counted as an agent: a stranger's flood was written one entry per request
/// (during an emergency, when the audit matters most) and a real agent's denials did not
/// name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_global_kill_strangers_are_sampled_and_agents_are_named() {
    let node = Node::start_configured(
        |s| {
            s.audit_limits.failure_window_ns = 3600 * NANOS_PER_SEC;
            s.audit_limits.failure_full_entries = 3;
        },
        sqlite,
    )
    .await;
    let t = node.token("claims-processor-v3").await;
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/kills",
            Some(json!({"target": "all", "reason": "incident 7"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    for _ in 0..50 {
        let (_, v) = node.check(Some("not-a-token"), get_claim()).await;
        assert_decision(&v, "deny", "KILLED");
    }
    for _ in 0..10 {
        let (_, v) = node.check(Some(&t), get_claim()).await;
        assert_decision(&v, "deny", "KILLED");
    }
    let dir = node.stop().await;
    let records = read_all(dir.path());
    let killed: Vec<&Record> = records
        .iter()
        .filter(|r| r.entry.kind == EntryKind::Decision && r.entry.reason == "KILLED")
        .collect();
    let named = killed
        .iter()
        .filter(|r| r.entry.agent_id == "claims-processor-v3")
        .count();
    assert_eq!(named, 10, "every agent call keeps its own entry, naming it");
    assert_eq!(
        killed.len() - named,
        3,
        "strangers: only the sampled entries"
    );
    let counted: u64 = records
        .iter()
        .filter(|r| r.entry.kind == EntryKind::Summary && r.entry.reason == "KILLED")
        .filter_map(|r| r.entry.summarised())
        .sum();
    assert_eq!(counted, 47, "the rest of the strangers' calls are counted");
}

/// Regression: rationales were stored whole (64 KiB each).
#[tokio::test]
async fn a_64_kib_rationale_is_stored_capped() {
    let node = Node::start_configured(|s| s.max_body_bytes = 262_144, sqlite).await;
    let t = node.token("claims-processor-v3").await;
    let rationale = "é".repeat(32 * 1024); // 64 KiB of two-byte characters
    let body = json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {"rationale": rationale}});
    let (_, v) = node.check(Some(&t), body.clone()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let (_, v) = node.check(None, body).await;
    assert_decision(&v, "deny", "UNAUTHENTICATED");
    let dir = node.stop().await;
    let decisions: Vec<Record> = read_all(dir.path())
        .into_iter()
        .filter(|r| r.entry.kind == EntryKind::Decision)
        .collect();
    assert_eq!(decisions.len(), 2);
    for r in decisions {
        let kept = r.entry.rationale.unwrap();
        assert!(kept.len() <= 2048 + 64, "{} bytes kept", kept.len());
        assert!(kept.starts_with("éé"));
        assert!(kept.ends_with("[truncated from 65536 bytes]"), "{kept}");
    }
}

/// A web page can POST `text/plain` or a form across origins without a preflight.
#[tokio::test]
async fn a_post_that_is_not_json_is_refused_with_415() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let body = serde_json::to_string(&get_claim()).unwrap();
    for (path, token) in [("/v1/check", &t), ("/admin/v1/kills", &node.operator)] {
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonx"),
        ] {
            let mut req = node
                .http
                .post(format!("{}{path}", node.base))
                .bearer_auth(token)
                .body(body.clone());
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{path} {ct:?}"
            );
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"], "UNSUPPORTED_MEDIA_TYPE", "{v}");
        }
    }
    // JSON with parameters is JSON
    let r = node
        .http
        .post(format!("{}/v1/check", node.base))
        .bearer_auth(&t)
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    node.stop().await;
}

/// Regression: a body that parsed but failed validation was answered 400 with no audit
/// entry. It is a deny `INVALID_REQUEST` on the record now, still answered 400.
#[tokio::test]
async fn invalid_requests_are_audited_and_still_400() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let long = "t".repeat(5000);
    let bad = [
        json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {"classification": "secret"}}),
        json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {"cost_estimate": -1}}),
        json!({"tool": "", "params": {}}),
        json!({"tool": long, "params": {}}),
    ];
    for b in &bad {
        let (st, v) = node.check(Some(&t), b.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"], "BAD_REQUEST");
    }
    let (st, _) = node.check(None, bad[0].clone()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let dir = node.stop().await;
    let entries: Vec<Entry> = read_all(dir.path())
        .into_iter()
        .map(|r| r.entry)
        .filter(|e| e.kind == EntryKind::Decision)
        .collect();
    assert_eq!(entries.len(), 5, "{entries:?}");
    for e in &entries {
        assert_eq!(
            (e.decision.as_str(), e.reason.as_str()),
            ("deny", "INVALID_REQUEST")
        );
        assert_eq!(e.rules, ["warden.request"]);
    }
    assert!(entries[..4]
        .iter()
        .all(|e| e.agent_id == "claims-processor-v3"));
    assert_eq!(entries[4].agent_id, "");
    assert_eq!(entries[0].action, "get_claim");
    assert!(entries[3].action.len() < 400, "{}", entries[3].action.len());
}

/// Regression: duplicate keys inside `params` were accepted and the last one won
/// (`payout` 50000 then 5 was permitted), while duplicate top-level keys were refused.
#[tokio::test]
async fn duplicate_keys_are_refused_at_any_depth() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let post = |path: &str, token: &str, body: &str| {
        node.http
            .post(format!("{}{path}", node.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    for body in [
        r#"{"tool": "update_claim", "params": {"claim_id": "C", "status": "approved", "payout": 50000, "payout": 5}}"#,
        r#"{"tool": "get_claim", "tool": "get_claim", "params": {"claim_id": "C"}}"#,
        r#"{"tool": "get_claim", "params": {"claim_id": "C"}, "context": {"rationale": "a", "rationale": "b"}}"#,
        r#"{"tool": "get_claim", "params": {"claim_id": "C", "x": [{"k": 1, "k": 2}]}}"#,
    ] {
        let r = post("/v1/check", &t, body).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("duplicate key"),
            "{v}"
        );
    }
    let r = post(
        "/admin/v1/kills",
        &node.operator,
        r#"{"target": "agent:claims-processor-v3", "target": "all"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    node.stop().await;
}

/// Regression: an admin request refused before its body was read closed the connection
/// without `Connection: close`, so a client's next request on it failed.
#[tokio::test]
async fn an_admin_request_refused_before_its_body_does_not_break_the_next_request() {
    use tokio::io::AsyncWriteExt;
    let node = Node::start().await;
    let addr = node.base.trim_start_matches("http://").to_owned();
    let body = "{\"target\": \"all\"}".repeat(2000);
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // The headers first; the body follows once the refusal is already on its way.
        let head = format!(
            "POST /admin/v1/kills HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let first = read_response(&mut sock).await;
        assert!(
            first.starts_with("HTTP/1.1 401") || first.starts_with("HTTP/1.1 403"),
            "{first}"
        );
        let closes = first
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"));
        // Either the server said it closes, or the connection still works.
        if !closes {
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let second = read_response(&mut sock).await;
            assert!(
                second.starts_with("HTTP/1.1 200"),
                "second answer: {second:?}"
            );
        }
    }
    node.stop().await;
}

/// One HTTP/1.1 response with a Content-Length body, or what arrived before the
/// connection closed.
async fn read_response(sock: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[..end + 4 + len]).to_string();
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return String::from_utf8_lossy(&buf).to_string(),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A node whose background refresh is too slow to matter within a test, so whatever it
/// sees of another process's changes it sees by looking them up on a miss.
async fn node_without_background_refresh() -> Node {
    Node::start_configured(
        |s| {
            s.control_refresh_ns = 3600 * NANOS_PER_SEC;
            s.control_stale_after_ns = 7200 * NANOS_PER_SEC;
        },
        |s| Arc::new(SqliteStore::open(&s.store_path).unwrap()),
    )
    .await
}

#[tokio::test]
async fn a_token_the_store_never_issued_is_refused_whatever_its_signature() {
    let node = node_without_background_refresh().await;
    let key = node.app().key.clone().unwrap();
    let issuer = node.app().settings.issuer.clone();
    let agent = node
        .app()
        .store
        .get_agent("claims-processor-v3")
        .unwrap()
        .unwrap();
    // signed with the node's own key, a jti nobody issued, valid until the end of time
    let mut forever = new_claims(&issuer, &agent, "never-issued".into(), SystemClock.now_ns());
    forever.exp = u64::MAX;
    let (st, v) = node.check(Some(&key.sign(&forever)), get_claim()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_decision(&v, "deny", "CREDENTIAL_INVALID");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("warden agent rotate claims-processor-v3"),
        "{v}"
    );
    // and it cannot be revoked by jti, because there is nothing to revoke: it is refused
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/claims-processor-v3/revoke",
            Some(json!({"jti": "never-issued"})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn a_credential_issued_by_another_process_is_accepted_at_once() {
    let node = node_without_background_refresh().await;
    let app = node.app().clone();
    // `warden agent token` and `warden agent register` write the file from another process
    let cli = SqliteStore::open(&app.settings.store_path).unwrap();
    let agent = cli.get_agent("claims-processor-v3").unwrap().unwrap();
    let (token, _) = warden_core::identity::issue_credential(
        &cli,
        app.key.as_ref().unwrap(),
        &app.settings.issuer,
        &agent,
        "from-the-cli".into(),
        &cli_acting(),
    )
    .unwrap();
    let (st, v) = node.check(Some(&token), get_claim()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_decision(&v, "permit", "PERMITTED");

    let newcomer = Agent {
        id: "newcomer".into(),
        ..agent.clone()
    };
    warden_core::identity::register_agent(&cli, &newcomer, &cli_acting()).unwrap();
    let (token, _) = warden_core::identity::issue_credential(
        &cli,
        app.key.as_ref().unwrap(),
        &app.settings.issuer,
        &newcomer,
        "newcomer-1".into(),
        &cli_acting(),
    )
    .unwrap();
    let (_, v) = node.check(Some(&token), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    // the standing route (gateways poll it) looks up a new credential the same way
    let (token, _) = warden_core::identity::issue_credential(
        &cli,
        app.key.as_ref().unwrap(),
        &app.settings.issuer,
        &newcomer,
        "newcomer-2".into(),
        &cli_acting(),
    )
    .unwrap();
    let resp = node
        .http
        .get(format!("{}/v1/agent", node.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    node.stop().await;
}

/// The audit records of kind `control`, oldest first.
fn control_records(store: &dyn Store) -> Vec<Record> {
    store
        .read_audit(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.kind == EntryKind::Control)
        .collect()
}

#[tokio::test]
async fn operator_actions_name_the_credential_and_unknown_targets_need_pre_emptive() {
    let node = Node::start().await;
    let store = node.app().store.clone();
    let expected = warden_core::identity::operator_id(&node.operator);
    assert!(
        expected.starts_with("operator:") && expected.len() == 17,
        "{expected}"
    );

    // a body naming someone else is refused
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/kills",
            Some(json!({"target": "agent:claims-processor-v3", "by": "mallory"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains(&expected), "{v}");

    // a kill of an agent nobody registered stops nothing: refused, naming the fix
    let before = control_records(store.as_ref()).len();
    for target in ["agent:nobody-here", "owner:no-such-team"] {
        let (st, v) = node
            .admin(
                reqwest::Method::POST,
                "/admin/v1/kills",
                Some(json!({"target": target})),
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{target}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("pre_emptive"),
            "{v}"
        );
    }
    assert_eq!(control_records(store.as_ref()).len(), before);
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/kills",
            Some(json!({"target": "agent:nobody-here", "pre_emptive": true})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/kills",
            Some(json!({"target": "agent:claims-processor-v3", "reason": "r"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    node.token("fraud-analyst").await;
    let records = control_records(store.as_ref());
    let actions: Vec<(&str, &str)> = records[before..]
        .iter()
        .map(|r| (r.entry.action.as_str(), r.entry.reason.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("kill", expected.as_str()),
            ("kill", expected.as_str()),
            ("credential-issue", expected.as_str())
        ]
    );
    let kills = node
        .app()
        .store
        .snapshot(SystemClock.now_ns())
        .unwrap()
        .kills;
    assert!(kills.iter().all(|k| k.set_by == expected), "{kills:?}");
    node.stop().await;
}

#[tokio::test]
async fn an_operator_action_whose_audit_entry_fails_does_not_happen() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let db = node.app().settings.store_path.clone();
    let conn = rusqlite::Connection::open(&db).unwrap();
    // every audit insert now fails, as on a full disk, while the other tables take writes
    conn.execute_batch(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .unwrap();
    let attempts = [
        (
            "/admin/v1/kills",
            Some(json!({"target": "agent:claims-processor-v3"})),
        ),
        ("/admin/v1/kills", Some(json!({"target": "all"}))),
        ("/admin/v1/agents/claims-processor-v3/tokens", None),
        ("/admin/v1/agents/claims-processor-v3/revoke", None),
        (
            "/admin/v1/agents",
            Some(
                json!({"id": "late", "owner": "claims-team", "tier": 2, "scopes": ["claims:read"]}),
            ),
        ),
    ];
    let store = node.app().store.clone();
    let version = store.state_version().unwrap();
    let creds = store.list_credentials("claims-processor-v3").unwrap();
    for (path, body) in attempts {
        let (st, v) = node.admin(reqwest::Method::POST, path, body).await;
        assert!(
            st.is_server_error() || st == StatusCode::CONFLICT,
            "{path}: {st} {v}"
        );
    }
    assert_eq!(
        store.state_version().unwrap(),
        version,
        "no change without its entry"
    );
    assert_eq!(
        store.list_credentials("claims-processor-v3").unwrap(),
        creds
    );
    assert!(store
        .snapshot(SystemClock.now_ns())
        .unwrap()
        .kills
        .is_empty());
    assert_eq!(store.get_agent("late").unwrap(), None);
    conn.execute_batch("DROP TRIGGER no_audit;").unwrap();
    let (_, v) = node.check(Some(&t), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    node.stop().await;
}

/// A node knows the calls it permitted; an outcome for a call it did not decide (another
/// node on the store, or before a restart) is checked against the store instead, with
/// the same answers.
#[tokio::test]
async fn an_outcome_for_a_call_another_node_decided_is_checked_against_the_store() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let (_, v) = node.check(Some(&t), get_claim()).await;
    let call = v["call_id"].as_str().unwrap().to_owned();
    let (_, v) = node
        .check(
            Some(&t),
            json!({"tool": "run_sql", "params": {"query": "x"}}),
        )
        .await;
    let denied = v["call_id"].as_str().unwrap().to_owned();

    let s = settings(&node.path());
    let store = Arc::new(SqliteStore::open(&s.store_path).unwrap());
    let other = App::build_with_store(s, store, Arc::new(SystemClock)).unwrap();
    let ok = || OutcomeRecord {
        status: "ok",
        output_hash: None,
        cost: None,
        duration_ns: Some(1_000),
    };
    let agent = "claims-processor-v3";
    let foreign = other
        .record_outcome("fraud-analyst", &call, ok(), false)
        .await;
    assert!(matches!(foreign, Err(ApiError::NotFound(_))), "{foreign:?}");
    let on_denied = other.record_outcome(agent, &denied, ok(), false).await;
    assert!(
        matches!(on_denied, Err(ApiError::Conflict(_))),
        "{on_denied:?}"
    );
    let first = other.record_outcome(agent, &call, ok(), true).await;
    assert!(first.is_ok(), "{first:?}");
    // And the node that decided it no longer takes one either.
    let url = format!("{}/v1/calls/{call}/outcome", node.base);
    let resp = node
        .http
        .post(&url)
        .bearer_auth(&t)
        .json(&json!({"status": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);

    let records = node.app().store.call_records(&call).unwrap();
    assert_eq!(records.len(), 2);
    let (d, o) = (&records[0].entry, &records[1].entry);
    assert_eq!(o.kind, EntryKind::Outcome);
    assert_eq!(
        (&o.trace_id, &o.span_id, &o.action, &o.input_hash),
        (&d.trace_id, &d.span_id, &d.action, &d.input_hash)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_outcome_posts_record_one_outcome_per_call() {
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let (_, v) = node.check(Some(&t), get_claim()).await;
        assert_decision(&v, "permit", "PERMITTED");
        calls.push(v["call_id"].as_str().unwrap().to_owned());
    }
    let posts: Vec<_> = calls
        .iter()
        .flat_map(|c| std::iter::repeat_n(c.clone(), 16))
        .map(|call| {
            let (http, base, t) = (node.http.clone(), node.base.clone(), t.clone());
            tokio::spawn(async move {
                let resp = http
                    .post(format!("{base}/v1/calls/{call}/outcome"))
                    .bearer_auth(&t)
                    .json(&json!({"status": "ok", "output": {"n": 1}}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                (call, status, resp.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut accepted = std::collections::BTreeMap::<String, usize>::new();
    for p in posts {
        let (call, status, body) = p.await.unwrap();
        match status {
            StatusCode::OK => *accepted.entry(call).or_default() += 1,
            StatusCode::CONFLICT => assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("already has an outcome"),
                "{body}"
            ),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(accepted.len(), 4, "{accepted:?}");
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    for c in &calls {
        let outcomes = node
            .app()
            .store
            .call_records(c)
            .unwrap()
            .into_iter()
            .filter(|r| r.entry.kind == warden_core::audit::EntryKind::Outcome)
            .count();
        assert_eq!(outcomes, 1, "call {c}");
    }
    node.stop().await;
}

/// A payments tool declared in the catalog with its input schema, as AgentDojo's banking
/// server declares `send_money` (plus a list-or-single `attachments`), and a Cedar policy
/// that reads the amount as a decimal.
fn with_payments_tool(s: &mut Settings) {
    let dir = s.base_dir.clone();
    let mut schema = std::fs::read_to_string(&s.schema_file).unwrap();
    schema.push_str(
        r#"
action send_money appliesTo {
  principal: Agent, resource: Tool,
  context: { params: { recipient: String, amount: decimal, subject?: String, attachments?: Set<String> }, call: Call },
};
"#,
    );
    std::fs::write(&s.schema_file, schema).unwrap();
    std::fs::write(
        dir.join("policy/payments.cedar"),
        r#"
@id("payments")
permit (principal, action == Action::"send_money", resource)
when { principal.scopes.contains("claims:write") };

@id("big-payments")
@message("payments over 1000.00 need a human")
forbid (principal, action == Action::"send_money", resource)
when { context.params.amount.greaterThan(decimal("1000.0")) };

@id("no-secret-attachments")
forbid (principal, action == Action::"send_money", resource)
when { context.params has attachments && context.params.attachments.contains("secret.pdf") };
"#,
    )
    .unwrap();
    let mut toml = std::fs::read_to_string(dir.join("warden.toml")).unwrap();
    toml.push_str(
        r#"
[[tools]]
name = "send_money"
scope = "claims:write"
classification = "internal"
[tools.input_schema]
type = "object"
required = ["recipient", "amount"]
[tools.input_schema.properties]
recipient = { type = "string" }
amount = { type = "number", description = "Amount of the transaction" }
subject = { anyOf = [{ type = "string" }, { type = "null" }], default = "" }
attachments = { anyOf = [{ type = "string" }, { type = "array", items = { type = "string" } }] }
"#,
    );
    *s = Settings::from_toml(&toml, "warden.toml", &dir, &|_| None).unwrap();
}

/// Typing from the tool's own schema, end to end over HTTP: an integer for a `number`
/// reaches a decimal rule, a null optional is absent, a lone attachment is a set of one,
/// and a wrong type is denied under `warden.arguments.schema` with the argument named.
#[tokio::test]
async fn arguments_are_typed_by_the_catalogs_input_schema_before_policy() {
    let node = Node::start_configured(with_payments_tool, sqlite).await;
    let t = node.token("claims-processor-v3").await;
    let pay = |params: Value| json!({"tool": "send_money", "params": params});

    let (st, v) = node
        .check(Some(&t), pay(json!({"recipient": "UK12", "amount": 250})))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_decision(&v, "permit", "PERMITTED");
    assert_eq!(v["rules"], json!(["payments"]));

    let (_, v) = node
        .check(Some(&t), pay(json!({"recipient": "UK12", "amount": 2500})))
        .await;
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");
    assert_eq!(v["rules"], json!(["big-payments"]));

    let (_, v) = node
        .check(
            Some(&t),
            pay(json!({"recipient": "UK12", "amount": 98.7, "subject": null})),
        )
        .await;
    assert_decision(&v, "permit", "PERMITTED");

    let (_, v) = node
        .check(
            Some(&t),
            pay(json!({"recipient": "UK12", "amount": 5, "attachments": "secret.pdf"})),
        )
        .await;
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");
    assert_eq!(v["rules"], json!(["no-secret-attachments"]));

    let (st, v) = node
        .check(Some(&t), pay(json!({"recipient": "UK12", "amount": "12"})))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");
    assert_eq!(v["rules"], json!(["warden.arguments.schema"]));
    assert_eq!(
        v["message"],
        "arguments of `send_money` do not fit its input schema: argument `/amount`: expected number, got string \"12\""
    );
    let (_, v) = node
        .check(
            Some(&t),
            pay(json!({"recipient": "UK12", "amount": 1, "attachments": ["a.pdf", 7]})),
        )
        .await;
    assert_eq!(v["rules"], json!(["warden.arguments.schema"]));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("argument `/attachments/1`: expected string, got number 7"),
        "{v}"
    );

    // A remote gateway's refusal under the schema rule, and one naming a rule outside
    // the closed set.
    let refused = json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {
        "refusal": "arguments of `get_claim` do not fit its input schema: argument `/claim_id`: expected string, got number 7",
        "refusal_rule": "warden.arguments.schema"}});
    let (_, v) = node.check(Some(&t), refused).await;
    assert_decision(&v, "deny", "CONSTRAINT_VIOLATION");
    assert_eq!(v["rules"], json!(["warden.arguments.schema"]));
    let forged = json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {
        "refusal": "x", "refusal_rule": "warden.control.kill-switch"}});
    let (st, _) = node.check(Some(&t), forged).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (_, v) = node
        .check(
            Some(&t),
            json!({"tool": "get_claim", "params": {"claim_id": "C"}, "context": {"refusal": "unresolved path"}}),
        )
        .await;
    assert_eq!(v["rules"], json!(["warden.gateway.arguments"]));

    let dir = node.stop().await;
    let denied: Vec<Entry> = read_all(dir.path())
        .into_iter()
        .map(|r| r.entry)
        .filter(|e| e.rules == ["warden.arguments.schema"])
        .collect();
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert!(denied
        .iter()
        .all(|e| e.agent_id == "claims-processor-v3" && e.reason == "CONSTRAINT_VIOLATION"));
    assert_eq!(denied[0].action, "send_money");
}

/// `mcp-proxy --server`'s gate speaks the agent plane with the node's own message types:
/// a permit with its ids, a refused credential, a check the node refuses to read (over
/// the body limit: denied INTERNAL with the node's reason), the outcome recorded, the
/// agent's tools, and a kill seen as a stop.
#[tokio::test]
async fn the_remote_gate_reads_every_answer_of_a_real_node() {
    use warden_mcp::gate::{Gate, Outcome, ToolCall};
    let node = Node::start().await;
    let t = node.token("claims-processor-v3").await;
    let tls = warden_core::config::UpstreamTls::default();
    let gate = warden_server::gate::RemoteGate::new(&node.base, t.clone(), &tls).unwrap();
    let call = |arguments: Value| ToolCall {
        action: "get_claim".into(),
        arguments,
        rationale: Some("customer asked".into()),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        refusal: None,
    };

    let v = gate.check(call(json!({"claim_id": "CLM-1001"}))).await;
    assert!(v.permit, "{v:?}");
    assert_eq!(v.reason, "PERMITTED");
    assert_eq!(v.agent_id, "claims-processor-v3");
    assert_eq!(v.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v.call_id.len(), 32);

    gate.outcome(Outcome {
        call_id: v.call_id.clone(),
        agent_id: v.agent_id.clone(),
        status: "ok",
        output: Some(json!({"amount": 10})),
        duration_ns: 2_000_000,
    })
    .await;
    let records = node.app().store.call_records(&v.call_id).unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1].entry.decision, "ok");
    assert_eq!(
        records[1].entry.output_hash.as_deref().map(str::len),
        Some(64)
    );

    let huge = "x".repeat(node.app().settings.max_body_bytes + 1);
    let v = gate.check(call(json!({"claim_id": huge}))).await;
    assert!(!v.permit);
    assert_eq!(v.reason, "INTERNAL");
    assert!(v.message.contains("Warden refused the check (413"), "{v:?}");

    let forged = warden_server::gate::RemoteGate::new(&node.base, format!("{t}x"), &tls).unwrap();
    let v = forged.check(call(json!({"claim_id": "CLM-1001"}))).await;
    assert!(!v.permit);
    assert!(v.reason.starts_with("CREDENTIAL_"), "{v:?}");
    assert!(forged.visible_actions().await.is_none());

    assert!(gate.stopped().await.is_none());
    let tools = gate.visible_actions().await.unwrap();
    assert!(tools.contains("get_claim"), "{tools:?}");
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/kills",
            Some(json!({"target": "agent:claims-processor-v3", "reason": "incident 7"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let stop = gate.stopped().await.unwrap();
    assert!(
        stop.starts_with("KILLED: ") && stop.contains("incident 7"),
        "{stop}"
    );
    node.stop().await;
}

/// Rotation, suspension, resumption and retirement through the admin API: each reason
/// code reached by a real call, each change on the audit record, each in force from the
/// node's next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_lifecycle_through_the_admin_api() {
    let node = Node::start().await;
    let agent = "claims-processor-v3";
    let path = |what: &str| format!("/admin/v1/agents/{agent}/{what}");
    let first = node.token(agent).await;
    let (_, v) = node.check(Some(&first), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");

    // Rotation with an overlap: both credentials work until the overlap ends.
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            &path("rotate"),
            Some(json!({"overlap": "1h"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let second = v["token"].as_str().unwrap().to_owned();
    let second_jti = v["credential"]["jti"].as_str().unwrap().to_owned();
    let now_s = SystemClock.now_ns() / NANOS_PER_SEC;
    let ends = v["others_end_at"].as_u64().unwrap();
    assert!((now_s + 3590..=now_s + 3600).contains(&ends), "{v}");
    for t in [&first, &second] {
        let (_, v) = node.check(Some(t), get_claim()).await;
        assert_decision(&v, "permit", "PERMITTED");
    }
    let (_, shown) = node
        .admin(
            reqwest::Method::GET,
            &format!("/admin/v1/agents/{agent}"),
            None,
        )
        .await;
    let rotated: Vec<&Value> = shown["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["replaced_by"] == second_jti.as_str())
        .collect();
    assert_eq!(rotated.len(), 1, "{shown}");
    assert_eq!(rotated[0]["ends_at"], ends, "{shown}");

    // Rotation without an overlap: the old credential is refused at once, as expired,
    // with what to do.
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            &path("rotate"),
            Some(json!({"overlap": "0s"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let third = v["token"].as_str().unwrap().to_owned();
    for old in [&first, &second] {
        let (st, v) = node.check(Some(old), get_claim()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_decision(&v, "deny", "CREDENTIAL_EXPIRED");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains("rotated out"), "{m}");
        assert!(m.contains(&format!("warden agent rotate {agent}")), "{m}");
    }
    let (_, v) = node.check(Some(&third), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let (st, v) = node
        .admin(
            reqwest::Method::POST,
            &path("rotate"),
            Some(json!({"overlap": "soon"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // Suspension stops the agent's calls until it is resumed; the credential survives.
    let (st, v) = node
        .admin(reqwest::Method::POST, &path("suspend"), None)
        .await;
    assert_eq!(
        (st, &v["status"]),
        (StatusCode::OK, &json!("suspended")),
        "{v}"
    );
    let (st, v) = node.check(Some(&third), get_claim()).await;
    // The agent proved who it is and is refused, as a killed one is: 200 with a deny.
    assert_eq!(st, StatusCode::OK);
    assert_decision(&v, "deny", "AGENT_SUSPENDED");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("warden agent resume {agent}")),
        "{v}"
    );
    // a suspended agent is issued nothing
    let (st, _) = node
        .admin(reqwest::Method::POST, &path("rotate"), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = node
        .admin(reqwest::Method::POST, &path("suspend"), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "suspending twice");
    let (st, v) = node
        .admin(reqwest::Method::POST, &path("resume"), None)
        .await;
    assert_eq!(
        (st, &v["status"]),
        (StatusCode::OK, &json!("active")),
        "{v}"
    );
    let (_, v) = node.check(Some(&third), get_claim()).await;
    assert_decision(&v, "permit", "PERMITTED");
    let (st, _) = node
        .admin(reqwest::Method::POST, &path("resume"), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "resuming an active agent");

    // Retirement is final.
    let (st, v) = node
        .admin(reqwest::Method::POST, &path("retire"), Some(json!({})))
        .await;
    assert_eq!(
        (st, &v["status"]),
        (StatusCode::OK, &json!("retired")),
        "{v}"
    );
    let (_, v) = node.check(Some(&third), get_claim()).await;
    assert_decision(&v, "deny", "AGENT_RETIRED");
    for what in ["resume", "suspend", "retire", "rotate"] {
        let (st, v) = node.admin(reqwest::Method::POST, &path(what), None).await;
        assert_eq!(st, StatusCode::CONFLICT, "{what}: {v}");
    }
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            &path("suspend"),
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "an unknown body field");
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/nobody/suspend",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Each change that took effect is on the record, naming the operator.
    let store = node.app().store.clone();
    let actions: Vec<(String, String)> = store
        .tail_audit(200)
        .unwrap()
        .into_iter()
        // The node's start records the config's agents as the config's doing.
        .filter(|r| r.entry.kind == EntryKind::Control && r.entry.action != "agent-config")
        .map(|r| (r.entry.action.clone(), r.entry.reason.clone()))
        .collect();
    let count = |a: &str| actions.iter().filter(|(x, _)| x == a).count();
    assert_eq!(count("credential-rotate"), 2, "{actions:?}");
    assert_eq!(count("agent-suspend"), 1, "{actions:?}");
    assert_eq!(count("agent-resume"), 1, "{actions:?}");
    assert_eq!(count("agent-retire"), 1, "{actions:?}");
    assert!(
        actions.iter().all(|(_, who)| who.starts_with("operator:")),
        "{actions:?}"
    );
}

/// The config's agents come in with an audit entry for every change: declared on first
/// start, nothing on a start with the same config, and a config edit that raises an
/// agent's tier or adds scopes names exactly that, as the config's doing. The agent's
/// status is the operators', and a config edit leaves it.
#[tokio::test]
async fn a_config_edit_to_an_agent_is_recorded_and_leaves_its_status() {
    let node = Node::start().await;
    let config_entries = |store: &Arc<dyn Store>| -> Vec<String> {
        store
            .read_audit(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.entry.action == "agent-config")
            .map(|r| {
                assert_eq!(r.entry.reason, "config");
                r.entry.rationale.unwrap_or_default()
            })
            .collect()
    };
    let store = node.app().store.clone();
    let first = config_entries(&store);
    assert_eq!(first.len(), node.app().settings.agents.len(), "{first:?}");
    assert!(
        first
            .iter()
            .any(|d| d.starts_with("agent `claims-processor-v3`: declared (owner")),
        "{first:?}"
    );
    let (st, _) = node
        .admin(
            reqwest::Method::POST,
            "/admin/v1/agents/claims-processor-v3/suspend",
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    let start_again = |edit: fn(&mut Settings)| {
        let mut s = settings(&node.path());
        edit(&mut s);
        let store = Arc::new(SqliteStore::open(&s.store_path).unwrap());
        App::build_with_store(s, store, Arc::new(SystemClock)).unwrap()
    };
    start_again(|_| {});
    assert_eq!(
        config_entries(&store).len(),
        first.len(),
        "the same config writes nothing"
    );

    start_again(|s| {
        let a = s
            .agents
            .iter_mut()
            .find(|a| a.id == "claims-processor-v3")
            .unwrap();
        a.tier = 3;
        a.scopes.insert("payments:send".into());
    });
    let all = config_entries(&store);
    assert_eq!(all.len(), first.len() + 1, "{all:?}");
    let last = all.last().unwrap();
    assert!(
        last.starts_with("agent `claims-processor-v3`: tier 2 -> 3; scopes added [payments:send]"),
        "{last}"
    );
    let agent = store.get_agent("claims-processor-v3").unwrap().unwrap();
    assert_eq!(agent.tier, 3);
    assert!(agent.scopes.contains("payments:send"));
    assert_eq!(
        agent.status,
        AgentStatus::Suspended,
        "the config does not resume it"
    );
    node.stop().await;
}
