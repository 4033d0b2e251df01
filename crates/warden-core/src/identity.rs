//! Agents as principals and their credentials.
//!
//! Every agent is its own principal (id, owner, trust tier, tool scopes, rotation policy,
//! status) and authenticates with its own short-lived credential: a compact JWS signed
//! with Ed25519 (`alg: EdDSA`), carrying the agent id, scopes, tier, expiry and a unique
//! id (`jti`) so it can be revoked. Only EdDSA is accepted, whatever the header says, so
//! `alg: none` and algorithm-confusion tokens are refused before any key is touched.
//!
//! A valid signature is not enough: a token is accepted only if the store issued its
//! `jti` to the agent it names, with the same issue and expiry times ([`check_issued`]),
//! and only while its lifetime fits the agent's rotation period. So whoever holds the key
//! cannot mint a token the store never recorded, and every accepted token can be revoked.
//! Header parameters marked critical (`crit`) are refused, as RFC 7515 requires of a
//! verifier that implements none of them.
//!
//! Verifying a signature costs tens of microseconds; the [`Verifier`] caches tokens whose
//! signature it has checked, keyed by the whole token text, so the check path pays a hash
//! lookup. Expiry, issuance, revocation and the agent's status are checked on every call,
//! cached or not.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
/// The public half of a signing key: what a process that only checks tokens holds.
pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::{Nanos, NANOS_PER_SEC};
use crate::decision::Reason;
use crate::store::{Acting, ControlChange, Credential};

/// The audience every agent token carries; a token for another audience is refused.
pub const AGENT_AUDIENCE: &str = "warden-agent";
/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated on `iat` (the issuing host's clock may run a little ahead).
const LEEWAY_SECS: u64 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentStatus {
    Active,
    /// Stopped by an operator for now: its credentials stay recorded but are refused
    /// (`AGENT_SUSPENDED`) until it is resumed, and it is issued no new ones.
    Suspended,
    /// Every credential of the agent is revoked; it cannot be issued new ones.
    Revoked,
    /// Taken out of service for good (`AGENT_RETIRED`): no status change leads back.
    Retired,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Suspended => "suspended",
            AgentStatus::Revoked => "revoked",
            AgentStatus::Retired => "retired",
        }
    }
    pub fn parse(s: &str) -> Option<AgentStatus> {
        match s {
            "active" => Some(AgentStatus::Active),
            "suspended" => Some(AgentStatus::Suspended),
            "revoked" => Some(AgentStatus::Revoked),
            "retired" => Some(AgentStatus::Retired),
            _ => None,
        }
    }

    /// Whether an operator may move an agent from `self` to `to`; the store checks it
    /// inside the transaction that changes the status, so two operators cannot race past
    /// it. Only a suspension is undone: a revoked agent's tokens stay void (un-revoking
    /// would bring back every credential it ever held), and retirement is final.
    /// `Err` says why not, for the operator.
    pub fn may_become(self, to: AgentStatus) -> Result<(), String> {
        use AgentStatus::*;
        match (self, to) {
            (Active, Suspended | Revoked | Retired)
            | (Suspended, Active | Revoked | Retired)
            | (Revoked, Revoked | Retired) => Ok(()),
            (Retired, _) => Err("it is retired, and retirement is final; register a new agent instead".into()),
            (Revoked, _) => Err("it is revoked, which is final for its credentials; retire it, or register a new agent".into()),
            (Active, Active) => Err("it is active, not suspended; nothing to resume".into()),
            (Suspended, Suspended) => Err("it is already suspended; `warden agent resume` undoes that".into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub id: String,
    pub owner: String,
    pub tier: u8,
    pub scopes: BTreeSet<String>,
    /// Lifetime of each credential issued to this agent.
    pub rotation_ns: Nanos,
    pub status: AgentStatus,
}

/// Agent ids appear in Cedar entity ids, URLs and log lines: keep them plain.
pub fn validate_agent_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a valid agent id; use 1 to 128 letters, digits and - _ . : @"
        ))
    }
}

/// The claims of an agent token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    /// Seconds since the epoch, as JWT has it.
    pub iat: u64,
    pub exp: u64,
    /// Not valid before (seconds since the epoch). Warden does not set it; a token that
    /// carries it is held to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub jti: String,
    pub owner: String,
    pub tier: u8,
    pub scopes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    /// Present (with any value, `null` included) means refused: see [`present`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    crit: Option<serde_json::Value>,
}

/// `Some` whenever the field is there, even as `null`, which serde's default for `Option`
/// would read as absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CredentialError {
    pub reason: Reason,
    pub message: String,
}

impl CredentialError {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file is not `ed25519:<64 hex digits>`")]
    Format,
    #[error("public key file is not `ed25519-public:<64 hex digits>`")]
    PublicFormat,
    #[error("public key file line {0} is not `ed25519-public:<64 hex digits>` with an optional ` until=<seconds since the epoch>`")]
    PublicLine(usize),
    #[error("public key file holds no current key: its first line must have no `until`")]
    NoCurrentKey,
}

/// One key of the set that verifies agent tokens: the current key, or one a key rotation
/// retired, which verifies until `until` (seconds since the epoch) and is refused from
/// then on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub key: VerifyingKey,
    pub until: Option<u64>,
}

impl PublicKey {
    pub fn current(key: VerifyingKey) -> Self {
        Self { key, until: None }
    }
    pub fn kid(&self) -> String {
        key_id(&self.key)
    }
    /// The raw key in base64url without padding: a JWK's `x` (RFC 8037).
    pub fn x(&self) -> String {
        B64.encode(self.key.as_bytes())
    }
    /// Whether it still verifies at `now`.
    pub fn valid_at(&self, now: Nanos) -> bool {
        self.until.is_none_or(|u| now / NANOS_PER_SEC < u)
    }
}

