//! Helpers the MCP integration tests share (included with `#[path]`, since each file
//! under tests/ is its own crate).
#![allow(dead_code)] // each test crate uses some of these

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Waits for `child` and returns its output; kills it and fails past `limit`.
pub fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "timed out:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed when this is dropped (a server a test started).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on right now (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`; fails after 30 s.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

/// Runs `warden` on the config `warden.toml` in `dir`, from `dir`; its stdout. Fails the
/// test, with warden's stderr, if it fails.
pub fn warden_in(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(WARDEN)
        .arg("--config")
        .arg(dir.join("warden.toml"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warden {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `warden serve` on the config in `dir`, on a free port, until the guard drops; its base
/// URL. It listens before it has opened the store: whatever must exist in the store
/// before anything reads it, create first (`warden agent token` creates the store).
pub fn serve_in(dir: &Path, stderr: std::process::Stdio) -> (Guard, String) {
    let port = free_port();
    let child = std::process::Command::new(WARDEN)
        .arg("--config")
        .arg(dir.join("warden.toml"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let guard = Guard(child);
    wait_for_port(port, "warden serve");
    (guard, format!("http://127.0.0.1:{port}"))
}

/// The reference server `server-everything` (its `dist/index.js` is `script`) over
/// Streamable HTTP on a free port, until the guard drops; its MCP URL.
pub fn everything_over_http(script: &Path) -> (Guard, String) {
    let port = free_port();
    let child = std::process::Command::new("node")
        .arg(script)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = Guard(child);
    wait_for_port(port, "server-everything");
    (guard, format!("http://127.0.0.1:{port}/mcp"))
}
