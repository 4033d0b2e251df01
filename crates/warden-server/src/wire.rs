//! The agent plane's messages, one type each: what `/v1/check`, `/v1/calls/{id}/outcome`
//! and `/v1/agent` take and answer. The node reads requests and writes answers with them,
//! and the remote gate (`warden mcp-proxy --server`) writes requests and reads answers
//! with the same types, so the two ends cannot drift apart.
//!
//! Requests refuse unknown fields (a misspelt field is an error, not a silent default);
//! answers do not, so a client keeps working when a node adds a field.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use warden_core::pipeline::RefusalRule;

/// `POST /v1/check`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub tool: String,
    #[serde(default = "empty_object")]
    pub params: Value,
    #[serde(default)]
    pub context: CheckContext,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_estimate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Sent by a remote MCP gateway that could not judge an argument (a path that does
    /// not resolve, arguments that do not fit the server's input schema): the call is
    /// denied and recorded. An agent can only refuse itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The rule of that refusal, one of a closed set; `warden.gateway.arguments` if
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_rule: Option<RefusalRule>,
}

/// The answer to a check: the decision, and the ids that tie it to its audit entry.
#[derive(Debug, Serialize, Deserialize)]
pub struct DecisionAnswer {
    /// `None` when the caller could not be authenticated.
    pub agent_id: Option<String>,
    /// `permit` or `deny`.
    pub decision: String,
    pub reason: String,
    pub rules: Vec<String>,
    pub call_id: String,
    pub message: String,
    pub trace_id: String,
    pub span_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// `POST /v1/calls/{call_id}/outcome`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeRequest {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// The reporter does not wait on this answer to go on (a gateway's background
    /// recorder): the entry may wait up to `[audit] linger` to share a commit with a
    /// decision. Answered once durable either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linger: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OutcomeAnswer {
    pub recorded: bool,
    pub call_id: String,
    pub seq: u64,
}

/// `GET /v1/agent`: whether the caller may act now, and the tools it could ever be
/// permitted. A stopped agent gets only `stopped`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Standing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub stopped: Option<Stopped>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stopped {
    pub reason: String,
    pub message: String,
}

/// What the node answers when it refuses a request itself (see `error::ApiError`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
    pub message: String,
}

/// `GET /.well-known/jwks.json`: the public keys that verify agent tokens (RFC 7517).
#[derive(Debug, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

/// One Ed25519 public key as a JWK (RFC 8037): `kty` `OKP`, `crv` `Ed25519`, `x` the raw
/// 32-byte key in base64url without padding.
#[derive(Debug, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}
