//! The stdio proxy's own stdin and stdout, as the MCP client's pipes.
//!
//! `tokio::io::stdin()` and `stdout()` work on anything (a terminal, a file) by handing
//! every read and write to a thread of the blocking pool and back: two thread hand-offs
//! per message, about a quarter of the proxy's CPU per call (docs/benchmarks.md). When
//! they are pipes or sockets, as they are when an MCP client starts the proxy (Python's
//! subprocess makes pipes, Node's child_process Unix socket pairs), they are read and
//! written here without blocking on the runtime's own event loop instead.
//!
//! `O_NONBLOCK` belongs to the open file description, which whoever else holds these
//! descriptors shares (a shell that runs the proxy in a pipeline and then something else
//! on the same pipe). [`ClientPipes`] puts the flags back as they were when it is dropped.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{fcntl_getfl, fcntl_setfl, fstat, FileType, OFlags};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Restores stdin's and stdout's file status flags when dropped.
pub struct ClientPipes {
    stdin_flags: Option<OFlags>,
    stdout_flags: Option<OFlags>,
}

impl ClientPipes {
    /// Stdin and stdout for the proxy; must be called inside the runtime. Each is read or
    /// written without blocking if it is a pipe or a socket, and through tokio's
    /// blocking-pool handle otherwise.
    pub fn open() -> (Self, Reader, Writer) {
        let stdin_flags = fcntl_getfl(io::stdin()).ok();
        let stdout_flags = fcntl_getfl(io::stdout()).ok();
        let reader: Reader = match stdin_pipe() {
            Ok(Either::Pipe(r)) => Box::new(r),
            Ok(Either::Socket(s)) => Box::new(s),
            Err(e) => {
                tracing::debug!(error = %e, "stdin is neither a pipe nor a socket; reading it through the blocking pool");
                Box::new(tokio::io::stdin())
            }
        };
        let writer: Writer = match stdout_pipe() {
            Ok(Either::Pipe(w)) => Box::new(w),
            Ok(Either::Socket(s)) => Box::new(s),
            Err(e) => {
                tracing::debug!(error = %e, "stdout is neither a pipe nor a socket; writing it through the blocking pool");
                Box::new(tokio::io::stdout())
            }
        };
        (
            Self {
                stdin_flags,
                stdout_flags,
            },
            reader,
            writer,
        )
    }
}

enum Either<P> {
    Pipe(P),
    Socket(UnixStream),
}

/// A second descriptor of `fd`'s pipe or socket (the reader or writer closes its own, not
/// fd 0 or 1), or why it is neither.
fn duplicate(fd: impl AsFd) -> io::Result<(OwnedFd, FileType)> {
    let kind = FileType::from_raw_mode(fstat(&fd)?.st_mode);
    if !matches!(kind, FileType::Fifo | FileType::Socket) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{kind:?}, neither a pipe nor a socket"),
        ));
    }
    Ok((fd.as_fd().try_clone_to_owned()?, kind))
}

fn socket(fd: OwnedFd) -> io::Result<UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    UnixStream::from_std(s)
}

fn stdin_pipe() -> io::Result<Either<pipe::Receiver>> {
    match duplicate(io::stdin())? {
        (fd, FileType::Fifo) => pipe::Receiver::from_owned_fd(fd).map(Either::Pipe),
        (fd, _) => socket(fd).map(Either::Socket),
    }
}

fn stdout_pipe() -> io::Result<Either<pipe::Sender>> {
    match duplicate(io::stdout())? {
        (fd, FileType::Fifo) => pipe::Sender::from_owned_fd(fd).map(Either::Pipe),
        (fd, _) => socket(fd).map(Either::Socket),
    }
}

impl Drop for ClientPipes {
    fn drop(&mut self) {
        if let Some(f) = self.stdin_flags {
            let _ = fcntl_setfl(io::stdin(), f);
        }
        if let Some(f) = self.stdout_flags {
            let _ = fcntl_setfl(io::stdout(), f);
        }
    }
}
