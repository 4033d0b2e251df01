//! The storage trait. Implementations live in `warden-store`; the core only says what it
//! needs: agents, credentials, kill switches, and an append-only audit chain.
//!
//! INVARIANT: `append_audit` returns only after the entries are durable, and assigns
//! sequence numbers and chain hashes inside the same transaction that writes them, so
//! several writers (the server and a CLI on the same file) extend one unbroken chain.

use std::collections::HashSet;

use crate::audit::{Entry, Record};
use crate::clock::Nanos;
use crate::control::{KillSwitch, KillTarget};
use crate::identity::{Agent, AgentStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached, is locked, or refused the write.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The data in the store is not what this version of Warden wrote.
    #[error("store holds unreadable data: {0}")]
    Corrupt(String),
    /// The request conflicts with what is stored (e.g. an agent registered twice).
    #[error("{0}")]
    Conflict(String),
    /// What the request names is not stored (an unknown agent, a credential it lacks).
    #[error("{0}")]
    NotFound(String),
}

/// A credential issued to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub jti: String,
    pub agent_id: String,
    pub issued_at_ns: Nanos,
    pub expires_at_ns: Nanos,
    pub revoked_at_ns: Option<Nanos>,
}

/// Everything the per-call checks read from memory: agents, revoked credentials and kill
/// switches, as of one store version.
#[derive(Clone, Debug, Default)]
pub struct StateSnapshot {
    /// Bumped by every change to agents, credentials or kill switches.
    pub version: u64,
    pub agents: Vec<Agent>,
    /// Revoked credentials that have not yet expired (expired ones are refused anyway).
    pub revoked_jtis: HashSet<String>,
    pub kills: Vec<KillSwitch>,
}

pub trait Store: Send + Sync {
    /// The current state version; cheap, polled to learn whether to reload the snapshot.
    fn state_version(&self) -> Result<u64, StoreError>;
    fn snapshot(&self, now: Nanos) -> Result<StateSnapshot, StoreError>;

    /// Inserts an agent or updates its owner, tier, scopes and rotation; leaves its status.
    fn upsert_agent(&self, agent: &Agent) -> Result<(), StoreError>;
    fn get_agent(&self, id: &str) -> Result<Option<Agent>, StoreError>;
    fn list_agents(&self) -> Result<Vec<Agent>, StoreError>;
    /// Returns false if there is no such agent.
    fn set_agent_status(
        &self,
        id: &str,
        status: AgentStatus,
        now: Nanos,
    ) -> Result<bool, StoreError>;

    fn insert_credential(&self, c: &Credential) -> Result<(), StoreError>;
    /// Revokes one credential; returns false if it does not exist or was already revoked.
    fn revoke_credential(&self, jti: &str, now: Nanos) -> Result<bool, StoreError>;
    fn list_credentials(&self, agent_id: &str) -> Result<Vec<Credential>, StoreError>;

    /// Sets (or replaces) a kill switch.
    fn set_kill(&self, kill: &KillSwitch) -> Result<(), StoreError>;
    /// Clears a kill switch; returns false if none was set for that target.
    fn clear_kill(&self, target: &KillTarget) -> Result<bool, StoreError>;

    /// Appends entries to the chain, durably, in one transaction.
    fn append_audit(&self, entries: Vec<Entry>) -> Result<Vec<Record>, StoreError>;
    /// Records with `seq > after`, in order, at most `limit`.
    fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError>;
    /// The records of one call (its decision and any outcome), in order.
    fn call_records(&self, call_id: &str) -> Result<Vec<Record>, StoreError>;
    /// The last `n` records, oldest first.
    fn tail_audit(&self, n: usize) -> Result<Vec<Record>, StoreError>;
}
