//! A closed-loop load generator for Warden's decision API (`POST /v1/check`).
//!
//! N client tasks each send one request, wait for the answer, and send the next, over
//! one shared connection pool. Requests that start during the warm-up are sent but not
//! counted; the measured phase ends after `--duration` seconds or `--requests` requests,
//! whichever comes first. Every measured request's latency is kept (one `Vec` per task,
//! merged at the end), so the percentiles are exact rather than bucketed.
//!
//! It only talks to loopback addresses: it is a benchmark for a node on this machine,
//! not a tool for loading someone else's server.
//!
//! ```text
//! WARDEN_TOKEN=... cargo run --release -p warden-server --example loadgen -- \
//!     --url http://127.0.0.1:8480 --concurrency 64 --duration 15 --warmup 3
//! ```
//!
//! Exit status: 0 when every measured request got a 200, 1 when some did not, 2 for bad
//! usage.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, Url};

const USAGE: &str = "\
usage: loadgen --url http://127.0.0.1:PORT [options]

  --url URL          the Warden node (loopback only); `/v1/check` is used when the URL
                     has no path
  --concurrency N    concurrent clients (default 64)
  --duration SECS    length of the measured phase (default 10 unless --requests is given)
  --requests N       stop after N measured requests
  --warmup SECS      unmeasured warm-up before the measured phase (default 0)
  --body JSON        request body (default a get_claim call)
  --threads N        tokio worker threads for the load generator (default 1)
  --timeout SECS     per-request timeout (default 30)";

const DEFAULT_BODY: &str = r#"{"tool":"get_claim","params":{"claim_id":"CLM-1001"}}"#;

struct Args {
    url: Url,
    token: String,
    concurrency: usize,
    duration: Option<Duration>,
    requests: Option<u64>,
    warmup: Duration,
    body: String,
    threads: usize,
    timeout: Duration,
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("error: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(report) => {
            report.print();
            if report.errors == 0 && report.requests > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut concurrency = 64usize;
    let mut duration = None;
    let mut requests = None;
    let mut warmup = 0.0f64;
    let mut body = DEFAULT_BODY.to_owned();
    let mut threads = 1usize;
    let mut timeout = 30.0f64;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--concurrency" => concurrency = number(&flag, &value)?,
            "--duration" => duration = Some(seconds(&flag, &value)?),
            "--requests" => requests = Some(number(&flag, &value)?),
            "--warmup" => warmup = seconds(&flag, &value)?,
            "--body" => body = value,
            "--threads" => threads = number(&flag, &value)?,
            "--timeout" => timeout = seconds(&flag, &value)?,
            _ => return Err(format!("unknown option `{flag}`")),
        }
    }
    let url = loopback_url(&url.ok_or("`--url` is required")?)?;
    // The token comes from the environment only: on the command line `ps` would show it.
    let token = std::env::var("WARDEN_TOKEN").map_err(|_| "no token: set WARDEN_TOKEN")?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if concurrency == 0 || concurrency > 10_000 {
        return Err("`--concurrency` must be 1 to 10000".into());
    }
    if threads == 0 || threads > 64 {
        return Err("`--threads` must be 1 to 64".into());
    }
    if requests == Some(0) {
        return Err("`--requests` must be at least 1".into());
    }
    if duration.is_some_and(|d| d <= 0.0) || timeout <= 0.0 {
        return Err("`--duration` and `--timeout` must be positive".into());
    }
    // Bounded either way: a measured phase of 10 s unless a request count is given.
    let duration = match (duration, requests) {
        (None, None) => Some(10.0),
        (d, _) => d,
    };
    serde_json::from_str::<serde_json::Value>(&body)
        .map_err(|e| format!("`--body` is not JSON: {e}"))?;
    Ok(Args {
        url,
        token,
        concurrency,
        duration: duration.map(Duration::from_secs_f64),
        requests,
        warmup: Duration::from_secs_f64(warmup),
        body,
        threads,
        timeout: Duration::from_secs_f64(timeout),
    })
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("`{flag}` takes a whole number, not `{value}`"))
}

fn seconds(flag: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "`{flag}` takes seconds (0 to 86400), not `{value}`"
        )),
    }
}

/// Accepts only `http://` URLs whose host is a loopback IP literal.
fn loopback_url(raw: &str) -> Result<Url, String> {
    let mut url = Url::parse(raw).map_err(|e| format!("`--url` `{raw}`: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("`--url` `{raw}`: only http:// is supported"));
    }
    // Only IP literals: a name could resolve anywhere.
    let loopback = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "`--url` `{raw}`: the host must be a loopback address such as 127.0.0.1"
        ));
    }
    if url.path() == "/" {
        url.set_path("/v1/check");
    }
    Ok(url)
}

/// What one client task saw during the measured phase.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    decisions: BTreeMap<String, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    /// Responses in every phase, warm-up included: each one is an audited call.
    all_answered: u64,
}

#[derive(serde::Deserialize)]
struct Answer {
    decision: Option<String>,
}

struct Plan {
    client: Client,
    url: Url,
    auth: HeaderValue,
    body: String,
    measure_from: Instant,
    stop_at: Option<Instant>,
    requests: Option<u64>,
    issued: AtomicU64,
}

