//! Group commit for the audit trail.
//!
//! Request handlers hand their entry to one writer thread and wait. The writer takes
//! everything queued (up to a batch limit), appends it in one durable transaction, and
//! answers every waiter. Under load one fsync covers many calls, so "no audit, no action"
//! costs little more than a channel round trip per call.

use std::sync::Arc;
use std::thread;

use tokio::sync::{mpsc, oneshot};
use warden_core::audit::{Entry, Record};
use warden_core::store::Store;

type Reply = oneshot::Sender<Result<Record, String>>;

#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<(Entry, Reply)>,
}

impl AuditWriter {
    /// Starts the writer thread. It stops when every `AuditWriter` clone is dropped.
    pub fn start(store: Arc<dyn Store>, max_batch: usize) -> std::io::Result<AuditWriter> {
        let (tx, mut rx) = mpsc::channel::<(Entry, Reply)>(max_batch.saturating_mul(8).max(1024));
        thread::Builder::new().name("warden-audit".into()).spawn(move || {
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
                match store.append_audit(entries) {
                    Ok(records) if records.len() == replies.len() => {
                        for (r, reply) in records.into_iter().zip(replies) {
                            let _ = reply.send(Ok(r));
                        }
                    }
                    Ok(records) => {
                        let msg = format!("store returned {} records for {} entries", records.len(), replies.len());
                        for reply in replies {
                            let _ = reply.send(Err(msg.clone()));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "audit append failed; denying the calls in this batch");
                        let msg = e.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(msg.clone()));
                        }
                    }
                }
            }
        })?;
        Ok(AuditWriter { tx })
    }

    /// Appends one entry and waits until it is durable.
    pub async fn append(&self, entry: Entry) -> Result<Record, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((entry, reply))
            .await
            .map_err(|_| "audit writer has stopped".to_owned())?;
        rx.await
            .map_err(|_| "audit writer dropped the entry".to_owned())?
    }
}
