//! In-process decision latency with the example policies (and with an input schema on
//! `update_claim`, plus argument normalization alone): credential cached, audit
//! excluded (the pipeline returns the entry; writing it is the server's job).
//!
//! Criterion measures the median; a second pass times 200,000 single calls to report the
//! p50/p99/p99.9 that criterion does not. Run: `cargo bench -p warden-core --bench decision`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, Criterion};
use serde_json::json;
use warden_core::args::Schema;
use warden_core::clock::{Clock, SystemClock, NANOS_PER_SEC};
use warden_core::config::Settings;
use warden_core::identity::{new_claims, SigningKeyPair, Verifier};
use warden_core::pipeline::{CallContext, CallIds, CallRequest};
use warden_core::policy::{PolicyBundle, Source};
use warden_core::store::{Credential, StateSnapshot};
use warden_core::Pipeline;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/claims");

fn read(p: &str) -> Source {
    let path = Path::new(EXAMPLE).join(p);
    Source {
        name: p.to_owned(),
        text: std::fs::read_to_string(path).expect("example file"),
    }
}

/// `update_claim`'s arguments as a catalog `input_schema` would declare them, the shape
/// pydantic gives an MCP tool (an optional integer with a null default).
fn update_claim_schema() -> Schema {
    Schema::compile(&json!({
        "type": "object",
        "title": "update_claim",
        "properties": {
            "claim_id": {"type": "string", "description": "The claim"},
            "status": {"type": "string", "enum": ["open", "approved", "rejected"]},
            "payout": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null}
        },
        "required": ["claim_id", "status"]
    }))
    .expect("schema")
}

fn setup(with_schema: bool) -> (Pipeline, String) {
    let text = std::fs::read_to_string(Path::new(EXAMPLE).join("warden.toml")).expect("config");
    let mut settings =
        Settings::from_toml(&text, "warden.toml", Path::new(EXAMPLE), &|_| None).expect("settings");
    if with_schema {
        let tool = settings
            .tools
            .get_mut("update_claim")
            .expect("update_claim");
        tool.input_schema = Some(update_claim_schema());
    }
    // Benchmark the policy path, not the limiter's refusal path.
    settings.limits.clear();
    // No refresher runs here; keep the control view from going stale mid-benchmark.
    settings.control_stale_after_ns = u64::MAX / 2;
    let bundle = PolicyBundle::load(
        &read("policy/warden.cedarschema"),
        &[read("policy/claims.cedar"), read("policy/database.cedar")],
        settings.tools.values(),
    )
    .expect("policy");
    let key = SigningKeyPair::from_seed([3; 32]);
    let verifier = Verifier::new(settings.issuer.clone(), [key.verifying_key()], 1024);
    let pipeline = Pipeline::new(&settings, bundle, verifier, Arc::new(SystemClock));
    let agent = &settings.agents[0];
    let now = SystemClock.now_ns();
    let claims = new_claims(&settings.issuer, agent, "bench".into(), now);
    // The store issued it: a token is accepted only for a credential in the view.
    let issued = Credential {
        jti: claims.jti.clone(),
        agent_id: agent.id.clone(),
        issued_at_ns: claims.iat * NANOS_PER_SEC,
        expires_at_ns: claims.exp * NANOS_PER_SEC,
        revoked_at_ns: None,
        replaced_by: None,
    };
    pipeline.apply_snapshot(
        StateSnapshot {
            version: 1,
            agents: settings.agents.clone(),
            credentials: [(issued.jti.clone(), issued)].into(),
            ..Default::default()
        },
        now,
    );
    let token = key.sign(&claims);
    (pipeline, token)
}

fn ids() -> CallIds {
    CallIds {
        call_id: "c".into(),
        trace_id: "t".into(),
        span_id: "s".into(),
    }
}