/// Parses a public key file (`warden.pub`): one key per line, the current key first
/// (`ed25519-public:<hex>`), then keys a rotation retired, each with the time it stops
/// verifying (`ed25519-public:<hex> until=<seconds>`). A file of one line, as older
/// versions wrote, is a set of one.
pub fn public_keys_from_file(text: &str) -> Result<Vec<PublicKey>, KeyError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().map(str::trim).enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = || KeyError::PublicLine(i + 1);
        let mut words = line.split_whitespace();
        let key = words
            .next()
            .ok_or_else(bad)
            .and_then(|k| public_key_from_line(k).map_err(|_| bad()))?;
        let until = match words.next() {
            None => None,
            Some(w) => Some(
                w.strip_prefix("until=")
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(bad)?,
            ),
        };
        if words.next().is_some() {
            return Err(bad());
        }
        keys.push(PublicKey { key, until });
    }
    match keys.first() {
        Some(k) if k.until.is_none() => Ok(keys),
        _ => Err(KeyError::NoCurrentKey),
    }
}

/// The text of a public key file holding `keys`, the current one first.
pub fn public_keys_to_file(keys: &[PublicKey]) -> String {
    keys.iter()
        .map(|k| {
            let hex_key = hex::encode(k.key.to_bytes());
            match k.until {
                None => format!("ed25519-public:{hex_key}\n"),
                Some(u) => format!("ed25519-public:{hex_key} until={u}\n"),
            }
        })
        .collect()
}

/// The current key of a public key file (its first line): what signs new tokens and
/// gateway assertions. See [`public_keys_from_file`] for the whole set.
pub fn public_key_from_file(text: &str) -> Result<VerifyingKey, KeyError> {
    public_keys_from_file(text)
        .map_err(|_| KeyError::PublicFormat)
        .map(|keys| keys.into_iter().next().map(|k| k.key))?
        .ok_or(KeyError::PublicFormat)
}

fn public_key_from_line(text: &str) -> Result<VerifyingKey, KeyError> {
    let hex_key = text
        .trim()
        .strip_prefix("ed25519-public:")
        .ok_or(KeyError::PublicFormat)?;
    let bytes = hex::decode(hex_key).map_err(|_| KeyError::PublicFormat)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::PublicFormat)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::PublicFormat)
}

/// An Ed25519 signing key with its key id (a fingerprint of the public key).
#[derive(Clone)]
pub struct SigningKeyPair {
    key: SigningKey,
    kid: String,
}

impl std::fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKeyPair {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let kid = key_id(&key.verifying_key());
        Self { key, kid }
    }

    /// Parses the key file's text: `ed25519:<hex seed>`.
    pub fn from_key_file(text: &str) -> Result<Self, KeyError> {
        let hex_seed = text
            .trim()
            .strip_prefix("ed25519:")
            .ok_or(KeyError::Format)?;
        let bytes = hex::decode(hex_seed).map_err(|_| KeyError::Format)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Format)?;
        Ok(Self::from_seed(seed))
    }

    pub fn to_key_file(&self) -> String {
        format!("ed25519:{}\n", hex::encode(self.key.to_bytes()))
    }

    /// The text of the public key file that goes beside the key file.
    pub fn to_public_key_file(&self) -> String {
        format!(
            "ed25519-public:{}\n",
            hex::encode(self.key.verifying_key().to_bytes())
        )
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs an agent token's claims into a compact JWS.
    pub fn sign(&self, claims: &Claims) -> String {
        self.sign_typed("JWT", claims)
    }

    /// Signs `claims` into a compact JWS whose header says `typ`, so a verifier can tell
    /// one kind of token from another before reading the claims (RFC 8725, 3.11).
    pub fn sign_typed<C: Serialize>(&self, typ: &str, claims: &C) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            kid: Some(self.kid.clone()),
            typ: Some(typ.into()),
            crit: None,
        };
        // Serializing these plain structs cannot fail; an empty object would only make
        // the token unverifiable, never more permissive.
        let h = B64.encode(serde_json::to_vec(&header).unwrap_or_default());
        let c = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{h}.{c}");
        let sig = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig.to_bytes()))
    }
}

/// How audit entries and kill switches name the holder of an operator token:
/// `operator:` and the first 8 hex digits of the token's SHA-256. Stable for one token,
/// tells tokens apart once there are several, and reveals nothing usable of the token.
pub fn operator_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("operator:{}", hex::encode(&digest[..4]))
}

fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// The JWS `typ` of a [`Assertion`]: never `JWT`, so neither Warden nor an upstream can
/// take one for an agent token or the other way round.
pub const ASSERTION_TYP: &str = "warden-assertion+jwt";
/// How long an upstream may accept an assertion: one request's worth, with room for
/// clock skew between the two hosts.
pub const ASSERTION_LIFETIME_SECS: u64 = 60;

/// What the HTTP MCP gateway tells an upstream server about a request it forwards: this
/// node (`iss`) sent it to this server (`aud`) on behalf of this agent (`sub`), and, when
/// the request carries one that policy permitted (a tools/call or another governed
/// method), under which decision (`call_id`, the id in the audit trail). Signed with the node's token key, so an
/// upstream checks it with `warden.pub`; `jti` is unique, for upstreams that refuse
/// replays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assertion {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

