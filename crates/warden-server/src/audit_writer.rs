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
//! An outcome or a summary holds up no call: the call it reports on was decided and has
//! answered. A batch of nothing else may therefore *linger* for a short bound (`[audit]
//! linger`, 2 ms by default) waiting for a decision to share its commit, as a Kafka
//! producer lingers to fill a batch. Without it a sequential session pays two fsyncs per
//! call, and the second is on the next call's path: the outcome of call N is being synced
//! when the decision of call N+1 arrives, and that decision waits for it before its own.
//! With it the two entries share one. A lingering entry is still answered only when it is
//! durable; only callers that asked ([`AuditWriter::append_lingering`]) linger, so a
//! client that waits for its outcome's answer before its next check is never slowed.
//!
//! The store refuses a batch whole when one entry breaks a rule (a second outcome for a
//! call); the writer then appends that batch's entries one by one, so only the offending
//! entry is refused and the others are written.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

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

/// One entry to append, whether it may wait for company, and where its answer goes.
struct Job {
    entry: Entry,
    linger: bool,
    reply: Reply,
}

#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Job>,
}

impl AuditWriter {
    /// Starts the writer thread. It stops when every `AuditWriter` clone is dropped.
    /// `linger` bounds how long a batch of lingering entries alone waits for a decision.
    pub fn start(
        store: Arc<dyn Store>,
        max_batch: usize,
        linger: Duration,
        health: Arc<Health>,
    ) -> std::io::Result<AuditWriter> {
        let (tx, mut rx) = mpsc::channel::<Job>(max_batch.saturating_mul(8).max(1024));
        // A runtime of the thread's own, for nothing but waiting on the channel with a
        // deadline (a blocking `recv` has none).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        thread::Builder::new()
            .name("warden-audit".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(max_batch);
                while let Some(first) = rt.block_on(rx.recv()) {
                    let mut urgent = !first.linger;
                    batch.push(first);
                    urgent |= take_queued(&mut rx, &mut batch, max_batch);
                    let until = tokio::time::Instant::now() + linger;
                    while !urgent && batch.len() < max_batch {
                        // The timer is made inside `block_on`: it needs the runtime.
                        let next =
                            rt.block_on(async { tokio::time::timeout_at(until, rx.recv()).await });
                        match next {
                            Ok(Some(job)) => {
                                urgent = !job.linger;
                                batch.push(job);
                                urgent |= take_queued(&mut rx, &mut batch, max_batch);
                            }
                            // Closed (the batch is still written) or the bound passed.
                            Ok(None) | Err(_) => break,
                        }
                    }
                    let (entries, replies): (Vec<Entry>, Vec<Reply>) =
                        batch.drain(..).map(|j| (j.entry, j.reply)).unzip();
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

    /// Appends one entry and waits until it is durable. For a decision: it is committed
    /// with whatever is queued, at once.
    pub async fn append(&self, entry: Entry) -> Result<Record, AuditError> {
        self.submit(entry, false).await
    }

    /// Appends an entry that holds up no call (an outcome, a summary) and waits until it
    /// is durable, which may take up to the writer's linger longer: a batch of such
    /// entries waits that long for a decision to share its commit.
    pub async fn append_lingering(&self, entry: Entry) -> Result<Record, AuditError> {
        self.submit(entry, true).await
    }

    async fn submit(&self, entry: Entry, linger: bool) -> Result<Record, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                entry,
                linger,
                reply,
            })
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

/// Moves what is queued now into `batch`, up to `max`; whether any of it may not linger.
fn take_queued(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>, max: usize) -> bool {
    let mut urgent = false;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => {
                urgent |= !job.linger;
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    urgent
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use warden_core::identity::Agent;
    use warden_core::store::{ControlChange, Credential, StateSnapshot};
    use warden_store::conformance::sample_entry;
    use warden_store::SqliteStore;

    use super::*;

    /// A real store that remembers the kinds of every batch appended, in order.
    struct Batches {
        inner: SqliteStore,
        seen: Mutex<Vec<Vec<EntryKind>>>,
        _dir: tempfile::TempDir,
    }

    impl Batches {
        fn new() -> Arc<Self> {
            let dir = tempfile::tempdir().expect("tempdir");
            let inner = SqliteStore::open(&dir.path().join("w.db")).expect("store");
            Arc::new(Self {
                inner,
                seen: Mutex::new(Vec::new()),
                _dir: dir,
            })
        }
        fn seen(&self) -> Vec<Vec<EntryKind>> {
            self.seen.lock().expect("lock").clone()
        }
    }

    impl Store for Batches {
        fn operators(&self) -> Result<warden_core::store::OperatorRoster, StoreError> {
            self.inner.operators()
        }
        fn state_version(&self) -> Result<u64, StoreError> {
            self.inner.state_version()
        }
        fn snapshot(&self, now: u64) -> Result<StateSnapshot, StoreError> {
            self.inner.snapshot(now)
        }
        fn upsert_agent(&self, a: &Agent) -> Result<(), StoreError> {
            self.inner.upsert_agent(a)
        }
        fn get_agent(&self, id: &str) -> Result<Option<Agent>, StoreError> {
            self.inner.get_agent(id)
        }
        fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
            self.inner.list_agents()
        }
        fn list_credentials(&self, id: &str) -> Result<Vec<Credential>, StoreError> {
            self.inner.list_credentials(id)
        }
        fn apply_control(&self, c: &ControlChange, e: Entry) -> Result<Record, StoreError> {
            self.inner.apply_control(c, e)
        }
        fn append_audit(&self, entries: Vec<Entry>) -> Result<Vec<Record>, StoreError> {
            self.seen
                .lock()
                .expect("lock")
                .push(entries.iter().map(|e| e.kind).collect());
            self.inner.append_audit(entries)
        }
        fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
            self.inner.read_audit(after, limit)
        }
        fn call_records(&self, id: &str) -> Result<Vec<Record>, StoreError> {
            self.inner.call_records(id)
        }
        fn tail_audit(&self, n: usize) -> Result<Vec<Record>, StoreError> {
            self.inner.tail_audit(n)
        }
    }

    fn entry(kind: EntryKind, call: &str) -> Entry {
        Entry {
            kind,
            ..sample_entry(0, call)
        }
    }

    fn writer(store: &Arc<Batches>, linger: Duration) -> AuditWriter {
        AuditWriter::start(store.clone(), 64, linger, Arc::new(Health::default())).expect("writer")
    }

    // Current-thread runtime: a spawned task runs up to its first wait when this one
    // yields, so the order in which entries reach the writer is the test's.
    #[tokio::test]
    async fn a_lingering_outcome_shares_the_next_decisions_commit() {
        let store = Batches::new();
        // Far longer than the test: the outcome can only be written with the decision.
        let w = writer(&store, Duration::from_secs(60));
        let outcome = tokio::spawn({
            let w = w.clone();
            async move { w.append_lingering(entry(EntryKind::Outcome, "c1")).await }
        });
        tokio::task::yield_now().await;
        let decision = w.append(entry(EntryKind::Decision, "c2")).await;
        assert!(decision.is_ok(), "{decision:?}");
        let outcome = outcome.await.expect("task");
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(
            store.seen(),
            vec![vec![EntryKind::Outcome, EntryKind::Decision]]
        );
    }

    #[tokio::test]
    async fn a_lingering_outcome_alone_is_written_once_the_linger_ends() {
        let store = Batches::new();
        let w = writer(&store, Duration::from_millis(1));
        let first = w.append_lingering(entry(EntryKind::Outcome, "c1")).await;
        assert!(first.is_ok(), "{first:?}");
        let second = w.append_lingering(entry(EntryKind::Outcome, "c2")).await;
        assert!(second.is_ok(), "{second:?}");
        assert_eq!(
            store.seen(),
            vec![vec![EntryKind::Outcome], vec![EntryKind::Outcome]]
        );
        assert_eq!(store.inner.tail_audit(5).expect("tail").len(), 2);
    }

    #[tokio::test]
    async fn only_callers_that_ask_linger() {
        let store = Batches::new();
        let w = writer(&store, Duration::from_secs(60));
        // Were it held for the linger, this would wait a minute.
        let plain = tokio::time::timeout(
            Duration::from_secs(20),
            w.append(entry(EntryKind::Outcome, "c1")),
        )
        .await;
        assert!(matches!(plain, Ok(Ok(_))), "{plain:?}");
        assert_eq!(store.seen(), vec![vec![EntryKind::Outcome]]);
    }
}
