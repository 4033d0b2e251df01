use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use proptest::prelude::*;
use tempfile::TempDir;
use warden_core::audit::{ChainError, EntryKind};
use warden_core::clock::NANOS_PER_SEC;

use super::*;
use crate::conformance::{self, assert_linked, sample_agent, sample_entry, verify_chain, NOW};

fn fresh() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warden.db");
    (dir, path)
}

/// A store at a fresh path holding `n` audit records (seq 1..=n).
fn store_with(n: u64) -> (TempDir, PathBuf, SqliteStore) {
    let (dir, path) = fresh();
    let store = SqliteStore::open(&path).unwrap();
    if n > 0 {
        store
            .append_audit(
                (0..n)
                    .map(|i| sample_entry(i, &format!("call-{i}")))
                    .collect(),
            )
            .unwrap();
    }
    (dir, path, store)
}

/// A connection that goes around the store, as an attacker or a careless tool would.
fn raw(path: &Path) -> Connection {
    Connection::open(path).unwrap()
}

fn corrupt_message<T: fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Corrupt(m)) => m,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn unavailable_message<T: fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Unavailable(m)) => m,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn conformance_suite_passes_on_sqlite() {
    let (_dir, path) = fresh();
    conformance::run_all(&|| Box::new(SqliteStore::open(&path).unwrap()));
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SqliteStore>();
}

#[test]
fn connections_are_configured_for_durability_and_sharing() {
    let (_dir, path, store) = store_with(0);
    for conn in [&store.writer, &store.reader] {
        let conn = lock(conn);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL");
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let busy: i64 = conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 5000);
    }
    let query_only: i64 = lock(&store.reader)
        .pragma_query_value(None, "query_only", |r| r.get(0))
        .unwrap();
    assert_eq!(query_only, 1);
    let version: i64 = raw(&path)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::LATEST);
}

#[test]
fn two_handles_on_one_file_extend_one_chain() {
    let (_dir, path) = fresh();
    let server = SqliteStore::open(&path).unwrap();
    let cli = SqliteStore::open(&path).unwrap();

    // Strictly alternating: each handle must pick up the other's head.
    let mut expected_seq = 1;
    for round in 0..8u64 {
        let store = if round % 2 == 0 { &server } else { &cli };
        let batch: Vec<Entry> = (0..round % 3 + 1)
            .map(|i| sample_entry(round * 10 + i, &format!("alt-{round}-{i}")))
            .collect();
        let records = store.append_audit(batch).unwrap();
        assert_eq!(records[0].seq, expected_seq);
        assert_linked(&records);
        expected_seq += records.len() as u64;
    }

    // Truly concurrent: both handles append at once from their own threads.
    std::thread::scope(|s| {
        for (name, store) in [("server", &server), ("cli", &cli)] {
            s.spawn(move || {
                for j in 0..20u64 {
                    let batch: Vec<Entry> = (0..j % 5 + 1)
                        .map(|i| sample_entry(j * 10 + i, &format!("{name}-{j}-{i}")))
                        .collect();
                    let records = store.append_audit(batch).unwrap();
                    // A batch is one transaction: never split by the other writer.
                    assert_linked(&records);
                }
            });
        }
    });

    let total = expected_seq - 1 + 2 * (0..20u64).map(|j| j % 5 + 1).sum::<u64>();
    assert_eq!(verify_chain(&server, 17), Ok(total));
    assert_eq!(verify_chain(&cli, 1000), Ok(total));
}

#[test]
fn concurrent_first_opens_create_the_schema_once() {
    let (_dir, path) = fresh();
    let stores: Vec<SqliteStore> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| SqliteStore::open(&path)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    stores[0].append_audit(vec![sample_entry(0, "c")]).unwrap();
    assert_eq!(stores[3].tail_audit(5).unwrap().len(), 1);
    assert_eq!(stores[2].state_version().unwrap(), 0);
}

#[test]
fn reopening_keeps_state_and_version() {
    let (_dir, path) = fresh();
    let before = {
        let store = SqliteStore::open(&path).unwrap();
        store.upsert_agent(&sample_agent("keep")).unwrap();
        store.state_version().unwrap()
    };
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.state_version().unwrap(), before);
    assert_eq!(store.get_agent("keep").unwrap(), Some(sample_agent("keep")));
}

