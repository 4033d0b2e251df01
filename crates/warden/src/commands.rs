//! Command-line arguments and what each command does.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use warden_core::audit::verify_store;
use warden_core::clock::{Clock, SystemClock, NANOS_PER_SEC};
use warden_core::config::{
    parse_duration, parse_overlap, Classification, ClientIdentity, Settings, UpstreamTls,
};
use warden_core::control::{KillSwitch, KillTarget};
use warden_core::identity::{
    self, issue_credential, validate_agent_id, Agent, AgentStatus, Verifier,
};
use warden_core::operator::{new_account, Role};
use warden_core::pipeline::{CallContext, CallRequest};
use warden_core::store::{Acting, ControlChange, Store};
use warden_core::Pipeline;
use warden_server::ids::random_hex;
use warden_server::{policy_files, setup};
use warden_store::SqliteStore;

use crate::terminal::escaped;

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Runtime governance for AI agents: every tool call decided, recorded, stoppable"
)]
pub struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        env = "WARDEN_CONFIG",
        default_value = "warden.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a complete example setup (claims processing) into DIR.
    Init {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Overwrite an existing config and policies (keys and the database are kept).
        #[arg(long)]
        force: bool,
    },
    /// Run the decision and admin API.
    Serve {
        /// Listen address (overrides the config and WARDEN_LISTEN).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Register agents and manage their credentials.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Manage the node's signing key.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Validate and test policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Stop an agent, an owner's agents, or every agent.
    Kill(KillArgs),
    /// Clear a kill switch.
    Revive(TargetArgs),
    /// Verify, read and export the audit trail.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Operator accounts for the admin API, each with a role and its own credential.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Govern an MCP server over stdio: put this in front of the server's command in an
    /// MCP client's config, e.g.
    /// `warden mcp-proxy --server http://127.0.0.1:8480 --name files -- npx server-filesystem /data`.
    McpProxy(McpProxyArgs),
}

