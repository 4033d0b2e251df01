//! The decisions a gateway needs from Warden, whichever way it reaches Warden.

use std::collections::HashSet;
use std::future::Future;

use serde_json::Value;
pub use warden_core::pipeline::Refusal;

/// One `tools/call` to decide.
#[derive(Debug, Clone)]
pub struct ToolCall {
    /// The Warden action the tool maps to.
    pub action: String,
    pub arguments: Value,
    /// The agent's stated reasoning, from `params._meta.rationale` if the client sent it.
    pub rationale: Option<String>,
    /// A W3C trace id to join, from the client's `traceparent`.
    pub trace_id: Option<String>,
    /// Set when the gateway itself found the call unfit to judge (a path argument that
    /// does not resolve, arguments that do not fit the tool's input schema): Warden
    /// denies it under the refusal's rule and still records it.
    pub refusal: Option<Refusal>,
}

/// Warden's answer for one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub permit: bool,
    pub reason: String,
    pub rules: Vec<String>,
    pub message: String,
    pub call_id: String,
    pub trace_id: String,
    pub span_id: String,
    /// The authenticated agent ("" if the credential was refused).
    pub agent_id: String,
}

/// What happened to a permitted call.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub call_id: String,
    /// The agent the call was decided for.
    pub agent_id: String,
    /// `ok`, `error` (the tool reported an error), or why it has no result (`cancelled`,
    /// `timeout`, `upstream-failed`).
    pub status: &'static str,
    /// The JSON-RPC `result` or `error` as the server sent it (hashed, never stored).
    pub output: Option<Value>,
    pub duration_ns: u64,
}

pub trait Gate: Send + Sync + 'static {
    /// Decides one call. Never fails: an unreachable Warden is a deny.
    fn check(&self, call: ToolCall) -> impl Future<Output = Verdict> + Send;
    /// Records a permitted call's outcome on its audit trail.
    fn outcome(&self, outcome: Outcome) -> impl Future<Output = ()> + Send;
    /// Whether the agent is stopped right now (kill switch, revoked credential). Polled
    /// while calls are in flight so they can be cancelled.
    fn stopped(&self) -> impl Future<Output = Option<String>> + Send;
    /// The actions the agent could ever be permitted (catalog, scopes, data ceiling), to
    /// filter `tools/list`. `None` when the agent's standing cannot be established: the
    /// gateway then offers no tools.
    fn visible_actions(&self) -> impl Future<Output = Option<HashSet<String>>> + Send;
}
