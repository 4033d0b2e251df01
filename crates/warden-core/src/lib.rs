//! Warden's domain and decision pipeline.
//!
//! This crate answers one question for every tool call an agent makes: may it run? It
//! holds each governance layer as a module named after its domain noun (`control`,
//! `identity`, `policy`, `limits`, `audit`) and composes them in [`pipeline`]. It does no
//! I/O: the clock comes in through [`clock::Clock`], randomness through the caller, and
//! persistence through the [`store::Store`] trait, so every rule here can be tested on a
//! fake clock and the same logic serves the HTTP API, the MCP gateway and the CLI.
//!
//! INVARIANT: the decision path never returns an error to its caller. Every failure
//! becomes a deny with a [`decision::Reason`] code.

pub mod args;
pub mod audit;
pub mod clock;
pub mod config;
pub mod control;
pub mod decision;
pub mod identity;
pub mod json;
pub mod limits;
pub mod operator;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod tool;
pub mod trace;

pub use decision::{Decision, Effect, Reason};
pub use pipeline::Pipeline;
