//! The embedded SQLite backend.
//!
//! One file in WAL mode holds everything. WAL lets readers proceed while a writer
//! commits, and lets several processes (the server and an operator's CLI) share the file:
//! SQLite's own file locks serialise their writes, and every write here starts with
//! `BEGIN IMMEDIATE` so that the audit chain's head is read and extended under the same
//! lock, whichever process holds it. `synchronous=FULL` makes every commit durable before
//! it returns, which is what lets the server answer a permit only after its audit entry
//! is on disk.
//!
//! Within one process there are two connections, each behind its own mutex: a writer and
//! a reader. The server polls [`Store::state_version`] every 250 ms to learn whether to
//! reload its view; on the reader that poll never queues behind an audit batch waiting
//! for its fsync.
//!
//! SQLite keeps its file descriptors: if the file is deleted or another file is moved to
//! its path, every connection goes on reading and writing the old inode, where nobody
//! else will ever look, while an operator's CLI creates or writes the new file. So the
//! store also holds a descriptor of its own and, before every statement batch, checks
//! that the path still names the file it opened; otherwise the batch fails as
//! `Unavailable` and a server fails closed.

mod codec;
mod error;
mod schema;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{
    params, CachedStatement, Connection, ErrorCode, OpenFlags, OptionalExtension, Params, Row,
    Transaction, TransactionBehavior,
};
use warden_core::audit::{seal, Entry, EntryKind, Record, GENESIS};
use warden_core::clock::{Clock, Nanos, SystemClock};
use warden_core::control::{KillSwitch, KillTarget};
use warden_core::identity::{Agent, AgentStatus};
use warden_core::operator::{Operator, Role};
use warden_core::store::{
    ControlChange, Credential, OperatorRoster, StateSnapshot, Store, StoreError,
};

use codec::{
    agent_columns, audit_columns, credential_columns, kill_columns, u64_from_sql, u64_to_sql,
};
use error::At;

/// How long a statement waits for another connection's lock before giving up with
/// `Unavailable`. Long enough to ride out a CLI's write or a checkpoint, short enough
/// that a wedged writer turns into denials rather than hung requests.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// The pause between attempts to switch a contended file to WAL.
const WAL_RETRY: Duration = Duration::from_millis(5);

/// The reader serves small, frequent queries; it does not need SQLite's default 2 MB
/// page cache (negative values are KiB).
const READER_CACHE_KIB: i64 = -512;

