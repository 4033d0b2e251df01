//! Group commit for the audit trail.
//!
//! Request handlers hand their entry to one writer thread and wait. The writer takes
//! everything queued (up to a batch limit), appends it in one durable transaction, and
//! answers every waiter. Under load one fsync covers many calls, so "no audit, no action"
//! costs little more than a channel round trip per call.
//!
//! A failed batch is answered with the error (its calls are denied) and the thread goes
//! on with the next: a store fault lasts as long as the fault, never longer. A panic in
//! the store is caught and treated as a failed batch, since the thread ending would deny
//! every later call. Failures and recoveries are reported to [`Health`], so the node is
//! unready while appends fail.
//!
//! The store refuses a batch whole when one entry breaks a rule (a second outcome for a
//! call); the writer then appends that batch's entries one by one, so only the offending
//! entry is refused and the others are written.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;

use tokio::sync::{mpsc, oneshot};
use warden_core::audit::{Entry, EntryKind, Record};
use warden_core::store::{Store, StoreError};

use crate::health::Health;

/// Why an entry was not appended.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditError {
    /// The store refused this entry (e.g. a second outcome for a call); retrying will not
    /// help. Other entries of its batch were written.
    #[error("{0}")]
    Refused(String),
    /// The entry could not be written now (store fault, writer stopped).
    #[error("{0}")]
    Failed(String),
}

type Answer = Result<Record, AuditError>;
type Reply = oneshot::Sender<Answer>;

#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<(Entry, Reply)>,
}

impl AuditWriter {
    /// Starts the writer thread. It stops when every `AuditWriter` clone is dropped.
    pub fn start(
        store: Arc<dyn Store>,
        max_batch: usize,
        health: Arc<Health>,
    ) -> std::io::Result<AuditWriter> {
        let (tx, mut rx) = mpsc::channel::<(Entry, Reply)>(max_batch.saturating_mul(8).max(1024));
        thread::Builder::new()
            .name("warden-audit".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(max_batch);
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    let (entries, replies): (Vec<Entry>, Vec<Reply>) = batch.drain(..).unzip();
                    let answers = append(store.as_ref(), entries, replies.len());
                    // Nor may a log subscriber that panics end the thread.
                    let _ = catch_unwind(AssertUnwindSafe(|| report(&health, &answers)));
                    for (answer, reply) in answers.into_iter().zip(replies) {
                        let _ = reply.send(answer);
                    }
                }
            })?;
        Ok(AuditWriter { tx })
    }

    /// Appends one entry and waits until it is durable.
    pub async fn append(&self, entry: Entry) -> Result<Record, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((entry, reply))
            .await
            .map_err(|_| AuditError::Failed("audit writer has stopped".to_owned()))?;
        rx.await
            .map_err(|_| AuditError::Failed("audit writer dropped the entry".to_owned()))?
    }

    /// False once the writer thread has ended, after which every append fails.
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// Appends one batch; one answer per entry, in order.
fn append(store: &dyn Store, entries: Vec<Entry>, n: usize) -> Vec<Answer> {
    // Only outcomes can be refused; batches of decisions are not copied.
    let retry_alone =
        (n > 1 && entries.iter().any(|e| e.kind == EntryKind::Outcome)).then(|| entries.clone());
    match guarded(store, entries) {
        Ok(records) if records.len() == n => records.into_iter().map(Ok).collect(),
        Ok(records) => failed(
            n,
            format!("store returned {} records for {n} entries", records.len()),
        ),
        // One entry broke a rule and the batch was refused whole: append each alone, so
        // only that one is refused. Rare (a client racing itself), so the extra
        // transactions cost nothing in the common case.
        Err(StoreError::Conflict(_)) if retry_alone.is_some() => retry_alone
            .into_iter()
            .flatten()
            .map(|e| match guarded(store, vec![e]) {
                Ok(mut records) if records.len() == 1 => records
                    .pop()
                    .ok_or_else(|| AuditError::Failed("store returned no record".to_owned())),
                Ok(records) => Err(AuditError::Failed(format!(
                    "store returned {} records for 1 entry",
                    records.len()
                ))),
                Err(StoreError::Conflict(m)) => Err(AuditError::Refused(m)),
                Err(e) => Err(AuditError::Failed(e.to_string())),
            })
            .collect(),
        Err(StoreError::Conflict(m)) => (0..n)
            .map(|_| Err(AuditError::Refused(m.clone())))
            .collect(),
        Err(e) => failed(n, e.to_string()),
    }
}

fn failed(n: usize, msg: String) -> Vec<Answer> {
    (0..n)
        .map(|_| Err(AuditError::Failed(msg.clone())))
        .collect()
}

/// `Store::append_audit` with a panic turned into an error.
fn guarded(store: &dyn Store, entries: Vec<Entry>) -> Result<Vec<Record>, StoreError> {
    // The store's own state survives a panic (SQLite rolls back the open transaction and
    // the connection's mutex is recovered on the next lock), so carrying on is safe.
    catch_unwind(AssertUnwindSafe(|| store.append_audit(entries))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(StoreError::Unavailable(format!(
            "the store panicked while appending: {what}"
        )))
    })
}

/// Tells [`Health`] how the batch went, logging only changes: under a flood of calls a
/// line per failed batch would bury the one that matters. A refused entry is the
/// caller's mistake, not a store fault: appends work.
fn report(health: &Health, answers: &[Answer]) {
    if answers.is_empty() {
        return;
    }
    // Any failed entry counts (an entry-by-entry retry can fail half-way when the store
    // goes down); only a batch with none is a success.
    let failure = answers.iter().find_map(|a| match a {
        Err(AuditError::Failed(e)) => Some(e),
        _ => None,
    });
    let changed = match failure {
        Some(e) => health.audit_failed(e.clone()),
        None => health.audit_succeeded(),
    };
    match (changed, failure) {
        (true, Some(e)) => {
            tracing::error!(error = %e, "audit append failed; denying calls until appends work again");
        }
        (true, None) => tracing::info!("audit appends work again"),
        (false, _) => {}
    }
}
