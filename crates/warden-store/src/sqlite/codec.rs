//! Rows to domain values and back.
//!
//! Everything read from the file is checked on the way in: a row this code did not
//! write (an unknown kind, a hash of the wrong length, a list that is not JSON) becomes
//! a [`DecodeError`] that the caller turns into `StoreError::Corrupt` naming the row,
//! never a panic and never a silently defaulted field that would then fail the chain
//! check with a misleading "edited" verdict.

use rusqlite::types::{FromSql, Type, ValueRef};
use rusqlite::Row;
use warden_core::audit::{Entry, EntryKind, Hash, Record};
use warden_core::control::{KillSwitch, KillTarget};
use warden_core::identity::{Agent, AgentStatus};
use warden_core::store::Credential;

/// A `u64` (nanoseconds, durations) as the `i64` with the same bits, which is what SQLite
/// can hold. Together with [`u64_from_sql`] this round-trips every value exactly, which
/// matters because the audit hash covers these fields bit for bit.
pub(crate) fn u64_to_sql(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`u64_to_sql`].
pub(crate) fn u64_from_sql(v: i64) -> u64 {
    v as u64
}

/// A list of strings as JSON text. Going through `Value` makes the encoding infallible.
pub(crate) fn json_list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    serde_json::Value::Array(
        items
            .into_iter()
            .cloned()
            .map(serde_json::Value::String)
            .collect(),
    )
    .to_string()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("column `{column}`: {source}")]
    Column {
        column: &'static str,
        source: rusqlite::Error,
    },
    #[error("column `{column}` holds {found}, not a blob")]
    NotBlob { column: &'static str, found: Type },
    #[error("column `{column}` holds {len} bytes, not a 32-byte hash")]
    HashLength { column: &'static str, len: usize },
    #[error("column `{column}` is not a JSON list of strings: {source}")]
    Json {
        column: &'static str,
        source: serde_json::Error,
    },
    #[error("column `{column}` holds {value}, which is out of range")]
    Range { column: &'static str, value: i64 },
    #[error("kind `{0}` is not `decision`, `outcome`, `control` or `summary`")]
    Kind(String),
    #[error("status `{0}` is not `active`, `suspended`, `revoked` or `retired`")]
    Status(String),
    #[error("scope `{0}` is not `all`, `owner` or `agent`")]
    Scope(String),
}

fn col<T: FromSql>(row: &Row<'_>, idx: usize, column: &'static str) -> Result<T, DecodeError> {
    row.get(idx)
        .map_err(|source| DecodeError::Column { column, source })
}

fn nanos(row: &Row<'_>, idx: usize, column: &'static str) -> Result<u64, DecodeError> {
    col::<i64>(row, idx, column).map(u64_from_sql)
}

fn hash(row: &Row<'_>, idx: usize, column: &'static str) -> Result<Hash, DecodeError> {
    match row.get_ref(idx) {
        Ok(ValueRef::Blob(b)) => Hash::try_from(b).map_err(|_| DecodeError::HashLength {
            column,
            len: b.len(),
        }),
        Ok(other) => Err(DecodeError::NotBlob {
            column,
            found: other.data_type(),
        }),
        Err(source) => Err(DecodeError::Column { column, source }),
    }
}

fn strings<C: FromIterator<String>>(
    row: &Row<'_>,
    idx: usize,
    column: &'static str,
) -> Result<C, DecodeError> {
    let text: String = col(row, idx, column)?;
    let list: Vec<String> =
        serde_json::from_str(&text).map_err(|source| DecodeError::Json { column, source })?;
    Ok(list.into_iter().collect())
}

// Column lists as macros rather than consts so SQL text can be assembled with
// `concat!` at compile time: the prepared-statement cache is keyed on that text, and the
// hot path should not format strings to look a statement up.

/// The audit columns in the order [`record`] reads them.
macro_rules! audit_columns {
    () => {
        "seq, ts_ns, kind, call_id, trace_id, span_id, agent_id, delegation_id, action, input_hash, \
         output_hash, decision, reason, rules, cost, duration_ns, rationale, prev_hash, hash"
    };
}
pub(crate) use audit_columns;

/// The sequence number of an audit row, read first so later failures can name it.
pub(crate) fn seq(row: &Row<'_>) -> Result<u64, DecodeError> {
    let raw: i64 = col(row, 0, "seq")?;
    u64::try_from(raw).map_err(|_| DecodeError::Range {
        column: "seq",
        value: raw,
    })
}

/// The `(seq, hash)` of a row selected as exactly those two columns: the chain's head.
pub(crate) fn head(row: &Row<'_>) -> Result<(u64, Hash), DecodeError> {
    Ok((seq(row)?, hash(row, 1, "hash")?))
}

/// An audit row selected with [`audit_columns`], whose `seq` is already known.
pub(crate) fn record(row: &Row<'_>, seq: u64) -> Result<Record, DecodeError> {
    let kind: String = col(row, 2, "kind")?;
    let kind = EntryKind::parse(&kind).ok_or(DecodeError::Kind(kind))?;
    let entry = Entry {
        ts_ns: nanos(row, 1, "ts_ns")?,
        kind,
        call_id: col(row, 3, "call_id")?,
        trace_id: col(row, 4, "trace_id")?,
        span_id: col(row, 5, "span_id")?,
        agent_id: col(row, 6, "agent_id")?,
        delegation_id: col(row, 7, "delegation_id")?,
        action: col(row, 8, "action")?,
        input_hash: col(row, 9, "input_hash")?,
        output_hash: col(row, 10, "output_hash")?,
        decision: col(row, 11, "decision")?,
        reason: col(row, 12, "reason")?,
        rules: strings(row, 13, "rules")?,
        cost: col(row, 14, "cost")?,
        duration_ns: col::<Option<i64>>(row, 15, "duration_ns")?.map(u64_from_sql),
        rationale: col(row, 16, "rationale")?,
    };
    Ok(Record {
        seq,
        prev_hash: hash(row, 17, "prev_hash")?,
        hash: hash(row, 18, "hash")?,
        entry,
    })
}

macro_rules! agent_columns {
    () => {
        "id, owner, tier, scopes, rotation_ns, status"
    };
}
pub(crate) use agent_columns;

/// An agent row selected with [`agent_columns`].
pub(crate) fn agent(row: &Row<'_>) -> Result<Agent, DecodeError> {
    let tier: i64 = col(row, 2, "tier")?;
    let status: String = col(row, 5, "status")?;
    Ok(Agent {
        id: col(row, 0, "id")?,
        owner: col(row, 1, "owner")?,
        tier: u8::try_from(tier).map_err(|_| DecodeError::Range {
            column: "tier",
            value: tier,
        })?,
        scopes: strings(row, 3, "scopes")?,
        rotation_ns: nanos(row, 4, "rotation_ns")?,
        status: AgentStatus::parse(&status).ok_or(DecodeError::Status(status))?,
    })
}

macro_rules! credential_columns {
    () => {
        "jti, agent_id, issued_at_ns, expires_at_ns, revoked_at_ns, replaced_by"
    };
}
pub(crate) use credential_columns;

/// A credential row selected with [`credential_columns`].
pub(crate) fn credential(row: &Row<'_>) -> Result<Credential, DecodeError> {
    Ok(Credential {
        jti: col(row, 0, "jti")?,
        agent_id: col(row, 1, "agent_id")?,
        issued_at_ns: nanos(row, 2, "issued_at_ns")?,
        expires_at_ns: nanos(row, 3, "expires_at_ns")?,
        revoked_at_ns: col::<Option<i64>>(row, 4, "revoked_at_ns")?.map(u64_from_sql),
        replaced_by: col(row, 5, "replaced_by")?,
    })
}

macro_rules! kill_columns {
    () => {
        "scope, target, reason, set_by, set_at_ns"
    };
}
pub(crate) use kill_columns;

/// A kill switch row selected with [`kill_columns`].
pub(crate) fn kill(row: &Row<'_>) -> Result<KillSwitch, DecodeError> {
    let scope: String = col(row, 0, "scope")?;
    let name: String = col(row, 1, "target")?;
    Ok(KillSwitch {
        target: KillTarget::from_parts(&scope, &name).ok_or(DecodeError::Scope(scope))?,
        reason: col(row, 2, "reason")?,
        set_by: col(row, 3, "set_by")?,
        set_at_ns: nanos(row, 4, "set_at_ns")?,
    })
}
