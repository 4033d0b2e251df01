//! The TCP sockets this test process holds, server and client side alike, with their
//! `TCP_NODELAY` option: the node runs in the test's process, so the sockets it accepted
//! and opened are here to inspect. Each descriptor is duplicated with `pidfd_getfd` on
//! our own process (a safe call, unlike borrowing a raw descriptor number).

use std::net::SocketAddr;

use rustix::net::sockopt::tcp_nodelay;
use rustix::net::{getpeername, getsockname};
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

/// One connected TCP socket of this process.
#[derive(Debug)]
pub struct Tcp {
    #[allow(dead_code)] // each test file reads the side it needs
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub nodelay: bool,
}

/// Every connected TCP socket this process holds right now.
pub fn connected() -> Vec<Tcp> {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).unwrap();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Some(n) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        // The descriptor may have closed since the listing: skip what cannot be had.
        let Ok(fd) = pidfd_getfd(&me, n, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let local = getsockname(&fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok());
        let peer = getpeername(&fd)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        let (Some(local), Some(peer)) = (local, peer) else {
            continue;
        };
        if let Ok(nodelay) = tcp_nodelay(&fd) {
            out.push(Tcp {
                local,
                peer,
                nodelay,
            });
        }
    }
    out
}