/// A Warden store in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    /// The file as opened. Holding it keeps its inode allocated, so a new file at the
    /// path can never reuse the number and pass for it.
    file: File,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and its schema if missing.
    ///
    /// A file that is not a SQLite database, belongs to another application, or was
    /// written by a newer Warden is refused with `StoreError::Corrupt` naming the path.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        create_private(path)?;
        // The descriptor first, checked against the path once the connections are open:
        // a file swapped in between would otherwise be the one every later check trusts.
        let file = File::open(path).map_err(|e| {
            StoreError::Unavailable(format!("`{}`: cannot open: {e}", path.display()))
        })?;
        let mut writer = connect(path)?;
        schema::migrate(&mut writer, path)?;
        let reader = connect(path)?;
        // The reader never writes; saying so turns a bug that tried into an error.
        reader.pragma_update(None, "query_only", true).at(path)?;
        reader
            .pragma_update(None, "cache_size", READER_CACHE_KIB)
            .at(path)?;
        let store = SqliteStore {
            path: path.to_owned(),
            file,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        };
        store.check_file()?;
        Ok(store)
    }

    /// Opens an existing store for reading only, as `warden audit verify` does: a
    /// missing file is an error (never created), the schema is not migrated, and both
    /// connections are opened read-only by SQLite itself, so no write can happen
    /// through this handle whatever the file's permissions or the process's privileges.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        let connect_ro = || -> Result<Connection, StoreError> {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(path, flags).at(path)?;
            conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
            Ok(conn)
        };
        // As in `open`: the descriptor first, checked once the connections are open.
        let file = File::open(path).map_err(|e| {
            StoreError::Unavailable(format!("`{}`: cannot open: {e}", path.display()))
        })?;
        let writer = connect_ro()?;
        schema::check_current(&writer, path)?;
        let reader = connect_ro()?;
        let store = SqliteStore {
            path: path.to_owned(),
            file,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        };
        store.check_file()?;
        Ok(store)
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails unless the path still names the file this store opened.
    fn check_file(&self) -> Result<(), StoreError> {
        let gone = |what: &str| {
            StoreError::Unavailable(format!(
                "`{}` {what} since this process opened it; refusing to read or write a file \
                 nobody else sees: put the store back or restart with the store you mean",
                self.path.display()
            ))
        };
        let held = self
            .file
            .metadata()
            .map_err(|e| StoreError::Unavailable(format!("`{}`: {e}", self.path.display())))?;
        let named = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone("was deleted")),
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "`{}`: {e}",
                    self.path.display()
                )))
            }
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
                return Err(if held.nlink() == 0 {
                    gone("was deleted and replaced by another file")
                } else {
                    gone("was replaced by another file")
                });
            }
        }
        #[cfg(not(unix))]
        let _ = (held, named);
        Ok(())
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the writer and commits it.
    ///
    /// IMMEDIATE takes the write lock up front. A deferred transaction that reads and
    /// then writes would have to upgrade its lock, and SQLite answers a contended upgrade
    /// with an immediate `SQLITE_BUSY` that the busy timeout cannot retry.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&self.path)?;
        // Checked under the write lock, so no cooperating writer (a CLI) can swap the file
        // between the check and the commit.
        self.check_file()?;
        // On error `tx` is dropped, which rolls back.
        let out = f(&tx)?;
        tx.commit().at(&self.path)?;
        Ok(out)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.check_file()?;
        f(&lock(&self.reader))
    }

    fn corrupt(&self, what: impl fmt::Display) -> StoreError {
        StoreError::Corrupt(format!("`{}`: {what}", self.path.display()))
    }

    fn collect<T>(
        &self,
        stmt: &mut CachedStatement<'_>,
        params: impl Params,
        decode: impl Fn(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut rows = stmt.query(params).at(&self.path)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().at(&self.path)? {
            out.push(decode(row)?);
        }
        Ok(out)
    }

    fn decode_record(&self, row: &Row<'_>) -> Result<Record, StoreError> {
        let seq = codec::seq(row).map_err(|e| self.corrupt(format_args!("audit row: {e}")))?;
        codec::record(row, seq).map_err(|e| self.corrupt(format_args!("audit entry {seq}: {e}")))
    }

    fn decode_agent(&self, row: &Row<'_>) -> Result<Agent, StoreError> {
        codec::agent(row).map_err(|e| self.corrupt(format_args!("agent `{}`: {e}", key(row))))
    }

    fn decode_credential(&self, row: &Row<'_>) -> Result<Credential, StoreError> {
        codec::credential(row)
            .map_err(|e| self.corrupt(format_args!("credential `{}`: {e}", key(row))))
    }

    fn decode_kill(&self, row: &Row<'_>) -> Result<KillSwitch, StoreError> {
        codec::kill(row).map_err(|e| self.corrupt(format_args!("kill switch `{}`: {e}", key(row))))
    }

    fn version(&self, conn: &Connection) -> Result<u64, StoreError> {
        let mut stmt = conn
            .prepare_cached("SELECT v FROM state WHERE k = 'version'")
            .at(&self.path)?;
        let mut rows = stmt.query([]).at(&self.path)?;
        let Some(row) = rows.next().at(&self.path)? else {
            return Err(self.corrupt("the state table has no `version` row"));
        };
        let v: i64 = row.get(0).at(&self.path)?;
        u64::try_from(v).map_err(|_| self.corrupt(format_args!("state version {v} is negative")))
    }

    /// Counts one change to agents, credentials or kill switches, in the caller's
    /// transaction, so a reader never sees the change without the new version.
    fn bump_version(&self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let changed = tx
            .prepare_cached("UPDATE state SET v = v + 1 WHERE k = 'version'")
            .at(&self.path)?
            .execute([])
            .at(&self.path)?;
        if changed == 1 {
            Ok(())
        } else {
            Err(self.corrupt("the state table has no `version` row"))
        }
    }
}

