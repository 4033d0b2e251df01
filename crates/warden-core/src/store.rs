//! The storage trait. Implementations live in `warden-store`; the core only says what it
//! needs: agents, credentials, kill switches, and an append-only audit chain.
//!
//! INVARIANT: `append_audit` returns only after the entries are durable, and assigns
//! sequence numbers and chain hashes inside the same transaction that writes them, so
//! several writers (the server and a CLI on the same file) extend one unbroken chain.
//! INVARIANT: an operator's change to agents, credentials or kill switches is written
//! only together with the audit entry that records it ([`Store::apply_control`]): no
//! entry, no change.
//! INVARIANT: a call has at most one outcome entry; the store refuses a second.

use std::collections::HashMap;

use crate::audit::{Entry, Record};
use crate::clock::Nanos;
use crate::control::{KillSwitch, KillTarget};
use crate::identity::{Agent, AgentStatus};
use crate::operator::Operator;

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
    /// From this time on the credential is refused. Set to the moment of an operator's
    /// revocation, or, by a rotation, to the end of the overlap: until then it still
    /// works, beside its replacement.
    pub revoked_at_ns: Option<Nanos>,
    /// The credential a rotation issued in its place (its `jti`), if it was rotated out
    /// rather than revoked.
    pub replaced_by: Option<String>,
}

impl Credential {
    /// Whether the credential is refused at `now` because it was revoked or rotated out.
    pub fn revoked_at(&self, now: Nanos) -> bool {
        self.revoked_at_ns.is_some_and(|r| r <= now)
    }
}

/// Everything the per-call checks read from memory: agents, issued credentials and kill
/// switches, as of one store version.
#[derive(Clone, Debug, Default)]
pub struct StateSnapshot {
    /// Bumped by every change to agents, credentials or kill switches.
    pub version: u64,
    pub agents: Vec<Agent>,
    /// Every credential not yet expired at the snapshot's time, revoked or not, by jti. A
    /// token is accepted only if the store issued its jti (expired ones are refused on
    /// their own expiry, so they need not be here).
    pub credentials: HashMap<String, Credential>,
    pub kills: Vec<KillSwitch>,
}

/// A change an operator makes to agents, credentials or kill switches. The store applies
/// it only together with its audit entry ([`Store::apply_control`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlChange {
    /// Registers a new agent; `Conflict` if the id is taken.
    RegisterAgent(Agent),
    /// An agent as the config file declares it: inserted if new, otherwise its owner,
    /// tier, scopes and rotation are set to these (its status and credentials stay).
    DeclareAgent(Agent),
    /// Records a credential issued to an agent; `Conflict` if the agent does not exist or
    /// is not active, or the jti is taken.
    IssueCredential(Credential),
    /// Revokes one unrevoked credential of `agent_id`; `NotFound` if the agent holds no
    /// such credential (a jti under the wrong agent revokes nothing).
    RevokeCredential {
        agent_id: String,
        jti: String,
        at: Nanos,
    },
    /// Issues `new` and rotates out every other credential of its agent that is still
    /// valid at `new.issued_at_ns`: each keeps working until `overlap_until` (or its own
    /// earlier expiry or revocation), then is refused. `Conflict` as for
    /// `IssueCredential`. One transaction, so there is no moment with neither credential.
    RotateCredential {
        new: Credential,
        overlap_until: Nanos,
    },
    /// Sets an agent's status; `NotFound` if there is no such agent, `Conflict` if the
    /// change is not one [`AgentStatus::may_become`] allows from the status it has.
    SetAgentStatus {
        agent_id: String,
        status: AgentStatus,
        at: Nanos,
    },
    /// Sets (or replaces) a kill switch. Unless `pre_emptive`, a switch for an agent id or
    /// owner that no registered agent has is refused (`NotFound`): a kill that stops
    /// nothing is almost always a typo, and reporting success would hide it.
    SetKill { kill: KillSwitch, pre_emptive: bool },
    /// Clears a kill switch; `NotFound` if none is set for the target.
    ClearKill(KillTarget),
    /// Adds an operator account; `Conflict` if its id is taken or an account that is not
    /// removed has its name.
    AddOperator(Operator),
    /// Removes an account (kept, marked removed); `NotFound` unless `id` names one that
    /// is not removed yet.
    RemoveOperator { id: String, at: Nanos },
    /// Disables the bootstrap operator token; `Conflict` if it is disabled already or no
    /// admin account is in standing at `at` (the admin API would then admit no admin).
    DisableBootstrap { at: Nanos },
}

/// The operator accounts and whether the bootstrap operator token is disabled: what the
/// admin plane reads on every request, so a removed account or a disabled bootstrap
/// token is refused on its next request on every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorRoster {
    /// Every account ever made, removed ones included (their names stay in the audit).
    pub accounts: Vec<Operator>,
    pub bootstrap_disabled: bool,
}

impl OperatorRoster {
    pub fn get(&self, id: &str) -> Option<&Operator> {
        self.accounts.iter().find(|o| o.id == id)
    }
}

/// Who acts on the governance plane, when, and the id the audit entry of the action gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acting {
    /// The operator, as the entry names them (e.g. `operator:1a2b3c4d`, `cli:alice`).
    pub who: String,
    pub at: Nanos,
    /// The entry's `call_id`: random, chosen by the caller (the core has no randomness).
    pub entry_id: String,
}

impl Acting {
    /// The control entry recording `action` with `detail`.
    pub fn entry(&self, action: &str, detail: String) -> Entry {
        Entry::control(self.at, self.entry_id.clone(), action, &self.who, detail)
    }
}

pub trait Store: Send + Sync {
    /// The current state version; cheap, polled to learn whether to reload the snapshot.
    fn state_version(&self) -> Result<u64, StoreError>;
    fn snapshot(&self, now: Nanos) -> Result<StateSnapshot, StoreError>;

    /// Inserts an agent or updates its owner, tier, scopes and rotation; leaves its status.
    /// Writes no audit entry: for tests and tools seeding a store. A node and the CLI
    /// bring the config's agents in through `identity::declare_agent`, which records
    /// every change ([`ControlChange::DeclareAgent`]).
    fn upsert_agent(&self, agent: &Agent) -> Result<(), StoreError>;
    fn get_agent(&self, id: &str) -> Result<Option<Agent>, StoreError>;
    fn list_agents(&self) -> Result<Vec<Agent>, StoreError>;
    fn list_credentials(&self, agent_id: &str) -> Result<Vec<Credential>, StoreError>;

    /// Applies an operator's change and appends the entry recording it, durably, in one
    /// transaction: both or neither. A refused change (`Conflict`, `NotFound`) writes no
    /// entry; an entry that cannot be written undoes the change. Returns the entry's record.
    fn apply_control(&self, change: &ControlChange, entry: Entry) -> Result<Record, StoreError>;

    /// Appends entries to the chain, durably, in one transaction. A second outcome entry
    /// for a call (already stored, or twice in `entries`) refuses the whole batch with
    /// `Conflict` naming the call, and nothing is written.
    fn append_audit(&self, entries: Vec<Entry>) -> Result<Vec<Record>, StoreError>;
    /// Records with `seq > after`, in order, at most `limit`.
    fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError>;
    /// The records of one call (its decision and any outcome), in order.
    fn call_records(&self, call_id: &str) -> Result<Vec<Record>, StoreError>;
    /// The last `n` records, oldest first.
    fn tail_audit(&self, n: usize) -> Result<Vec<Record>, StoreError>;

    /// The operator accounts and the bootstrap token's state, read fresh.
    fn operators(&self) -> Result<OperatorRoster, StoreError>;
}
