//! The HTTP clients Warden builds toward other servers: the HTTP MCP gateway's upstream
//! servers (`[[mcp_servers]]` with a `url`) and a remote `warden serve` asked by
//! `warden mcp-proxy --server` ([`crate::gate::RemoteGate`]).
//!
//! TLS is rustls with the ring provider, as on the listeners. Trust anchors:
//! - by default the Mozilla roots compiled into the binary (`webpki-roots`), not the
//!   host's store: a node must run on nothing but its binary (a bare container has no
//!   `/etc/ssl`), and the set it trusts is the same on every host, not whatever a host's
//!   administrator or distribution added;
//! - with `ca_file`, only the CAs in that file. It replaces the public roots rather than
//!   adding to them, as curl's `--cacert` does: an upstream on a private CA is then
//!   pinned to that CA, and no public CA can vouch for a server of that name.
//!
//! A client certificate (`client_cert` + `client_key`) is presented when the upstream asks
//! for one; the key file is read with the checks of every secret (`chmod 600`).
//!
//! Every client sets `TCP_NODELAY`: a request or answer that ends in a small segment must
//! not wait for the peer's delayed ACK (about 40 ms per exchange with Nagle's algorithm
//! on). Redirects are not followed: the target is a configured URL, not something to be
//! talked into leaving.
//!
//! An upstream learns that a request came from Warden from the `Warden-Assertion`
//! header ([`UpstreamClients::assertion`]): a compact JWS signed with the node's token
//! key, which the upstream checks with `warden.pub`.
//!
//! Errors from a client are shown with their causes ([`error_chain`]): "error sending
//! request" alone hides whether the certificate, the network or the server failed.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use rustls::{ClientConfig, RootCertStore};
use warden_core::clock::Clock;
use warden_core::config::{Settings, UpstreamTls};
use warden_core::identity::{Assertion, SigningKeyPair, ASSERTION_TYP};

use crate::ids::random_hex;
use crate::tls::{certs, file_err, private_key, TlsError};

/// The header that carries a request's [`Assertion`] to an upstream MCP server. A client's
/// own header of this name never reaches the upstream.
pub const ASSERTION_HEADER: &str = "warden-assertion";

/// How long opening a connection (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An MCP server's TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
#[error("[[mcp_servers]] `{server}`: {source}")]
pub struct UpstreamError {
    pub server: String,
    #[source]
    pub source: TlsError,
}

/// `e` and every error under it, each cause once: "error sending request for url (...):
/// client error (Connect): invalid peer certificate: UnknownIssuer".
pub fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some layers repeat their cause in their own message; say it once.
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The rustls configuration of a client: whom to trust, what to present.
pub fn client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let roots = match &tls.ca_file {
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        Some(ca) => ca_roots(ca)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = certs(&id.cert, "client certificate chain (leaf first)")?;
            let key = private_key(&id.key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                file_err(
                    &id.key,
                    format!(
                        "does not go with the client certificate in {} ({e}); give the key the certificate was issued for",
                        id.cert.display()
                    ),
                )
            })?
        }
    };
    // The clients speak HTTP/1.1 only (reqwest is built without HTTP/2).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn ca_roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| file_err(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A client builder with what every outgoing client of Warden has: its TLS, no Nagle
/// delay, no redirects, a bound on connecting. Callers add their own timeouts.
pub fn builder(tls: &UpstreamTls) -> Result<reqwest::ClientBuilder, TlsError> {
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(client_config(tls)?)
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none()))
}

fn build(b: reqwest::ClientBuilder) -> Result<reqwest::Client, TlsError> {
    b.build()
        .map_err(|e| TlsError::Config(format!("cannot build an HTTP client: {}", error_chain(&e))))
}

/// Signs the assertions; only a node that holds the token key has one.
struct Signer {
    key: SigningKeyPair,
    issuer: String,
    clock: Arc<dyn Clock>,
}