impl SqliteStore {
    /// Seals `entries` onto the chain's head and inserts them, in the caller's write
    /// transaction. Refuses a second outcome for a call before writing anything.
    fn append_in(
        &self,
        tx: &Transaction<'_>,
        entries: Vec<Entry>,
    ) -> Result<Vec<Record>, StoreError> {
        self.refuse_second_outcomes(tx, &entries)?;
        let (last_seq, last_hash) = {
            let mut stmt = tx
                .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                .at(&self.path)?;
            let mut rows = stmt.query([]).at(&self.path)?;
            match rows.next().at(&self.path)? {
                None => (0, GENESIS),
                Some(row) => codec::head(row)
                    .map_err(|e| self.corrupt(format_args!("last audit entry: {e}")))?,
            }
        };
        let records = seal(last_seq, last_hash, entries.into_iter().map(storable));
        let mut insert = tx
            .prepare_cached(concat!(
                "INSERT INTO audit (",
                audit_columns!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
            ))
            .at(&self.path)?;
        for r in &records {
            let e = &r.entry;
            insert
                .execute(params![
                    u64_to_sql(r.seq),
                    u64_to_sql(e.ts_ns),
                    e.kind.as_str(),
                    e.call_id,
                    e.trace_id,
                    e.span_id,
                    e.agent_id,
                    e.delegation_id,
                    e.action,
                    e.input_hash,
                    e.output_hash,
                    e.decision,
                    e.reason,
                    codec::json_list(&e.rules),
                    e.cost,
                    e.duration_ns.map(u64_to_sql),
                    e.rationale,
                    &r.prev_hash[..],
                    &r.hash[..],
                ])
                .at(&self.path)?;
        }
        Ok(records)
    }

    /// One outcome per call, checked under the write lock so concurrent reports (several
    /// requests, several processes) cannot both pass. A check rather than a unique index:
    /// a store written before this rule may already hold duplicates, and must still open.
    fn refuse_second_outcomes(
        &self,
        tx: &Transaction<'_>,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut stored = tx
            .prepare_cached("SELECT 1 FROM audit WHERE call_id = ?1 AND kind = 'outcome' LIMIT 1")
            .at(&self.path)?;
        for e in entries.iter().filter(|e| e.kind == EntryKind::Outcome) {
            if !seen.insert(e.call_id.as_str()) || stored.exists([&e.call_id]).at(&self.path)? {
                return Err(StoreError::Conflict(format!(
                    "call `{}` already has an outcome; a call has exactly one",
                    e.call_id
                )));
            }
        }
        Ok(())
    }

