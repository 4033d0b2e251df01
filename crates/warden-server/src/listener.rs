//! The node's listeners: an accept loop on hyper that bounds what an unauthenticated peer
//! can hold, so a flood of slow or idle sockets cannot take the node (or its `/healthz`)
//! down.
//!
//! Every connection is in one of three phases, kept per connection and watched by a timer
//! beside it:
//! - awaiting a request head, from accept (or from the first byte after an idle spell):
//!   it must complete within `header_timeout`, TLS handshake included;
//! - busy, from the head until the response body is finished or dropped: bounded by the
//!   request timeout, which the service applies (not the connection);
//! - idle between keep-alive requests: closed after `idle_timeout`.
//!
//! hyper's own header-read timer is not used because it also runs while a keep-alive
//! connection sits idle, which would make the idle timeout the header timeout.
//!
//! Connections are capped in total and per peer address. At a cap, the connection that
//! has waited longest without a request in flight (under that cap) is closed to admit the
//! new one; only if every connection under the cap is busy is the new one closed at once.
//! Evicting rather than leaving new connections in the backlog is what keeps a health
//! prober answered while idle sockets pile up: a backlogged prober would time out, and one
//! closed at accept would fail. The per-address cap (below the total) keeps one host from
//! evicting everyone else's connections.

use crate::flood::peer_key;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tokio_rustls::TlsAcceptor;
use warden_core::config::ConnectionLimits;

use crate::error::ApiError;

/// What the accept loop is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    Run,
    /// Stop accepting; let requests in flight finish; close idle connections.
    Drain,
    /// Close every connection now.
    Abort,
}

/// The timeouts and caps of one listener, as durations.
#[derive(Clone, Copy, Debug)]
struct Limits {
    header: Duration,
    request: Duration,
    idle: Duration,
    max: usize,
    per_ip: usize,
}

impl From<&ConnectionLimits> for Limits {
    fn from(c: &ConnectionLimits) -> Self {
        Limits {
            header: Duration::from_nanos(c.header_timeout_ns),
            request: Duration::from_nanos(c.request_timeout_ns),
            idle: Duration::from_nanos(c.idle_timeout_ns),
            max: c.max_connections,
            per_ip: c.max_connections_per_ip,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every await-free step, so a panic
    // elsewhere while holding one leaves nothing half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitingHead,
    Busy,
    Idle,
}

#[derive(Debug)]
struct Activity {
    phase: Phase,
    since: Instant,
    in_flight: usize,
}

/// One open connection, shared by its task, its IO, its service and the registry.
#[derive(Debug)]
struct Conn {
    id: u64,
    ip: IpAddr,
    activity: Mutex<Activity>,
    evicted: Notify,
    /// The phase changed to one whose deadline may be earlier than the one being waited
    /// for (a request ended, or bytes came after an idle spell).
    phase_changed: Notify,
}

impl Conn {
    fn bytes_arrived(&self) {
        let mut a = lock(&self.activity);
        if a.phase == Phase::Idle {
            a.phase = Phase::AwaitingHead;
            a.since = Instant::now();
            self.phase_changed.notify_one();
        }
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        let mut a = lock(&self.activity);
        a.in_flight += 1;
        a.phase = Phase::Busy;
        InFlight(self.clone())
    }

    /// When the connection is due to be closed, or `None` while a request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let a = lock(&self.activity);
        match a.phase {
            Phase::AwaitingHead => Some(a.since + limits.header),
            Phase::Idle => Some(a.since + limits.idle),
            Phase::Busy => None,
        }
    }

    fn evictable_since(&self) -> Option<Instant> {
        let a = lock(&self.activity);
        (a.phase != Phase::Busy).then_some(a.since)
    }
}

/// A request in flight; dropped when its response body is finished or abandoned.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = lock(&self.0.activity);
        a.in_flight = a.in_flight.saturating_sub(1);
        if a.in_flight == 0 {
            a.phase = Phase::Idle;
            a.since = Instant::now();
            self.0.phase_changed.notify_one();
        }
    }
}

