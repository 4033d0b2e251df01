//! The HTTP MCP gateway toward upstream servers over TLS, with real parts: Warden on an
//! ephemeral port (the `examples/mcp` config) in front of an MCP server written here that
//! speaks HTTPS with rustls on its own ephemeral port, with certificates from rcgen CAs
//! made for each test. The upstream records every request it gets, so the tests see what
//! Warden sent: the call, and the `Warden-Assertion` that vouches for it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/example.rs"]
mod example;
#[path = "support/sockets.rs"]
mod sockets;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ed25519_dalek::Signature;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use warden_core::audit::EntryKind;
use warden_core::config::Settings;
use warden_core::identity::{public_key_from_file, Assertion, ASSERTION_LIFETIME_SECS};
use warden_server::Running;

use example::OPERATOR;
const AGENT: &str = "research-agent";
const ISSUER: &str = "warden-mcp-example";
const GENEROUS: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------- PKI

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `name` signed by this CA, and its key, in PEM.
    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

// ------------------------------------------------------------------ the upstream

/// What the upstream saw: each POST's headers and body, and the common name of the
/// client certificate on its connection, if any.
#[derive(Default)]
struct Seen {
    posts: Vec<(HeaderMap, Value, Option<String>)>,
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    fn url(&self) -> String {
        format!("https://{}/mcp", self.addr)
    }

    fn posts(&self) -> Vec<(HeaderMap, Value, Option<String>)> {
        self.seen.lock().unwrap().posts.clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer of a small MCP server: `initialize` and `echo`.
fn answer(msg: &Value) -> Value {
    let id = &msg["id"];
    let result = match msg["method"].as_str() {
        Some("initialize") => json!({"protocolVersion":"2025-06-18","capabilities":{"tools":{}},
                                     "serverInfo":{"name":"tls-upstream","version":"1"}}),
        Some("tools/call") => json!({"content":[{"type":"text",
            "text": format!("Echo: {}", msg["params"]["arguments"]["message"].as_str().unwrap_or(""))}]}),
        _ => json!({}),
    };
    json!({"jsonrpc":"2.0","id":id,"result":result})
}

/// An MCP server over HTTPS with a certificate for 127.0.0.1 from `server_ca`; with
/// `client_ca`, it refuses a client without a certificate from that CA.
async fn upstream(server_ca: &Ca, client_ca: Option<&Ca>) -> Upstream {
    let (cert, key) = server_ca.leaf("127.0.0.1");
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                // A refused handshake just ends the connection; the client sees why.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| common_name(c.first()?.as_ref()));
                let router = Router::new()
                    .route("/mcp", post(mcp))
                    .with_state((state, client));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                    .await;
            });
        }
    });
    Upstream { addr, seen, task }
}

/// The common name in a DER certificate, found by its OID (2.5.4.3) rather than parsed:
/// enough to tell which test certificate a client presented.
/// The subject's is the last one: the issuer's name comes first in a certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(oid.len()).rposition(|w| w == oid)? + oid.len();
    let len = *der.get(at + 1)? as usize;
    let name = der.get(at + 2..at + 2 + len)?;
    Some(String::from_utf8_lossy(name).into_owned())
}

async fn mcp(
    State((seen, client)): State<(Arc<Mutex<Seen>>, Option<String>)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let msg: Value = serde_json::from_slice(&body).unwrap();
    seen.lock()
        .unwrap()
        .posts
        .push((headers, msg.clone(), client));
    Json(answer(&msg)).into_response()
}

// ------------------------------------------------------------------------ Warden

/// The MCP example in a temporary folder, its `everything` server at `url` with the
/// `[[mcp_servers]]` lines `extra`.
fn prepare(url: &str, extra: &str) -> tempfile::TempDir {
    let files = ["warden.toml", "policy/mcp.cedar", "policy/mcp.cedarschema"];
    example::copy("mcp", &files, |text| {
        text.replace(
            "url = \"http://127.0.0.1:3001/mcp\"\n",
            &format!("url = \"{url}\"\n{extra}\n"),
        )
    })
}