#[test]
fn an_edited_entry_is_reported_at_its_seq() {
    // Each edit changes one byte (or one bit of a number) of record 3.
    for edit in [
        "UPDATE audit SET agent_id = 'agent-3' WHERE seq = 3",
        "UPDATE audit SET ts_ns = ts_ns + 1 WHERE seq = 3",
        "UPDATE audit SET decision = 'permiT' WHERE seq = 3",
        "UPDATE audit SET rules = '[\"rule-0\",\"rule-2\"]' WHERE seq = 3",
        "UPDATE audit SET delegation_id = NULL WHERE seq = 3",
        "UPDATE audit SET kind = 'outcome' WHERE seq = 3",
    ] {
        let (_dir, path, store) = store_with(6);
        assert_eq!(verify_chain(&store, 100), Ok(6));
        assert_eq!(raw(&path).execute(edit, []).unwrap(), 1, "{edit}");
        assert_eq!(
            verify_chain(&store, 100),
            Err(ChainError::BadHash { seq: 3 }),
            "{edit}"
        );
    }
}

#[test]
fn a_deleted_entry_is_reported_as_a_gap() {
    let (_dir, path, store) = store_with(6);
    raw(&path)
        .execute("DELETE FROM audit WHERE seq = 3", [])
        .unwrap();
    assert_eq!(
        verify_chain(&store, 100),
        Err(ChainError::Gap { seq: 3, found: 4 })
    );
}

#[test]
fn undecodable_audit_rows_are_corrupt_naming_the_seq() {
    for (edit, detail) in [
        ("UPDATE audit SET kind = 'bogus' WHERE seq = 3", "bogus"),
        ("UPDATE audit SET rules = 'not json' WHERE seq = 3", "rules"),
        ("UPDATE audit SET hash = x'0011' WHERE seq = 3", "2 bytes"),
    ] {
        let (_dir, path, store) = store_with(5);
        let conn = raw(&path);
        // The schema's checks would refuse these edits; a tampered file need not have them.
        conn.pragma_update(None, "ignore_check_constraints", true)
            .unwrap();
        conn.execute(edit, []).unwrap();
        for m in [
            corrupt_message(store.read_audit(0, 100)),
            corrupt_message(store.call_records("call-2")),
            corrupt_message(store.tail_audit(3)),
        ] {
            assert!(m.contains("audit entry 3"), "{edit}: {m}");
            assert!(m.contains(detail), "{edit}: {m}");
            assert!(m.contains(&path.display().to_string()), "{edit}: {m}");
        }
        // Rows before the damaged one still read.
        assert_eq!(store.read_audit(0, 2).unwrap().len(), 2);
    }
}

#[test]
fn append_refuses_to_extend_an_unreadable_head() {
    let (_dir, path, store) = store_with(3);
    let conn = raw(&path);
    conn.pragma_update(None, "ignore_check_constraints", true)
        .unwrap();
    conn.execute("UPDATE audit SET hash = x'00' WHERE seq = 3", [])
        .unwrap();
    let m = corrupt_message(store.append_audit(vec![sample_entry(9, "x")]));
    assert!(m.contains("last audit entry"), "{m}");
    assert!(
        store.read_audit(3, 10).unwrap().is_empty(),
        "nothing may be appended"
    );
}

#[test]
fn undecodable_state_rows_are_corrupt_naming_the_row() {
    let (_dir, path, store) = store_with(0);
    store.upsert_agent(&sample_agent("zed")).unwrap();
    raw(&path)
        .execute("UPDATE agents SET status = 'zombie' WHERE id = 'zed'", [])
        .unwrap();
    let m = corrupt_message(store.snapshot(NOW));
    assert!(m.contains("agent `zed`") && m.contains("zombie"), "{m}");

    let (_dir, path, store) = store_with(0);
    raw(&path)
        .execute(
            "INSERT INTO kill_switches VALUES ('planet', 'earth', 'r', 'op', 0)",
            [],
        )
        .unwrap();
    let m = corrupt_message(store.snapshot(NOW));
    assert!(m.contains("kill switch `planet`"), "{m}");
}

