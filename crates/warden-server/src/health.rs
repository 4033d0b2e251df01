//! Whether this node would decide calls now rather than fail closed, and why not.
//!
//! `/readyz` tells whatever routes traffic which nodes to use, so it must say 503 whenever
//! this node's own state would turn calls into denials: no policy, a stale control view,
//! a store it cannot read (deleted or replaced under it included), audit appends that
//! fail, an audit writer that has stopped. Low free space on the store's filesystem is
//! reported too, before the appends start failing. Each condition is set by the part
//! that finds it out (the control refresh, the audit writer, the watch task below) and
//! cleared by the same part once it sees the condition gone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use warden_core::clock::NANOS_PER_MILLI;

use crate::App;

/// How often a failing audit is probed for recovery.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often the store's free space is read.
const DISK_EVERY: Duration = Duration::from_secs(5);
/// The default low-space threshold: 256 MiB, or 1% of a smaller filesystem.
const DEFAULT_MIN_FREE: u64 = 256 << 20;

/// The body of `/readyz`.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub control_view_fresh: bool,
    pub control_view_age_ms: Option<u64>,
    pub policy_digest: Option<String>,
    /// Empty when ready.
    pub reasons: Vec<NotReady>,
}

/// One reason the node is not ready.
#[derive(Debug, Serialize)]
pub struct NotReady {
    pub code: NotReadyCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotReadyCode {
    NoPolicy,
    ControlViewStale,
    StoreUnavailable,
    AuditAppendFailing,
    AuditWriterStopped,
    LowDiskSpace,
}

/// The conditions found by the node's parts, each with its message.
#[derive(Default)]
pub struct Health {
    faults: Mutex<Faults>,
}

#[derive(Default)]
struct Faults {
    store: Option<String>,
    audit: Option<String>,
    /// Failed audit appends so far, so that a probe that started before a failure
    /// cannot clear it.
    audit_failures: u64,
    disk: Option<String>,
}

impl Health {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        // The fields are plain values, each written in one assignment: a panic elsewhere
        // cannot leave them half-updated.
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a failed audit append; true if appends were working until now.
    pub(crate) fn audit_failed(&self, message: String) -> bool {
        let mut f = self.faults();
        f.audit_failures = f.audit_failures.wrapping_add(1);
        f.audit.replace(message).is_none()
    }

    /// Records a successful append; true if appends were failing until now.
    pub(crate) fn audit_succeeded(&self) -> bool {
        self.faults().audit.take().is_some()
    }

    /// Clears a failing audit unless another append failed since `failures` was read.
    fn audit_recovered(&self, failures: u64) -> bool {
        let mut f = self.faults();
        f.audit_failures == failures && f.audit.take().is_some()
    }

    /// While appends are failing, the count of failures so far.
    fn audit_failing(&self) -> Option<u64> {
        let f = self.faults();
        f.audit.as_ref().map(|_| f.audit_failures)
    }

    /// Records the outcome of reading the store; true if that changed the condition.
    pub(crate) fn store_read(&self, error: Option<String>) -> bool {
        let mut f = self.faults();
        let changed = f.store.is_some() != error.is_some();
        f.store = error;
        changed
    }

    fn set_disk(&self, low: Option<String>) -> bool {
        let mut f = self.faults();
        let changed = f.disk.is_some() != low.is_some();
        f.disk = low;
        changed
    }
}

impl App {
    /// Whether this node would decide calls now, with every reason it would not.
    pub fn readiness(&self) -> Readiness {
        let control_view_fresh = self.pipeline.is_fresh();
        let control_view_age_ms = self.pipeline.staleness().map(|s| s / NANOS_PER_MILLI);
        let policy_digest = self.pipeline.policy().map(|p| p.digest().to_owned());
        let mut reasons = Vec::new();
        let mut add = |code, message: String| reasons.push(NotReady { code, message });
        if policy_digest.is_none() {
            add(NotReadyCode::NoPolicy, "no policy is loaded".into());
        }
        if !control_view_fresh {
            let age = control_view_age_ms.map_or("never loaded".to_owned(), |ms| {
                format!("last confirmed {ms}ms ago")
            });
            add(
                NotReadyCode::ControlViewStale,
                format!("the kill-switch view is stale ({age})"),
            );
        }
        if !self.audit.is_running() {
            add(
                NotReadyCode::AuditWriterStopped,
                "the audit writer has stopped; restart the node".into(),
            );
        }
        let f = self.health.faults();
        if let Some(m) = &f.store {
            add(NotReadyCode::StoreUnavailable, m.clone());
        }
        if let Some(m) = &f.audit {
            add(NotReadyCode::AuditAppendFailing, m.clone());
        }
        if let Some(m) = &f.disk {
            add(NotReadyCode::LowDiskSpace, m.clone());
        }
        drop(f);
        Readiness {
            ready: reasons.is_empty(),
            control_view_fresh,
            control_view_age_ms,
            policy_digest,
            reasons,
        }
    }