async fn try_start(dir: &Path) -> Result<Running, warden_server::ServeError> {
    let text = std::fs::read_to_string(dir.join("warden.toml")).unwrap();
    let settings = Settings::from_toml(&text, "warden.toml", dir, &|_| None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    warden_server::start(settings, listener).await
}

struct Node {
    running: Running,
    http: reqwest::Client,
    token: String,
}

impl Node {
    async fn start(dir: &Path) -> Node {
        let running = match try_start(dir).await {
            Ok(r) => r,
            Err(e) => panic!("the node did not start: {e}"),
        };
        let http = reqwest::Client::builder()
            .timeout(GENEROUS)
            .build()
            .unwrap();
        let resp = http
            .post(format!(
                "http://{}/admin/v1/agents/{AGENT}/tokens",
                running.addr
            ))
            .bearer_auth(OPERATOR)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let token = resp.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        Node {
            running,
            http,
            token,
        }
    }

    /// POSTs one message to the gateway; the status and the JSON answer.
    async fn post(&self, msg: &Value, extra: &[(&str, &str)]) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("http://{}/mcp/everything", self.running.addr))
            .bearer_auth(&self.token)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2025-06-18")
            .body(msg.to_string());
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// `echo_entries` once `outcomes` outcomes are on the record: an outcome may be
    /// appended just after the answer went out.
    async fn echo_entries_with(&self, outcomes: usize) -> (Vec<String>, Vec<String>) {
        let deadline = tokio::time::Instant::now() + GENEROUS;
        loop {
            let entries = self.echo_entries();
            if entries.1.len() >= outcomes || tokio::time::Instant::now() > deadline {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The call ids of permitted `everything/echo` decisions and the statuses of outcomes.
    fn echo_entries(&self) -> (Vec<String>, Vec<String>) {
        let records = self.running.app.store.read_audit(0, 10_000).unwrap();
        let mut permits = Vec::new();
        let mut outcomes = Vec::new();
        for r in records
            .into_iter()
            .filter(|r| r.entry.action == "everything/echo")
        {
            match r.entry.kind {
                EntryKind::Decision if r.entry.decision == "permit" => {
                    permits.push(r.entry.call_id)
                }
                EntryKind::Outcome => outcomes.push(r.entry.decision),
                _ => {}
            }
        }
        (permits, outcomes)
    }
}

fn initialize(id: i64) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}})
}

fn echo(id: i64, message: &str) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
           "params":{"name":"echo","arguments":{"message":message}}})
}

