//! The `warden` command: run a node, scaffold a setup, and operate the governance plane
//! (agents, kill switches, policy, audit) from a terminal.
//!
//! Operator commands act on the node's store directly (the SQLite file named by the
//! config); a running server sees their effect within its control refresh interval
//! (250 ms by default). `main` prints the error chain and picks the exit code: 0 done,
//! 1 a check failed (broken audit, failing policy test), 2 bad usage or config.

mod client_pipes;
mod commands;
mod logging;
mod server_env;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Errors quote what they could not accept, stored strings included.
            let shown = |e: &dyn std::fmt::Display| terminal::escaped(&e.to_string()).into_owned();
            logging::eprint_line(format_args!("error: {}", shown(&e)));
            for cause in e.chain().skip(1) {
                logging::eprint_line(format_args!("  caused by: {}", shown(&cause)));
            }
            ExitCode::from(2)
        }
    }
}