    /// While appends are failing, tries an empty one (it takes the write lock and checks
    /// the store, writing nothing), so the node turns ready again without waiting for a
    /// call that a router, seeing it unready, would never send.
    async fn probe_audit(&self) {
        let Some(failures) = self.health.audit_failing() else {
            return;
        };
        let store = self.store.clone();
        let probe = tokio::task::spawn_blocking(move || store.append_audit(Vec::new())).await;
        if matches!(probe, Ok(Ok(_))) && self.health.audit_recovered(failures) {
            tracing::info!("audit appends work again");
        }
    }

    async fn check_disk(&self) {
        let dir = store_dir(&self.settings.store_path);
        let configured = self.settings.store_min_free_bytes;
        let d = dir.clone();
        let space = tokio::task::spawn_blocking(move || free_space(&d)).await;
        let low = match space {
            Ok(Ok(space)) => low_space_message(&dir, space, configured),
            Ok(Err(e)) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot read free space");
                None
            }
            Err(_) => None,
        };
        let now_low = low.clone();
        if self.health.set_disk(low) {
            match now_low {
                Some(m) => tracing::warn!("{m}"),
                None => {
                    tracing::info!(dir = %dir.display(), "free space is above the threshold again")
                }
            }
        }
    }
}

/// Space on a filesystem, in bytes.
#[derive(Clone, Copy, Debug)]
struct Space {
    /// What an unprivileged process may still write.
    available: u64,
    total: u64,
}

#[cfg(unix)]
fn free_space(dir: &Path) -> std::io::Result<Space> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(Space {
        available: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

#[cfg(not(unix))]
fn free_space(_: &Path) -> std::io::Result<Space> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// The folder holding the store file, whose filesystem the store grows on.
fn store_dir(store: &Path) -> PathBuf {
    match store.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn low_space_message(dir: &Path, space: Space, configured: Option<u64>) -> Option<String> {
    let threshold = configured.unwrap_or_else(|| DEFAULT_MIN_FREE.min(space.total / 100));
    (space.available < threshold).then(|| {
        format!(
            "{} bytes free on the filesystem of `{}`, below the threshold of {threshold} bytes \
             (`[store] min_free_bytes`); audit appends will fail when it is full: free space",
            space.available,
            dir.display()
        )
    })
}

/// Watches what no request finds out by itself: whether a failing audit has recovered,
/// and the store's free space.
pub(crate) fn spawn_watch(app: &Arc<App>, mut stop: watch::Receiver<bool>) {
    let app = app.clone();
    tokio::spawn(async move {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut disk = tokio::time::interval(DISK_EVERY);
        disk.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = probe.tick() => app.probe_audit().await,
                _ = disk.tick() => app.check_disk().await,
                _ = stop.changed() => break,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_threshold_is_256_mib_or_one_percent_of_a_small_filesystem() {
        let dir = Path::new("/srv");
        let big = Space {
            available: 300 << 20,
            total: 1 << 40,
        };
        assert!(low_space_message(dir, big, None).is_none());
        let low = Space {
            available: 200 << 20,
            ..big
        };
        let m = low_space_message(dir, low, None).unwrap();
        assert!(m.contains("`/srv`") && m.contains("min_free_bytes"), "{m}");
        let small = Space {
            available: 20 << 20,
            total: 1 << 30,
        };
        assert!(low_space_message(dir, small, None).is_none());
        assert!(low_space_message(dir, small, Some(64 << 20)).is_some());
        let empty = Space {
            available: 0,
            total: 0,
        };
        assert!(low_space_message(dir, empty, Some(0)).is_none());
    }

    #[test]
    fn a_probe_does_not_clear_a_failure_that_came_after_it_started() {
        let h = Health::default();
        assert!(h.audit_failed("a".into()));
        let seen = h.audit_failing().unwrap();
        assert!(!h.audit_failed("b".into()));
        assert!(!h.audit_recovered(seen));
        assert!(h.audit_failing().is_some());
        assert!(h.audit_recovered(h.audit_failing().unwrap()));
        assert!(h.audit_failing().is_none());
    }

    #[test]
    fn the_store_dir_of_a_bare_file_name_is_the_working_directory() {
        assert_eq!(store_dir(Path::new("warden.db")), Path::new("."));
        assert_eq!(
            store_dir(Path::new("/var/w/warden.db")),
            Path::new("/var/w")
        );
    }
}