#[derive(Args)]
#[command(after_long_help = MCP_PROXY_MODES)]
struct McpProxyArgs {
    /// A file holding the agent's token (mode 0600). Without it the token comes from the
    /// WARDEN_TOKEN environment variable; never from the command line, where `ps` shows it.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Ask this running `warden serve` (e.g. http://127.0.0.1:8480). The recommended mode:
    /// the agent's host then holds only the agent's own token.
    #[arg(long, env = "WARDEN_SERVER", value_name = "URL")]
    server: Option<String>,
    /// With an https:// --server: the CA certificates (PEM) its certificate chains to, in
    /// place of the public roots built into Warden (for a node on a private CA).
    #[arg(long, value_name = "PATH", requires = "server")]
    ca_file: Option<PathBuf>,
    /// With an https:// --server that asks for one: this host's client certificate (PEM,
    /// leaf first).
    #[arg(long, value_name = "PATH", requires_all = ["server", "client_key"])]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, mode 0600).
    #[arg(long, value_name = "PATH", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Decide in this process instead, on the store named by the config. It needs no
    /// signing key and no operator token, but it writes the store (audit, kill switches):
    /// only for a host trusted as much as Warden itself.
    #[arg(long, conflicts_with = "server")]
    embedded: bool,
    /// The server's name: its tools are the actions `<name>/<tool>` unless the config's
    /// [[mcp_servers]] entry of this name maps them.
    #[arg(long, default_value = "mcp")]
    name: String,
    /// Offer the client every tool the server has, not only those the agent may call.
    #[arg(long)]
    no_filter: bool,
    /// Cancel a tool call that has no answer after this long.
    #[arg(long)]
    call_timeout: Option<String>,
    /// Largest JSON-RPC message accepted from the client, in bytes.
    #[arg(long, default_value_t = warden_mcp::stdio::MAX_CLIENT_MESSAGE)]
    max_frame: usize,
    /// Give the server this variable from this environment (NAME) or with this value
    /// (NAME=VALUE, visible to `ps`: pass secrets by name). Repeatable. The server starts
    /// with only PATH, HOME, LANG, LC_*, TZ and TMPDIR otherwise; WARDEN_* is refused.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = crate::server_env::parse_env_arg)]
    env_vars: Vec<crate::server_env::EnvArg>,
    /// Largest JSON-RPC message accepted from the server, in bytes (file and database
    /// servers return large results).
    #[arg(long, default_value_t = warden_mcp::stdio::MAX_SERVER_MESSAGE)]
    max_server_frame: usize,
    /// The MCP server's command and arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

const MCP_PROXY_MODES: &str = "\
Modes:
  --server URL   remote (recommended): each call is decided and audited by a running
                 `warden serve`. This host holds the agent's token and nothing else: it
                 cannot mint tokens, clear a kill switch or touch the audit.
  --embedded     the decision path runs in this process. It verifies tokens with the
                 public key file beside the config's key file (`warden.pub`) and never
                 reads or creates the signing key; it needs no operator token. But it
                 opens the store read-write: whoever controls this host can rewrite the
                 audit and clear kill switches. Use it only on a host trusted as much as
                 the governance itself (e.g. the machine that runs `warden serve`).
One of the two must be given.";

#[derive(Subcommand)]
enum OperatorCmd {
    /// Make an account and print its credential (shown this once; only its hash is kept).
    Add {
        name: String,
        /// admin (agents, policies, operators, kills), reviewer (held calls, kills) or
        /// auditor (reads and verifies the audit).
        #[arg(long)]
        role: String,
        /// How long the credential works, e.g. 90d; without it, until the account is removed.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List accounts (never their secrets) and whether the bootstrap token is disabled.
    List,
    /// Remove an account by id: its credential is refused from its next request.
    Remove { id: String },
    /// Disable the bootstrap operator token (`operator.token`); needs an admin account.
    DisableBootstrap,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Register a new agent and print its first credential.
    Register {
        id: String,
        #[arg(long)]
        owner: String,
        #[arg(long)]
        tier: u8,
        /// A tool scope; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Credential lifetime, e.g. 90d.
        #[arg(long, default_value = "90d")]
        rotation: String,
    },
    /// Issue a new credential for an agent and print it.
    Token { id: String },
    /// Issue a new credential and rotate out the agent's others: they keep working for
    /// the overlap, then are refused (CREDENTIAL_EXPIRED).
    Rotate {
        id: String,
        /// How long the old credentials keep working, e.g. 15m; `0s` ends them at once.
        /// Default: `[identity] rotation_overlap` (1h).
        #[arg(long)]
        overlap: Option<String>,
    },
    /// Suspend an agent: its calls are refused (AGENT_SUSPENDED) until it is resumed.
    Suspend { id: String },
    /// Resume a suspended agent.
    Resume { id: String },
    /// Retire an agent for good: its calls are refused (AGENT_RETIRED), and no change
    /// brings it back.
    Retire { id: String },
    /// List agents.
    List,
    /// Show an agent and its credentials.
    Show { id: String },
    /// Revoke an agent (all its credentials), or one credential with --jti.
    Revoke {
        id: String,
        #[arg(long)]
        jti: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Replace the signing key. The old public key stays in `warden.pub` (and the JWKS)
    /// for the overlap, so tokens it signed keep verifying; rotate every agent's
    /// credential within it (`warden agent rotate`), and restart `warden serve` and any
    /// embedded `mcp-proxy` so they sign and verify with the new set.
    Rotate {
        /// How long tokens signed with the old key keep verifying, e.g. 24h.
        #[arg(long, default_value = "24h")]
        overlap: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Parse and validate the schema and policies named in the config.
    Validate,
    /// Run a table of example calls and report expected against actual.
    Test { file: PathBuf },
}

#[derive(Args)]
struct TargetArgs {
    /// The agent id.
    agent: Option<String>,
    /// Every agent of this owner (team).
    #[arg(long, conflicts_with_all = ["agent", "all"])]
    owner: Option<String>,
    /// Every agent.
    #[arg(long, conflicts_with_all = ["agent", "owner"])]
    all: bool,
}

impl TargetArgs {
    fn target(&self) -> Result<KillTarget> {
        match (&self.agent, &self.owner, self.all) {
            (Some(a), None, false) => Ok(KillTarget::Agent(a.clone())),
            (None, Some(o), false) => Ok(KillTarget::Owner(o.clone())),
            (None, None, true) => Ok(KillTarget::All),
            _ => bail!("name an agent, or use --owner TEAM or --all"),
        }
    }
}

#[derive(Args)]
struct KillArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value = "stopped by an operator")]
    reason: String,
    /// Set the switch even though no registered agent has this id or owner (yet).
    #[arg(long)]
    pre_emptive: bool,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Recompute the hash chain and report the first broken or missing entry.
    ///
    /// The chain shows that entries were not edited, removed or reordered since they were
    /// written, but it is plain SHA-256 in the store: whoever can write the store file can
    /// rewrite history and recompute every hash after the change, or cut entries off the
    /// end. Against that, pin history from outside: keep the `SEQ:HASH` this command
    /// prints (or that `warden serve` logs every minute) somewhere the store's host cannot
    /// write, and pass it back with --expect-head.
    Verify {
        /// Fail unless entry SEQ has hash HASH (an earlier verify's or the server log's
        /// chain head); a bare HASH must be the current head. Repeat for several.
        #[arg(long = "expect-head", value_name = "SEQ:HASH")]
        expect_head: Vec<String>,
        /// Fail unless the chain holds at least N entries (an empty audit proves nothing).
        #[arg(long, value_name = "N", default_value_t = 1)]
        min_entries: u64,
    },
    /// Print the last entries; with --follow, keep printing new ones.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        lines: usize,
        #[arg(long, short)]
        follow: bool,
    },
    /// Export entries.
    Export {
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn load_settings(path: &Path) -> Result<Settings> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read config `{}` (run `warden init` to create one, or pass --config)",
            path.display()
        )
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let env = |k: &str| std::env::var(k).ok();
    Ok(Settings::from_toml(
        &text,
        &path.display().to_string(),
        &base,
        &env,
    )?)
}