#[test]
fn a_file_that_is_not_a_database_is_refused_untouched() {
    let (_dir, path) = fresh();
    let junk = "this is a policy file, not a database\n".repeat(200);
    std::fs::write(&path, &junk).unwrap();
    let m = corrupt_message(SqliteStore::open(&path));
    assert!(m.contains(&format!("`{}`", path.display())), "{m}");
    assert!(m.contains("not a SQLite database"), "{m}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        junk,
        "the file must be left as it was"
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let (_dir, path) = fresh();
    drop(SqliteStore::open(&path).unwrap());
    raw(&path).pragma_update(None, "user_version", 7).unwrap();
    let m = corrupt_message(SqliteStore::open(&path));
    assert!(
        m.contains(&path.display().to_string()) && m.contains("schema version 7"),
        "{m}"
    );
}

#[test]
fn another_applications_database_is_refused() {
    let (_dir, path) = fresh();
    raw(&path)
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let m = corrupt_message(SqliteStore::open(&path));
    assert!(m.contains("not a Warden store"), "{m}");

    let (_dir, path) = fresh();
    raw(&path)
        .execute_batch("PRAGMA application_id = 42; PRAGMA user_version = 1;")
        .unwrap();
    let m = corrupt_message(SqliteStore::open(&path));
    assert!(m.contains("another application"), "{m}");
}

#[test]
fn a_missing_directory_is_unavailable_naming_the_path() {
    let (_dir, path) = fresh();
    let path = path.with_file_name("no-such-dir").join("warden.db");
    let m = unavailable_message(SqliteStore::open(&path));
    assert!(m.contains(&path.display().to_string()), "{m}");
}

/// SQLite's read-only open holds even for root, which writes through file permissions:
/// so this runs (and can fail) wherever the suite runs, CI's root included.
#[test]
fn a_store_opened_read_only_reads_but_refuses_every_write() {
    let (_dir, path) = fresh();
    {
        let store = SqliteStore::open(&path).unwrap();
        store.append_audit(vec![sample_entry(0, "before")]).unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let store = SqliteStore::open_read_only(&path).unwrap();
    // Reading works: `warden audit verify` opens the store this way.
    assert_eq!(verify_chain(&store, 10), Ok(1));
    let m = unavailable_message(store.append_audit(vec![sample_entry(1, "after")]));
    assert!(m.contains(&path.display().to_string()), "{m}");
    assert!(m.contains("readonly"), "{m}");
    let m = unavailable_message(conformance::control(
        &store,
        ControlChange::SetKill {
            kill: KillSwitch {
                target: KillTarget::All,
                reason: "r".into(),
                set_by: "t".into(),
                set_at_ns: 1,
            },
            pre_emptive: false,
        },
    ));
    assert!(m.contains("readonly"), "{m}");
    drop(store);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is unchanged"
    );
}

#[test]
fn opening_read_only_never_creates_a_store() {
    let (_dir, path) = fresh();
    assert!(SqliteStore::open_read_only(&path).is_err());
    assert!(
        !path.exists(),
        "a read-only open created `{}`",
        path.display()
    );
    // An empty file (what a failed earlier run might leave) is no store either.
    std::fs::write(&path, "").unwrap();
    let m = corrupt_message(SqliteStore::open_read_only(&path));
    assert!(m.contains("holds no Warden store"), "{m}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

#[cfg(unix)]
#[test]
fn the_store_and_its_wal_and_shm_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;

    let (_dir, path) = fresh();
    let store = SqliteStore::open(&path).unwrap();
    store.append_audit(vec![sample_entry(0, "x")]).unwrap();
    // While the store is open, SQLite keeps its -wal and -shm beside it.
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
}

#[test]
fn a_held_write_lock_makes_append_unavailable_while_reads_proceed() {
    let (_dir, path, store) = store_with(2);
    let blocker = raw(&path);
    blocker
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO state (k, v) VALUES ('held', 1);")
        .unwrap();
    std::thread::scope(|s| {
        let append = s.spawn(|| {
            let started = Instant::now();
            (
                store.append_audit(vec![sample_entry(7, "blocked")]),
                started.elapsed(),
            )
        });
        // Give the append time to take the writer and start waiting on the lock.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let version = store.state_version().unwrap();
        assert_eq!(store.read_audit(0, 10).unwrap().len(), 2);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "reads must not wait behind a blocked append ({:?})",
            started.elapsed()
        );
        assert_eq!(version, 0);

        let (result, waited) = append.join().unwrap();
        assert!(
            waited >= Duration::from_secs(4),
            "the busy timeout must be honoured ({waited:?})"
        );
        let m = unavailable_message(result);
        assert!(
            m.contains(&path.display().to_string()) && m.contains("locked"),
            "{m}"
        );
    });
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(
        store.append_audit(vec![sample_entry(8, "after")]).unwrap()[0].seq,
        3
    );
}

#[test]
fn a_deleted_store_file_makes_every_read_and_write_unavailable() {
    let (_dir, path, store) = store_with(1);
    std::fs::remove_file(&path).unwrap();
    for m in [
        unavailable_message(store.state_version()),
        unavailable_message(store.snapshot(NOW)),
        unavailable_message(store.append_audit(vec![sample_entry(2, "lost")])),
        unavailable_message(store.append_audit(Vec::new())),
        unavailable_message(conformance::control(
            &store,
            ControlChange::SetKill {
                kill: KillSwitch {
                    target: KillTarget::All,
                    reason: "r".into(),
                    set_by: "op".into(),
                    set_at_ns: NOW,
                },
                pre_emptive: false,
            },
        )),
    ] {
        assert!(
            m.contains(&path.display().to_string()) && m.contains("deleted"),
            "{m}"
        );
    }
    assert!(!path.exists(), "the store must not recreate its file");
}

#[test]
fn a_replaced_store_file_makes_every_read_and_write_unavailable() {
    let (dir, path, store) = store_with(1);
    let other = dir.path().join("other.db");
    drop(SqliteStore::open(&other).unwrap());
    std::fs::rename(&other, &path).unwrap();
    for m in [
        unavailable_message(store.state_version()),
        unavailable_message(store.read_audit(0, 10)),
        unavailable_message(store.append_audit(vec![sample_entry(2, "misplaced")])),
    ] {
        assert!(
            m.contains(&path.display().to_string()) && m.contains("replaced"),
            "{m}"
        );
    }
}

#[test]
fn a_store_file_moved_away_and_back_is_accepted_again() {
    let (dir, path, store) = store_with(1);
    let aside = dir.path().join("aside.db");
    std::fs::rename(&path, &aside).unwrap();
    assert!(store.state_version().is_err());
    std::fs::rename(&aside, &path).unwrap();
    assert_eq!(
        store.append_audit(vec![sample_entry(2, "back")]).unwrap()[0].seq,
        2
    );
}

#[test]
fn a_panic_mid_write_leaves_the_store_usable() {
    let (_dir, _path, store) = store_with(0);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _: Result<(), StoreError> = store.write(|tx| {
            tx.execute(
                "INSERT INTO kill_switches VALUES ('all', '', 'half-done', 'op', 0)",
                [],
            )
            .unwrap();
            panic!("writer crashed mid-transaction");
        });
    }));
    assert!(result.is_err());
    assert!(store.writer.is_poisoned());
    assert!(
        store.snapshot(NOW).unwrap().kills.is_empty(),
        "the half-done write must be rolled back"
    );
    store.upsert_agent(&sample_agent("after-panic")).unwrap();
    assert_eq!(store.state_version().unwrap(), 1);
}