impl Assertion {
    /// An assertion issued at `now`, valid for [`ASSERTION_LIFETIME_SECS`].
    pub fn new(
        issuer: &str,
        audience: &str,
        agent_id: &str,
        call_id: Option<&str>,
        jti: String,
        now: Nanos,
    ) -> Self {
        let iat = now / NANOS_PER_SEC;
        Assertion {
            iss: issuer.to_owned(),
            aud: audience.to_owned(),
            sub: agent_id.to_owned(),
            iat,
            exp: iat.saturating_add(ASSERTION_LIFETIME_SECS),
            jti,
            call_id: call_id.map(str::to_owned),
        }
    }
}

/// Builds the claims for a new credential of `agent`, valid from `now` for the agent's
/// rotation period.
pub fn new_claims(issuer: &str, agent: &Agent, jti: String, now: Nanos) -> Claims {
    let iat = now / NANOS_PER_SEC;
    Claims {
        iss: issuer.to_owned(),
        sub: agent.id.clone(),
        aud: AGENT_AUDIENCE.to_owned(),
        iat,
        exp: iat.saturating_add(agent.rotation_ns / NANOS_PER_SEC),
        nbf: None,
        jti,
        owner: agent.owner.clone(),
        tier: agent.tier,
        scopes: agent.scopes.iter().cloned().collect(),
    }
}

/// A token's claims, once its signature checked, and the `until` of the key that signed it.
type Verified = (Arc<Claims>, Option<u64>);

/// Checks signatures and claims of agent tokens, with a cache of verified tokens.
pub struct Verifier {
    issuer: String,
    keys: HashMap<String, PublicKey>,
    /// Each token whose signature checked, with the `until` of the key that signed it,
    /// so a key's retirement holds for cached tokens too.
    cache: RwLock<HashMap<String, Verified>>,
    cache_cap: usize,
}

impl Verifier {
    /// A verifier of tokens signed by any of `keys`, all current.
    pub fn new(
        issuer: impl Into<String>,
        keys: impl IntoIterator<Item = VerifyingKey>,
        cache_cap: usize,
    ) -> Self {
        Self::with_keys(issuer, keys.into_iter().map(PublicKey::current), cache_cap)
    }

    /// A verifier of tokens signed by any of `keys`, each until its `until`.
    pub fn with_keys(
        issuer: impl Into<String>,
        keys: impl IntoIterator<Item = PublicKey>,
        cache_cap: usize,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            keys: keys.into_iter().map(|k| (k.kid(), k)).collect(),
            cache: RwLock::new(HashMap::new()),
            cache_cap,
        }
    }

    /// The keys that verify tokens at `now`, by key id (for the JWKS), in kid order.
    pub fn keys_at(&self, now: Nanos) -> Vec<(&str, &PublicKey)> {
        let mut keys: Vec<(&str, &PublicKey)> = self
            .keys
            .iter()
            .filter(|(_, k)| k.valid_at(now))
            .map(|(kid, k)| (kid.as_str(), k))
            .collect();
        keys.sort_by_key(|(kid, _)| *kid);
        keys
    }

    /// Verifies a token's signature, issuer, audience and validity window at `now`.
    /// Revocation and the agent's status are the caller's to check.
    pub fn verify(&self, token: &str, now: Nanos) -> Result<Arc<Claims>, CredentialError> {
        let cached = self.cache.read().ok().and_then(|c| c.get(token).cloned());
        let (claims, key_until) = match cached {
            Some(c) => c,
            None => {
                let verified = self.verify_uncached(token)?;
                let entry = (Arc::new(verified.0), verified.1);
                if let Ok(mut cache) = self.cache.write() {
                    // A full cache is dropped whole: simpler than LRU bookkeeping on the
                    // hot path, and only tokens with valid signatures ever get in.
                    if cache.len() >= self.cache_cap {
                        cache.clear();
                    }
                    cache.insert(token.to_owned(), entry.clone());
                }
                entry
            }
        };
        if let Some(until) = key_until.filter(|u| now / NANOS_PER_SEC >= *u) {
            return Err(CredentialError::new(
                Reason::CredentialExpired,
                format!(
                    "credential of agent `{0}` was signed with a key that was rotated out and stopped verifying {1}s ago; issue a new one with `warden agent rotate {0}`",
                    claims.sub,
                    (now / NANOS_PER_SEC).saturating_sub(until)
                ),
            ));
        }
        check_window(&claims, now)?;
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<(Claims, Option<u64>), CredentialError> {
        let malformed = |what: &str| {
            CredentialError::new(
                Reason::CredentialMalformed,
                format!("credential is not a valid token: {what}"),
            )
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed("longer than 8 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected three dot-separated parts"));
        };
        let header_bytes = B64
            .decode(h)
            .map_err(|_| malformed("header is not base64url"))?;
        // A duplicate member is refused (serde reports it), so no two readers of this
        // header can see different algorithms or key ids.
        let header: Header = serde_json::from_slice(&header_bytes)
            .map_err(|e| malformed(&format!("header does not parse: {e}")))?;
        if header.crit.is_some() {
            return Err(CredentialError::new(
                Reason::CredentialInvalid,
                "credential header marks extensions critical (`crit`), which this server does not implement; issue a new token with `warden agent token`",
            ));
        }
        // Other tokens this key signs (gateway assertions) say so in `typ`; one of them
        // is never an agent's credential, whatever its claims.
        if header.typ.as_deref().is_some_and(|t| t != "JWT") {
            return Err(CredentialError::new(
                Reason::CredentialInvalid,
                format!(
                    "credential is a `{}`, not an agent token",
                    header.typ.as_deref().unwrap_or_default()
                ),
            ));
        }
        if header.alg != "EdDSA" {
            return Err(CredentialError::new(
                Reason::CredentialInvalid,
                format!(
                    "credential uses algorithm `{}`; only `EdDSA` is accepted",
                    header.alg
                ),
            ));
        }
        let kid = header.kid.unwrap_or_default();
        let key = self.keys.get(&kid).ok_or_else(|| {
            CredentialError::new(
                Reason::CredentialInvalid,
                format!("credential was signed by a key this server does not know (kid `{kid}`); it may be for another server"),
            )
        })?;
        let sig_bytes = B64
            .decode(s)
            .map_err(|_| malformed("signature is not base64url"))?;
        let sig = Signature::from_slice(&sig_bytes)
            .map_err(|_| malformed("signature has the wrong length"))?;
        let signing_input = &token[..h.len() + 1 + c.len()];
        key.key
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| {
                CredentialError::new(
                    Reason::CredentialInvalid,
                    "credential signature does not verify: it was forged or altered",
                )
            })?;
        // Only now, with the signature checked, are the claims worth reading.
        let claims_bytes = B64
            .decode(c)
            .map_err(|_| malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&claims_bytes)
            .map_err(|e| malformed(&format!("claims do not parse: {e}")))?;
        if claims.iss != self.issuer {
            return Err(CredentialError::new(
                Reason::CredentialInvalid,
                format!(
                    "credential was issued by `{}`, not by this server (`{}`)",
                    claims.iss, self.issuer
                ),
            ));
        }
        if claims.aud != AGENT_AUDIENCE {
            return Err(CredentialError::new(
                Reason::CredentialInvalid,
                format!(
                    "credential is for audience `{}`, not `{AGENT_AUDIENCE}`",
                    claims.aud
                ),
            ));
        }
        Ok((claims, key.until))
    }
}

