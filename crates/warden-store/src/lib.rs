//! Storage backends for Warden: the only crate that knows SQL.
//!
//! `warden-core` says what it needs from storage through the [`Store`] trait (agents,
//! credentials, kill switches and an append-only, hash-chained audit trail) and does no
//! I/O itself. This crate provides the embedded default, [`SqliteStore`]: one SQLite file
//! in WAL mode, shared safely by a running server and CLI invocations on the same host,
//! where an audit batch is answered only once it is on disk. The [`conformance`] module
//! holds the behaviour every backend must show, written against `&dyn Store`, so a
//! future PostgreSQL backend is held to the same contract by the same tests.
//!
//! [`Store`]: warden_core::store::Store

pub mod conformance;
mod sqlite;

pub use sqlite::SqliteStore;
