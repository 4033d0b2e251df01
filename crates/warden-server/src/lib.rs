//! Warden's HTTP edge: the agent-plane decision API, the operator-plane admin API and the
//! health probes, plus the node's background work (group-committed audit, refreshing the
//! control view, policy reloads).
//!
//! This is the only crate that knows HTTP. Requests are turned into the core's plain
//! types, decided by [`warden_core::Pipeline`], recorded through the [`AuditWriter`], and
//! answered; status codes are chosen only in [`error::ApiError`] and [`api`].
//!
//! INVARIANT: a permit is returned only after its audit entry is durable.
//! INVARIANT: agent credentials never reach the admin plane; it takes only operator
//! credentials, and every admin route is mounted from `admin::table()` with its access.

pub mod admin;
pub mod api;
pub mod audit_writer;
pub mod error;
pub mod flood;
pub mod gate;
pub mod health;
pub mod ids;
pub mod listener;
pub mod mcp_http;
pub mod open_calls;
pub mod policy_files;
pub mod rebinding;
pub mod setup;
pub mod tls;
pub mod upstream;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use warden_core::audit::Entry;
use warden_core::clock::{Clock, SystemClock};
use warden_core::config::Settings;
use warden_core::identity::{self, PublicKey, SigningKeyPair, Verifier};
use warden_core::policy::PolicyError;
use warden_core::store::{Acting, Store, StoreError};
use warden_core::Pipeline;
use warden_store::SqliteStore;