/// Issues a new credential for a registered, active agent: records it in the store,
/// together with the audit entry of `by`, so it can be listed and revoked and so tokens
/// are accepted only for what was recorded, and returns the signed token.
pub fn issue_credential(
    store: &dyn crate::store::Store,
    key: &SigningKeyPair,
    issuer: &str,
    agent: &Agent,
    jti: String,
    by: &Acting,
) -> Result<(String, crate::store::Credential), crate::store::StoreError> {
    issue_with(store, key, issuer, agent, jti, by, None)
}

/// Rotates an agent's credential: issues a new one and rotates out every other credential
/// the agent holds, which keep working for `overlap_ns` more (so the agent can switch
/// without a failed call) and are then refused `CREDENTIAL_EXPIRED`. One store
/// transaction with its audit entry; returns the new token.
pub fn rotate_credential(
    store: &dyn crate::store::Store,
    key: &SigningKeyPair,
    issuer: &str,
    agent: &Agent,
    jti: String,
    overlap_ns: Nanos,
    by: &Acting,
) -> Result<(String, crate::store::Credential), crate::store::StoreError> {
    issue_with(store, key, issuer, agent, jti, by, Some(overlap_ns))
}

fn issue_with(
    store: &dyn crate::store::Store,
    key: &SigningKeyPair,
    issuer: &str,
    agent: &Agent,
    jti: String,
    by: &Acting,
    overlap_ns: Option<Nanos>,
) -> Result<(String, crate::store::Credential), crate::store::StoreError> {
    // The store checks again inside its transaction; this early answer saves a signature
    // and names the status.
    if agent.status != AgentStatus::Active {
        return Err(crate::store::StoreError::Conflict(format!(
            "agent `{}` is {}; it cannot be issued credentials",
            agent.id,
            agent.status.as_str()
        )));
    }
    let claims = new_claims(issuer, agent, jti, by.at);
    let cred = crate::store::Credential {
        jti: claims.jti.clone(),
        agent_id: agent.id.clone(),
        issued_at_ns: claims.iat * NANOS_PER_SEC,
        expires_at_ns: claims.exp.saturating_mul(NANOS_PER_SEC),
        revoked_at_ns: None,
        replaced_by: None,
    };
    let (change, entry) = match overlap_ns {
        None => (
            ControlChange::IssueCredential(cred.clone()),
            by.entry(
                "credential-issue",
                format!("credential `{}` of agent `{}`", cred.jti, agent.id),
            ),
        ),
        Some(overlap) => (
            ControlChange::RotateCredential {
                new: cred.clone(),
                overlap_until: by.at.saturating_add(overlap),
            },
            by.entry(
                "credential-rotate",
                format!(
                    "credential `{}` of agent `{}`; its other credentials end in {}s",
                    cred.jti,
                    agent.id,
                    overlap / NANOS_PER_SEC
                ),
            ),
        ),
    };
    store.apply_control(&change, entry)?;
    Ok((key.sign(&claims), cred))
}

/// Suspends, resumes or retires an agent (`to`: suspended, active, retired), with the
/// audit entry of `by`. Takes effect on the node's next call once its control view has
/// the change. The store refuses a change [`AgentStatus::may_become`] does not allow.
pub fn set_agent_status(
    store: &dyn crate::store::Store,
    agent_id: &str,
    to: AgentStatus,
    by: &Acting,
) -> Result<(), crate::store::StoreError> {
    let action = match to {
        AgentStatus::Active => "agent-resume",
        AgentStatus::Suspended => "agent-suspend",
        AgentStatus::Retired => "agent-retire",
        AgentStatus::Revoked => "revoke",
    };
    let change = ControlChange::SetAgentStatus {
        agent_id: agent_id.to_owned(),
        status: to,
        at: by.at,
    };
    store
        .apply_control(&change, by.entry(action, format!("agent `{agent_id}`")))
        .map(|_| ())
}

/// Registers a new agent, with the audit entry of `by`; one already registered is refused
/// (it keeps its status and credentials, and gets new ones with [`issue_credential`]).
pub fn register_agent(
    store: &dyn crate::store::Store,
    agent: &Agent,
    by: &Acting,
) -> Result<(), crate::store::StoreError> {
    let entry = by.entry("agent-register", format!("agent `{}`", agent.id));
    store
        .apply_control(&ControlChange::RegisterAgent(agent.clone()), entry)
        .map(|_| ())
}