async fn run(args: Args) -> Result<Report, String> {
    let client = Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(args.timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let auth = HeaderValue::from_str(&format!("Bearer {}", args.token))
        .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let plan = Arc::new(Plan {
        client,
        url: args.url,
        auth,
        body: args.body,
        measure_from,
        stop_at: args.duration.map(|d| measure_from + d),
        requests: args.requests,
        issued: AtomicU64::new(0),
    });
    eprintln!(
        "loadgen: {} clients against {} ({} warm-up, {}{})",
        args.concurrency,
        plan.url,
        fmt_secs(args.warmup),
        args.duration
            .map(|d| format!("{} measured", fmt_secs(d)))
            .unwrap_or_default(),
        args.requests
            .map(|n| format!(
                "{}at most {n} requests",
                if args.duration.is_some() { ", " } else { "" }
            ))
            .unwrap_or_default(),
    );
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(client_loop(plan.clone())))
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        let tally = t.await.map_err(|e| format!("a client task failed: {e}"))?;
        total.latencies_ns.extend(tally.latencies_ns);
        for (k, v) in tally.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        for (k, v) in tally.decisions {
            *total.decisions.entry(k).or_default() += v;
        }
        total.transport_errors += tally.transport_errors;
        total.all_answered += tally.all_answered;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    Ok(Report::new(total, elapsed, args.concurrency))
}

async fn client_loop(plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    loop {
        let sent = Instant::now();
        if plan.stop_at.is_some_and(|t| sent >= t) {
            break;
        }
        let measured = sent >= plan.measure_from;
        if measured {
            if let Some(n) = plan.requests {
                if plan.issued.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
        }
        let result = plan
            .client
            .post(plan.url.clone())
            .header(AUTHORIZATION, plan.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(plan.body.clone())
            .send()
            .await;
        // The body is read in full: the answer is not complete until it has arrived.
        let outcome = match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                resp.bytes().await.map(|b| (status, b))
            }
            Err(e) => Err(e),
        };
        let latency = sent.elapsed();
        if outcome.is_ok() {
            tally.all_answered += 1;
        }
        if !measured {
            continue;
        }
        match outcome {
            Ok((status, bytes)) => {
                tally
                    .latencies_ns
                    .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                *tally.statuses.entry(status).or_default() += 1;
                let decision = serde_json::from_slice::<Answer>(&bytes)
                    .ok()
                    .and_then(|a| a.decision)
                    .unwrap_or_else(|| "(none)".to_owned());
                *tally.decisions.entry(decision).or_default() += 1;
            }
            Err(e) => {
                tally.transport_errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(e.to_string());
                }
            }
        }
    }
    tally
}

struct Report {
    concurrency: usize,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    statuses: BTreeMap<u16, u64>,
    decisions: BTreeMap<String, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    all_answered: u64,
    sorted_ns: Vec<u64>,
}

impl Report {
    fn new(mut t: Tally, elapsed: Duration, concurrency: usize) -> Report {
        t.latencies_ns.sort_unstable();
        let answered: u64 = t.statuses.values().sum();
        let not_ok: u64 = t
            .statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(_, n)| n)
            .sum();
        Report {
            concurrency,
            requests: answered + t.transport_errors,
            errors: not_ok + t.transport_errors,
            elapsed,
            statuses: t.statuses,
            decisions: t.decisions,
            transport_errors: t.transport_errors,
            first_error: t.first_error,
            all_answered: t.all_answered,
            sorted_ns: t.latencies_ns,
        }
    }

    /// Nearest-rank percentile over the answered requests.
    fn percentile(&self, q: f64) -> Option<Duration> {
        let n = self.sorted_ns.len();
        if n == 0 {
            return None;
        }
        let rank = (q * n as f64).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        self.sorted_ns.get(idx).map(|ns| Duration::from_nanos(*ns))
    }

    fn print(&self) {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        };
        let show = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), fmt_latency);
        println!("concurrency   {}", self.concurrency);
        println!("requests      {}", self.requests);
        println!("errors        {}", self.errors);
        println!("elapsed       {secs:.2} s");
        println!("throughput    {rate:.0} req/s");
        println!("p50           {}", show(self.percentile(0.50)));
        println!("p90           {}", show(self.percentile(0.90)));
        println!("p99           {}", show(self.percentile(0.99)));
        println!("p99.9         {}", show(self.percentile(0.999)));
        println!(
            "max           {}",
            show(self.sorted_ns.last().map(|ns| Duration::from_nanos(*ns)))
        );
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        println!("status        {}", statuses.join(", "));
        let decisions: Vec<String> = self
            .decisions
            .iter()
            .map(|(d, n)| format!("{d}: {n}"))
            .collect();
        println!("decisions     {}", decisions.join(", "));
        println!("answered      {} (warm-up included)", self.all_answered);
        if self.transport_errors > 0 {
            println!(
                "transport     {} failed; first: {}",
                self.transport_errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
    }
}

fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} us")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_hosts_that_are_not_loopback() {
        assert!(loopback_url("http://127.0.0.1:8480").is_ok());
        assert!(loopback_url("http://127.5.0.1:1/").is_ok());
        assert!(loopback_url("http://[::1]:8480").is_ok());
        assert!(loopback_url("http://10.0.0.1:8480").is_err());
        assert!(loopback_url("http://example.com").is_err());
        assert!(loopback_url("http://localhost:8480").is_err());
        assert!(loopback_url("https://127.0.0.1:8480").is_err());
    }

    #[test]
    fn a_bare_url_gets_the_check_path() {
        let u = loopback_url("http://127.0.0.1:8480").unwrap();
        assert_eq!(u.path(), "/v1/check");
        let u = loopback_url("http://127.0.0.1:8480/v1/check").unwrap();
        assert_eq!(u.path(), "/v1/check");
    }
}
