//! Agent-token verification, with and without the verifier's cache.
//!
//! "Cached" verifies one token again and again: a hash lookup of the token text, then the
//! key's end and the validity window. "Uncached" cycles through 10,000 distinct tokens on
//! a verifier that holds one, so every call misses: base64 and JSON of the header, the
//! Ed25519 signature check, the claims parse, and the cache insert a miss pays for.
//! Criterion gives the median; a second pass times 200,000 single calls of each for the
//! p50/p99/p99.9. Run: `cargo bench -p warden-core --bench token`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Instant;

use criterion::{black_box, Criterion};
use warden_core::clock::{Clock, SystemClock, NANOS_PER_SEC};
use warden_core::identity::{new_claims, Agent, AgentStatus, SigningKeyPair, Verifier};

const DISTINCT: usize = 10_000;

fn percentiles(label: &str, mut f: impl FnMut(usize)) {
    let n = 200_000;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i);
        times.push(t.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    let at = |q: f64| times[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0;
    println!(
        "{label}: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn main() {
    let key = SigningKeyPair::from_seed([3; 32]);
    let agent = Agent {
        id: "claims-processor-v3".into(),
        owner: "claims-team".into(),
        tier: 2,
        scopes: ["claims:read".to_string(), "claims:write".to_string()].into(),
        rotation_ns: 30 * 86_400 * NANOS_PER_SEC,
        status: AgentStatus::Active,
    };
    let now = SystemClock.now_ns();
    let tokens: Vec<String> = (0..DISTINCT)
        .map(|i| key.sign(&new_claims("warden", &agent, format!("jti-{i:032}"), now)))
        .collect();
    let cached = Verifier::new("warden", [key.verifying_key()], 1024);
    // Holding one token, it misses on every call as the tokens cycle.
    let uncached = Verifier::new("warden", [key.verifying_key()], 1);
    assert!(cached.verify(&tokens[0], now).is_ok());
    assert!(tokens.iter().all(|t| uncached.verify(t, now).is_ok()));

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("token");
    g.bench_function("verify, cached", |b| {
        b.iter(|| black_box(cached.verify(black_box(&tokens[0]), now).is_ok()))
    });
    let mut i = 0;
    g.bench_function("verify, uncached (signature checked)", |b| {
        b.iter(|| {
            i = (i + 1) % DISTINCT;
            black_box(uncached.verify(black_box(&tokens[i]), now).is_ok())
        })
    });
    g.finish();
    c.final_summary();

    percentiles("verify, cached", |_| {
        black_box(cached.verify(&tokens[0], now).is_ok());
    });
    percentiles("verify, uncached", |i| {
        black_box(uncached.verify(&tokens[i % DISTINCT], now).is_ok());
    });
}