/// Opens the store and makes sure the agents declared in the config are registered.
fn open_store(settings: &Settings) -> Result<SqliteStore> {
    let store = SqliteStore::open(&settings.store_path)?;
    for a in &settings.agents {
        // Recorded as the config's doing, as a node records it.
        let by = Acting {
            who: "config".into(),
            ..acting()?
        };
        warden_core::identity::declare_agent(&store, a, &by)?;
    }
    Ok(store)
}

/// Opens the store for a kill or a revive, which only mean something to a node serving
/// that store: a missing file is an error, never created. If the node's store was
/// deleted under it, a kill written to a new file there would report success while the
/// node never read it (the node itself fails closed once its file is gone).
fn open_served_store(settings: &Settings) -> Result<SqliteStore> {
    let path = &settings.store_path;
    if !path.exists() {
        bail!(
            "no store at `{}`: no node serves it, so there is nothing to stop, revive or revoke \
             (`warden serve` creates it; check --config or WARDEN_STORE)",
            path.display()
        );
    }
    open_store(settings)
}

/// Opens the store for reading only; a missing store is an error, never created.
fn open_existing(settings: &Settings) -> Result<SqliteStore> {
    let path = &settings.store_path;
    if !path.exists() {
        bail!(
            "no store at `{}`: nothing to read (`warden serve` creates it; check --config or WARDEN_STORE)",
            path.display()
        );
    }
    Ok(SqliteStore::open_read_only(path)?)
}

