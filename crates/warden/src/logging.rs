//! Logging to standard error that can never take the process down.
//!
//! A node's log reader can go away (a closed pipe, a full disk behind a redirect). The
//! standard library's `eprintln!`, which `tracing-subscriber` falls back on to report a
//! failed write, panics when it cannot write; in the audit writer's thread that stopped
//! all recording, and in the main thread it ended the process with 101. Losing log lines
//! is the lesser harm: a node keeps deciding and recording whether or not anyone reads
//! its logs.

use std::io::{self, Write};

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: `filter` picks what is logged, `ansi` colours it.
pub fn init(filter: EnvFilter, ansi: bool) {
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_writer(|| LossyStderr)
        .log_internal_errors(false)
        .with_env_filter(filter)
        .init();
}

/// Standard error, dropping whatever cannot be written.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // All or nothing per log line, then claim success: a partial write retried by
        // `write_all` could interleave with another thread's line.
        let _ = io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Prints a line to standard error, ignoring a broken one (unlike `eprintln!`).
pub fn eprint_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_stderr_reports_every_write_as_done() {
        let mut w = LossyStderr;
        assert_eq!(w.write(b"").unwrap(), 0);
        assert!(w.flush().is_ok());
    }
}