#[test]
fn costs_sqlite_cannot_hold_exactly_are_normalised_before_sealing() {
    let (_dir, _path, store) = store_with(0);
    let with_cost = |c: f64| Entry {
        cost: Some(c),
        ..sample_entry(0, "cost")
    };
    let records = store
        .append_audit(vec![
            with_cost(-0.0),
            with_cost(f64::NAN),
            with_cost(f64::INFINITY),
            with_cost(f64::NEG_INFINITY),
            with_cost(3.0),
        ])
        .unwrap();
    let costs: Vec<Option<u64>> = records
        .iter()
        .map(|r| r.entry.cost.map(f64::to_bits))
        .collect();
    assert_eq!(
        costs,
        vec![
            Some(0.0f64.to_bits()),
            None,
            Some(f64::INFINITY.to_bits()),
            Some(f64::NEG_INFINITY.to_bits()),
            Some(3.0f64.to_bits())
        ]
    );
    assert_eq!(store.read_audit(0, 10).unwrap(), records);
    assert_eq!(verify_chain(&store, 10), Ok(5));
}

fn arb_text() -> impl Strategy<Value = String> {
    // Any characters, NUL and newlines included.
    "(?s).{0,12}"
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        Just(EntryKind::Decision),
        Just(EntryKind::Outcome),
        Just(EntryKind::Control)
    ];
    let ids = (
        arb_text(),
        arb_text(),
        arb_text(),
        arb_text(),
        proptest::option::of(arb_text()),
    );
    let what = (
        arb_text(),
        proptest::option::of(arb_text()),
        proptest::option::of(arb_text()),
        arb_text(),
        arb_text(),
        proptest::collection::vec(arb_text(), 0..4),
    );
    let numbers = (
        any::<u64>(),
        proptest::option::of(any::<f64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(arb_text()),
    );
    (kind, ids, what, numbers).prop_map(
        |(
            kind,
            (call_id, trace_id, span_id, agent_id, delegation_id),
            (action, input_hash, output_hash, decision, reason, rules),
            (ts_ns, cost, duration_ns, rationale),
        )| Entry {
            ts_ns,
            kind,
            call_id,
            trace_id,
            span_id,
            agent_id,
            delegation_id,
            action,
            input_hash,
            output_hash,
            decision,
            reason,
            rules,
            cost,
            duration_ns,
            rationale,
        },
    )
}