/// The HTTP MCP gateway's clients, one per upstream server, and the node's signature for
/// what it sends them.
pub struct UpstreamClients {
    clients: HashMap<String, reqwest::Client>,
    signer: Option<Signer>,
}

impl UpstreamClients {
    /// Builds a client for every `[[mcp_servers]]` entry with a `url`, reading its CA,
    /// certificate and key files now, so a missing, malformed or exposed file stops the
    /// node at start with the file's name. Servers without TLS settings of their own share
    /// one client.
    ///
    /// No overall timeout: SSE streams live as long as the calls they carry, and each
    /// call's own timeout is enforced by the gateway.
    pub fn new(
        settings: &Settings,
        key: SigningKeyPair,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, UpstreamError> {
        let mut shared: Option<reqwest::Client> = None;
        let mut clients = HashMap::new();
        for (name, server) in &settings.mcp_servers {
            if server.url.is_none() {
                continue;
            }
            let fail = |source| UpstreamError {
                server: name.clone(),
                source,
            };
            let client = if server.tls == UpstreamTls::default() {
                match &shared {
                    Some(c) => c.clone(),
                    None => {
                        let c = build(builder(&server.tls).map_err(fail)?).map_err(fail)?;
                        shared.insert(c).clone()
                    }
                }
            } else {
                build(builder(&server.tls).map_err(fail)?).map_err(fail)?
            };
            clients.insert(name.clone(), client);
        }
        Ok(Self {
            clients,
            signer: Some(Signer {
                key,
                issuer: settings.issuer.clone(),
                clock,
            }),
        })
    }

    /// For a process that serves no HTTP gateway (the embedded `warden mcp-proxy`): it
    /// reads no upstream's files and holds no key to sign with.
    pub fn none() -> Self {
        Self {
            clients: HashMap::new(),
            signer: None,
        }
    }

    /// The client for the upstream server `name`.
    pub fn for_server(&self, name: &str) -> Result<reqwest::Client, String> {
        self.clients
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no HTTP client for MCP server `{name}` on this node"))
    }

    /// What a request to `server` needs: its client and a fresh assertion (see
    /// [`UpstreamClients::assertion`]).
    pub fn for_request(
        &self,
        server: &str,
        audience: &str,
        agent_id: &str,
        call_id: Option<&str>,
    ) -> Result<(reqwest::Client, HeaderValue), String> {
        Ok((
            self.for_server(server)?,
            self.assertion(audience, agent_id, call_id)?,
        ))
    }

    /// A `Warden-Assertion` value: this node sends the request to `audience` (the
    /// upstream's configured URL) for `agent_id`, carrying the permitted call `call_id` if
    /// any. Valid for [`warden_core::identity::ASSERTION_LIFETIME_SECS`].
    pub fn assertion(
        &self,
        audience: &str,
        agent_id: &str,
        call_id: Option<&str>,
    ) -> Result<HeaderValue, String> {
        let s = self
            .signer
            .as_ref()
            .ok_or("this process holds no signing key to vouch for its requests")?;
        let jti = random_hex(16).map_err(|e| format!("cannot get randomness from the OS: {e}"))?;
        let claims = Assertion::new(
            &s.issuer,
            audience,
            agent_id,
            call_id,
            jti,
            s.clock.now_ns(),
        );
        HeaderValue::from_str(&s.key.sign_typed(ASSERTION_TYP, &claims))
            .map_err(|e| format!("cannot put the assertion in a header: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for Layer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn StdError + 'static))
        }
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        let e = Layer(
            "error sending request",
            Some(Box::new(Layer(
                "client error (Connect)",
                Some(Box::new(Layer(
                    "tcp connect error",
                    Some(Box::new(Layer("Connection refused (os error 111)", None))),
                ))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
        let repeating = Layer(
            "io: invalid peer certificate: UnknownIssuer",
            Some(Box::new(Layer(
                "invalid peer certificate: UnknownIssuer",
                None,
            ))),
        );
        assert_eq!(
            error_chain(&repeating),
            "io: invalid peer certificate: UnknownIssuer"
        );
    }
}