    /// Records a credential for an active agent, or refuses it with `Conflict`.
    fn insert_credential(&self, tx: &Transaction<'_>, c: &Credential) -> Result<(), StoreError> {
        let status: Option<String> = tx
            .prepare_cached("SELECT status FROM agents WHERE id = ?1")
            .at(&self.path)?
            .query_row([&c.agent_id], |r| r.get(0))
            .optional()
            .at(&self.path)?;
        match status.as_deref() {
            None => {
                return Err(StoreError::Conflict(format!(
                    "agent `{}` does not exist; register it before issuing it credentials",
                    c.agent_id
                )))
            }
            Some(s) if s != AgentStatus::Active.as_str() => {
                return Err(StoreError::Conflict(format!(
                    "agent `{}` is {s}; it cannot be issued credentials",
                    c.agent_id
                )))
            }
            Some(_) => {}
        }
        let inserted = tx
            .prepare_cached(concat!(
                "INSERT INTO credentials (",
                credential_columns!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .at(&self.path)?
            .execute(params![
                c.jti,
                c.agent_id,
                u64_to_sql(c.issued_at_ns),
                u64_to_sql(c.expires_at_ns),
                c.revoked_at_ns.map(u64_to_sql),
                c.replaced_by,
            ]);
        match inserted {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                Err(StoreError::Conflict(format!(
                    "credential `{}` already exists",
                    c.jti
                )))
            }
            Err(e) => Err(error::classify(&self.path, &e)),
        }
    }

    /// Writes `agent`'s row: a new one, or with `update`, over an existing agent's owner,
    /// tier, scopes and rotation (its status stays the operators').
    fn write_agent(
        &self,
        tx: &Transaction<'_>,
        agent: &Agent,
        update: bool,
    ) -> rusqlite::Result<usize> {
        const INSERT: &str = "INSERT INTO agents \
             (id, owner, tier, scopes, rotation_ns, status, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
        const UPSERT: &str = "INSERT INTO agents \
             (id, owner, tier, scopes, rotation_ns, status, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, tier = excluded.tier, \
             scopes = excluded.scopes, rotation_ns = excluded.rotation_ns, updated_at = excluded.updated_at";
        // `updated_at` is bookkeeping for operators, never read by a decision, so the wall
        // clock is good enough.
        tx.prepare_cached(if update { UPSERT } else { INSERT })?
            .execute(params![
                agent.id,
                agent.owner,
                agent.tier,
                codec::json_list(&agent.scopes),
                u64_to_sql(agent.rotation_ns),
                agent.status.as_str(),
                u64_to_sql(SystemClock.now_ns()),
            ])
    }

    /// Applies an operator's change in the caller's write transaction, or refuses it with
    /// `Conflict`/`NotFound` (the transaction then rolls back, entry and all).
    fn apply_change(&self, tx: &Transaction<'_>, change: &ControlChange) -> Result<(), StoreError> {
        match change {
            ControlChange::DeclareAgent(agent) => {
                self.write_agent(tx, agent, true).map(|_| ()).at(&self.path)
            }
            ControlChange::RegisterAgent(agent) => {
                let inserted = self.write_agent(tx, agent, false);
                match inserted {
                    Ok(_) => Ok(()),
                    Err(rusqlite::Error::SqliteFailure(f, _))
                        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                    {
                        Err(StoreError::Conflict(format!(
                            "agent `{}` is already registered; issue it a new credential instead",
                            agent.id
                        )))
                    }
                    Err(e) => Err(error::classify(&self.path, &e)),
                }
            }
            ControlChange::IssueCredential(c) => self.insert_credential(tx, c),
            ControlChange::RotateCredential { new, overlap_until } => {
                self.insert_credential(tx, new)?;
                // Every other credential still valid when the new one is issued ends at
                // the overlap's end, or keeps its earlier end; a revocation already in
                // force stays as it is.
                tx.prepare_cached(
                    "UPDATE credentials SET revoked_at_ns = ?3, replaced_by = ?2 \
                     WHERE agent_id = ?1 AND jti <> ?2 AND expires_at_ns > ?4 \
                     AND (revoked_at_ns IS NULL OR revoked_at_ns > ?3)",
                )
                .at(&self.path)?
                .execute(params![
                    new.agent_id,
                    new.jti,
                    u64_to_sql(*overlap_until),
                    u64_to_sql(new.issued_at_ns),
                ])
                .at(&self.path)?;
                Ok(())
            }
            ControlChange::RevokeCredential { agent_id, jti, at } => {
                let changed = tx
                    .prepare_cached(
                        "UPDATE credentials SET revoked_at_ns = ?3, replaced_by = NULL \
                         WHERE jti = ?1 AND agent_id = ?2 \
                         AND (revoked_at_ns IS NULL OR revoked_at_ns > ?3)",
                    )
                    .at(&self.path)?
                    .execute(params![jti, agent_id, u64_to_sql(*at)])
                    .at(&self.path)?;
                if changed == 0 {
                    return Err(StoreError::NotFound(format!(
                        "agent `{agent_id}` has no unrevoked credential `{jti}`"
                    )));
                }
                Ok(())
            }
            ControlChange::SetAgentStatus {
                agent_id,
                status,
                at,
            } => {
                let current: Option<String> = tx
                    .prepare_cached("SELECT status FROM agents WHERE id = ?1")
                    .at(&self.path)?
                    .query_row([agent_id], |r| r.get(0))
                    .optional()
                    .at(&self.path)?;
                let Some(current) = current else {
                    return Err(StoreError::NotFound(format!("no agent `{agent_id}`")));
                };
                let current = AgentStatus::parse(&current).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "agent `{agent_id}` has status `{current}`, which this Warden does not know"
                    ))
                })?;
                current.may_become(*status).map_err(|why| {
                    StoreError::Conflict(format!(
                        "agent `{agent_id}` cannot become {}: {why}",
                        status.as_str()
                    ))
                })?;
                let changed = tx
                    .prepare_cached("UPDATE agents SET status = ?2, updated_at = ?3 WHERE id = ?1")
                    .at(&self.path)?
                    .execute(params![agent_id, status.as_str(), u64_to_sql(*at)])
                    .at(&self.path)?;
                if changed == 0 {
                    return Err(StoreError::NotFound(format!("no agent `{agent_id}`")));
                }
                Ok(())
            }
            ControlChange::SetKill { kill, pre_emptive } => {
                let (scope, target) = kill.target.parts();
                if !pre_emptive {
                    let known = match &kill.target {
                        KillTarget::All => true,
                        KillTarget::Agent(id) => tx
                            .prepare_cached("SELECT 1 FROM agents WHERE id = ?1")
                            .at(&self.path)?
                            .exists([id])
                            .at(&self.path)?,
                        KillTarget::Owner(owner) => tx
                            .prepare_cached("SELECT 1 FROM agents WHERE owner = ?1 LIMIT 1")
                            .at(&self.path)?
                            .exists([owner])
                            .at(&self.path)?,
                    };
                    if !known {
                        let what = match &kill.target {
                            KillTarget::Owner(o) => format!("no registered agent has owner `{o}`"),
                            _ => format!("no agent `{target}` is registered"),
                        };
                        return Err(StoreError::NotFound(format!(
                            "{what}, so this kill switch would stop nothing; check the name, or \
                             set it before the agent exists with `--pre-emptive` \
                             (admin API: `\"pre_emptive\": true`)"
                        )));
                    }
                }
                tx.prepare_cached(concat!(
                    "INSERT INTO kill_switches (",
                    kill_columns!(),
                    ") VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (scope, target) DO UPDATE SET reason = excluded.reason, \
                     set_by = excluded.set_by, set_at_ns = excluded.set_at_ns"
                ))
                .at(&self.path)?
                .execute(params![
                    scope,
                    target,
                    kill.reason,
                    kill.set_by,
                    u64_to_sql(kill.set_at_ns)
                ])
                .at(&self.path)?;
                Ok(())
            }
            ControlChange::ClearKill(target) => {
                let (scope, name) = target.parts();
                let changed = tx
                    .prepare_cached("DELETE FROM kill_switches WHERE scope = ?1 AND target = ?2")
                    .at(&self.path)?
                    .execute([scope, name])
                    .at(&self.path)?;
                if changed == 0 {
                    return Err(StoreError::NotFound(format!(
                        "no kill switch is set for {target}"
                    )));
                }
                Ok(())
            }
            ControlChange::AddOperator(o) => {
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO operators (id, name, role, secret_hash, created_at_ns, \
                         expires_at_ns, removed_at_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
                    )
                    .at(&self.path)?
                    .execute(params![
                        o.id,
                        o.name,
                        o.role.as_str(),
                        o.secret_hash,
                        u64_to_sql(o.created_at_ns),
                        o.expires_at_ns.map(u64_to_sql),
                    ]);
                match inserted {
                    Ok(_) => Ok(()),
                    Err(rusqlite::Error::SqliteFailure(f, _))
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        Err(StoreError::Conflict(format!(
                            "an operator named `{}` exists already (or the id `{}` is taken); \
                             remove it first or choose another name",
                            o.name, o.id
                        )))
                    }
                    Err(e) => Err(error::classify(&self.path, &e)),
                }
            }
            ControlChange::RemoveOperator { id, at } => {
                let changed = tx
                    .prepare_cached(
                        "UPDATE operators SET removed_at_ns = ?2 \
                         WHERE id = ?1 AND removed_at_ns IS NULL",
                    )
                    .at(&self.path)?
                    .execute(params![id, u64_to_sql(*at)])
                    .at(&self.path)?;
                if changed == 0 {
                    return Err(StoreError::NotFound(format!(
                        "no operator account `{id}` (or it was removed already)"
                    )));
                }
                Ok(())
            }
            ControlChange::DisableBootstrap { at } => {
                let roster = self.roster_in(tx)?;
                if roster.bootstrap_disabled {
                    return Err(StoreError::Conflict(
                        "the bootstrap operator token is disabled already".into(),
                    ));
                }
                let admin = roster
                    .accounts
                    .iter()
                    .any(|o| o.role == Role::Admin && o.standing(*at).is_ok());
                if !admin {
                    return Err(StoreError::Conflict(
                        "no admin account is in standing: add one (`warden operator add NAME --role admin`) \
                         before disabling the bootstrap operator token"
                            .into(),
                    ));
                }
                tx.prepare_cached("UPDATE state SET v = 1 WHERE k = 'bootstrap_disabled'")
                    .at(&self.path)?
                    .execute([])
                    .at(&self.path)?;
                Ok(())
            }
        }
    }

    /// The operator accounts and the bootstrap switch, read on `conn`.
    fn roster_in(&self, conn: &Connection) -> Result<OperatorRoster, StoreError> {
        let accounts = self.collect(
            &mut conn
                .prepare_cached(
                    "SELECT id, name, role, secret_hash, created_at_ns, expires_at_ns, \
                     removed_at_ns FROM operators ORDER BY created_at_ns, id",
                )
                .at(&self.path)?,
            [],
            |row| {
                let role: String = row.get(2).at(&self.path)?;
                Ok(Operator {
                    id: row.get(0).at(&self.path)?,
                    name: row.get(1).at(&self.path)?,
                    role: role
                        .parse()
                        .map_err(|e| self.corrupt(format!("operator `{}`: {e}", key(row))))?,
                    secret_hash: row.get(3).at(&self.path)?,
                    created_at_ns: u64_from_sql(row.get(4).at(&self.path)?),
                    expires_at_ns: row
                        .get::<_, Option<i64>>(5)
                        .at(&self.path)?
                        .map(u64_from_sql),
                    removed_at_ns: row
                        .get::<_, Option<i64>>(6)
                        .at(&self.path)?
                        .map(u64_from_sql),
                })
            },
        )?;
        let disabled: i64 = conn
            .query_row(
                "SELECT v FROM state WHERE k = 'bootstrap_disabled'",
                [],
                |r| r.get(0),
            )
            .at(&self.path)?;
        Ok(OperatorRoster {
            accounts,
            bootstrap_disabled: disabled != 0,
        })
    }
}

