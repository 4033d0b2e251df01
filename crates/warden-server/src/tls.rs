//! TLS for the node's listeners, from PEM files named in `[server.tls]`, so tokens and
//! decisions do not cross a network in clear. Optional client certificates let a
//! deployment admit only agents' hosts that hold one.
//!
//! rustls with the ring provider: ring builds from its bundled C and assembly with `cc`
//! alone, where aws-lc-rs needs cmake and takes several times as long on a small machine.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use warden_core::config::TlsSettings;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("tls setup: {0}")]
    Config(String),
    #[error(transparent)]
    Secret(#[from] crate::setup::SetupError),
}

pub(crate) fn file_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_err(path, format!("cannot read the {what}: {e}")))
}

/// Reads the private key, refusing a file that group or others may read (the shared
/// check for every secret file).
fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::setup::read_secret(path)?
        .map(String::into_bytes)
        .ok_or_else(|| {
            file_err(
                path,
                "the key does not exist; name the certificate's private key (PEM)",
            )
        })
}

/// A certificate's private key from a PEM file that only its owner may read.
pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_key(path)?).map_err(|e| {
        file_err(
            path,
            format!("no usable private key ({e}); give the certificate's key in PEM (PKCS#8, PKCS#1 or SEC1)"),
        )
    })
}

pub(crate) fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("the {what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(
            path,
            format!("no `BEGIN CERTIFICATE` block; give the {what} in PEM"),
        ));
    }
    Ok(certs)
}

/// Builds the acceptor; every error names the file and what to put there.
pub fn acceptor(t: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(&t.cert, "certificate chain (leaf first)")?;
    let key = private_key(&t.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &t.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca, "client CA certificate")? {
                roots
                    .add(cert)
                    .map_err(|e| file_err(ca, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if t.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| file_err(ca, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        file_err(
            &t.key,
            format!(
                "does not go with the certificate in {} ({e}); give the key the certificate was issued for",
                t.cert.display()
            ),
        )
    })?;
    // The node speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
