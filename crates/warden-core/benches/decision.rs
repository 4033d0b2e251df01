//! In-process decision latency with the example policies: credential cached, audit
//! excluded (the pipeline returns the entry; writing it is the server's job).
//!
//! Criterion measures the median; a second pass times 200,000 single calls to report the
//! p50/p99/p99.9 that criterion does not. Run: `cargo bench -p warden-core --bench decision`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, Criterion};
use serde_json::json;
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

fn setup() -> (Pipeline, String) {
    let text = std::fs::read_to_string(Path::new(EXAMPLE).join("warden.toml")).expect("config");
    let mut settings =
        Settings::from_toml(&text, "warden.toml", Path::new(EXAMPLE), &|_| None).expect("settings");
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
    let (pipeline, token) = setup();
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
    assert!(pipeline.check(&permit, ids()).decision.is_permit());
    let d = pipeline.check(&forbid, ids()).decision;
    assert_eq!(d.reason, warden_core::Reason::ConstraintViolation, "{d:?}");

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
    g.finish();
    c.final_summary();

    // Percentiles of single calls.
    for (name, req, permitted) in [("permit", &permit, true), ("forbid", &forbid, false)] {
        assert_eq!(pipeline.check(req, ids()).decision.is_permit(), permitted);
        let n = 200_000;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            black_box(pipeline.check(req, ids()));
            samples.push(t.elapsed().as_nanos() as u64);
        }
        samples.sort_unstable();
        let pct = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0;
        println!(
            "decision/{name}: n={n} p50={:.1}us p99={:.1}us p99.9={:.1}us max={:.1}us",
            pct(0.50),
            pct(0.99),
            pct(0.999),
            samples[n - 1] as f64 / 1000.0
        );
    }
}