/// The operator running this command, for one change and its audit entry (written with
/// the change, in one transaction).
fn acting() -> Result<Acting> {
    let who = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    Ok(Acting {
        who: format!("cli:{who}"),
        at: SystemClock.now_ns(),
        entry_id: random_hex(16)?,
    })
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init { dir, force } => init(&dir, force),
        Command::Serve { listen } => {
            let mut settings = load_settings(&cli.config)?;
            if let Some(l) = listen {
                settings.listen = l;
            }
            crate::logging::init(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(warden_server::serve(settings))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(cmd) => agent(&load_settings(&cli.config)?, &cli.config, cmd),
        Command::Key(KeyCmd::Rotate { overlap }) => {
            rotate_key(&load_settings(&cli.config)?, &overlap)
        }
        Command::Policy(PolicyCmd::Validate) => {
            let settings = load_settings(&cli.config)?;
            let bundle = policy_files::load(&settings)?;
            println!(
                "policy is valid: {} rules, digest {} ({} tools in the catalog)",
                bundle.rule_ids().len(),
                bundle.digest(),
                settings.tools.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCmd::Test { file }) => {
            policy_test(&load_settings(&cli.config)?, &file)
        }
        Command::Kill(k) => {
            let settings = load_settings(&cli.config)?;
            let store = open_served_store(&settings)?;
            let target = k.target.target()?;
            let by = acting()?;
            let kill = KillSwitch {
                target: target.clone(),
                reason: k.reason.clone(),
                set_by: by.who.clone(),
                set_at_ns: by.at,
            };
            let entry = by.entry("kill", format!("{target}: {}", k.reason));
            store.apply_control(
                &ControlChange::SetKill {
                    kill,
                    pre_emptive: k.pre_emptive,
                },
                entry,
            )?;
            println!(
                "killed {target}; running nodes deny its calls within {}ms",
                settings.control_refresh_ns / 1_000_000
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Revive(t) => {
            let settings = load_settings(&cli.config)?;
            let store = open_served_store(&settings)?;
            let target = t.target()?;
            let entry = acting()?.entry("revive", target.to_string());
            store.apply_control(&ControlChange::ClearKill(target.clone()), entry)?;
            println!("revived {target}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(cmd) => audit(&load_settings(&cli.config)?, cmd),
        Command::Operator(cmd) => operator(&load_settings(&cli.config)?, cmd),
        Command::McpProxy(args) => mcp_proxy(&cli.config, args),
    }
}

/// The agent's token for `mcp-proxy`: from `--token-file` (private to its owner, like
/// every secret Warden reads) or else `WARDEN_TOKEN`.
fn agent_token(file: Option<&Path>) -> Result<String> {
    let token = match file {
        Some(p) => setup::read_secret(p)?
            .ok_or_else(|| anyhow!("--token-file `{}` does not exist", p.display()))?,
        None => std::env::var("WARDEN_TOKEN").map_err(|_| {
            anyhow!("no agent token: set WARDEN_TOKEN or pass --token-file PATH (tokens are never taken on the command line)")
        })?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("the agent token is empty");
    }
    Ok(token)
}

fn mcp_proxy(config: &Path, args: McpProxyArgs) -> Result<ExitCode> {
    use warden_mcp::stdio::{self, Exit};
    use warden_mcp::tools::ToolMap;

    // stdout is the protocol: logs go to stderr only, and quietly by default.
    crate::logging::init(
        tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        false,
    );
    let token = agent_token(args.token_file.as_deref())?;
    let tls = UpstreamTls {
        ca_file: args.ca_file.clone(),
        identity: args
            .client_cert
            .clone()
            .zip(args.client_key.clone())
            .map(|(cert, key)| ClientIdentity { cert, key }),
    };
    if tls != UpstreamTls::default()
        && !args
            .server
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    {
        bail!(
            "--ca-file and --client-cert apply only to an https:// --server; \
             the node's address is given as {}",
            args.server.as_deref().unwrap_or("nothing")
        );
    }
    // Built before the MCP server starts, so a CA or key file that cannot be used stops
    // the proxy with its name rather than after the server is up.
    let remote = match &args.server {
        Some(url) => Some(
            warden_server::gate::RemoteGate::new(url, token.clone(), &tls)
                .context("cannot set up the connection to `warden serve`")?,
        ),
        None => None,
    };
    let settings = match (&args.server, args.embedded) {
        (None, false) => bail!(
            "choose a mode: `--server URL` to ask a running `warden serve` (recommended: this \
             host then holds only the agent's token), or `--embedded` to decide in this \
             process, which writes the store and so trusts this host as much as Warden \
             itself; see `warden mcp-proxy --help`"
        ),
        // In remote mode the config is optional: it only supplies the tool-name mapping
        // and the path arguments to resolve. Optional means absent, not broken: a config
        // that exists but does not load would silently drop both.
        (Some(_), _) if !config.exists() => None,
        (Some(_), _) => Some(load_settings(config).context(
            "the config maps this server's tools and paths; fix it, or pass no --config",
        )?),
        (None, true) => Some(
            load_settings(config)
                .context("the embedded decision path needs the config (or pass --server URL)")?,
        ),
    };
    if let (true, Some(s)) = (args.embedded, &settings) {
        // Not `eprintln!`: a broken stderr must not take the proxy down.
        let _ = writeln!(
            std::io::stderr(),
            "warden mcp-proxy: embedded mode: this process decides and audits on `{}` and can \
             write it, so whoever controls this host can rewrite the audit and clear kill \
             switches; it holds no signing key and no operator token. Use --server URL \
             unless this host is trusted as much as Warden itself",
            s.store_path.display()
        );
    }
    let declared = settings
        .as_ref()
        .and_then(|s| s.mcp_servers.get(&args.name));
    let map = ToolMap::new(
        args.name.clone(),
        declared.map(|m| m.actions.clone()).unwrap_or_default(),
    );
    let call_timeout = match &args.call_timeout {
        Some(t) => parse_duration(t).map_err(|m| anyhow!("--call-timeout: {m}"))?,
        None => declared.map_or(300 * NANOS_PER_SEC, |m| m.timeout_ns),
    };
    let mut rules = warden_mcp::engine::Rules::new(map);
    rules.filter_lists = !args.no_filter;
    rules.call_timeout = Duration::from_nanos(call_timeout);
    rules.resolve_paths = declared
        .map(|m| m.resolve_paths.clone())
        .unwrap_or_default();
    // The server runs in our working directory, so its relative paths are ours.
    rules.path_base = Some(std::env::current_dir()?);
    if let Some(m) = declared {
        rules.passthrough = m.passthrough.clone();
    }
    let opts = stdio::Options {
        max_frame: args.max_frame,
        max_server_frame: args.max_server_frame,
        ..stdio::Options::new(rules)
    };

    // The server gets no credential of ours: an empty environment, what a program needs
    // to run, and what the operator named (see `server_env`).
    let all_env: Vec<(String, std::ffi::OsString)> = std::env::vars_os()
        .filter_map(|(k, v)| k.into_string().ok().map(|k| (k, v)))
        .collect();
    let server_env = crate::server_env::server_env(
        &|name: &str| std::env::var_os(name),
        &all_env,
        declared,
        &args.env_vars,
    );
    for name in &server_env.missing {
        crate::logging::eprint_line(format_args!(
            "warden mcp-proxy: `{}` was to be passed to the MCP server but is not set here",
            escaped(name)
        ));
    }

    // One thread is plenty for one client's session, and many proxies side by side (one
    // per agent session) then cost one thread each rather than a pool each.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let mut child = tokio::process::Command::new(&args.command[0])
            .args(&args.command[1..])
            .env_clear()
            .envs(&server_env.vars)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the MCP server `{}`", args.command[0]))?;
        let (Some(server_in), Some(server_out)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the MCP server's pipes are not available");
        };
        let (_pipes, client_in, client_out) = crate::client_pipes::ClientPipes::open();
        let client_in = tokio::io::BufReader::new(client_in);
        let server_out = tokio::io::BufReader::new(server_out);
        let (exit, stats) = match (remote, settings) {
            (Some(gate), _) => {
                let gate = Arc::new(gate);
                stdio::run(gate, opts, client_in, client_out, server_out, server_in).await
            }
            (None, Some(settings)) => {
                let app = tokio::task::spawn_blocking(move || {
                    warden_server::App::build_verify_only(settings, Arc::new(SystemClock))
                })
                .await??;
                let _background = app.start_background();
                let gate = Arc::new(warden_server::gate::EmbeddedGate::new(app, token));
                stdio::run(gate, opts, client_in, client_out, server_out, server_in).await
            }
            (None, None) => bail!("no config and no --server"),
        };
        tracing::info!(?exit, ?stats, "mcp-proxy finished");
        match exit {
            Exit::ClientClosed => {
                // The server's stdin is closed; give it a moment to exit on its own.
                if tokio::time::timeout(Duration::from_secs(2), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                Ok(ExitCode::SUCCESS)
            }
            Exit::ServerClosed => {
                let status = child.wait().await?;
                if status.success() {
                    Ok(ExitCode::SUCCESS)
                } else {
                    crate::logging::eprint_line(format_args!(
                        "warden mcp-proxy: the MCP server exited with {status}"
                    ));
                    Ok(ExitCode::from(1))
                }
            }
        }
    });
    // Reading our stdin occupies a blocking thread until the client closes it; when the
    // server is the one that ended, do not wait for that.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

const EXAMPLE_CONFIG: &str = include_str!("../../../examples/claims/warden.toml");
const EXAMPLE_SCHEMA: &str = include_str!("../../../examples/claims/policy/warden.cedarschema");
const EXAMPLE_CLAIMS: &str = include_str!("../../../examples/claims/policy/claims.cedar");
const EXAMPLE_DATABASE: &str = include_str!("../../../examples/claims/policy/database.cedar");
const EXAMPLE_TESTS: &str = include_str!("../../../examples/claims/policy-tests.toml");

fn init(dir: &Path, force: bool) -> Result<ExitCode> {
    let config = dir.join("warden.toml");
    if config.exists() && !force {
        println!(
            "{} exists; leaving the setup as it is (use --force to rewrite it)",
            config.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    fs::create_dir_all(dir.join("policy"))
        .with_context(|| format!("cannot create `{}`", dir.display()))?;
    for (name, text) in [
        ("warden.toml", EXAMPLE_CONFIG),
        ("policy/warden.cedarschema", EXAMPLE_SCHEMA),
        ("policy/claims.cedar", EXAMPLE_CLAIMS),
        ("policy/database.cedar", EXAMPLE_DATABASE),
        ("policy-tests.toml", EXAMPLE_TESTS),
    ] {
        let p = dir.join(name);
        fs::write(&p, text).with_context(|| format!("cannot write `{}`", p.display()))?;
    }
    let key = dir.join("warden.key");
    if !key.exists() {
        setup::write_secret(&key, &setup::generate_key()?.to_key_file())?;
    }
    // The public half goes beside it, for the processes that only verify tokens.
    setup::write_public_key(&key, &setup::load_key(&key)?)?;
    let token = dir.join("operator.token");
    if !token.exists() {
        setup::write_secret(&token, &format!("{}\n", setup::new_operator_token()?))?;
    }
    let c = config.display();
    println!("wrote the claims-processing example to {}", dir.display());
    println!("  start it:        warden serve --config {c}");
    println!("  an agent token:  warden agent token claims-processor-v3 --config {c}");
    println!(
        "  test policies:   warden policy test {} --config {c}",
        dir.join("policy-tests.toml").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Issues a credential for `agent` (recorded with its audit entry) and prints the token.
fn issue_and_print(
    store: &SqliteStore,
    key: &identity::SigningKeyPair,
    settings: &Settings,
    agent: &Agent,
) -> Result<()> {
    let (token, _) = issue_credential(
        store,
        key,
        &settings.issuer,
        agent,
        random_hex(16)?,
        &acting()?,
    )?;
    println!("{token}");
    Ok(())
}

/// Rotates the signing key and records it in the audit.
fn rotate_key(settings: &Settings, overlap: &str) -> Result<ExitCode> {
    let overlap_ns = parse_overlap(overlap).map_err(|m| anyhow!("--overlap: {m}"))?;
    // The store first: a rotation nobody can record is not made.
    let store = open_store(settings)?;
    let by = acting()?;
    let (new, old_kid) = setup::rotate_key(&settings.key_file, overlap_ns, by.at)?;
    store.append_audit(vec![by.entry(
        "key-rotate",
        format!(
            "signing key `{}` replaces `{old_kid}`, which verifies for {}s more",
            new.kid(),
            overlap_ns / NANOS_PER_SEC
        ),
    )])?;
    println!(
        "signing key `{}` replaces `{old_kid}`; tokens signed with `{old_kid}` verify for {}s more.\n\
         Restart `warden serve` (and any embedded `warden mcp-proxy`) to sign and verify with the new set,\n\
         then issue every agent a new credential within the overlap: `warden agent rotate <agent>`.",
        new.kid(),
        overlap_ns / NANOS_PER_SEC
    );
    Ok(ExitCode::SUCCESS)
}

/// Suspends, resumes or retires an agent, with its audit entry; a running node has the
/// change by its next control refresh.
fn set_status(store: &SqliteStore, id: &str, to: AgentStatus) -> Result<()> {
    identity::set_agent_status(store, id, to, &acting()?)?;
    let done = match to {
        AgentStatus::Active => "resumed",
        AgentStatus::Suspended => "suspended",
        AgentStatus::Retired => "retired",
        AgentStatus::Revoked => "revoked",
    };
    println!("{done} agent {}", escaped(id));
    Ok(())
}

fn agent(settings: &Settings, config: &Path, cmd: AgentCmd) -> Result<ExitCode> {
    // Reading creates nothing: neither a store nor a signing key.
    let store = match cmd {
        AgentCmd::List | AgentCmd::Show { .. } => open_existing(settings)?,
        // A missing store holds no credential to revoke: creating one would report a
        // revocation that no node ever reads.
        AgentCmd::Revoke { .. }
        | AgentCmd::Suspend { .. }
        | AgentCmd::Resume { .. }
        | AgentCmd::Retire { .. } => open_served_store(settings)?,
        // Issuing may come before the first `warden serve`, which then opens this store
        // (a node whose store vanished fails closed on its own).
        AgentCmd::Token { .. } | AgentCmd::Rotate { .. } | AgentCmd::Register { .. } => {
            open_store(settings)?
        }
    };
    let key = || setup::load_or_create_key(&settings.key_file);
    let now = SystemClock.now_ns();
    match cmd {
        AgentCmd::Register {
            id,
            owner,
            tier,
            scopes,
            rotation,
        } => {
            validate_agent_id(&id).map_err(|m| anyhow!(m))?;
            if !settings.tiers.contains_key(&tier) {
                bail!(
                    "tier {tier} is not declared in `{}`; declare it under [[tiers]]",
                    config.display()
                );
            }
            let agent = Agent {
                id,
                owner,
                tier,
                scopes: scopes.into_iter().collect(),
                rotation_ns: parse_duration(&rotation).map_err(|m| anyhow!("--rotation: {m}"))?,
                status: AgentStatus::Active,
            };
            // The key first: an agent registered without its first token could not be
            // registered again to get one.
            let key = key()?;
            identity::register_agent(&store, &agent, &acting()?)?;
            issue_and_print(&store, &key, settings, &agent)?;
        }
        AgentCmd::Token { id } => {
            let agent = store
                .get_agent(&id)?
                .ok_or_else(|| anyhow!("no agent `{id}`"))?;
            issue_and_print(&store, &key()?, settings, &agent)?;
        }
        AgentCmd::List => {
            println!(
                "{:<28} {:<16} {:>4}  {:<8} scopes",
                "agent", "owner", "tier", "status"
            );
            for a in store.list_agents()? {
                let scopes: Vec<&str> = a.scopes.iter().map(String::as_str).collect();
                println!(
                    "{:<28} {:<16} {:>4}  {:<8} {}",
                    escaped(&a.id),
                    escaped(&a.owner),
                    a.tier,
                    a.status.as_str(),
                    escaped(&scopes.join(","))
                );
            }
        }
        AgentCmd::Show { id } => {
            let a = store
                .get_agent(&id)?
                .ok_or_else(|| anyhow!("no agent `{id}`"))?;
            println!(
                "agent     {}\nowner     {}\ntier      {}\nstatus    {}",
                escaped(&a.id),
                escaped(&a.owner),
                a.tier,
                a.status.as_str()
            );
            println!(
                "scopes    {}",
                escaped(&a.scopes.iter().cloned().collect::<Vec<_>>().join(", "))
            );
            println!("rotation  {}d", a.rotation_ns / NANOS_PER_SEC / 86_400);
            for c in store.list_credentials(&id)? {
                let state = if c.revoked_at(now) {
                    if c.replaced_by.is_some() {
                        "rotated out"
                    } else {
                        "revoked"
                    }
                } else if c.revoked_at_ns.is_some() {
                    "in overlap (rotated out soon)"
                } else if c.expires_at_ns <= now {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "credential {}  expires {}  {state}",
                    escaped(&c.jti),
                    c.expires_at_ns / NANOS_PER_SEC
                );
            }
        }
        AgentCmd::Revoke { id, jti } => {
            let what = identity::revoke(&store, &id, jti.as_deref(), &acting()?)?;
            println!("revoked {}", escaped(&what));
        }
        AgentCmd::Rotate { id, overlap } => {
            let overlap_ns = match overlap {
                Some(o) => parse_overlap(&o).map_err(|m| anyhow!("--overlap: {m}"))?,
                None => settings.rotation_overlap_ns,
            };
            let agent = store
                .get_agent(&id)?
                .ok_or_else(|| anyhow!("no agent `{id}`"))?;
            let (token, cred) = identity::rotate_credential(
                &store,
                &key()?,
                &settings.issuer,
                &agent,
                random_hex(16)?,
                overlap_ns,
                &acting()?,
            )?;
            println!("{token}");
            eprintln!(
                "credential `{}` issued; the agent's other credentials stop working in {}s",
                cred.jti,
                overlap_ns / NANOS_PER_SEC
            );
        }
        AgentCmd::Suspend { id } => set_status(&store, &id, AgentStatus::Suspended)?,
        AgentCmd::Resume { id } => set_status(&store, &id, AgentStatus::Active)?,
        AgentCmd::Retire { id } => set_status(&store, &id, AgentStatus::Retired)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Operator accounts, changed on the store directly as `cli:<user>` (whoever can write
/// the store holds more power than any role; the audit names the OS user).
fn operator(settings: &Settings, cmd: OperatorCmd) -> Result<ExitCode> {
    match cmd {
        OperatorCmd::List => {
            let roster = open_existing(settings)?.operators()?;
            let now = SystemClock.now_ns();
            println!("{:<10} {:<24} {:<9} state", "id", "name", "role");
            for o in &roster.accounts {
                let state = match o.standing(now) {
                    Ok(()) => "active",
                    Err(_) if o.removed_at_ns.is_some() => "removed",
                    Err(_) => "expired",
                };
                println!(
                    "{:<10} {:<24} {:<9} {state}",
                    escaped(&o.id),
                    escaped(&o.name),
                    o.role
                );
            }
            println!(
                "bootstrap operator token: {}",
                if roster.bootstrap_disabled {
                    "disabled"
                } else {
                    "enabled"
                }
            );
        }
        OperatorCmd::Add {
            name,
            role,
            expires_in,
        } => {
            let role: Role = role.parse().map_err(|m: String| anyhow!("--role: {m}"))?;
            let lifetime = expires_in
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|m| anyhow!("--expires-in: {m}"))?;
            let store = open_store(settings)?;
            let by = acting()?;
            let (op, token) = new_account(
                &name,
                role,
                random_hex(4)?,
                &random_hex(32)?,
                by.at,
                lifetime,
            )
            .map_err(|m| anyhow!(m))?;
            let entry = by.entry("operator-add", format!("{} as {role}", op.who()));
            store.apply_control(&ControlChange::AddOperator(op.clone()), entry)?;
            eprintln!(
                "added {} ({role}); its credential follows, shown only now",
                escaped(&op.who())
            );
            println!("{token}");
        }
        OperatorCmd::Remove { id } => {
            let store = open_served_store(settings)?;
            let by = acting()?;
            let entry = by.entry("operator-remove", format!("operator account {id}"));
            store.apply_control(
                &ControlChange::RemoveOperator {
                    id: id.clone(),
                    at: by.at,
                },
                entry,
            )?;
            println!("removed operator account {}", escaped(&id));
        }
        OperatorCmd::DisableBootstrap => {
            let store = open_served_store(settings)?;
            let by = acting()?;
            let entry = by.entry("bootstrap-disable", "the bootstrap operator token".into());
            store.apply_control(&ControlChange::DisableBootstrap { at: by.at }, entry)?;
            println!("the bootstrap operator token is disabled; operator accounts remain");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(rename = "case", default)]
    cases: Vec<TestCase>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    agent: String,
    tool: String,
    #[serde(default)]
    params: Option<toml::Value>,
    classification: Option<String>,
    cost_estimate: Option<f64>,
    #[serde(default = "one")]
    repeat: u32,
    expect: String,
    reason: Option<String>,
    rule: Option<String>,
}

fn one() -> u32 {
    1
}

fn policy_test(settings: &Settings, file: &Path) -> Result<ExitCode> {
    let text =
        fs::read_to_string(file).with_context(|| format!("cannot read `{}`", file.display()))?;
    let tests: TestFile = toml::from_str(&text)
        .with_context(|| format!("`{}` is not a valid test table", file.display()))?;
    let clock = Arc::new(SystemClock);
    let now = clock.now_ns();
    let (mut passed, mut failed) = (0, 0);
    for (i, case) in tests.cases.iter().enumerate() {
        // A fresh pipeline per case, so rate-limit state does not leak between cases.
        let pipeline = Pipeline::new(
            settings,
            policy_files::load(settings)?,
            Verifier::new("", [], 16),
            clock.clone(),
        );
        let agent = settings
            .agents
            .iter()
            .find(|a| a.id == case.agent)
            .ok_or_else(|| {
                anyhow!(
                    "case {} (`{}`): agent `{}` is not declared in the config",
                    i + 1,
                    case.name,
                    case.agent
                )
            })?;
        let params: serde_json::Value = match &case.params {
            Some(v) => serde_json::to_value(v)?,
            None => serde_json::json!({}),
        };
        let classification = case
            .classification
            .as_deref()
            .map(str::parse::<Classification>)
            .transpose()
            .map_err(|m| anyhow!("case `{}`: {m}", case.name))?;
        let ctx = CallContext {
            classification,
            cost_estimate: case.cost_estimate,
            ..Default::default()
        };
        let req = CallRequest {
            credential: None,
            tool: &case.tool,
            params: &params,
            context: &ctx,
        };
        let mut decision = None;
        for _ in 0..case.repeat.max(1) {
            decision = Some(pipeline.authorize(agent, &req, now));
        }
        let Some(d) = decision else { continue };
        let mut problems = Vec::new();
        if d.effect.as_str() != case.expect {
            problems.push(format!(
                "expected {}, got {}",
                case.expect,
                d.effect.as_str()
            ));
        }
        if let Some(r) = &case.reason {
            if d.reason.code() != r {
                problems.push(format!("expected reason {r}, got {}", d.reason.code()));
            }
        }
        if let Some(rule) = &case.rule {
            if !d.rules.contains(rule) {
                problems.push(format!(
                    "expected rule `{rule}`, got [{}]",
                    d.rules.join(", ")
                ));
            }
        }
        if problems.is_empty() {
            passed += 1;
            println!(
                "PASS  {}  ({} {} [{}])",
                case.name,
                d.effect.as_str(),
                d.reason.code(),
                d.rules.join(", ")
            );
        } else {
            failed += 1;
            println!(
                "FAIL  {}: {}\n      message: {}",
                case.name,
                problems.join("; "),
                d.message
            );
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn audit(settings: &Settings, cmd: AuditCmd) -> Result<ExitCode> {
    let store = open_existing(settings)?;
    match cmd {
        AuditCmd::Verify {
            expect_head,
            min_entries,
        } => verify(&store, &expect_head, min_entries),
        AuditCmd::Tail { lines, follow } => {
            let mut last = 0;
            for r in store.tail_audit(lines)? {
                print_record(&r);
                last = r.seq;
            }
            if follow {
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    for r in store.read_audit(last, 1000)? {
                        print_record(&r);
                        last = r.seq;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCmd::Export { format, output } => {
            if format != "jsonl" {
                bail!("unknown export format `{format}`; supported: jsonl");
            }
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    fs::File::create(p)
                        .with_context(|| format!("cannot create `{}`", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let mut after = 0;
            let mut n = 0u64;
            loop {
                let page = store.read_audit(after, 5000)?;
                let Some(l) = page.last() else { break };
                after = l.seq;
                for r in &page {
                    serde_json::to_writer(&mut out, &warden_server::admin::record_json(r))?;
                    out.write_all(b"\n")?;
                    n += 1;
                }
            }
            out.flush()?;
            if let Some(p) = output {
                eprintln!("exported {n} entries to {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One audit entry as a line. Agent id, action and the rest may be an agent's own
/// strings (a refused tool name, a forged token's subject): escaped, so a line is one
/// entry and shows what is stored.
/// A pinned chain position: `SEQ:HASH`, or a bare `HASH` for the current head.
struct Pin {
    seq: Option<u64>,
    hash: String,
}

fn parse_pin(text: &str) -> Result<Pin> {
    let (seq, hash) = match text.split_once(':') {
        Some((seq, hash)) => {
            let seq =
                seq.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    anyhow!("--expect-head `{text}`: `{seq}` is not an entry number")
                })?;
            (Some(seq), hash)
        }
        None => (None, text),
    };
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--expect-head `{text}`: the hash must be 64 hex digits (as `warden audit verify` prints it)");
    }
    Ok(Pin {
        seq,
        hash: hash.to_ascii_lowercase(),
    })
}

fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// `warden audit verify`: the whole chain, then the operator's outside knowledge of it.
fn verify(store: &SqliteStore, expect_head: &[String], min_entries: u64) -> Result<ExitCode> {
    // Bad pins are usage errors, found before the (possibly long) walk of the chain.
    let pins = expect_head
        .iter()
        .map(|p| parse_pin(p))
        .collect::<Result<Vec<_>>>()?;
    let report = verify_store(store)?;
    if let Some(e) = report.error {
        println!(
            "audit BROKEN: {e} ({} entries before it verified)",
            report.verified
        );
        return Ok(ExitCode::from(1));
    }
    let n = report.verified;
    let mut problems = Vec::new();
    if n < min_entries {
        problems.push(if n == 0 {
            "the audit is empty: an empty or emptied log proves nothing".to_owned()
        } else {
            format!("the chain holds {n} entries, fewer than the {min_entries} expected (entries cut off the end?)")
        });
    }
    for pin in &pins {
        let seq = pin.seq.unwrap_or(n);
        let found = match seq {
            0 => None,
            _ => store
                .read_audit(seq - 1, 1)?
                .into_iter()
                .next()
                .filter(|r| r.seq == seq),
        };
        match found {
            None => problems.push(format!(
                "entry {seq} is missing: the chain ends at entry {n} (entries cut off the end?)"
            )),
            Some(r) if hex(&r.hash) != pin.hash => problems.push(format!(
                "entry {seq} has hash {}, not the expected {}: history up to it was rewritten",
                hex(&r.hash),
                pin.hash
            )),
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        println!(
            "audit verified: {n} entries, chain head {n}:{}",
            report.head
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("audit NOT VERIFIED: {p}");
        }
        Ok(ExitCode::from(1))
    }
}

fn print_record(r: &warden_core::audit::Record) {
    let e = &r.entry;
    println!(
        "{:>6}  {}  {:<8} {:<22} {:<16} {:<6} {:<24} {}",
        r.seq,
        warden_core::clock::format_rfc3339(e.ts_ns),
        e.kind.as_str(),
        if e.agent_id.is_empty() {
            "-".into()
        } else {
            escaped(&e.agent_id)
        },
        escaped(&e.action),
        escaped(&e.decision),
        escaped(&e.reason),
        escaped(&e.rules.join(","))
    );
}