fn main() {
    let (pipeline, token) = setup(false);
    let (typed_pipeline, typed_token) = setup(true);
    let permit_params = json!({"claim_id": "CLM-1001", "status": "approved", "payout": 2500});
    let forbid_params = json!({"claim_id": "CLM-1001", "status": "approved", "payout": 25000});
    let ctx = CallContext {
        rationale: Some("bench".into()),
        ..Default::default()
    };
    let permit = CallRequest {
        credential: Some(&token),
        tool: "update_claim",
        params: &permit_params,
        context: &ctx,
    };
    let forbid = CallRequest {
        credential: Some(&token),
        tool: "update_claim",
        params: &forbid_params,
        context: &ctx,
    };
    let scope = CallRequest {
        credential: Some(&token),
        tool: "run_sql",
        params: &permit_params,
        context: &ctx,
    };
    let typed_permit = CallRequest {
        credential: Some(&typed_token),
        ..permit
    };
    let misfit_params = json!({"claim_id": "CLM-1001", "status": "approved", "payout": "2500"});
    let typed_misfit = CallRequest {
        params: &misfit_params,
        ..typed_permit
    };
    assert!(pipeline.check(&permit, ids()).decision.is_permit());
    assert!(typed_pipeline
        .check(&typed_permit, ids())
        .decision
        .is_permit());
    let d = typed_pipeline.check(&typed_misfit, ids()).decision;
    assert_eq!(d.rules, ["warden.arguments.schema"], "{d:?}");
    let d = pipeline.check(&forbid, ids()).decision;
    assert_eq!(d.reason, warden_core::Reason::ConstraintViolation, "{d:?}");

    // Normalization alone: the schema above on arguments that already fit (borrowed,
    // no copy), and AgentDojo's `send_money` with an integer amount (retyped, a copy).
    let schema = update_claim_schema();
    let with_null = json!({"claim_id": "CLM-1001", "status": "approved", "payout": null});
    let send_money = Schema::compile(&json!({
        "type": "object",
        "properties": {
            "recipient": {"type": "string", "title": "Recipient"},
            "amount": {"type": "number", "title": "Amount"},
            "subject": {"type": "string", "title": "Subject"},
            "date": {"type": "string", "title": "Date"}
        },
        "required": ["recipient", "amount", "subject", "date"]
    }))
    .expect("schema");
    let payment = json!({"recipient": "UK12345678901234567890", "amount": 100,
        "subject": "Car Rental", "date": "2022-01-01"});
    assert!(matches!(
        schema.normalized(&permit_params),
        Ok(Cow::Borrowed(_))
    ));
    assert!(matches!(send_money.normalized(&payment), Ok(Cow::Owned(_))));

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("decision");
    g.bench_function("permit (cedar permit, cached credential)", |b| {
        b.iter(|| black_box(pipeline.check(&permit, ids())))
    });
    g.bench_function("deny by forbid rule", |b| {
        b.iter(|| black_box(pipeline.check(&forbid, ids())))
    });
    g.bench_function("deny by scope (before cedar)", |b| {
        b.iter(|| black_box(pipeline.check(&scope, ids())))
    });
    g.bench_function("permit, input schema on the tool", |b| {
        b.iter(|| black_box(typed_pipeline.check(&typed_permit, ids())))
    });
    g.bench_function("deny by input schema (before cedar)", |b| {
        b.iter(|| black_box(typed_pipeline.check(&typed_misfit, ids())))
    });
    g.finish();
    let mut g = c.benchmark_group("args");
    g.bench_function("normalize, arguments already fit (borrowed)", |b| {
        b.iter(|| black_box(schema.normalized(black_box(&permit_params)).is_ok()))
    });
    g.bench_function("normalize, null optional removed (copy)", |b| {
        b.iter(|| black_box(schema.normalized(black_box(&with_null)).is_ok()))
    });
    g.bench_function("normalize, integer amount retyped (copy)", |b| {
        b.iter(|| black_box(send_money.normalized(black_box(&payment)).is_ok()))
    });
    g.finish();
    c.final_summary();

    // Percentiles of single calls. Each call is timed alone, so on a busy machine the
    // median still shows the call's own cost (a preemption lands in the tail).
    for (name, p, req, permitted) in [
        ("permit", &pipeline, &permit, true),
        ("forbid", &pipeline, &forbid, false),
        ("permit+schema", &typed_pipeline, &typed_permit, true),
    ] {
        assert_eq!(p.check(req, ids()).decision.is_permit(), permitted);
        percentiles(&format!("decision/{name}"), || {
            black_box(p.check(req, ids()));
        });
    }
    percentiles("args/already fit", || {
        black_box(schema.normalized(black_box(&permit_params)).is_ok());
    });
    percentiles("args/null removed", || {
        black_box(schema.normalized(black_box(&with_null)).is_ok());
    });
    percentiles("args/integer retyped", || {
        black_box(send_money.normalized(black_box(&payment)).is_ok());
    });
}

/// Times 200,000 single runs of `f` and prints p50, p99, p99.9 and the maximum (the
/// timer's own cost, a few tens of ns, included).
fn percentiles(name: &str, f: impl Fn()) {
    let n = 200_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0;
    println!(
        "{name}: n={n} p50={:.3}us p99={:.3}us p99.9={:.1}us max={:.1}us",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        samples[n - 1] as f64 / 1000.0
    );
}
