//! The schema and its migrations, keyed on `PRAGMA user_version`.
//!
//! Migration `i` (counting from 1) takes the file from version `i - 1` to `i`. They run
//! under one `BEGIN IMMEDIATE`, so when a server and a CLI open a new file at the same
//! moment exactly one of them creates the tables and the other sees them done. A file
//! marked with a newer version is refused rather than read with the wrong assumptions.
//!
//! Nanosecond counters (`*_ns`, `updated_at`) are `u64` in Rust and stored as the `i64`
//! with the same bits, so every value round-trips exactly; realistic timestamps (before
//! the year 2262) stay positive and therefore compare correctly in SQL too.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};
use warden_core::store::StoreError;

use super::error::At;

/// Marks a file as Warden's (`PRAGMA application_id`, the ASCII bytes `WDRN`), so a
/// SQLite file belonging to something else is refused instead of gaining our tables.
pub(crate) const APPLICATION_ID: i32 = 0x5744_524E;

const V1: &str = "
CREATE TABLE agents (
    id          TEXT PRIMARY KEY NOT NULL,
    owner       TEXT NOT NULL,
    tier        INTEGER NOT NULL,
    scopes      TEXT NOT NULL,      -- JSON list of strings
    rotation_ns INTEGER NOT NULL,
    status      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL    -- nanoseconds since the epoch
) STRICT;

CREATE TABLE credentials (
    jti           TEXT PRIMARY KEY NOT NULL,
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    issued_at_ns  INTEGER NOT NULL,
    expires_at_ns INTEGER NOT NULL,
    revoked_at_ns INTEGER
) STRICT;
CREATE INDEX credentials_agent ON credentials (agent_id);
-- The snapshot reads only revoked credentials; keep that read off the full table.
CREATE INDEX credentials_revoked ON credentials (expires_at_ns) WHERE revoked_at_ns IS NOT NULL;

CREATE TABLE kill_switches (
    scope     TEXT NOT NULL,
    target    TEXT NOT NULL,
    reason    TEXT NOT NULL,
    set_by    TEXT NOT NULL,
    set_at_ns INTEGER NOT NULL,
    PRIMARY KEY (scope, target)
) STRICT;

CREATE TABLE state (
    k TEXT PRIMARY KEY NOT NULL,
    v INTEGER NOT NULL
) STRICT;
INSERT INTO state (k, v) VALUES ('version', 0);

CREATE TABLE audit (
    seq           INTEGER PRIMARY KEY,
    ts_ns         INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    call_id       TEXT NOT NULL,
    trace_id      TEXT NOT NULL,
    span_id       TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    delegation_id TEXT,
    action        TEXT NOT NULL,
    input_hash    TEXT,
    output_hash   TEXT,
    decision      TEXT NOT NULL,
    reason        TEXT NOT NULL,
    rules         TEXT NOT NULL,    -- JSON list of strings
    cost          REAL,
    duration_ns   INTEGER,
    rationale     TEXT,
    prev_hash     BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash          BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
CREATE INDEX audit_call_id ON audit (call_id);
";

/// Credential rotation: a rotated-out credential names its replacement, and its
/// `revoked_at_ns` (the end of the overlap) may lie in the future.
const V2_ROTATION: &str = "
ALTER TABLE credentials ADD COLUMN replaced_by TEXT;
";

/// Operator accounts with roles (their secrets only as SHA-256), and the switch that
/// disables the bootstrap operator token. One name per account not removed.
const V3_OPERATORS: &str = "
CREATE TABLE operators (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_hash   TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL,
    expires_at_ns INTEGER,
    removed_at_ns INTEGER
) STRICT;
CREATE UNIQUE INDEX operators_live_name ON operators (name) WHERE removed_at_ns IS NULL;
INSERT INTO state (k, v) VALUES ('bootstrap_disabled', 0);
";

const MIGRATIONS: &[&str] = &[V1, V2_ROTATION, V3_OPERATORS];

/// The schema version this code writes and reads.
pub(crate) const LATEST: i64 = MIGRATIONS.len() as i64;

fn versions(conn: &Connection, path: &Path) -> Result<(i64, i32), StoreError> {
    let user_version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .at(path)?;
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .at(path)?;
    Ok((user_version, app_id))
}

fn check(path: &Path, user_version: i64, app_id: i32) -> Result<(), StoreError> {
    let at = path.display();
    if user_version < 0 {
        return Err(StoreError::Corrupt(format!(
            "`{at}` has an invalid schema version {user_version}"
        )));
    }
    if user_version > LATEST {
        return Err(StoreError::Corrupt(format!(
            "`{at}` has schema version {user_version}, but this build of Warden knows only versions up to {LATEST}; \
             use a newer Warden for this file"
        )));
    }
    if app_id != APPLICATION_ID && (app_id != 0 || user_version != 0) {
        return Err(StoreError::Corrupt(format!(
            "`{at}` is a SQLite database of another application (application_id {app_id:#x}, user_version \
             {user_version}), not a Warden store"
        )));
    }
    Ok(())
}

/// Checks, without writing, that the file at `path` is a Warden store at [`LATEST`]: what
/// a read-only handle needs, as it cannot migrate.
pub(crate) fn check_current(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let (user_version, app_id) = versions(conn, path)?;
    check(path, user_version, app_id)?;
    match user_version {
        LATEST => Ok(()),
        0 => Err(StoreError::Corrupt(format!(
            "`{}` holds no Warden store (no schema): it is empty or was never opened by Warden",
            path.display()
        ))),
        v => Err(StoreError::Unavailable(format!(
            "`{}` has schema version {v}, older than this Warden's {LATEST}; open it once with \
             `warden serve` to migrate it",
            path.display()
        ))),
    }
}

/// Brings the file at `path` to [`LATEST`], or explains why it cannot.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    // The common case, an up-to-date file, takes no write lock: a CLI opening the store
    // must not queue behind the server's audit batches just to learn nothing changed,
    // and a read-only file must still open.
    let (user_version, app_id) = versions(conn, path)?;
    check(path, user_version, app_id)?;
    if user_version == LATEST {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let (user_version, app_id) = versions(&tx, path)?;
    check(path, user_version, app_id)?;
    if user_version == LATEST {
        return Ok(());
    }
    if user_version == 0 {
        let objects: i64 = tx
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .at(path)?;
        if objects > 0 {
            return Err(StoreError::Corrupt(format!(
                "`{}` is a SQLite database that already holds other tables, not a Warden store",
                path.display()
            )));
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .at(path)?;
    }
    let done = usize::try_from(user_version).unwrap_or(usize::MAX);
    for step in MIGRATIONS.iter().skip(done) {
        tx.execute_batch(step).at(path)?;
    }
    tx.pragma_update(None, "user_version", LATEST).at(path)?;
    tx.commit().at(path)
}