proptest! {
    // Each case creates a file and fsyncs every batch; a few dozen cases are plenty.
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Whatever is appended, in whatever batches, reads back exactly and verifies.
    #[test]
    fn random_batches_read_back_and_verify(
        batches in proptest::collection::vec(proptest::collection::vec(arb_entry(), 0..6), 1..5)
    ) {
        let (_dir, _path, store) = store_with(0);
        // One outcome per call: give every outcome a call id of its own.
        let mut n = 0;
        let batches: Vec<Vec<Entry>> = batches
            .into_iter()
            .map(|b| {
                b.into_iter()
                    .map(|mut e| {
                        n += 1;
                        if e.kind == EntryKind::Outcome {
                            e.call_id = format!("{}#{n}", e.call_id);
                        }
                        e
                    })
                    .collect()
            })
            .collect();
        let mut appended = Vec::new();
        for batch in &batches {
            let records = store.append_audit(batch.clone()).unwrap();
            prop_assert_eq!(records.len(), batch.len());
            for (r, e) in records.iter().zip(batch) {
                let same_cost = match (r.entry.cost, e.cost) {
                    (Some(a), Some(0.0)) => a.to_bits() == 0,
                    (None, Some(b)) => b.is_nan(),
                    (a, b) => a.map(f64::to_bits) == b.map(f64::to_bits),
                };
                prop_assert!(same_cost, "cost {:?} stored as {:?}", e.cost, r.entry.cost);
                prop_assert_eq!(&Entry { cost: r.entry.cost, ..e.clone() }, &r.entry);
            }
            appended.extend(records);
        }
        prop_assert_eq!(store.read_audit(0, usize::MAX).unwrap(), appended.clone());
        prop_assert_eq!(verify_chain(&store, 3), Ok(appended.len() as u64));
    }
}

/// Makes every audit insert fail, as a full disk or a broken file would, while the rest of
/// the database still takes writes.
fn break_audit_inserts(path: &Path) {
    raw(path)
        .execute_batch(
            "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
        )
        .unwrap();
}

#[test]
fn a_control_change_whose_entry_cannot_be_written_does_not_happen() {
    let (_dir, path, store) = store_with(1);
    store.upsert_agent(&sample_agent("atomic")).unwrap();
    let version = store.state_version().unwrap();
    break_audit_inserts(&path);
    let kill = KillSwitch {
        target: KillTarget::Agent("atomic".into()),
        reason: "r".into(),
        set_by: "op".into(),
        set_at_ns: NOW,
    };
    let cred = Credential {
        jti: "atomic-1".into(),
        agent_id: "atomic".into(),
        issued_at_ns: NOW,
        expires_at_ns: NOW + 60 * NANOS_PER_SEC,
        revoked_at_ns: None,
        replaced_by: None,
    };
    for change in [
        ControlChange::SetKill {
            kill,
            pre_emptive: false,
        },
        ControlChange::IssueCredential(cred),
        ControlChange::RegisterAgent(sample_agent("atomic-2")),
        ControlChange::SetAgentStatus {
            agent_id: "atomic".into(),
            status: AgentStatus::Revoked,
            at: NOW,
        },
    ] {
        assert!(
            conformance::control(&store, change.clone()).is_err(),
            "{change:?}"
        );
    }
    let snap = store.snapshot(NOW).unwrap();
    assert_eq!(
        snap.version, version,
        "no change may be written without its entry"
    );
    assert!(snap.kills.is_empty());
    assert!(snap.credentials.is_empty());
    assert_eq!(store.get_agent("atomic-2").unwrap(), None);
    assert_eq!(
        store.get_agent("atomic").unwrap().map(|a| a.status),
        Some(AgentStatus::Active)
    );
}