#[derive(Debug, Default)]
struct Slots {
    next_id: u64,
    conns: HashMap<u64, Arc<Conn>>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Slots {
    fn remove(&mut self, id: u64) -> Option<Arc<Conn>> {
        let conn = self.conns.remove(&id)?;
        let key = peer_key(conn.ip);
        if let Some(n) = self.per_ip.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&key);
            }
        }
        Some(conn)
    }

    /// Closes the connection that has waited longest without a request in flight among
    /// those `under` selects; false if all of them are busy.
    fn evict_one(&mut self, under: impl Fn(&Conn) -> bool) -> bool {
        let victim = self
            .conns
            .values()
            .filter(|c| under(c))
            .filter_map(|c| c.evictable_since().map(|since| (since, c.id)))
            .min()
            .map(|(_, id)| id);
        match victim.and_then(|id| self.remove(id)) {
            Some(conn) => {
                conn.evicted.notify_one();
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("every connection is busy (server.max_connections)")]
    Full,
    #[error("every connection from this address is busy (server.max_connections_per_ip)")]
    PeerFull,
}

/// The open connections of one listener.
#[derive(Debug)]
struct Registry {
    limits: Limits,
    slots: Mutex<Slots>,
}

impl Registry {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        // Counted per IPv4 address or IPv6 /64: a host can present a new address of its
        // /64 on every connection.
        let key = peer_key(ip);
        let mut s = lock(&self.slots);
        if s.per_ip.get(&key).copied().unwrap_or(0) >= self.limits.per_ip
            && !s.evict_one(|c| peer_key(c.ip) == key)
        {
            return Err(Refused::PeerFull);
        }
        if s.conns.len() >= self.limits.max && !s.evict_one(|_| true) {
            return Err(Refused::Full);
        }
        s.next_id += 1;
        let conn = Arc::new(Conn {
            id: s.next_id,
            ip,
            activity: Mutex::new(Activity {
                phase: Phase::AwaitingHead,
                since: Instant::now(),
                in_flight: 0,
            }),
            evicted: Notify::new(),
            phase_changed: Notify::new(),
        });
        s.conns.insert(conn.id, conn.clone());
        *s.per_ip.entry(key).or_insert(0) += 1;
        Ok(Slot {
            registry: self.clone(),
            conn,
        })
    }

    fn open(&self) -> usize {
        lock(&self.slots).conns.len()
    }
}

/// A connection's place in the registry, given back when its task ends.
struct Slot {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.registry.slots).remove(self.conn.id);
    }
}

/// One listener: a bound socket, what it serves and how it protects itself.
pub(crate) struct Listener {
    pub listener: TcpListener,
    pub router: Router,
    pub limits: ConnectionLimits,
    pub tls: Option<TlsAcceptor>,
}

/// Accepts and serves until told to stop, then drains: requests in flight get up to the
/// request timeout to finish, after which every connection is closed.
pub(crate) async fn run(l: Listener, mut stop: watch::Receiver<Stop>) {
    let limits = Limits::from(&l.limits);
    let registry = Arc::new(Registry {
        limits,
        slots: Mutex::default(),
    });
    let shared = Arc::new(Shared {
        router: l.router,
        tls: l.tls,
        limits,
    });
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: &dyn std::fmt::Display| {
        // A flood would otherwise become a flood of log lines.
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            last_warning = Some(Instant::now());
            tracing::warn!(%what, "refusing connections");
        }
    };
    loop {
        tokio::select! {
            accepted = l.listener.accept() => match accepted {
                Ok((stream, peer)) => match registry.admit(peer.ip()) {
                    Ok(slot) => {
                        tokio::spawn(serve_conn(stream, peer, slot, shared.clone(), stop.clone()));
                    }
                    Err(refused) => {
                        warn(&format_args!("{peer}: {refused}"));
                        drop(stream);
                    }
                },
                Err(e) => {
                    // Out of file descriptors or similar: back off rather than spin; the
                    // eviction above keeps this rare.
                    warn(&format_args!("cannot accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() != Stop::Run {
                    break;
                }
            }
        }
    }
    drop(l.listener);
    let grace = Instant::now() + limits.request;
    while registry.open() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open = registry.open();
    if open > 0 {
        tracing::warn!(
            open,
            "closing connections still busy after the request timeout"
        );
    }
}

struct Shared {
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    shared: Arc<Shared>,
    stop: watch::Receiver<Stop>,
) {
    // Small request/response exchanges otherwise wait on delayed ACKs (about 40 ms).
    let _ = stream.set_nodelay(true);
    match &shared.tls {
        None => serve_http(stream, slot, &shared, stop).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(shared.limits.header, acceptor.accept(stream));
            tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => serve_http(tls, slot, &shared, stop).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                },
                _ = slot.conn.evicted.notified() => {}
            }
        }
    }
}

async fn serve_http<I>(io: I, slot: Slot, shared: &Shared, mut stop: watch::Receiver<Stop>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = slot.conn.clone();
    let service = ConnService {
        router: TowerToHyperService::new(shared.router.clone()),
        conn: conn.clone(),
        request_timeout: shared.limits.request,
    };
    let io = TokioIo::new(Watched {
        inner: io,
        conn: conn.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true).header_read_timeout(None);
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let limits = shared.limits;
    let mut draining = false;
    loop {
        // While a request is in flight there is no deadline here; its end wakes this loop,
        // as does the first byte after an idle spell. A timer that fires early (the phase
        // changed in between) just looks again.
        let wake = conn
            .deadline(&limits)
            .unwrap_or_else(|| Instant::now() + limits.header.max(limits.idle));
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = sleep_until(wake) => {
                if conn.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    // No request in flight, so closing loses nothing but a slow head.
                    return;
                }
            }
            _ = conn.evicted.notified() => return,
            _ = conn.phase_changed.notified() => {}
            changed = stop.changed() => match changed.map(|()| *stop.borrow()) {
                Ok(Stop::Run) => {}
                Ok(Stop::Drain) => {
                    if !draining {
                        draining = true;
                        served.as_mut().graceful_shutdown();
                    }
                }
                Ok(Stop::Abort) | Err(_) => return,
            },
        }
    }
}

