//! The two ways an MCP gateway reaches Warden's decision path: in-process, sharing this
//! node's pipeline and audit writer, or over HTTP to a running `warden serve`.
//!
//! Both fail closed: if Warden cannot be reached or cannot record, the call is denied.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use warden_core::audit::hash_json;
use warden_core::config::UpstreamTls;
use warden_core::pipeline::CallContext;
use warden_mcp::gate::{Gate, Outcome, ToolCall, Verdict};

use crate::api::OutcomeRecord;
use crate::tls::TlsError;
use crate::upstream::{self, error_chain};
use crate::wire::{
    CheckContext, CheckRequest, DecisionAnswer, ErrorAnswer, OutcomeRequest, Standing,
};
use crate::App;

/// The pipeline of this process.
pub struct EmbeddedGate {
    app: Arc<App>,
    token: String,
}

impl EmbeddedGate {
    pub fn new(app: Arc<App>, token: String) -> Self {
        Self { app, token }
    }
}

impl Gate for EmbeddedGate {
    async fn check(&self, call: ToolCall) -> Verdict {
        let ctx = CallContext {
            rationale: call.rationale,
            refusal: call.refusal,
            ..Default::default()
        };
        let d = self
            .app
            .decide(
                Some(&self.token),
                &call.action,
                &call.arguments,
                &ctx,
                call.trace_id.as_deref(),
            )
            .await;
        Verdict {
            permit: d.decision.is_permit(),
            reason: d.decision.reason.code().to_owned(),
            rules: d.decision.rules,
            message: d.decision.message,
            call_id: d.call_id,
            trace_id: d.trace_id,
            span_id: d.span_id,
            agent_id: d.agent_id,
        }
    }

    async fn outcome(&self, o: Outcome) {
        let record = OutcomeRecord {
            status: o.status,
            output_hash: o.output.as_ref().map(hash_json),
            cost: None,
            duration_ns: Some(o.duration_ns),
        };
        if let Err(e) = self
            .app
            .record_outcome(&o.agent_id, &o.call_id, record, true)
            .await
        {
            tracing::error!(call_id = %o.call_id, error = %e, "could not record a tool call's outcome");
        }
    }

    async fn stopped(&self) -> Option<String> {
        self.app
            .standing(Some(&self.token))
            .await
            .err()
            .map(|d| format!("{}: {}", d.reason.code(), d.message))
    }

    async fn visible_actions(&self) -> Option<HashSet<String>> {
        let standing = self.app.standing(Some(&self.token)).await.ok()?;
        Some(self.app.pipeline.visible_tools(&standing))
    }
}

/// A `warden serve` reached over HTTP.
pub struct RemoteGate {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl RemoteGate {
    /// A gate asking the node at `base`; `tls` says which CA its certificate chains to
    /// (the public roots by default) and which client certificate to present.
    pub fn new(base: &str, token: String, tls: &UpstreamTls) -> Result<Self, TlsError> {
        let http = upstream::builder(tls)?
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(8)
            .build()
            .map_err(|e| {
                TlsError::Config(format!("cannot build an HTTP client: {}", error_chain(&e)))
            })?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// The agent's standing: the tools it could ever be permitted, or why it is stopped.
    async fn standing(&self) -> Result<Vec<String>, String> {
        let resp = self
            .http
            .get(format!("{}/v1/agent", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "INTERNAL: cannot reach Warden at {}: {}",
                    self.base,
                    error_chain(&e)
                )
            })?;
        let body: Standing = resp.json().await.map_err(|e| {
            format!(
                "INTERNAL: unreadable answer from Warden: {}",
                error_chain(&e)
            )
        })?;
        match body {
            Standing {
                stopped: Some(s), ..
            } => Err(format!("{}: {}", s.reason, s.message)),
            Standing {
                tools: Some(tools), ..
            } => Ok(tools),
            Standing { .. } => {
                Err("INTERNAL: Warden's answer names neither tools nor a stop".into())
            }
        }
    }
}

fn deny_internal(message: String) -> Verdict {
    Verdict {
        permit: false,
        reason: "INTERNAL".into(),
        rules: vec!["warden.gateway".into()],
        message,
        call_id: String::new(),
        trace_id: String::new(),
        span_id: String::new(),
        agent_id: String::new(),
    }
}

impl Gate for RemoteGate {
    async fn check(&self, call: ToolCall) -> Verdict {
        let refusal_rule = call.refusal.as_ref().map(|r| r.rule);
        let body = CheckRequest {
            tool: call.action,
            params: call.arguments,
            context: CheckContext {
                rationale: call.rationale,
                trace_id: call.trace_id,
                refusal: call.refusal.map(|r| r.message),
                refusal_rule,
                ..CheckContext::default()
            },
        };
        let resp = match self
            .http
            .post(format!("{}/v1/check", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return deny_internal(format!(
                    "cannot reach Warden at {}: {}",
                    self.base,
                    error_chain(&e)
                ))
            }
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return deny_internal(format!(
                    "unreadable answer from Warden ({status}): {}",
                    error_chain(&e)
                ))
            }
        };
        let d: DecisionAnswer = match serde_json::from_slice(&bytes) {
            Ok(d) => d,
            // 400/413: Warden refused the request itself (e.g. arguments over the size
            // limit).
            Err(e) => {
                return deny_internal(match serde_json::from_slice::<ErrorAnswer>(&bytes) {
                    Ok(refused) => {
                        format!("Warden refused the check ({status}): {}", refused.message)
                    }
                    Err(_) => format!("unreadable answer from Warden ({status}): {e}"),
                })
            }
        };
        Verdict {
            permit: d.decision == "permit",
            reason: d.reason,
            rules: d.rules,
            message: d.message,
            call_id: d.call_id,
            trace_id: d.trace_id,
            span_id: d.span_id,
            agent_id: d.agent_id.unwrap_or_default(),
        }
    }

    async fn outcome(&self, o: Outcome) {
        // Hash here: a large tool result should not travel to Warden just to be hashed.
        let body = OutcomeRequest {
            status: o.status.to_owned(),
            output_hash: o.output.as_ref().map(hash_json),
            output: None,
            cost: None,
            duration_ms: Some(o.duration_ns as f64 / 1e6),
            // The session's recorder waits on this, not the agent.
            linger: true,
        };
        let res = self
            .http
            .post(format!("{}/v1/calls/{}/outcome", self.base, o.call_id))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::error!(call_id = %o.call_id, status = %r.status(), "Warden refused a tool call's outcome")
            }
            Err(e) => {
                tracing::error!(call_id = %o.call_id, error = %error_chain(&e), "could not record a tool call's outcome")
            }
        }
    }

    async fn stopped(&self) -> Option<String> {
        self.standing().await.err()
    }

    async fn visible_actions(&self) -> Option<HashSet<String>> {
        Some(self.standing().await.ok()?.into_iter().collect())
    }
}