/// The text of a tool result or the message of an error, whichever the answer has.
fn text_of(answer: &Value) -> String {
    let a = match answer {
        Value::Array(items) => &items[0],
        one => one,
    };
    a.pointer("/result/content/0/text")
        .or_else(|| a.pointer("/error/message"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("neither a result nor an error: {answer}"))
        .to_owned()
}

/// Checks a compact JWS with `warden.pub` alone, as an upstream would (Ed25519 over
/// `header.claims`), and returns its header and claims.
fn verify_assertion(jws: &str, public_key_file: &Path) -> (Value, Assertion) {
    let key = public_key_from_file(&std::fs::read_to_string(public_key_file).unwrap()).unwrap();
    let parts: Vec<&str> = jws.split('.').collect();
    assert_eq!(parts.len(), 3, "not a compact JWS: {jws}");
    let sig = Signature::from_slice(&B64.decode(parts[2]).unwrap()).unwrap();
    key.verify_strict(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("the assertion does not verify with warden.pub");
    let header: Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let claims: Assertion = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    (header, claims)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An upstream on a CA of its own and a node that trusts that CA (`ca_file`).
async fn private_upstream_and_node() -> (Upstream, tempfile::TempDir, Node) {
    let ca = Ca::new("upstream ca");
    let up = upstream(&ca, None).await;
    let dir = prepare(&up.url(), "ca_file = \"upstream-ca.pem\"");
    write(dir.path(), "upstream-ca.pem", &ca.pem(), 0o644);
    let node = Node::start(dir.path()).await;
    (up, dir, node)
}

// ------------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_on_a_private_ca_is_reached_and_sees_a_signed_assertion() {
    let (up, dir, node) = private_upstream_and_node().await;

    // A client's own assertion must not reach the upstream, as if Warden had signed it.
    let forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.";
    let (status, a) = node
        .post(&initialize(1), &[("warden-assertion", forged)])
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["result"]["serverInfo"]["name"], "tls-upstream");
    let (status, a) = node
        .post(&echo(2, "over tls"), &[("Warden-Assertion", forged)])
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(text_of(&a), "Echo: over tls");

    let posts = up.posts();
    assert_eq!(posts.len(), 2);
    let (permits, outcomes) = node.echo_entries_with(1).await;
    assert_eq!(permits.len(), 1);
    assert_eq!(outcomes, ["ok"]);
    let mut jtis = Vec::new();
    for (i, (headers, body, _)) in posts.iter().enumerate() {
        let values: Vec<_> = headers.get_all("warden-assertion").iter().collect();
        assert_eq!(values.len(), 1, "one assertion per request: {values:?}");
        let jws = values[0].to_str().unwrap();
        assert_ne!(jws, forged);
        let (header, claims) = verify_assertion(jws, &dir.path().join("warden.pub"));
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["typ"], "warden-assertion+jwt");
        let key = warden_server::setup::load_key(&dir.path().join("warden.key")).unwrap();
        assert_eq!(header["kid"], key.kid());
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.aud, up.url());
        assert_eq!(claims.sub, AGENT);
        assert_eq!(claims.exp - claims.iat, ASSERTION_LIFETIME_SECS);
        assert!(claims.iat.abs_diff(now_secs()) < 300, "iat {}", claims.iat);
        jtis.push(claims.jti.clone());
        if i == 0 {
            assert_eq!(body["method"], "initialize");
            assert_eq!(claims.call_id, None, "initialize carries no call");
        } else {
            assert_eq!(body["method"], "tools/call");
            assert_eq!(claims.call_id.as_ref(), Some(&permits[0]));
        }
    }
    assert_ne!(jtis[0], jtis[1]);
    node.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_file_a_private_upstream_is_refused_and_the_error_names_the_certificate_problem()
{
    let ca = Ca::new("upstream ca");
    let up = upstream(&ca, None).await;
    // The public roots built into Warden do not include a CA made a moment ago.
    let dir = prepare(&up.url(), "");
    let node = Node::start(dir.path()).await;
    let (status, a) = node.post(&echo(1, "anyone there?"), &[]).await;
    assert_eq!(status, 502, "{a}");
    let m = text_of(&a);
    assert!(
        m.contains("MCP server `everything` is unreachable")
            && m.contains("invalid peer certificate: UnknownIssuer"),
        "{m}"
    );
    assert!(up.posts().is_empty());
    // Permitted, then failed upstream: both on the record.
    let (permits, outcomes) = node.echo_entries_with(1).await;
    assert_eq!(
        (permits.len(), outcomes),
        (1, vec!["upstream-failed".into()])
    );
    node.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_named_in_the_error() {
    // A port nothing listens on: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = prepare(&format!("http://127.0.0.1:{port}/mcp"), "");
    let node = Node::start(dir.path()).await;
    let (status, a) = node.post(&echo(1, "anyone there?"), &[]).await;
    assert_eq!(status, 502, "{a}");
    let m = text_of(&a);
    assert!(m.contains("Connection refused"), "{m}");
    node.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_requires_a_client_certificate_admits_warden_only_with_one() {
    let ca = Ca::new("upstream ca");
    let clients = Ca::new("gateway client ca");
    let up = upstream(&ca, Some(&clients)).await;

    let dir = prepare(&up.url(), "ca_file = \"upstream-ca.pem\"");
    write(dir.path(), "upstream-ca.pem", &ca.pem(), 0o644);
    let node = Node::start(dir.path()).await;
    let (status, a) = node.post(&echo(1, "no certificate"), &[]).await;
    assert_eq!(status, 502, "{a}");
    let m = text_of(&a);
    assert!(m.contains("CertificateRequired"), "{m}");
    assert!(up.posts().is_empty());
    node.running.stop().await.unwrap();

    let (cert, key) = clients.leaf("warden-gateway");
    let dir = prepare(
        &up.url(),
        "ca_file = \"upstream-ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"",
    );
    write(dir.path(), "upstream-ca.pem", &ca.pem(), 0o644);
    write(dir.path(), "client.pem", &cert, 0o644);
    write(dir.path(), "client.key", &key, 0o600);
    let node = Node::start(dir.path()).await;
    let (status, a) = node.post(&echo(1, "with a certificate"), &[]).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(text_of(&a), "Echo: with a certificate");
    let posts = up.posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].2.as_deref(), Some("warden-gateway"));
    node.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_upstream_tls_files_stop_the_node_naming_the_file() {
    let ca = Ca::new("upstream ca");
    let (cert, key) = ca.leaf("warden-gateway");
    let tls = "ca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"";
    let dir = prepare("https://127.0.0.1:1/mcp", tls);
    let d = dir.path();
    write(d, "ca.pem", &ca.pem(), 0o644);
    write(d, "client.pem", &cert, 0o644);

    write(d, "client.key", &key, 0o644);
    let err = try_start(d).await.err().unwrap().to_string();
    let key_path = d.join("client.key").display().to_string();
    assert!(
        err.contains("`everything`") && err.contains(&key_path) && err.contains("chmod 600"),
        "{err}"
    );

    write(
        d,
        "client.key",
        &KeyPair::generate().unwrap().serialize_pem(),
        0o600,
    );
    let err = try_start(d).await.err().unwrap().to_string();
    assert!(
        err.contains(&key_path) && err.contains("does not go with the client certificate"),
        "{err}"
    );

    write(d, "client.key", &key, 0o600);
    std::fs::remove_file(d.join("ca.pem")).unwrap();
    let err = try_start(d).await.err().unwrap().to_string();
    assert!(
        err.contains(&d.join("ca.pem").display().to_string())
            && err.contains("cannot read the CA certificate"),
        "{err}"
    );

    write(d, "ca.pem", "not a certificate\n", 0o644);
    let err = try_start(d).await.err().unwrap().to_string();
    assert!(err.contains("ca.pem") && err.contains("PEM"), "{err}");

    // And with them all in order, it starts.
    write(d, "ca.pem", &ca.pem(), 0o644);
    try_start(d).await.unwrap().stop().await.unwrap();
}

/// Nagle's algorithm on the gateway's side would hold a request's last small segment
/// until the upstream's delayed ACK (about 40 ms a call). reqwest 0.12 already turns it
/// off by default; the gateway says so itself, and this pins it whatever the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_connections_to_the_upstream_have_nodelay() {
    let (up, _dir, node) = private_upstream_and_node().await;
    let (status, a) = node.post(&echo(1, "hello"), &[]).await;
    assert_eq!(status, 200, "{a}");
    // The gateway keeps its connection to the upstream alive for the next call.
    let toward_upstream: Vec<_> = sockets::connected()
        .into_iter()
        .filter(|s| s.peer == up.addr)
        .collect();
    assert!(!toward_upstream.is_empty(), "no connection to the upstream");
    assert!(
        toward_upstream.iter().all(|s| s.nodelay),
        "{toward_upstream:?}"
    );
    node.running.stop().await.unwrap();
}