/// The first column of a row as text, to name the row in an error about its other
/// columns.
fn key(row: &Row<'_>) -> String {
    row.get::<_, String>(0).unwrap_or_else(|_| "?".to_owned())
}

/// Creates the store file, empty and readable by its owner only, if it does not exist.
///
/// SQLite would create it with 0644 less the umask, and it gives the `-wal` and `-shm`
/// files the database file's mode; creating the file 0600 first keeps all three private
/// whatever the umask. The store holds every agent's credentials list, the kill switches
/// and the audit, so no other user of the host has any business reading it.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        // An empty file is an empty database to SQLite.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable(format!(
            "`{}`: cannot create the store: {e}",
            path.display()
        ))),
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    // NO_MUTEX: each connection lives behind our own mutex, so SQLite's per-connection
    // lock would only be taken uncontended. No URI flag: the path is a path.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).at(path)?;
    conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
    enable_wal(&conn, path)?;
    conn.pragma_update(None, "synchronous", "FULL").at(path)?;
    conn.pragma_update(None, "foreign_keys", true).at(path)?;
    Ok(conn)
}

/// Switches the file to WAL (a no-op once it is, as the mode is stored in the file).
///
/// This is also the first statement that reads the file's header, so it is where a file
/// that is not a database is found out. Changing the mode needs an exclusive lock, and
/// SQLite reports a conflict over it at once instead of through the busy handler: two
/// processes creating the same store at the same moment would see a spurious "database
/// is locked". So busy is retried here, for as long as the busy timeout would have.
fn enable_wal(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(StoreError::Unavailable(format!(
                    "`{}`: could not switch to WAL journal mode (it stays `{mode}`); \
                     is the file on a network filesystem?",
                    path.display()
                )))
            }
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(WAL_RETRY);
            }
            Err(e) => return Err(error::classify(path, &e)),
        }
    }
}