/// The connection's IO, noting when bytes arrive after an idle spell.
struct Watched<I> {
    inner: I,
    conn: Arc<Conn>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.bytes_arrived();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The MCP gateway's routes answer with streams that live as long as a tool call or a
/// session; only their request body is held to the request timeout.
fn is_stream_route(path: &str) -> bool {
    path == "/mcp" || path.starts_with("/mcp/")
}

#[derive(Clone)]
struct ConnService {
    router: TowerToHyperService<Router>,
    conn: Arc<Conn>,
    request_timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // The peer's address, for handlers that sample failures per source.
        req.extensions_mut().insert(ConnectInfo(self.conn.ip));
        let in_flight = self.conn.begin_request();
        let router = self.router.clone();
        let limit = self.request_timeout;
        Box::pin(async move {
            let deadline = Instant::now() + limit;
            let resp = if is_stream_route(req.uri().path()) {
                let req = req.map(|b| Body::new(DeadlineBody::new(b, deadline)));
                hyper::service::Service::call(&router, req).await
            } else {
                let answered = tokio::time::timeout_at(
                    deadline,
                    hyper::service::Service::call(&router, req.map(Body::new)),
                );
                match answered.await {
                    Ok(resp) => resp,
                    Err(_) => {
                        let mut resp = ApiError::RequestTimeout(limit).into_response();
                        // The request's body may be half read; the connection cannot be
                        // reused, and the client should know before it tries.
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        Ok(resp)
                    }
                }
            };
            Ok(match resp {
                Ok(resp) => resp.map(|inner| {
                    Body::new(TrackedBody {
                        inner,
                        _in_flight: in_flight,
                    })
                }),
                Err(never) => match never {},
            })
        })
    }
}

/// A request body that fails if it has not fully arrived by a deadline.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: Instant) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the request timeout")]
struct BodyTimedOut;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimedOut.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that marks its request finished when it is done or dropped.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft limit on open files to the hard limit, so the connection cap (not the
/// default soft limit, often 1024) is what bounds the node. Returns the soft limit now in
/// force, or `None` if unlimited or unknown.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, soft = ?lim.current, hard = ?lim.maximum,
                "cannot raise the open-file limit to its hard limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize, per_ip: usize) -> Arc<Registry> {
        let limits = Limits {
            header: Duration::from_secs(1),
            request: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            max,
            per_ip,
        };
        Arc::new(Registry {
            limits,
            slots: Mutex::default(),
        })
    }

    #[tokio::test]
    async fn a_full_registry_evicts_the_longest_idle_and_never_a_busy_connection() {
        let r = registry(2, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = r.admit(a).unwrap();
        let busy = first.conn.begin_request();
        let second = r.admit(a).unwrap();
        // Full: the idle one goes, the busy one stays.
        let third = r.admit(b).unwrap();
        assert_eq!(r.open(), 2);
        let ids: Vec<u64> = lock(&r.slots).conns.keys().copied().collect();
        assert!(ids.contains(&first.conn.id) && ids.contains(&third.conn.id));
        assert!(!ids.contains(&second.conn.id));
        // Now both are busy: a newcomer is refused.
        let _busy_too = third.conn.begin_request();
        assert!(matches!(r.admit(b), Err(Refused::Full)));
        drop(busy);
        assert!(r.admit(b).is_ok());
        drop((first, second, third));
    }

    #[tokio::test]
    async fn one_address_evicts_only_its_own_connections() {
        let r = registry(4, 1);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let from_b = r.admit(b).unwrap();
        let first_a = r.admit(a).unwrap();
        let second_a = r.admit(a).unwrap();
        let ids: Vec<u64> = lock(&r.slots).conns.keys().copied().collect();
        assert!(ids.contains(&from_b.conn.id) && ids.contains(&second_a.conn.id));
        assert!(!ids.contains(&first_a.conn.id));
        let _busy = second_a.conn.begin_request();
        assert!(matches!(r.admit(a), Err(Refused::PeerFull)));
        // The evicted slot's drop does not free anyone else's.
        drop(first_a);
        assert_eq!(r.open(), 2);
    }

    /// Regression: the cap was per full IPv6 address, and a host owns its /64, so it
    /// could take every slot with one new address per connection.
    #[tokio::test]
    async fn an_ipv6_host_is_capped_across_its_whole_64() {
        let r = registry(8, 1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let a2: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let first = r.admit(a).unwrap();
        let _busy = first.conn.begin_request();
        assert!(matches!(r.admit(a2), Err(Refused::PeerFull)));
        assert!(r.admit(elsewhere).is_ok());
        // An IPv4-mapped address counts as its IPv4 address.
        let v4: IpAddr = [10, 0, 0, 1].into();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let held = r.admit(v4).unwrap();
        let _busy_v4 = held.conn.begin_request();
        assert!(matches!(r.admit(mapped), Err(Refused::PeerFull)));
    }
}
