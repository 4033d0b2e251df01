//! The node's listeners under hostile or careless peers, and TLS: the real server on an
//! ephemeral port, driven over raw sockets and over HTTPS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/example.rs"]
mod example;
#[path = "support/sockets.rs"]
mod sockets;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden_core::config::Settings;
use warden_server::Running;

use example::OPERATOR;
/// Long enough that a loaded machine still makes it; the timeouts under test are 1 s.
const GENEROUS: Duration = Duration::from_secs(15);

/// The claims example in a temporary folder, with `server` added to its `[server]` table
/// and `tables` (e.g. `[server.tls]`) after it.
fn prepare(server: &str, tables: &str) -> tempfile::TempDir {
    let files = [
        "warden.toml",
        "policy/warden.cedarschema",
        "policy/claims.cedar",
        "policy/database.cedar",
    ];
    example::copy("claims", &files, |text| {
        text.replace("[server]\n", &format!("[server]\n{server}\n"))
            .replace("[store]\n", &format!("{tables}\n[store]\n"))
    })
}

fn settings(dir: &Path) -> Settings {
    let text = std::fs::read_to_string(dir.join("warden.toml")).unwrap();
    Settings::from_toml(&text, "warden.toml", dir, &|_| None).unwrap()
}

async fn try_start(dir: &Path) -> Result<Running, warden_server::ServeError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    warden_server::start(settings(dir), listener).await
}

async fn start(dir: &Path) -> Running {
    match try_start(dir).await {
        Ok(r) => r,
        Err(e) => panic!("the node did not start: {e}"),
    }
}

/// Reads until the peer closes; the bytes read, or `None` if it was still open at the
/// deadline.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| all)
}