/// Locks a connection, recovering it if a thread panicked while holding it.
///
/// The connection itself stays sound: rusqlite's `Transaction` rolls back when dropped
/// during unwinding. Should a transaction still be open anyway, it is rolled back here,
/// so a single panic does not take the store down for the life of the process.
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    let guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
    if !guard.is_autocommit() {
        // If this fails, the next BEGIN fails too and reports it as `Unavailable`.
        let _ = guard.execute_batch("ROLLBACK");
    }
    guard
}

/// Makes an entry's cost storable exactly as hashed.
///
/// SQLite turns a NaN into NULL and may keep -0.0 as the integer 0, so either would
/// read back different from what was hashed, and an honest entry would later look
/// edited. Normalising before sealing means the hash covers what is stored: -0.0 costs
/// the same as 0.0, and NaN is no cost estimate at all.
fn storable(mut e: Entry) -> Entry {
    e.cost = match e.cost {
        Some(c) if c.is_nan() => None,
        // A float pattern compares with `==`, so this arm takes -0.0 too.
        Some(0.0) => Some(0.0),
        other => other,
    };
    e
}

/// `after`/`limit` arguments beyond what SQLite's integers hold mean "no bound".
fn clamp(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn state_version(&self) -> Result<u64, StoreError> {
        self.read(|conn| self.version(conn))
    }

    fn snapshot(&self, now: Nanos) -> Result<StateSnapshot, StoreError> {
        self.check_file()?;
        let mut conn = lock(&self.reader);
        // One read transaction, so the version describes exactly the rows returned.
        let tx = conn.transaction().at(&self.path)?;
        let version = self.version(&tx)?;
        let agents = self.collect(
            &mut tx
                .prepare_cached(concat!(
                    "SELECT ",
                    agent_columns!(),
                    " FROM agents ORDER BY id"
                ))
                .at(&self.path)?,
            [],
            |row| self.decode_agent(row),
        )?;
        // `expires_at_ns < 0` keeps expiries beyond i64::MAX (stored with the sign bit
        // set) in the candidate set; the exact unsigned comparison is made below.
        let credentials = self.collect(
            &mut tx
                .prepare_cached(concat!(
                    "SELECT ",
                    credential_columns!(),
                    " FROM credentials WHERE expires_at_ns > ?1 OR expires_at_ns < 0"
                ))
                .at(&self.path)?,
            [u64_to_sql(now)],
            |row| self.decode_credential(row),
        )?;
        let kills = self.collect(
            &mut tx
                .prepare_cached(concat!(
                    "SELECT ",
                    kill_columns!(),
                    " FROM kill_switches ORDER BY scope, target"
                ))
                .at(&self.path)?,
            [],
            |row| self.decode_kill(row),
        )?;
        tx.commit().at(&self.path)?;
        Ok(StateSnapshot {
            version,
            agents,
            credentials: credentials
                .into_iter()
                .filter(|c| c.expires_at_ns > now)
                .map(|c| (c.jti.clone(), c))
                .collect(),
            kills,
        })
    }

    fn upsert_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        self.write(|tx| {
            self.write_agent(tx, agent, true).at(&self.path)?;
            self.bump_version(tx)
        })
    }

    fn get_agent(&self, id: &str) -> Result<Option<Agent>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    agent_columns!(),
                    " FROM agents WHERE id = ?1"
                ))
                .at(&self.path)?;
            let mut rows = stmt.query([id]).at(&self.path)?;
            match rows.next().at(&self.path)? {
                Some(row) => self.decode_agent(row).map(Some),
                None => Ok(None),
            }
        })
    }

    fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.read(|conn| {
            self.collect(
                &mut conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        agent_columns!(),
                        " FROM agents ORDER BY id"
                    ))
                    .at(&self.path)?,
                [],
                |row| self.decode_agent(row),
            )
        })
    }

    fn list_credentials(&self, agent_id: &str) -> Result<Vec<Credential>, StoreError> {
        self.read(|conn| {
            self.collect(
                &mut conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        credential_columns!(),
                        " FROM credentials WHERE agent_id = ?1 ORDER BY issued_at_ns, jti"
                    ))
                    .at(&self.path)?,
                [agent_id],
                |row| self.decode_credential(row),
            )
        })
    }

    fn apply_control(&self, change: &ControlChange, entry: Entry) -> Result<Record, StoreError> {
        self.write(|tx| {
            self.apply_change(tx, change)?;
            self.bump_version(tx)?;
            let mut records = self.append_in(tx, vec![entry])?;
            records
                .pop()
                .ok_or_else(|| self.corrupt("appending a control entry returned no record"))
        })
    }

    fn append_audit(&self, entries: Vec<Entry>) -> Result<Vec<Record>, StoreError> {
        // An empty append still takes the write lock, checks the file and reads the head,
        // and writes nothing: it answers "could an append be made now?", which is how a
        // server learns that a failing audit has recovered without waiting for traffic.
        self.write(|tx| self.append_in(tx, entries))
    }

    fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.read(|conn| {
            self.collect(
                &mut conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        audit_columns!(),
                        " FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                    ))
                    .at(&self.path)?,
                [clamp(after), clamp(limit)],
                |row| self.decode_record(row),
            )
        })
    }

    fn call_records(&self, call_id: &str) -> Result<Vec<Record>, StoreError> {
        self.read(|conn| {
            self.collect(
                &mut conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        audit_columns!(),
                        " FROM audit WHERE call_id = ?1 ORDER BY seq"
                    ))
                    .at(&self.path)?,
                [call_id],
                |row| self.decode_record(row),
            )
        })
    }

    fn tail_audit(&self, n: usize) -> Result<Vec<Record>, StoreError> {
        self.read(|conn| {
            self.collect(
                &mut conn
                    .prepare_cached(concat!(
                        "SELECT * FROM (SELECT ",
                        audit_columns!(),
                        " FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq"
                    ))
                    .at(&self.path)?,
                [clamp(n)],
                |row| self.decode_record(row),
            )
        })
    }

    fn operators(&self) -> Result<OperatorRoster, StoreError> {
        self.read(|conn| self.roster_in(conn))
    }
}

#[cfg(test)]
mod tests;