pub use audit_writer::AuditWriter;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("the policy does not load, so the server will not start:\n  {}", .0.problems.join("\n  "))]
    Policy(PolicyError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Everything a request handler needs.
pub struct App {
    pub settings: Settings,
    pub pipeline: Arc<Pipeline>,
    pub store: Arc<dyn Store>,
    pub audit: AuditWriter,
    pub health: Arc<health::Health>,
    /// The token signing key; `None` on a node that only verifies (the embedded
    /// `warden mcp-proxy`), which then cannot issue credentials.
    pub key: Option<SigningKeyPair>,
    /// The HTTP MCP gateway's clients toward its upstream servers, and its signature on
    /// what it sends them; empty on a node that only verifies.
    pub upstream: upstream::UpstreamClients,
    /// `None` on a node that only verifies: its admin plane admits nobody.
    operator_token: Option<String>,
    /// How the holder of the operator token is named in audit entries and kill switches
    /// (empty without one).
    operator_id: String,
    reload_lock: Mutex<()>,
    /// Floods of failures from unauthenticated callers, sampled (see [`flood`]).
    failures: flood::FailureSampler,
    /// Permitted calls awaiting their outcome (see [`open_calls`]).
    open_calls: open_calls::OpenCalls,
}

impl App {
    /// Builds a node from validated settings: opens the store, loads key, operator token
    /// and policy, registers the declared agents and loads the control view.
    pub fn build(settings: Settings, clock: Arc<dyn Clock>) -> Result<Arc<App>, ServeError> {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&settings.store_path)?);
        Self::build_with_store(settings, store, clock)
    }

    /// Like [`App::build`] with a store of the caller's (tests inject faults this way).
    pub fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<App>, ServeError> {
        let key = setup::load_or_create_key(&settings.key_file)?;
        let operator_token = setup::operator_token(&settings)?;
        // The current key, and those a rotation retired that still verify.
        let public = setup::load_public_keys(&settings.key_file)?;
        Self::assemble(
            settings,
            store,
            clock,
            public,
            Some(key),
            Some(operator_token),
        )
    }

    /// Builds a node that verifies agent tokens with the public key file alone and holds
    /// no operator token, for the embedded `warden mcp-proxy`. It never opens (or
    /// creates) the signing key. It does write the store (audit, declared agents), so it
    /// belongs only on a host trusted as much as the governance itself.
    pub fn build_verify_only(
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<App>, ServeError> {
        let public = setup::load_public_keys(&settings.key_file)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&settings.store_path)?);
        Self::assemble(settings, store, clock, public, None, None)
    }

    fn assemble(
        settings: Settings,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        public: Vec<PublicKey>,
        key: Option<SigningKeyPair>,
        operator_token: Option<String>,
    ) -> Result<Arc<App>, ServeError> {
        // Only a node that holds the signing key serves the HTTP gateway; the embedded
        // proxy has no business reading upstreams' client keys.
        let upstream = match &key {
            Some(k) => upstream::UpstreamClients::new(&settings, k.clone(), clock.clone())?,
            None => upstream::UpstreamClients::none(),
        };
        let bundle = policy_files::load(&settings).map_err(ServeError::Policy)?;
        // The config's agents, each change recorded as the config's doing.
        for agent in &settings.agents {
            let by = Acting {
                who: "config".to_owned(),
                at: clock.now_ns(),
                entry_id: ids::random_hex(16).map_err(|e| {
                    ServeError::Io(std::io::Error::other(format!("no randomness: {e}")))
                })?,
            };
            identity::declare_agent(store.as_ref(), agent, &by)?;
        }
        let verifier = Verifier::with_keys(
            settings.issuer.clone(),
            public,
            settings.token_cache_entries,
        );
        let pipeline = Arc::new(Pipeline::new(&settings, bundle, verifier, clock));
        let health = Arc::new(health::Health::default());
        let audit = AuditWriter::start(
            store.clone(),
            settings.audit_max_batch,
            Duration::from_nanos(settings.audit_linger_ns),
            health.clone(),
        )?;
        let failures = flood::FailureSampler::new(&settings.audit_limits);
        let app = Arc::new(App {
            upstream,
            failures,
            settings,
            pipeline,
            store,
            audit,
            health,
            key,
            operator_id: operator_token
                .as_deref()
                .map_or_else(String::new, identity::operator_id),
            operator_token,
            reload_lock: Mutex::new(()),
            open_calls: open_calls::OpenCalls::default(),
        });
        app.refresh_state()?;
        Ok(app)
    }

    /// Every route the node serves.
    pub fn router(self: &Arc<Self>) -> Router {
        self.agent_router().merge(self.admin_routes())
    }

    /// The agent plane (decision API, MCP gateway) and the health probes.
    fn agent_router(self: &Arc<Self>) -> Router {
        api::routes(self.clone())
            .merge(mcp_http::routes(self.clone()))
            .layer(axum::middleware::from_fn(error::require_json))
    }

    /// The admin API, taking JSON bodies only.
    fn admin_routes(self: &Arc<Self>) -> Router {
        admin::routes(self.clone()).layer(axum::middleware::from_fn(error::require_json))
    }

    /// What the admin listener serves when `admin_listen` is set: the admin API and the
    /// health probes, nothing an agent uses.
    fn admin_router(self: &Arc<Self>) -> Router {
        self.admin_routes().merge(
            Router::new()
                .route("/healthz", get(api::healthz))
                .route("/readyz", get(api::readyz))
                .with_state(self.clone()),
        )
    }

    /// Re-reads agents, credentials and kill switches if the store changed, and confirms
    /// the view as current. Safe to run concurrently: the pipeline installs only newer
    /// views and confirms only views at least as new as the store. Blocking: call from a
    /// blocking context.
    pub fn refresh_state(&self) -> Result<(), StoreError> {
        // Taken before the reads, so a confirmation never claims more than they showed.
        let read_at = self.pipeline.clock().now_ns();
        let version = self.store.state_version()?;
        if !self.pipeline.confirm_current(version, read_at) {
            let snap = self.store.snapshot(read_at)?;
            self.pipeline.apply_snapshot(snap, read_at);
        }
        Ok(())
    }

    /// Reloads the policy from its files. An invalid policy is rejected and the one in
    /// force stays; the outcome is logged and audited.
    pub async fn reload_policy(self: &Arc<Self>, trigger: &str) -> Result<String, PolicyError> {
        let _guard = self.reload_lock.lock().await;
        let app = self.clone();
        let loaded = tokio::task::spawn_blocking(move || policy_files::load(&app.settings))
            .await
            .unwrap_or_else(|e| {
                Err(PolicyError {
                    problems: vec![format!("policy loader crashed: {e}")],
                })
            });
        let (action, detail, result) = match loaded {
            Ok(bundle) => {
                let digest = bundle.digest().to_owned();
                self.pipeline.install_policy(bundle);
                tracing::info!(%digest, trigger, "policy reloaded");
                ("policy-reloaded", format!("digest {digest}"), Ok(digest))
            }
            Err(e) => {
                let in_force = self
                    .pipeline
                    .policy()
                    .map(|p| p.digest().to_owned())
                    .unwrap_or_default();
                tracing::warn!(trigger, error = %e, %in_force, "new policy rejected; previous policy stays in force");
                ("policy-rejected", e.problems.join("; "), Err(e))
            }
        };
        self.audit_control(trigger, action, detail).await;
        result
    }

    /// Appends a policy reload or rejection to the audit trail (best effort: the policy
    /// lives in files, not the store, so there is no store change to make atomic with it;
    /// a failure is logged loudly). Changes to agents, credentials and kill switches are
    /// written together with their entries through `Store::apply_control` instead.
    pub async fn audit_control(&self, who: &str, action: &str, detail: String) {
        let id = ids::random_hex(16).unwrap_or_default();
        let entry = Entry::control(self.pipeline.clock().now_ns(), id, action, who, detail);
        if let Err(e) = self.audit.append(entry).await {
            tracing::error!(error = %e, action, "could not audit an operator action");
        }
    }

    /// Starts the node's background work (control refresh, policy watch, SIGHUP) without
    /// an HTTP listener, as `warden mcp-proxy` does in embedded mode. Dropping the returned
    /// sender stops it.
    pub fn start_background(self: &Arc<Self>) -> tokio::sync::watch::Sender<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        spawn_background(self, rx);
        tx
    }

    pub(crate) fn operator_token(&self) -> Option<&str> {
        self.operator_token.as_deref()
    }

    /// The acting operator's name, from the credential (`operator:<8 hex>`).
    pub fn operator_id(&self) -> &str {
        &self.operator_id
    }

    /// Refreshes the control view once if `decision` may only reflect a view older than
    /// the store (a token or agent issued by another process since the last refresh).
    /// Returns whether the caller should decide again; a failed refresh means no.
    pub(crate) async fn refreshed_for(self: &Arc<Self>, decision: &warden_core::Decision) -> bool {
        if !Pipeline::needs_newer_view(decision) {
            return false;
        }
        let app = self.clone();
        match blocking(move || app.refresh_state()).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the control view for an unknown credential");
                false
            }
        }
    }

    /// The standing of a credential (see [`Pipeline::standing`]), refreshing the view once
    /// for a credential it does not hold yet.
    pub async fn standing(
        self: &Arc<Self>,
        credential: Option<&str>,
    ) -> Result<warden_core::pipeline::Standing, warden_core::Decision> {
        match self.pipeline.standing(credential) {
            Err(d) if self.refreshed_for(&d).await => self.pipeline.standing(credential),
            other => other,
        }
    }

    /// Authenticates a credential (see [`Pipeline::authenticate`]), refreshing the view
    /// once for a credential it does not hold yet.
    pub async fn authenticate(
        self: &Arc<Self>,
        credential: Option<&str>,
    ) -> Result<warden_core::identity::Agent, warden_core::Decision> {
        match self.pipeline.authenticate(credential) {
            Err(d) if self.refreshed_for(&d).await => self.pipeline.authenticate(credential),
            other => other,
        }
    }
}