/// Reads one response with a `Content-Length` body; its head and body as text.
async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("no content-length");
            if got.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(GENEROUS, s.read(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        assert!(n > 0, "closed mid-response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + GENEROUS;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_half_header_is_disconnected_after_the_header_timeout() {
    let dir = prepare(
        "header_timeout = \"1s\"\nidle_timeout = \"1h\"\nrequest_timeout = \"1h\"",
        "",
    );
    let node = start(dir.path()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: warden\r\nX-Slow: ")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut s, GENEROUS).await.is_some(),
        "a half-sent header held its connection open"
    );
    // A client that says nothing at all is held to the same bound.
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    assert!(read_until_closed(&mut silent, GENEROUS).await.is_some());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_header_after_a_keep_alive_request_is_held_to_the_header_timeout() {
    // The idle timeout is long; the header timeout must start at the next request's first
    // byte, not wait for the idle one.
    let dir = prepare(
        "header_timeout = \"1s\"\nidle_timeout = \"1h\"\nrequest_timeout = \"1h\"",
        "",
    );
    let node = start(dir.path()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: warden\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: war")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut s, GENEROUS).await.is_some(),
        "a half-sent second header held its connection open"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_never_finishes_gets_408_after_the_request_timeout() {
    let dir = prepare(
        "header_timeout = \"1h\"\nidle_timeout = \"1h\"\nrequest_timeout = \"1s\"",
        "",
    );
    let node = start(dir.path()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(
        b"POST /v1/check HTTP/1.1\r\nHost: warden\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"tool\": ",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut s, GENEROUS)
        .await
        .expect("a half-sent body held its connection open");
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 408"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_request_body_is_held_to_the_request_timeout_too() {
    let dir = prepare(
        "header_timeout = \"1h\"\nidle_timeout = \"1h\"\nrequest_timeout = \"1s\"",
        "",
    );
    let node = start(dir.path()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(
        b"POST /mcp/anything HTTP/1.1\r\nHost: warden\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"jsonrpc\": ",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut s, GENEROUS)
        .await
        .expect("a half-sent MCP body held its connection open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 4"), "{text}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let dir = prepare(
        "header_timeout = \"1h\"\nidle_timeout = \"1s\"\nrequest_timeout = \"1h\"",
        "",
    );
    let node = start(dir.path()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: warden\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s, GENEROUS)
        .await
        .expect("an idle keep-alive connection stayed open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_do_not_starve_a_health_prober() {
    let dir = prepare(
        "header_timeout = \"1h\"\nidle_timeout = \"1h\"\nmax_connections = 20\nmax_connections_per_ip = 10",
        "",
    );
    let node = start(dir.path()).await;
    let closed = Arc::new(AtomicUsize::new(0));
    for _ in 0..30 {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        let closed = closed.clone();
        tokio::spawn(async move {
            if read_until_closed(&mut s, Duration::from_secs(3600))
                .await
                .is_some()
            {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let prober = reqwest::Client::builder()
        .timeout(GENEROUS)
        .build()
        .unwrap();
    let r = prober
        .get(format!("http://{}/healthz", node.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // One address holds at most 10 connections (the prober's among them), so at least 20
    // of the 30 idle ones were closed to make room.
    wait_for("idle connections beyond the cap stayed open", || {
        closed.load(Ordering::SeqCst) >= 20
    })
    .await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_at_its_cap_evicts_only_its_own_connections() {
    let dir = prepare(
        "header_timeout = \"1h\"\nidle_timeout = \"1h\"\nmax_connections = 20\nmax_connections_per_ip = 5",
        "",
    );
    let node = start(dir.path()).await;
    let from = |ip: [u8; 4]| {
        let addr = node.addr;
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from((ip, 0))).unwrap();
            sock.connect(addr).await.unwrap()
        }
    };
    let mut quiet = Vec::new();
    for _ in 0..5 {
        quiet.push(from([127, 0, 0, 1]).await);
    }
    let closed = Arc::new(AtomicUsize::new(0));
    for _ in 0..30 {
        let mut s = from([127, 0, 0, 2]).await;
        let closed = closed.clone();
        tokio::spawn(async move {
            if read_until_closed(&mut s, Duration::from_secs(3600))
                .await
                .is_some()
            {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    wait_for("the flooding address kept more than its cap", || {
        closed.load(Ordering::SeqCst) >= 25
    })
    .await;
    // Every admission has happened by now; the other address's connections are intact.
    for s in &quiet {
        let mut buf = [0u8; 1];
        let r = s.try_read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a connection from another address was closed: {r:?}"
        );
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_admin_listen_the_admin_api_is_served_only_on_the_admin_port() {
    let dir = prepare("admin_listen = \"127.0.0.1:0\"", "");
    let node = start(dir.path()).await;
    let admin = node.admin_addr.expect("no admin listener");
    let http = reqwest::Client::new();
    let get = |addr: SocketAddr, path: &str| {
        http.get(format!("http://{addr}{path}"))
            .bearer_auth(OPERATOR)
            .send()
    };
    let r = get(node.addr, "/admin/v1/agents").await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = get(admin, "/admin/v1/agents").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for addr in [node.addr, admin] {
        let r = get(addr, "/healthz").await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{addr}");
    }
    // The agent plane is not on the admin port.
    let r = http
        .post(format!("http://{admin}/v1/check"))
        .json(&json!({"tool": "get_claim", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    node.stop().await.unwrap();
}

/// Small answers must not wait for the client's delayed ACK (Nagle's algorithm would hold
/// the last segment of a response for about 40 ms): every accepted socket has
/// `TCP_NODELAY`, on both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_have_nodelay_on_both_listeners() {
    let dir = prepare("admin_listen = \"127.0.0.1:0\"", "");
    let node = start(dir.path()).await;
    let admin = node.admin_addr.unwrap();
    for addr in [node.addr, admin] {
        let client = TcpStream::connect(addr).await.unwrap();
        let mine = client.local_addr().unwrap();
        // The accept loop takes the connection in its own time.
        let deadline = tokio::time::Instant::now() + GENEROUS;
        let accepted = loop {
            let found: Vec<_> = sockets::connected()
                .into_iter()
                .filter(|s| s.local == addr && s.peer == mine)
                .collect();
            if !found.is_empty() {
                break found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{addr} never accepted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(accepted.iter().all(|s| s.nodelay), "{accepted:?}");
        // And the test's own end keeps the default, so the check can tell them apart.
        assert!(!client.nodelay().unwrap());
    }
    node.stop().await.unwrap();
}

// ------------------------------------------------------------------------------ TLS

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "warden test ca");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("127.0.0.1");
    let (client_cert, client_key) = leaf("claims-processor-v3");
    Pki {
        ca: ca_cert.pem(),
        server_cert,
        server_key,
        client: format!("{client_cert}{client_key}"),
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A node serving TLS with `pki`'s server certificate; `client_ca` adds the CA for client
/// certificates with `require_client_cert` as given.
fn prepare_tls(pki: &Pki, client_ca: Option<bool>) -> tempfile::TempDir {
    let mut table = "[server.tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n".to_owned();
    if let Some(require) = client_ca {
        table += &format!("client_ca = \"ca.pem\"\nrequire_client_cert = {require}\n");
    }
    let dir = prepare("", &table);
    write(dir.path(), "ca.pem", &pki.ca, 0o644);
    write(dir.path(), "server.pem", &pki.server_cert, 0o644);
    write(dir.path(), "server.key", &pki.server_key, 0o600);
    dir
}

fn https_client(pki: &Pki, with_cert: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(GENEROUS)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.as_bytes()).unwrap());
    if with_cert {
        b = b.identity(reqwest::Identity::from_pem(pki.client.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_health_and_decisions_and_refuses_plain_http() {
    let pki = pki();
    let dir = prepare_tls(&pki, None);
    let node = start(dir.path()).await;
    let base = format!("https://{}", node.addr);
    let http = https_client(&pki, false);

    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http
        .post(format!("{base}/admin/v1/agents/claims-processor-v3/tokens"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = http
        .post(format!("{base}/v1/check"))
        .bearer_auth(&token)
        .json(
            &json!({"tool": "get_claim", "params": {"claim_id": "CLM-1001"},
                      "context": {"rationale": "customer asked"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["decision"], "permit");

    let plain = reqwest::Client::builder()
        .timeout(GENEROUS)
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://{}/healthz", node.addr))
        .send()
        .await;
    assert!(r.is_err(), "plain HTTP was answered on the TLS port: {r:?}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_required_client_certificates_refuses_a_client_without_one() {
    let pki = pki();
    let dir = prepare_tls(&pki, Some(true));
    let node = start(dir.path()).await;
    let url = format!("https://{}/healthz", node.addr);
    let r = https_client(&pki, false).get(&url).send().await;
    assert!(
        r.is_err(),
        "a client without a certificate was served: {r:?}"
    );
    let r = https_client(&pki, true).get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    node.stop().await.unwrap();

    // Optional client certificates: both are served.
    let dir = prepare_tls(&pki, Some(false));
    let node = start(dir.path()).await;
    let url = format!("https://{}/healthz", node.addr);
    for with_cert in [false, true] {
        let r = https_client(&pki, with_cert)
            .get(&url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_to_start_with_an_exposed_key_or_a_bad_certificate() {
    let pki = pki();
    let dir = prepare_tls(&pki, None);
    let key = dir.path().join("server.key");
    write(dir.path(), "server.key", &pki.server_key, 0o640);
    let err = try_start(dir.path()).await.err().unwrap().to_string();
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );

    write(dir.path(), "server.key", &pki.server_key, 0o600);
    write(dir.path(), "server.pem", "not a certificate\n", 0o644);
    let err = try_start(dir.path()).await.err().unwrap().to_string();
    assert!(
        err.contains(&dir.path().join("server.pem").display().to_string()) && err.contains("PEM"),
        "{err}"
    );

    // A key that is not the certificate's.
    write(dir.path(), "server.pem", &pki.server_cert, 0o644);
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    write(dir.path(), "server.key", &other, 0o600);
    let err = try_start(dir.path()).await.err().unwrap().to_string();
    assert!(err.contains("does not go with the certificate"), "{err}");
}
