//! What the pipeline answers: an effect, a reason code, the rules that decided.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    Permit,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Permit => "permit",
            Effect::Deny => "deny",
        }
    }
}

/// Why a decision came out as it did. The codes are part of the API: clients branch on
/// them, dashboards count them, so they never change spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A policy permitted the call and no layer objected.
    Permitted,
    /// The tool is unknown, outside the agent's scopes, or no policy permits it.
    ToolNotPermitted,
    /// A forbid rule matched, or the arguments do not fit the tool's schema.
    ConstraintViolation,
    /// A rate limit or budget is exhausted.
    RateLimited,
    /// The call touches data above the agent's trust tier.
    DataBoundaryViolation,
    /// A kill switch covers the agent, its owner or the whole fleet.
    Killed,
    /// No credential was presented.
    Unauthenticated,
    /// The credential is not a well-formed token.
    CredentialMalformed,
    /// The credential's signature, key, issuer or audience is not ours (forged, or meant
    /// for another server).
    CredentialInvalid,
    /// The credential has expired (or is not yet valid).
    CredentialExpired,
    /// The credential, or every credential of its agent, was revoked.
    CredentialRevoked,
    /// The credential names an agent this server does not know.
    UnknownAgent,
    /// An operator suspended the agent; its credentials are refused until it is resumed.
    AgentSuspended,
    /// An operator retired the agent for good; nothing it holds is accepted again.
    AgentRetired,
    /// The request was well-formed JSON but not a valid call (an unknown data class, a
    /// negative cost, an unusable tool name). Answered 400, and audited like any deny.
    InvalidRequest,
    /// Warden could not decide safely (store down, audit write failed, stale kill-switch
    /// view): fail closed.
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::Permitted,
        Reason::ToolNotPermitted,
        Reason::ConstraintViolation,
        Reason::RateLimited,
        Reason::DataBoundaryViolation,
        Reason::Killed,
        Reason::Unauthenticated,
        Reason::CredentialMalformed,
        Reason::CredentialInvalid,
        Reason::CredentialExpired,
        Reason::CredentialRevoked,
        Reason::UnknownAgent,
        Reason::AgentSuspended,
        Reason::AgentRetired,
        Reason::InvalidRequest,
        Reason::Internal,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::Permitted => "PERMITTED",
            Reason::ToolNotPermitted => "TOOL_NOT_PERMITTED",
            Reason::ConstraintViolation => "CONSTRAINT_VIOLATION",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::DataBoundaryViolation => "DATA_BOUNDARY_VIOLATION",
            Reason::Killed => "KILLED",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::CredentialMalformed => "CREDENTIAL_MALFORMED",
            Reason::CredentialInvalid => "CREDENTIAL_INVALID",
            Reason::CredentialExpired => "CREDENTIAL_EXPIRED",
            Reason::CredentialRevoked => "CREDENTIAL_REVOKED",
            Reason::UnknownAgent => "UNKNOWN_AGENT",
            Reason::AgentSuspended => "AGENT_SUSPENDED",
            Reason::AgentRetired => "AGENT_RETIRED",
            Reason::InvalidRequest => "INVALID_REQUEST",
            Reason::Internal => "INTERNAL",
        }
    }

    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether the caller failed to prove who it is (as opposed to being refused).
    pub fn is_authentication_failure(self) -> bool {
        matches!(
            self,
            Reason::Unauthenticated
                | Reason::CredentialMalformed
                | Reason::CredentialInvalid
                | Reason::CredentialExpired
                | Reason::CredentialRevoked
                | Reason::UnknownAgent
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    pub reason: Reason,
    /// Ids of the rules that decided: Cedar policy ids, limit ids, built-in rule names.
    pub rules: Vec<String>,
    pub message: String,
    /// For `RATE_LIMITED`: when the caller may try again.
    pub retry_after_ms: Option<u64>,
}

impl Decision {
    pub fn permit(rules: Vec<String>, message: impl Into<String>) -> Self {
        Self {
            effect: Effect::Permit,
            reason: Reason::Permitted,
            rules,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn deny(reason: Reason, rules: Vec<String>, message: impl Into<String>) -> Self {
        Self {
            effect: Effect::Deny,
            reason,
            rules,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A deny from a rule built into Warden (not a Cedar policy).
    pub fn deny_builtin(reason: Reason, rule: &str, message: impl Into<String>) -> Self {
        Self::deny(reason, vec![rule.to_owned()], message)
    }

    pub fn is_permit(&self) -> bool {
        self.effect == Effect::Permit
    }
}