/// Runs `f` on the blocking pool (store calls are synchronous).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("store task failed: {e}"))))
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    /// The admin listener's address, when `admin_listen` is set.
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    stop: watch::Sender<listener::Stop>,
    background: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, gives requests in flight up to the request timeout to finish,
    /// closes what is left, and waits for the listeners to end.
    pub async fn stop(self) -> Result<(), std::io::Error> {
        let _ = self.stop.send(listener::Stop::Drain);
        let mut result = Ok(());
        for task in self.tasks {
            if let Err(e) = task.await {
                result = Err(std::io::Error::other(e));
            }
        }
        // Failures counted in windows that have not ended yet still reach the audit.
        self.app.flush_failure_counts(true).await;
        let _ = self.stop.send(listener::Stop::Abort);
        let _ = self.background.send(true);
        result
    }
}

/// Starts a node on an already bound listener (tests bind 127.0.0.1:0).
pub async fn start(settings: Settings, listener: TcpListener) -> Result<Running, ServeError> {
    start_with_clock(settings, listener, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(
    settings: Settings,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
) -> Result<Running, ServeError> {
    let app = tokio::task::spawn_blocking(move || App::build(settings, clock))
        .await
        .map_err(|e| ServeError::Io(std::io::Error::other(e)))??;
    start_app(app, listener).await
}

async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Serves an already built node on a bound listener, and on `admin_listen` (bound here)
/// if the settings name one. TLS, when configured, applies to both.
pub async fn start_app(app: Arc<App>, listener: TcpListener) -> Result<Running, ServeError> {
    let addr = listener.local_addr()?;
    let settings = &app.settings;
    let tls = settings.tls.as_ref().map(tls::acceptor).transpose()?;
    let admin = match &settings.admin_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let (stop, stop_rx) = watch::channel(listener::Stop::Run);
    let mut tasks = Vec::new();
    let main_router = match admin {
        Some(admin) => {
            tasks.push(tokio::spawn(listener::run(
                listener::Listener {
                    listener: admin,
                    router: app.admin_router(),
                    limits: settings.connections.clone(),
                    tls: tls.clone(),
                },
                stop_rx.clone(),
            )));
            app.agent_router()
        }
        None => app.router(),
    };
    tasks.push(tokio::spawn(listener::run(
        listener::Listener {
            listener,
            router: main_router,
            limits: settings.connections.clone(),
            tls,
        },
        stop_rx,
    )));
    let (background, background_rx) = watch::channel(false);
    spawn_head_log(&app, background_rx.clone());
    spawn_background(&app, background_rx);
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, ?admin_addr, scheme, "warden is serving");
    Ok(Running {
        addr,
        admin_addr,
        app,
        stop,
        background,
        tasks,
    })
}

/// Binds the configured address and serves until Ctrl-C or SIGTERM.
pub async fn serve(settings: Settings) -> Result<(), ServeError> {
    let open_files = listener::raise_fd_limit();
    // Each listener may hold max_connections sockets; the store and logs need a few more.
    let listeners = 1 + u64::from(settings.admin_listen.is_some());
    let wanted = settings.connections.max_connections as u64 * listeners + 64;
    if open_files.is_some_and(|n| n < wanted) {
        tracing::warn!(?open_files, max_connections = settings.connections.max_connections,
            "the open-file limit is below what server.max_connections may need; raise it (ulimit -n) or lower the cap");
    }
    let listener = bind(&settings.listen).await?;
    let running = start(settings, listener).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    let app = running.app.clone();
    running.stop().await?;
    log_chain_head(&app, "at shutdown").await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How often a serving node logs its audit chain head.
const HEAD_LOG_EVERY: Duration = Duration::from_secs(60);

/// Logs the audit chain head at start and every [`HEAD_LOG_EVERY`], so that a copy of
/// it exists outside the store (in whatever collects the logs). The chain alone cannot
/// show a rewrite by someone who can write the store; a head kept elsewhere can, with
/// `warden audit verify --expect-head SEQ:HASH`.
fn spawn_head_log(app: &Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let a = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEAD_LOG_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            log_chain_head(&a, "periodic").await;
        }
    });
}