/// Brings the store's record of an agent up to what the config file declares, with an
/// audit entry (`agent-config`) naming what changed: a config edit that gives an agent
/// more scopes or a higher tier is an operator's act like any other, and the audit must
/// show it. An agent that already matches is left alone and nothing is written; its
/// status and credentials are never touched. Returns whether anything changed.
pub fn declare_agent(
    store: &dyn crate::store::Store,
    agent: &Agent,
    by: &Acting,
) -> Result<bool, crate::store::StoreError> {
    let current = store.get_agent(&agent.id)?;
    let Some(change) = declared_change(current.as_ref(), agent) else {
        return Ok(false);
    };
    let entry = by.entry("agent-config", format!("agent `{}`: {change}", agent.id));
    store.apply_control(&ControlChange::DeclareAgent(agent.clone()), entry)?;
    Ok(true)
}

/// What declaring `to` changes in `from`, for the audit entry; `None` if nothing.
fn declared_change(from: Option<&Agent>, to: &Agent) -> Option<String> {
    let list = |set: &mut dyn Iterator<Item = &String>| {
        set.map(String::as_str).collect::<Vec<_>>().join(", ")
    };
    let Some(from) = from else {
        return Some(format!(
            "declared (owner `{}`, tier {}, scopes [{}], rotation {}s)",
            to.owner,
            to.tier,
            list(&mut to.scopes.iter()),
            to.rotation_ns / NANOS_PER_SEC
        ));
    };
    let mut changes = Vec::new();
    if from.owner != to.owner {
        changes.push(format!("owner `{}` -> `{}`", from.owner, to.owner));
    }
    if from.tier != to.tier {
        changes.push(format!("tier {} -> {}", from.tier, to.tier));
    }
    let added = list(&mut to.scopes.difference(&from.scopes));
    let removed = list(&mut from.scopes.difference(&to.scopes));
    if !added.is_empty() {
        changes.push(format!("scopes added [{added}]"));
    }
    if !removed.is_empty() {
        changes.push(format!("scopes removed [{removed}]"));
    }
    if from.rotation_ns != to.rotation_ns {
        changes.push(format!(
            "rotation {}s -> {}s",
            from.rotation_ns / NANOS_PER_SEC,
            to.rotation_ns / NANOS_PER_SEC
        ));
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// Revokes one credential of an agent (`jti`), or, without one, the agent itself and so
/// every credential it holds, with the audit entry of `by`. Returns what was revoked, for
/// the operator. A credential must belong to the agent named: an operator revoking
/// `agent-a`'s token by mistake with `agent-b`'s id revokes nothing.
pub fn revoke(
    store: &dyn crate::store::Store,
    agent_id: &str,
    jti: Option<&str>,
    by: &Acting,
) -> Result<String, crate::store::StoreError> {
    let (change, what) = match jti {
        Some(j) => (
            ControlChange::RevokeCredential {
                agent_id: agent_id.to_owned(),
                jti: j.to_owned(),
                at: by.at,
            },
            format!("credential `{j}` of agent `{agent_id}`"),
        ),
        None => (
            ControlChange::SetAgentStatus {
                agent_id: agent_id.to_owned(),
                status: AgentStatus::Revoked,
                at: by.at,
            },
            format!("agent `{agent_id}` and all its credentials"),
        ),
    };
    store.apply_control(&change, by.entry("revoke", what.clone()))?;
    Ok(what)
}

/// Checks a verified token against the credential the store recorded for its `jti`
/// (`None`: the store issued no such credential, or it has expired) and against the
/// agent's rotation period as it stands now. The agent must be the one the token names.
pub fn check_issued(
    claims: &Claims,
    issued: Option<&Credential>,
    agent: &Agent,
    now: Nanos,
) -> Result<(), CredentialError> {
    let id = &agent.id;
    // Only failures pay for the message: this runs on every call.
    let reissue = || format!("issue a new one with `warden agent rotate {id}`");
    let Some(c) = issued else {
        return Err(CredentialError::new(
            Reason::CredentialInvalid,
            format!(
                "credential `{}` of agent `{id}` was never issued by this server's store (or was deleted from it); {}",
                claims.jti,
                reissue()
            ),
        ));
    };
    if c.agent_id != claims.sub
        || c.issued_at_ns / NANOS_PER_SEC != claims.iat
        || c.expires_at_ns / NANOS_PER_SEC != claims.exp
    {
        return Err(CredentialError::new(
            Reason::CredentialInvalid,
            format!(
                "credential `{}` does not match the one the store issued (agent, issue or expiry time differ); {}",
                claims.jti,
                reissue()
            ),
        ));
    }
    if c.revoked_at(now) {
        let ended = now.saturating_sub(c.revoked_at_ns.unwrap_or(now)) / NANOS_PER_SEC;
        return Err(match &c.replaced_by {
            // Rotated out: its time ran out on schedule, as an expiry does.
            Some(new) => CredentialError::new(
                Reason::CredentialExpired,
                format!(
                    "credential `{}` of agent `{id}` was rotated out (replaced by `{new}`) and its overlap ended {ended}s ago; give the agent its new credential, or issue one with `warden agent rotate {id}`",
                    claims.jti
                ),
            ),
            None => CredentialError::new(
                Reason::CredentialRevoked,
                format!(
                    "credential `{}` of agent `{id}` was revoked; {}",
                    claims.jti,
                    reissue()
                ),
            ),
        });
    }
    let rotation = agent.rotation_ns / NANOS_PER_SEC;
    let lifetime = claims.exp.saturating_sub(claims.iat);
    let remaining = claims.exp.saturating_sub(now / NANOS_PER_SEC);
    if lifetime > rotation || remaining > rotation.saturating_add(LEEWAY_SECS) {
        return Err(CredentialError::new(
            Reason::CredentialInvalid,
            format!(
                "credential `{}` lives {lifetime}s, longer than agent `{id}`'s rotation period of {rotation}s (shortened since it was issued?); {}",
                claims.jti,
                reissue()
            ),
        ));
    }
    Ok(())
}

fn check_window(claims: &Claims, now: Nanos) -> Result<(), CredentialError> {
    let now_s = now / NANOS_PER_SEC;
    if now_s >= claims.exp {
        return Err(CredentialError::new(
            Reason::CredentialExpired,
            format!(
                "credential of agent `{}` expired {}s ago (its rotation period ran out); issue a new one with `warden agent rotate {}`",
                claims.sub,
                now_s - claims.exp,
                claims.sub
            ),
        ));
    }
    if claims.iat > now_s.saturating_add(LEEWAY_SECS) {
        return Err(CredentialError::new(
            Reason::CredentialExpired,
            "credential is not valid yet (issued in the future); check the clocks",
        ));
    }
    // No leeway: `exp` has none either, and Warden issues no `nbf` of its own.
    if let Some(nbf) = claims.nbf.filter(|nbf| now_s < *nbf) {
        return Err(CredentialError::new(
            Reason::CredentialExpired,
            format!(
                "credential of agent `{}` is not valid for another {}s (`nbf`); wait, or check the clocks",
                claims.sub,
                nbf - now_s
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> Agent {
        Agent {
            id: "claims-processor-v3".into(),
            owner: "claims-team".into(),
            tier: 2,
            scopes: ["claims:read".to_string()].into(),
            rotation_ns: 3600 * NANOS_PER_SEC,
            status: AgentStatus::Active,
        }
    }

    const T0: Nanos = 1_700_000_000 * NANOS_PER_SEC;

    #[test]
    fn a_gateway_assertion_is_never_accepted_as_an_agent_token() {
        let key = SigningKeyPair::from_seed([7; 32]);
        let v = Verifier::new("warden", [key.verifying_key()], 16);
        // Even one whose audience is the agents' and whose claims are a full agent
        // token's: the `typ` alone refuses it.
        let claims = new_claims("warden", &agent(), "j1".into(), T0);
        let as_assertion = key.sign_typed(ASSERTION_TYP, &claims);
        let e = v.verify(&as_assertion, T0).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialInvalid);
        assert!(e.message.contains(ASSERTION_TYP), "{}", e.message);
        let a = Assertion::new(
            "warden",
            AGENT_AUDIENCE,
            "claims-processor-v3",
            None,
            "j2".into(),
            T0,
        );
        assert_eq!(a.exp - a.iat, ASSERTION_LIFETIME_SECS);
        assert!(v.verify(&key.sign_typed(ASSERTION_TYP, &a), T0).is_err());
        // The agent token itself still verifies.
        assert!(v.verify(&key.sign(&claims), T0).is_ok());
    }

    #[test]
    fn round_trip_and_cache() {
        let k = SigningKeyPair::from_seed([7; 32]);
        let v = Verifier::new("w", [k.verifying_key()], 16);
        let tok = k.sign(&new_claims("w", &agent(), "j1".into(), T0));
        let c = v.verify(&tok, T0).unwrap();
        assert_eq!(c.sub, "claims-processor-v3");
        // cached: still checks expiry
        assert!(v.verify(&tok, T0 + 10).is_ok());
        let e = v.verify(&tok, T0 + 3600 * NANOS_PER_SEC).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialExpired);
    }

    #[test]
    fn expiry_on_fake_clock_boundaries() {
        let k = SigningKeyPair::from_seed([7; 32]);
        let v = Verifier::new("w", [k.verifying_key()], 16);
        let tok = k.sign(&new_claims("w", &agent(), "j1".into(), T0));
        assert!(v.verify(&tok, T0 + 3599 * NANOS_PER_SEC).is_ok());
        assert_eq!(
            v.verify(&tok, T0 + 3600 * NANOS_PER_SEC)
                .unwrap_err()
                .reason,
            Reason::CredentialExpired
        );
        // issued far in the future
        assert_eq!(
            v.verify(&tok, T0 - 120 * NANOS_PER_SEC).unwrap_err().reason,
            Reason::CredentialExpired
        );
    }

    #[test]
    fn refuses_forged_other_server_and_malformed() {
        let k = SigningKeyPair::from_seed([7; 32]);
        let other = SigningKeyPair::from_seed([8; 32]);
        let v = Verifier::new("w", [k.verifying_key()], 16);
        let claims = new_claims("w", &agent(), "j1".into(), T0);

        let foreign = other.sign(&claims);
        assert_eq!(
            v.verify(&foreign, T0).unwrap_err().reason,
            Reason::CredentialInvalid
        );

        let wrong_issuer = k.sign(&new_claims("elsewhere", &agent(), "j".into(), T0));
        let e = v.verify(&wrong_issuer, T0).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialInvalid);
        assert!(e.message.contains("elsewhere"));

        // tamper with the claims (raise the tier), keep the signature
        let tok = k.sign(&claims);
        let mut parts: Vec<&str> = tok.split('.').collect();
        let mut forged = claims.clone();
        forged.tier = 4;
        let forged_c = B64.encode(serde_json::to_vec(&forged).unwrap());
        parts[1] = &forged_c;
        assert_eq!(
            v.verify(&parts.join("."), T0).unwrap_err().reason,
            Reason::CredentialInvalid
        );

        // alg none
        let none_h = B64.encode(br#"{"alg":"none"}"#);
        let none = format!(
            "{none_h}.{}.",
            B64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert_eq!(
            v.verify(&none, T0).unwrap_err().reason,
            Reason::CredentialInvalid
        );

        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            &"x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert_eq!(
                v.verify(bad, T0).unwrap_err().reason,
                Reason::CredentialMalformed,
                "{bad}"
            );
        }
        // truncated signature
        let trunc = &tok[..tok.len() - 4];
        assert_eq!(
            v.verify(trunc, T0).unwrap_err().reason,
            Reason::CredentialMalformed
        );
    }

    #[test]
    fn not_before_is_honoured() {
        let k = SigningKeyPair::from_seed([7; 32]);
        let v = Verifier::new("w", [k.verifying_key()], 16);
        let mut claims = new_claims("w", &agent(), "j1".into(), T0);
        claims.nbf = Some(T0 / NANOS_PER_SEC + 30);
        let tok = k.sign(&claims);
        let e = v.verify(&tok, T0 + 29 * NANOS_PER_SEC).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialExpired);
        assert!(e.message.contains("nbf"), "{e}");
        assert!(v.verify(&tok, T0 + 30 * NANOS_PER_SEC).is_ok());
    }

    #[test]
    fn a_critical_header_is_refused_whatever_it_names() {
        let k = SigningKeyPair::from_seed([7; 32]);
        let v = Verifier::new("w", [k.verifying_key()], 16);
        let claims =
            B64.encode(serde_json::to_vec(&new_claims("w", &agent(), "j1".into(), T0)).unwrap());
        for crit in [r#"["exp"]"#, "[]", "null", r#""b64""#] {
            let h = B64.encode(format!(
                r#"{{"alg":"EdDSA","kid":"{}","crit":{crit}}}"#,
                k.kid()
            ));
            let input = format!("{h}.{claims}");
            let sig = B64.encode(k.key.sign(input.as_bytes()).to_bytes());
            let e = v.verify(&format!("{input}.{sig}"), T0).unwrap_err();
            assert_eq!(e.reason, Reason::CredentialInvalid, "{crit}");
            assert!(e.message.contains("crit"), "{e}");
        }
    }

    /// Signs arbitrary header and claims text with `k`, as an attacker holding the key
    /// (or a buggy issuer) could.
    fn raw_token(k: &SigningKeyPair, header: &str, claims: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let sig = B64.encode(k.key.sign(input.as_bytes()).to_bytes());
        format!("{input}.{sig}")
    }

    /// Every bad token the issue lists, each refused with its reason and a message that
    /// says what is wrong.
    #[test]
    fn bad_tokens_are_refused_each_with_a_clear_reason() {
        let k = SigningKeyPair::from_seed([7; 32]);
        let v = Verifier::new("w", [k.verifying_key()], 16);
        let claims = new_claims("w", &agent(), "j1".into(), T0);
        let c = serde_json::to_string(&claims).unwrap();
        let kid = k.kid().to_owned();
        let good = k.sign(&claims);
        assert!(v.verify(&good, T0).is_ok());
        let sig_of = |t: &str| t.rsplit('.').next().unwrap().to_owned();
        let body = |t: &str| t.rsplit_once('.').unwrap().0.to_owned();
        let huge = {
            let mut big = claims.clone();
            big.scopes = (0..2000).map(|i| format!("scope-{i}")).collect();
            k.sign(&big)
        };
        let cases: Vec<(&str, String, Reason, &str)> = vec![
            (
                "alg none, no signature",
                format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode(&c)),
                Reason::CredentialInvalid,
                "algorithm `none`",
            ),
            (
                "alg none, with our signature",
                raw_token(&k, &format!(r#"{{"alg":"none","kid":"{kid}"}}"#), &c),
                Reason::CredentialInvalid,
                "algorithm `none`",
            ),
            (
                "HS256 keyed with the public key (algorithm confusion)",
                raw_token(&k, &format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#), &c),
                Reason::CredentialInvalid,
                "only `EdDSA`",
            ),
            (
                "RS256",
                raw_token(&k, &format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#), &c),
                Reason::CredentialInvalid,
                "only `EdDSA`",
            ),
            (
                "an unknown key id",
                raw_token(&k, r#"{"alg":"EdDSA","kid":"0011223344556677"}"#, &c),
                Reason::CredentialInvalid,
                "kid `0011223344556677`",
            ),
            (
                "no key id",
                raw_token(&k, r#"{"alg":"EdDSA"}"#, &c),
                Reason::CredentialInvalid,
                "does not know",
            ),
            (
                "a truncated signature",
                format!("{}.{}", body(&good), &sig_of(&good)[..40]),
                Reason::CredentialMalformed,
                "wrong length",
            ),
            (
                "an empty signature",
                format!("{}.", body(&good)),
                Reason::CredentialMalformed,
                "wrong length",
            ),
            (
                "a signature of another token",
                format!(
                    "{}.{}",
                    body(&good),
                    sig_of(&k.sign(&new_claims("w", &agent(), "j2".into(), T0)))
                ),
                Reason::CredentialInvalid,
                "forged or altered",
            ),
            (
                "huge claims",
                huge.clone(),
                Reason::CredentialMalformed,
                "longer than 8 KiB",
            ),
            (
                "a duplicate key in the header",
                raw_token(
                    &k,
                    &format!(r#"{{"alg":"EdDSA","kid":"{kid}","alg":"EdDSA"}}"#),
                    &c,
                ),
                Reason::CredentialMalformed,
                "duplicate field `alg`",
            ),
            (
                "a duplicate key in the claims",
                raw_token(
                    &k,
                    &format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#),
                    &c.replacen(r#""sub":"#, r#""sub":"someone-else","sub":"#, 1),
                ),
                Reason::CredentialMalformed,
                "duplicate field `sub`",
            ),
            (
                "claims that are not an object",
                raw_token(&k, &format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#), "[1,2]"),
                Reason::CredentialMalformed,
                "claims do not parse",
            ),
        ];
        assert!(huge.len() > MAX_TOKEN_BYTES);
        for (what, token, reason, says) in cases {
            let e = v.verify(&token, T0).unwrap_err();
            assert_eq!(e.reason, reason, "{what}: {e}");
            assert!(e.message.contains(says), "{what}: {e}");
        }

        // A future `nbf` holds the token off until then (see `not_before_is_honoured`).
        let mut later = claims.clone();
        later.nbf = Some(T0 / NANOS_PER_SEC + 3600);
        let e = v.verify(&k.sign(&later), T0).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialExpired);
        assert!(e.message.contains("`nbf`"), "{e}");

        // An `exp` far in the future verifies as a signature, but no store issued such a
        // credential, and one recorded with it would outlive the rotation period.
        let mut forever = claims.clone();
        forever.exp = forever.iat + 10 * 365 * 86_400;
        let t = k.sign(&forever);
        let verified = v.verify(&t, T0).unwrap();
        let e = check_issued(&verified, None, &agent(), T0).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialInvalid);
        let recorded = Credential {
            jti: "j1".into(),
            agent_id: agent().id,
            issued_at_ns: T0,
            expires_at_ns: forever.exp.saturating_mul(NANOS_PER_SEC),
            revoked_at_ns: None,
            replaced_by: None,
        };
        let e = check_issued(&verified, Some(&recorded), &agent(), T0).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialInvalid);
        assert!(e.message.contains("rotation period"), "{e}");
    }

    #[test]
    fn a_retired_key_verifies_through_its_overlap_and_not_a_second_longer() {
        let old = SigningKeyPair::from_seed([7; 32]);
        let new = SigningKeyPair::from_seed([8; 32]);
        let until = T0 / NANOS_PER_SEC + 600;
        let v = Verifier::with_keys(
            "w",
            [
                PublicKey::current(new.verifying_key()),
                PublicKey {
                    key: old.verifying_key(),
                    until: Some(until),
                },
            ],
            16,
        );
        let by_old = old.sign(&new_claims("w", &agent(), "j1".into(), T0));
        let by_new = new.sign(&new_claims("w", &agent(), "j2".into(), T0));
        let last = until * NANOS_PER_SEC - 1;
        assert!(v.verify(&by_old, last).is_ok());
        // cached now; the key's end holds for the cached token too
        let e = v.verify(&by_old, until * NANOS_PER_SEC).unwrap_err();
        assert_eq!(e.reason, Reason::CredentialExpired);
        assert!(
            e.message
                .contains("warden agent rotate claims-processor-v3"),
            "{e}"
        );
        assert!(v.verify(&by_new, until * NANOS_PER_SEC).is_ok());
        // The JWKS lists a key only while it verifies.
        let kids = |now| {
            v.keys_at(now)
                .into_iter()
                .map(|(k, _)| k.to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(kids(last).len(), 2);
        assert_eq!(kids(until * NANOS_PER_SEC), vec![new.kid().to_owned()]);
    }

    #[test]
    fn public_key_sets_round_trip_and_refuse_what_they_cannot_read() {
        let a = SigningKeyPair::from_seed([1; 32]).verifying_key();
        let b = SigningKeyPair::from_seed([2; 32]).verifying_key();
        let set = vec![
            PublicKey::current(a),
            PublicKey {
                key: b,
                until: Some(1_800_000_000),
            },
        ];
        let text = public_keys_to_file(&set);
        assert_eq!(public_keys_from_file(&text).unwrap(), set);
        assert_eq!(public_key_from_file(&text).unwrap(), a);
        // one line, as older versions wrote it
        let one = SigningKeyPair::from_seed([1; 32]).to_public_key_file();
        assert_eq!(
            public_keys_from_file(&one).unwrap(),
            vec![PublicKey::current(a)]
        );
        let first_line = text.lines().next().unwrap();
        let second_line = text.lines().nth(1).unwrap();
        for bad in [
            String::new(),
            format!("{second_line}\n{first_line}\n"),
            format!("{first_line} until=soon\n"),
            format!("{first_line}\n{second_line} extra\n"),
            format!("{first_line}\ned25519-public:zz\n"),
        ] {
            assert!(public_keys_from_file(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_file_round_trip() {
        let k = SigningKeyPair::from_seed([9; 32]);
        let k2 = SigningKeyPair::from_key_file(&k.to_key_file()).unwrap();
        assert_eq!(k.kid(), k2.kid());
        assert!(SigningKeyPair::from_key_file("ed25519:zz").is_err());
        assert!(SigningKeyPair::from_key_file("rsa:00").is_err());
        let public = public_key_from_file(&k.to_public_key_file()).unwrap();
        assert_eq!(public, k.verifying_key());
        // The private key file is not a public key file, and the other way round.
        assert!(public_key_from_file(&k.to_key_file()).is_err());
        assert!(SigningKeyPair::from_key_file(&k.to_public_key_file()).is_err());
    }

    #[test]
    fn agent_ids() {
        assert!(validate_agent_id("claims-processor-v3").is_ok());
        assert!(validate_agent_id("").is_err());
        assert!(validate_agent_id("a\"b").is_err());
        assert!(validate_agent_id("a b").is_err());
    }
}