/// One info line with the last entry's sequence number and hash (`pin`, in the form
/// `--expect-head` takes).
async fn log_chain_head(app: &Arc<App>, when: &'static str) {
    let store = app.store.clone();
    match blocking(move || store.tail_audit(1)).await {
        Ok(last) => match last.last() {
            Some(r) => {
                let head = hex::encode(r.hash);
                tracing::info!(seq = r.seq, %head, pin = %format_args!("{}:{head}", r.seq), when,
                    "audit chain head; keep a copy where this host cannot write it");
            }
            None => tracing::info!(when, "audit chain head: the audit is empty"),
        },
        Err(e) => tracing::warn!(error = %e, when, "cannot read the audit chain head"),
    }
}

fn spawn_background(app: &Arc<App>, stop: tokio::sync::watch::Receiver<bool>) {
    health::spawn_watch(app, stop.clone());

    // Control view refresh: the freshness bound in the pipeline turns a store that stops
    // answering into denials, so this loop only has to keep trying.
    let a = app.clone();
    let mut stop_rx = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_nanos(a.settings.control_refresh_ns));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => break,
            }
            let app = a.clone();
            let res = tokio::task::spawn_blocking(move || app.refresh_state()).await;
            let error = match res {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("cannot refresh the control view: {e}")),
                Err(e) => Some(format!("control refresh task failed: {e}")),
            };
            // Logged when it starts and ends, not every refresh.
            match (a.health.store_read(error.clone()), error) {
                (true, Some(e)) => tracing::warn!("{e}"),
                (true, None) => tracing::info!("the control view refreshes again"),
                (false, _) => {}
            }
        }
    });

    // Failure counts: each window's summary entry is appended soon after it ends.
    let a = app.clone();
    let mut stop_rx = stop.clone();
    tokio::spawn(async move {
        let every = Duration::from_nanos(a.settings.audit_limits.failure_window_ns / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => break,
            }
            a.flush_failure_counts(false).await;
        }
    });

    if app.settings.policy_watch {
        let a = app.clone();
        let mut stop_rx = stop.clone();
        tokio::spawn(async move {
            let mut last = policy_files::stamp(&a.settings);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let s = a.settings.clone();
                let now = tokio::task::spawn_blocking(move || policy_files::stamp(&s))
                    .await
                    .unwrap_or_default();
                if now != last {
                    last = now;
                    let _ = a.reload_policy("file-watch").await;
                }
                if Arc::strong_count(&a) == 1 {
                    break;
                }
            }
        });
    }

    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let a = app.clone();
        let mut stop_rx = stop.clone();
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        got = hup.recv() => if got.is_none() { break },
                        _ = stop_rx.changed() => break,
                    }
                    let _ = a.reload_policy("sighup").await;
                }
            });
        }
    }
}
