//! Configuration: parsed from text into raw serde types, then validated in one step into
//! [`Settings`]. Errors name the file, the field and the fix. Environment overrides come in
//! through a lookup function so tests pass a map instead of touching the process
//! environment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::args::Schema;
use crate::audit::AuditLimits;
use crate::clock::{Nanos, NANOS_PER_MILLI, NANOS_PER_SEC};
use crate::identity::{Agent, AgentStatus};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: field `{field}`: {message}")]
    Field {
        file: String,
        field: String,
        message: String,
    },
}

/// Data classes, lowest first. The order is what makes tier boundaries work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Classification {
    Public,
    Internal,
    Confidential,
    Restricted,
}

impl Classification {
    pub const ALL: [Classification; 4] = [
        Classification::Public,
        Classification::Internal,
        Classification::Confidential,
        Classification::Restricted,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Public => "public",
            Classification::Internal => "internal",
            Classification::Confidential => "confidential",
            Classification::Restricted => "restricted",
        }
    }
}

impl FromStr for Classification {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Classification::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!("unknown data class `{s}`; use one of public, internal, confidential, restricted")
            })
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `90d`.
/// The rotation overlap when neither the config nor the operator names one.
pub const DEFAULT_ROTATION_OVERLAP: &str = "1h";

/// A credential rotation's overlap: a duration as [`parse_duration`] reads it, or zero
/// (`0s`, `0`), which ends the old credential the moment the new one is issued.
pub fn parse_overlap(s: &str) -> Result<Nanos, String> {
    let t = s.trim();
    if !t.is_empty()
        && t.trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .bytes()
            .all(|b| b == b'0')
    {
        let unit = t.trim_start_matches('0');
        if matches!(unit, "" | "ms" | "s" | "m" | "h" | "d") {
            return Ok(0);
        }
    }
    parse_duration(s)
}

pub fn parse_duration(s: &str) -> Result<Nanos, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` has no unit; write e.g. `30s`, `5m`, `2h` or `90d`"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let mult = match unit {
        "ms" => NANOS_PER_MILLI,
        "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        "d" => 86_400 * NANOS_PER_SEC,
        _ => {
            return Err(format!(
                "`{s}` has unknown unit `{unit}`; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{s}` must be greater than zero and less than 500 years"))
}

/// Which `Host` header values the MCP HTTP gateway answers, against DNS rebinding (a web
/// page whose name was re-pointed at this node reaches it with its own name as `Host`).
#[derive(Clone, Debug, PartialEq)]
pub enum HostAllowList {
    /// Not configured: the loopback names (`localhost`, `127.0.0.1`, `[::1]`, any port)
    /// when the node listens on a loopback address, any host otherwise (it cannot know
    /// the names it is reached by).
    Default,
    /// `["*"]`: any host.
    Any,
    /// These hosts, lower case; an entry without a port matches any port.
    Only(Vec<String>),
}

impl HostAllowList {
    fn parse(list: &[String]) -> Result<Self, String> {
        if list.iter().any(|h| h == "*") {
            return if list.len() == 1 {
                Ok(HostAllowList::Any)
            } else {
                Err("`*` (any host) cannot be combined with other entries".into())
            };
        }
        if list.is_empty() {
            return Err("an empty list would refuse every request; list hosts, or `*`".into());
        }
        list.iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                let ok = !h.is_empty()
                    && h.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                    });
                if ok {
                    Ok(h)
                } else {
                    Err(format!(
                        "`{h}` is not a host name (`mcp.example.com`, `10.0.0.5:8480`, `[::1]`)"
                    ))
                }
            })
            .collect::<Result<_, _>>()
            .map(HostAllowList::Only)
    }
}

/// `scheme://host[:port]` in lower case, or why `o` is not an origin.
fn parse_origin(o: &str) -> Result<String, String> {
    let lower = o.trim().trim_end_matches('/').to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or_else(|| format!("`{o}` is not an origin: write `https://host[:port]`"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "`{o}` is not an origin: write `https://host[:port]`, no path"
        ));
    }
    Ok(lower)
}

// ---------------------------------------------------------------- raw (serde) types

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    identity: RawIdentity,
    policy: RawPolicy,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    tiers: Vec<RawTier>,
    #[serde(default)]
    tools: Vec<RawTool>,
    #[serde(default)]
    agents: Vec<RawAgent>,
    #[serde(default)]
    limits: Vec<RawLimit>,
    #[serde(default)]
    mcp_servers: Vec<RawMcpServer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcpServer {
    name: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    actions: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    resolve_paths: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    pass_env: Vec<String>,
    passthrough: Option<Vec<String>>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    client_cert: Option<String>,
    #[serde(default)]
    client_key: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    operator_token_file: Option<String>,
    max_body_bytes: Option<usize>,
    header_timeout: Option<String>,
    request_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    mcp_sessions_max: Option<usize>,
    mcp_session_idle: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    allowed_origins: Option<Vec<String>>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
    require_client_cert: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
    min_free_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    issuer: Option<String>,
    key_file: Option<String>,
    token_cache_entries: Option<usize>,
    rotation_overlap: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    schema: Option<String>,
    policies: Option<String>,
    watch: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    refresh: Option<String>,
    stale_after: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    max_batch: Option<usize>,
    linger: Option<String>,
    max_rationale_bytes: Option<usize>,
    failure_window: Option<String>,
    failure_full_entries: Option<u32>,
    failure_max_entries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    tier: u8,
    max_classification: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    name: String,
    scope: String,
    #[serde(default)]
    classification: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// The tool's input JSON Schema, written as a TOML table.
    #[serde(default)]
    input_schema: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: String,
    owner: String,
    tier: u8,
    scopes: Vec<String>,
    #[serde(default)]
    rotation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    id: String,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    tiers: Vec<u8>,
    #[serde(default)]
    per: Option<String>,
    rate: u32,
    window: String,
    #[serde(default)]
    burst: Option<u32>,
}

/// A catalog input schema, from its TOML table.
///
/// Written inline in the config rather than as a path to a JSON file: the catalog stays
/// one file that parses without touching the disk (so `Settings::from_toml` stays pure
/// and a config is valid or not on its text alone), and the schema cannot change under a
/// running node without the config changing. The one JSON value TOML lacks, `null`,
/// matters to a schema only in `enum` and `const` (`default` and `examples` are
/// annotations); `type = ["string", "null"]` says the same.
fn compile_input_schema(table: &toml::Table) -> Result<Schema, String> {
    let json = toml_to_json(&toml::Value::Table(table.clone()), "")?;
    Schema::compile(&json).map_err(|e| e.to_string())
}

fn toml_to_json(v: &toml::Value, at: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .ok_or_else(|| format!("`{at}` is {f}, which JSON cannot hold"))?,
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => {
            return Err(format!(
                "`{at}` is a TOML date ({d}); a JSON Schema has none: quote it"
            ))
        }
        toml::Value::Array(a) => J::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| toml_to_json(x, &format!("{at}/{i}")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, x)| Ok((k.clone(), toml_to_json(x, &format!("{at}/{k}"))?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

// ---------------------------------------------------------------- validated types

#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    pub scope: String,
    pub classification: Classification,
    pub description: Option<String>,
    /// The tool's input schema, if the catalog declares one: every call's arguments are
    /// normalized against it before policy (see [`crate::args`]).
    pub input_schema: Option<Schema>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKey {
    /// One budget per agent.
    Agent,
    /// One budget shared by all agents of an owner (team).
    Owner,
}

#[derive(Clone, Debug)]
pub struct LimitSpec {
    pub id: String,
    /// Empty means every tool.
    pub tools: BTreeSet<String>,
    /// Empty means every agent.
    pub agents: BTreeSet<String>,
    /// Agents of these trust tiers, as they are at the call (empty: every tier). A
    /// tier's default limits: an agent moved to another tier is held to that tier's
    /// limits from its next call.
    pub tiers: BTreeSet<u8>,
    pub per: LimitKey,
    pub rate: u32,
    pub window_ns: Nanos,
    pub burst: u32,
}

impl LimitSpec {
    pub fn applies_to(&self, agent: &str, tier: u8, tool: &str) -> bool {
        (self.tools.is_empty() || self.tools.contains(tool))
            && (self.agents.is_empty() || self.agents.contains(agent))
            && (self.tiers.is_empty() || self.tiers.contains(&tier))
    }
}

/// An upstream MCP server: reachable at `/mcp/{name}` on the HTTP gateway if it has a
/// URL, and known by name to `warden mcp-proxy --name`.
#[derive(Clone, Debug)]
pub struct McpServer {
    pub name: String,
    /// Streamable HTTP endpoint of the upstream server.
    pub url: Option<String>,
    /// MCP tool name to Warden action; unmapped tools are `<name>/<tool>`.
    pub actions: BTreeMap<String, String>,
    /// How long a tool call may run before the gateway cancels it.
    pub timeout_ns: Nanos,
    /// Arguments that name local files; both MCP gateways resolve them before policy and
    /// forward them as resolved (the HTTP gateway on its own host, absolute paths only).
    pub resolve_paths: Vec<String>,
    /// Variables `mcp-proxy` sets in the environment of the server it starts.
    pub env: BTreeMap<String, String>,
    /// Variables `mcp-proxy` passes through from its own environment to the server.
    pub pass_env: Vec<String>,
    /// Client methods that pass the gateways without a decision (an entry ending in `/*`
    /// names a prefix). Every other request is decided and audited.
    pub passthrough: Vec<String>,
    /// How the HTTP gateway authenticates an `https` upstream and itself to it.
    pub tls: UpstreamTls,
}

/// TLS toward an upstream, from PEM files. Checked only for form here; the server reads
/// the files when it builds its clients, so a missing or exposed file stops it at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The CA certificates the upstream's certificate must chain to, instead of the
    /// public roots built into Warden.
    pub ca_file: Option<PathBuf>,
    /// A client certificate to present (mTLS).
    pub identity: Option<ClientIdentity>,
}

/// A client certificate chain (leaf first) and its private key, which must not be
/// readable by group or others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Checks a variable name an operator asks `mcp-proxy` to give the server it starts.
///
/// `WARDEN_*` is Warden's own namespace: `WARDEN_TOKEN` is the agent's credential and
/// others name servers, files and logs, none of which a tool server has any use for. A
/// server that needs a value of that name must be given it under another name. The
/// prefix is compared case-insensitively, since some platforms treat names that way.
pub fn check_child_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(format!(
            "`{}` is not an environment variable name (non-empty, no `=`, no NUL)",
            name.escape_debug()
        ));
    }
    if name
        .get(..WARDEN_ENV_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(WARDEN_ENV_PREFIX))
    {
        return Err(format!(
            "`{name}` is refused: `WARDEN_*` variables (the agent's token among them) never reach \
             the MCP server; give the server what it needs under a name of its own"
        ));
    }
    Ok(())
}

const WARDEN_ENV_PREFIX: &str = "WARDEN_";

/// Client methods that pass the MCP gateways undecided unless a server says otherwise:
/// the handshake, liveness, and notifications (which cannot be answered, so cannot be
/// denied; `tools/call` sent as one is never forwarded).
pub const DEFAULT_PASSTHROUGH: [&str; 3] = ["initialize", "ping", "notifications/*"];

/// How the HTTP listener protects itself from slow, idle and numerous clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request head (and a TLS handshake) must arrive within this time of the
    /// connection opening or of its first byte.
    pub header_timeout_ns: Nanos,
    /// An ordinary request must be read and answered within this time; the MCP gateway's
    /// streams only have to deliver their request body within it.
    pub request_timeout_ns: Nanos,
    /// A keep-alive connection with no request in flight is closed after this time.
    pub idle_timeout_ns: Nanos,
    /// Open connections the node keeps at most; idle ones are closed to admit new ones.
    pub max_connections: usize,
    /// Open connections one peer address may hold at most.
    pub max_connections_per_ip: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout_ns: 10 * NANOS_PER_SEC,
            request_timeout_ns: 30 * NANOS_PER_SEC,
            idle_timeout_ns: 60 * NANOS_PER_SEC,
            max_connections: 4096,
            max_connections_per_ip: 1024,
        }
    }
}

/// TLS for the listeners, from PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key; must not be readable by group or others.
    pub key: PathBuf,
    /// CA certificates that agents' client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate (needs `client_ca`).
    pub require_client_cert: bool,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// The directory of the config file; relative paths are resolved against it.
    pub base_dir: PathBuf,
    pub listen: String,
    /// A second address that alone serves the admin API (with the health probes); when
    /// set, the main listener answers `/admin` with 404.
    pub admin_listen: Option<String>,
    pub connections: ConnectionLimits,
    pub tls: Option<TlsSettings>,
    pub operator_token_file: PathBuf,
    /// Set by `WARDEN_OPERATOR_TOKEN`; wins over the file.
    pub operator_token_env: Option<String>,
    pub max_body_bytes: usize,
    pub store_path: PathBuf,
    /// Below this much free space on the store's filesystem the node reports itself
    /// unready. `None`: the smaller of 256 MiB and 1% of the filesystem; `Some(0)`: never.
    pub store_min_free_bytes: Option<u64>,
    pub issuer: String,
    pub key_file: PathBuf,
    pub token_cache_entries: usize,
    /// How long a rotated-out credential keeps working beside its replacement
    /// (`[identity] rotation_overlap`, 1h by default; `0s` ends it at once).
    pub rotation_overlap_ns: Nanos,
    pub schema_file: PathBuf,
    pub policies_path: PathBuf,
    pub policy_watch: bool,
    pub control_refresh_ns: Nanos,
    pub control_stale_after_ns: Nanos,
    pub audit_max_batch: usize,
    /// How long an outcome may wait for a decision to share its commit (see
    /// `warden_server::audit_writer`).
    pub audit_linger_ns: Nanos,
    /// Caps on agent-supplied text and sampling of failure floods.
    pub audit_limits: AuditLimits,
    /// Highest data class each trust tier may touch.
    pub tiers: BTreeMap<u8, Classification>,
    pub tools: BTreeMap<String, Tool>,
    pub agents: Vec<Agent>,
    pub limits: Vec<LimitSpec>,
    pub mcp_servers: BTreeMap<String, McpServer>,
    /// MCP sessions the HTTP gateway tracks at most; past it new ones are refused.
    pub mcp_sessions_max: usize,
    /// `Host` values the MCP HTTP gateway answers (`[server] allowed_hosts`; see
    /// [`HostAllowList`]).
    pub mcp_allowed_hosts: HostAllowList,
    /// Browser origins the MCP HTTP gateway accepts besides its own hosts
    /// (`[server] allowed_origins`), each `scheme://host[:port]`, lower case.
    pub mcp_allowed_origins: Vec<String>,
    /// An MCP session unused this long is forgotten (its client initializes anew).
    pub mcp_session_idle_ns: Nanos,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8480";
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

impl Settings {
    /// Parses and validates a config file's text. `file` is the name used in errors and
    /// `base_dir` the folder relative paths are resolved against; `env` looks up
    /// environment overrides (`WARDEN_LISTEN`, `WARDEN_ADMIN_LISTEN`, `WARDEN_STORE`,
    /// `WARDEN_OPERATOR_TOKEN`).
    pub fn from_toml(
        text: &str,
        file: &str,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let field = |field: &str, message: String| ConfigError::Field {
            file: file.to_owned(),
            field: field.to_owned(),
            message,
        };
        let path = |p: &str| base_dir.join(p);

        let listen = env("WARDEN_LISTEN")
            .or(raw.server.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let admin_listen = env("WARDEN_ADMIN_LISTEN")
            .or(raw.server.admin_listen)
            .filter(|a| !a.is_empty());
        if admin_listen.as_deref() == Some(listen.as_str()) {
            return Err(field(
                "server.admin_listen",
                format!("`{listen}` is also `server.listen`; give the admin plane its own address or leave it out"),
            ));
        }
        let max_body_bytes = raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
        if !(1024..=16 * 1024 * 1024).contains(&max_body_bytes) {
            return Err(field(
                "server.max_body_bytes",
                format!("{max_body_bytes} is out of range; use 1024 to 16777216"),
            ));
        }
        let tls = raw.server.tls.map(|t| TlsSettings {
            cert: path(&t.cert),
            key: path(&t.key),
            require_client_cert: t.require_client_cert.unwrap_or(false),
            client_ca: t.client_ca.as_deref().map(path),
        });
        if let Some(t) = &tls {
            if t.require_client_cert && t.client_ca.is_none() {
                return Err(field(
                    "server.tls.require_client_cert",
                    "needs `client_ca`, the CA file that agents' certificates chain to".into(),
                ));
            }
        }
        let store_path = env("WARDEN_STORE")
            .map(PathBuf::from)
            .unwrap_or_else(|| path(raw.store.path.as_deref().unwrap_or("warden.db")));

        let issuer = raw.identity.issuer.unwrap_or_else(|| "warden".to_owned());
        if issuer.is_empty() {
            return Err(field("identity.issuer", "must not be empty".into()));
        }
        let schema_file = raw.policy.schema.ok_or_else(|| {
            field(
                "policy.schema",
                "missing; name the Cedar schema file, e.g. `schema = \"policy/warden.cedarschema\"`".into(),
            )
        })?;
        let policies_path = raw.policy.policies.ok_or_else(|| {
            field(
                "policy.policies",
                "missing; name a .cedar file or a folder of them, e.g. `policies = \"policy\"`"
                    .into(),
            )
        })?;

        let dur = |name: &str, v: Option<String>, default: &str| -> Result<Nanos, ConfigError> {
            parse_duration(v.as_deref().unwrap_or(default)).map_err(|m| field(name, m))
        };
        let defaults = ConnectionLimits::default();
        let timeout = |name: &str, v: Option<String>, default: Nanos| match v {
            Some(v) => dur(name, Some(v), ""),
            None => Ok(default),
        };
        let connections = ConnectionLimits {
            header_timeout_ns: timeout(
                "server.header_timeout",
                raw.server.header_timeout,
                defaults.header_timeout_ns,
            )?,
            request_timeout_ns: timeout(
                "server.request_timeout",
                raw.server.request_timeout,
                defaults.request_timeout_ns,
            )?,
            idle_timeout_ns: timeout(
                "server.idle_timeout",
                raw.server.idle_timeout,
                defaults.idle_timeout_ns,
            )?,
            max_connections: raw
                .server
                .max_connections
                .unwrap_or(defaults.max_connections),
            max_connections_per_ip: raw
                .server
                .max_connections_per_ip
                .unwrap_or(defaults.max_connections_per_ip),
        };
        if !(16..=1_000_000).contains(&connections.max_connections) {
            return Err(field(
                "server.max_connections",
                format!(
                    "{} is out of range; use 16 to 1000000",
                    connections.max_connections
                ),
            ));
        }
        if connections.max_connections_per_ip == 0
            || connections.max_connections_per_ip > connections.max_connections
        {
            return Err(field(
                "server.max_connections_per_ip",
                format!(
                    "{} is out of range; use 1 to server.max_connections ({})",
                    connections.max_connections_per_ip, connections.max_connections
                ),
            ));
        }
        let control_refresh_ns = dur("control.refresh", raw.control.refresh, "250ms")?;
        let control_stale_after_ns = dur("control.stale_after", raw.control.stale_after, "2s")?;
        let rotation_overlap_ns = parse_overlap(
            raw.identity
                .rotation_overlap
                .as_deref()
                .unwrap_or(DEFAULT_ROTATION_OVERLAP),
        )
        .map_err(|m| field("identity.rotation_overlap", m))?;
        let mcp_session_idle_ns = dur(
            "server.mcp_session_idle",
            raw.server.mcp_session_idle.clone(),
            "30m",
        )?;
        let mcp_allowed_hosts = match raw.server.allowed_hosts.clone() {
            Some(list) => {
                HostAllowList::parse(&list).map_err(|m| field("server.allowed_hosts", m))?
            }
            None => HostAllowList::Default,
        };
        let mut mcp_allowed_origins = Vec::new();
        for o in raw.server.allowed_origins.clone().unwrap_or_default() {
            mcp_allowed_origins
                .push(parse_origin(&o).map_err(|m| field("server.allowed_origins", m))?);
        }
        let mcp_sessions_max = raw.server.mcp_sessions_max.unwrap_or(10_000);
        if mcp_sessions_max == 0 {
            return Err(field(
                "server.mcp_sessions_max",
                "0 would refuse every MCP session; use at least 1".into(),
            ));
        }
        if control_stale_after_ns < 2 * control_refresh_ns {
            return Err(field(
                "control.stale_after",
                "must be at least twice control.refresh, or every missed refresh would deny".into(),
            ));
        }

        let audit_linger_ns = dur("audit.linger", raw.audit.linger.clone(), "2ms")?;
        if audit_linger_ns > 100 * NANOS_PER_MILLI {
            return Err(field(
                "audit.linger",
                "is out of range; use 1ms to 100ms (an outcome is answered only once durable)"
                    .into(),
            ));
        }
        let audit_limits = {
            let d = AuditLimits::default();
            let max_rationale_bytes = raw
                .audit
                .max_rationale_bytes
                .unwrap_or(d.max_rationale_bytes);
            if !(64..=65_536).contains(&max_rationale_bytes) {
                return Err(field(
                    "audit.max_rationale_bytes",
                    format!("{max_rationale_bytes} is out of range; use 64 to 65536"),
                ));
            }
            let failure_window_ns = dur("audit.failure_window", raw.audit.failure_window, "10s")?;
            if !(100 * NANOS_PER_MILLI..=3600 * NANOS_PER_SEC).contains(&failure_window_ns) {
                return Err(field(
                    "audit.failure_window",
                    "is out of range; use 100ms to 1h".into(),
                ));
            }
            let failure_full_entries = raw
                .audit
                .failure_full_entries
                .unwrap_or(d.failure_full_entries);
            let failure_max_entries = raw
                .audit
                .failure_max_entries
                .unwrap_or(d.failure_max_entries);
            if failure_max_entries < failure_full_entries {
                return Err(field(
                    "audit.failure_max_entries",
                    format!(
                        "{failure_max_entries} is less than audit.failure_full_entries \
                         ({failure_full_entries}); it bounds all sources together"
                    ),
                ));
            }
            AuditLimits {
                max_rationale_bytes,
                failure_window_ns,
                failure_full_entries,
                failure_max_entries,
            }
        };

        let mut tiers = BTreeMap::new();
        for (i, t) in raw.tiers.into_iter().enumerate() {
            let class: Classification = t
                .max_classification
                .parse()
                .map_err(|m| field(&format!("tiers[{i}].max_classification"), m))?;
            if tiers.insert(t.tier, class).is_some() {
                return Err(field(
                    &format!("tiers[{i}].tier"),
                    format!("tier {} is declared twice", t.tier),
                ));
            }
        }

        let mut tools = BTreeMap::new();
        for (i, t) in raw.tools.into_iter().enumerate() {
            // The name every edge accepts from agents, so a declared tool can be called.
            if let Err(e) = crate::tool::check_name(&t.name) {
                return Err(field(&format!("tools[{i}].name"), e.to_string()));
            }
            if t.name.contains('"') {
                return Err(field(
                    &format!("tools[{i}].name"),
                    format!("`{}` is not a usable tool name", t.name),
                ));
            }
            let classification = match t.classification {
                Some(c) => c
                    .parse()
                    .map_err(|m| field(&format!("tools[{i}].classification"), m))?,
                None => Classification::Internal,
            };
            let input_schema = match t.input_schema {
                None => None,
                Some(table) => Some(compile_input_schema(&table).map_err(|m| {
                    field(
                        &format!("tools[{i}].input_schema"),
                        format!("tool `{}`: {m}", t.name),
                    )
                })?),
            };
            let tool = Tool {
                name: t.name.clone(),
                scope: t.scope,
                classification,
                description: t.description,
                input_schema,
            };
            if tools.insert(t.name.clone(), tool).is_some() {
                return Err(field(
                    &format!("tools[{i}].name"),
                    format!("tool `{}` is declared twice", t.name),
                ));
            }
        }

        let mut agents = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, a) in raw.agents.into_iter().enumerate() {
            crate::identity::validate_agent_id(&a.id)
                .map_err(|m| field(&format!("agents[{i}].id"), m))?;
            if !seen.insert(a.id.clone()) {
                return Err(field(
                    &format!("agents[{i}].id"),
                    format!("agent `{}` is declared twice", a.id),
                ));
            }
            if !tiers.contains_key(&a.tier) {
                return Err(field(
                    &format!("agents[{i}].tier"),
                    format!(
                        "tier {} is not declared; add a [[tiers]] entry for it",
                        a.tier
                    ),
                ));
            }
            let rotation_ns = dur(&format!("agents[{i}].rotation"), a.rotation, "90d")?;
            agents.push(Agent {
                id: a.id,
                owner: a.owner,
                tier: a.tier,
                scopes: a.scopes.into_iter().collect(),
                rotation_ns,
                status: AgentStatus::Active,
            });
        }

        let mut limits = Vec::new();
        let mut limit_ids = BTreeSet::new();
        for (i, l) in raw.limits.into_iter().enumerate() {
            if !limit_ids.insert(l.id.clone()) {
                return Err(field(
                    &format!("limits[{i}].id"),
                    format!("limit `{}` is declared twice", l.id),
                ));
            }
            for t in &l.tools {
                if !tools.contains_key(t) {
                    return Err(field(
                        &format!("limits[{i}].tools"),
                        format!("`{t}` is not a declared tool; declare it under [[tools]] or fix the name"),
                    ));
                }
            }
            let per = match l.per.as_deref().unwrap_or("agent") {
                "agent" => LimitKey::Agent,
                "owner" => LimitKey::Owner,
                other => {
                    return Err(field(
                        &format!("limits[{i}].per"),
                        format!("`{other}` is not `agent` or `owner`"),
                    ))
                }
            };
            if l.rate == 0 {
                return Err(field(
                    &format!("limits[{i}].rate"),
                    "must be at least 1".into(),
                ));
            }
            let window_ns = dur(&format!("limits[{i}].window"), Some(l.window), "")?;
            if let Some(t) = l.tiers.iter().find(|t| !tiers.contains_key(*t)) {
                return Err(field(
                    &format!("limits[{i}].tiers"),
                    format!("tier {t} is not declared in [[tiers]]"),
                ));
            }
            limits.push(LimitSpec {
                id: l.id,
                tools: l.tools.into_iter().collect(),
                agents: l.agents.into_iter().collect(),
                tiers: l.tiers.into_iter().collect(),
                per,
                rate: l.rate,
                window_ns,
                burst: l.burst.unwrap_or(l.rate).max(1),
            });
        }

        let mut mcp_servers = BTreeMap::new();
        for (i, m) in raw.mcp_servers.into_iter().enumerate() {
            let ok_name = !m.name.is_empty()
                && m.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok_name {
                return Err(field(
                    &format!("mcp_servers[{i}].name"),
                    format!(
                        "`{}` is not usable in a URL path; use letters, digits and - _ .",
                        m.name
                    ),
                ));
            }
            if let Some(u) = &m.url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(field(
                        &format!("mcp_servers[{i}].url"),
                        format!("`{u}` is not an http(s) URL"),
                    ));
                }
            }
            let timeout_ns = dur(&format!("mcp_servers[{i}].timeout"), m.timeout, "5m")?;
            for name in m.env.keys() {
                check_child_env_name(name)
                    .map_err(|e| field(&format!("mcp_servers[{i}].env"), e))?;
            }
            for name in &m.pass_env {
                check_child_env_name(name)
                    .map_err(|e| field(&format!("mcp_servers[{i}].pass_env"), e))?;
            }
            let passthrough = match m.passthrough {
                Some(list) => list,
                None => DEFAULT_PASSTHROUGH.iter().map(|s| s.to_string()).collect(),
            };
            for p in &passthrough {
                // Letting the gateway's reason to exist through undecided is never what
                // an operator means; refuse it rather than run ungoverned.
                let governs_calls = p == "tools/call"
                    || p == "*"
                    || p.strip_suffix("/*")
                        .is_some_and(|pre| "tools/call".starts_with(&format!("{pre}/")));
                if governs_calls || p.is_empty() {
                    return Err(field(
                        &format!("mcp_servers[{i}].passthrough"),
                        format!(
                            "`{p}` would let tool calls pass undecided; list the methods that \
                             may pass (for example \"initialize\", \"ping\", \"notifications/*\")"
                        ),
                    ));
                }
            }
            let identity = match (m.client_cert, m.client_key) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(ClientIdentity {
                    cert: path(&cert),
                    key: path(&key),
                }),
                (Some(_), None) => {
                    return Err(field(
                        &format!("mcp_servers[{i}].client_key"),
                        "missing; `client_cert` needs the certificate's private key (PEM)".into(),
                    ))
                }
                (None, Some(_)) => {
                    return Err(field(
                        &format!("mcp_servers[{i}].client_cert"),
                        "missing; `client_key` needs the certificate it belongs to (PEM)".into(),
                    ))
                }
            };
            let tls = UpstreamTls {
                ca_file: m.ca_file.as_deref().map(path),
                identity,
            };
            // TLS settings for a server that is not reached over TLS would be silently
            // ignored, and the operator would believe the link is protected.
            if tls != UpstreamTls::default()
                && !m.url.as_deref().is_some_and(|u| u.starts_with("https://"))
            {
                let which = if tls.ca_file.is_some() {
                    "ca_file"
                } else {
                    "client_cert"
                };
                return Err(field(
                    &format!("mcp_servers[{i}].{which}"),
                    "applies only to a server reached over TLS; give it an `https://` url or remove the TLS settings".into(),
                ));
            }
            let server = McpServer {
                name: m.name.clone(),
                url: m.url,
                actions: m.actions,
                timeout_ns,
                resolve_paths: m.resolve_paths,
                env: m.env,
                pass_env: m.pass_env,
                passthrough,
                tls,
            };
            if mcp_servers.insert(m.name.clone(), server).is_some() {
                return Err(field(
                    &format!("mcp_servers[{i}].name"),
                    format!("`{}` is declared twice", m.name),
                ));
            }
        }

        Ok(Settings {
            base_dir: base_dir.to_path_buf(),
            listen,
            admin_listen,
            connections,
            tls,
            operator_token_file: path(
                raw.server
                    .operator_token_file
                    .as_deref()
                    .unwrap_or("operator.token"),
            ),
            operator_token_env: env("WARDEN_OPERATOR_TOKEN"),
            max_body_bytes,
            store_path,
            store_min_free_bytes: raw.store.min_free_bytes,
            issuer,
            key_file: path(raw.identity.key_file.as_deref().unwrap_or("warden.key")),
            token_cache_entries: raw.identity.token_cache_entries.unwrap_or(100_000).max(16),
            rotation_overlap_ns,
            schema_file: path(&schema_file),
            policies_path: path(&policies_path),
            policy_watch: raw.policy.watch.unwrap_or(true),
            control_refresh_ns,
            control_stale_after_ns,
            audit_max_batch: raw.audit.max_batch.unwrap_or(512).clamp(1, 10_000),
            audit_linger_ns,
            audit_limits,
            tiers,
            tools,
            agents,
            limits,
            mcp_servers,
            mcp_sessions_max,
            mcp_allowed_hosts,
            mcp_allowed_origins,
            mcp_session_idle_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = r#"
[policy]
schema = "s.cedarschema"
policies = "p.cedar"
[[tiers]]
tier = 1
max_classification = "internal"
[[tools]]
name = "get_claim"
scope = "claims:read"
classification = "confidential"
[[agents]]
id = "a1"
owner = "team"
tier = 1
scopes = ["claims:read"]
rotation = "1h"
[[limits]]
id = "l1"
tools = ["get_claim"]
rate = 2
window = "1m"
"#;

    #[test]
    fn parses_minimal_config_with_defaults() {
        let s = Settings::from_toml(MINIMAL, "warden.toml", Path::new("/etc/w"), &no_env).unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN);
        assert_eq!(s.store_path, Path::new("/etc/w/warden.db"));
        assert_eq!(s.agents[0].rotation_ns, 3600 * NANOS_PER_SEC);
        assert_eq!(s.limits[0].burst, 2);
        assert_eq!(
            s.tools["get_claim"].classification,
            Classification::Confidential
        );
    }

    #[test]
    fn store_min_free_bytes_defaults_to_the_proportional_rule() {
        let s = Settings::from_toml(MINIMAL, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.store_min_free_bytes, None);
        let text = format!("[store]\nmin_free_bytes = 1048576\n{MINIMAL}");
        let s = Settings::from_toml(&text, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.store_min_free_bytes, Some(1 << 20));
    }

    #[test]
    fn audit_limits_have_defaults_and_bounds() {
        let s = Settings::from_toml(MINIMAL, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.audit_limits, AuditLimits::default());
        assert_eq!(s.audit_limits.max_rationale_bytes, 2048);
        assert_eq!(s.audit_linger_ns, 2 * NANOS_PER_MILLI);
        let text = format!(
            "[audit]\nmax_rationale_bytes = 512\nfailure_window = \"1s\"\nfailure_full_entries = 3\nlinger = \"10ms\"\n{MINIMAL}"
        );
        let s = Settings::from_toml(&text, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.audit_linger_ns, 10 * NANOS_PER_MILLI);
        assert_eq!(
            s.audit_limits,
            AuditLimits {
                max_rationale_bytes: 512,
                failure_window_ns: NANOS_PER_SEC,
                failure_full_entries: 3,
                failure_max_entries: 1000,
            }
        );
        for bad in [
            "max_rationale_bytes = 1",
            "max_rationale_bytes = 10000000",
            "failure_window = \"1ms\"",
            "linger = \"0ms\"",
            "linger = \"1s\"",
            "failure_max_entries = 10",
        ] {
            let text = format!("[audit]\n{bad}\n{MINIMAL}");
            let e = Settings::from_toml(&text, "warden.toml", Path::new("."), &no_env)
                .unwrap_err()
                .to_string();
            assert!(e.contains("audit."), "{bad}: {e}");
        }
    }

    #[test]
    fn allowed_hosts_and_origins_are_checked() {
        let s = Settings::from_toml(MINIMAL, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.mcp_allowed_hosts, HostAllowList::Default);
        assert!(s.mcp_allowed_origins.is_empty());
        let text = format!(
            "[server]\nallowed_hosts = [\"MCP.example.com\", \"10.0.0.5:8480\"]\nallowed_origins = [\"https://Console.example.com/\"]\n{MINIMAL}"
        );
        let s = Settings::from_toml(&text, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(
            s.mcp_allowed_hosts,
            HostAllowList::Only(vec!["mcp.example.com".into(), "10.0.0.5:8480".into()])
        );
        assert_eq!(s.mcp_allowed_origins, vec!["https://console.example.com"]);
        let text = format!("[server]\nallowed_hosts = [\"*\"]\n{MINIMAL}");
        let s = Settings::from_toml(&text, "warden.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.mcp_allowed_hosts, HostAllowList::Any);
        for bad in [
            "allowed_hosts = []",
            "allowed_hosts = [\"*\", \"a.example\"]",
            "allowed_hosts = [\"https://a.example\"]",
            "allowed_hosts = [\"a.example/x\"]",
            "allowed_origins = [\"a.example\"]",
            "allowed_origins = [\"https://a.example/path\"]",
            "allowed_origins = [\"https://\"]",
        ] {
            let text = format!("[server]\n{bad}\n{MINIMAL}");
            let e = Settings::from_toml(&text, "warden.toml", Path::new("."), &no_env)
                .unwrap_err()
                .to_string();
            assert!(e.contains("server.allowed_"), "{bad}: {e}");
        }
    }

    #[test]
    fn env_overrides_file() {
        let env = |k: &str| (k == "WARDEN_LISTEN").then(|| "127.0.0.1:1".to_owned());
        let s = Settings::from_toml(MINIMAL, "warden.toml", Path::new("."), &env).unwrap();
        assert_eq!(s.listen, "127.0.0.1:1");
    }

    #[test]
    fn errors_name_file_field_and_fix() {
        let bad = MINIMAL.replace(
            "classification = \"confidential\"",
            "classification = \"secret\"",
        );
        let err = Settings::from_toml(&bad, "conf/warden.toml", Path::new("."), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("conf/warden.toml"), "{err}");
        assert!(err.contains("tools[0].classification"), "{err}");
        assert!(err.contains("use one of public"), "{err}");

        let bad = MINIMAL.replace("tier = 1\nscopes", "tier = 7\nscopes");
        let err = Settings::from_toml(&bad, "w.toml", Path::new("."), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agents[0].tier") && err.contains("[[tiers]]"),
            "{err}"
        );

        let bad = MINIMAL.replace("[policy]", "[policy]\nbogus = 1");
        let err = Settings::from_toml(&bad, "w.toml", Path::new("."), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("w.toml") && err.contains("bogus"), "{err}");

        let bad = MINIMAL.replace("window = \"1m\"", "window = \"1 minute\"");
        let err = Settings::from_toml(&bad, "w.toml", Path::new("."), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits[0].window"), "{err}");

        let bad = MINIMAL.replace("rate = 2\n", "rate = 2\ntiers = [1, 7]\n");
        let err = Settings::from_toml(&bad, "w.toml", Path::new("."), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("limits[0].tiers") && err.contains("tier 7"),
            "{err}"
        );
        let good = MINIMAL.replace("rate = 2\n", "rate = 2\ntiers = [1]\n");
        let s = Settings::from_toml(&good, "w.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(s.limits[0].tiers, [1].into());
    }

    #[test]
    fn server_limits_tls_and_admin_listen() {
        let s = Settings::from_toml(MINIMAL, "w.toml", Path::new("/etc/w"), &no_env).unwrap();
        assert_eq!(s.connections, ConnectionLimits::default());
        assert_eq!((s.admin_listen, s.tls), (None, None));

        let text = format!(
            "[server]\nheader_timeout = \"2s\"\nmax_connections = 20\nmax_connections_per_ip = 5\n\
             admin_listen = \"127.0.0.1:9\"\n[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n{MINIMAL}"
        );
        let s = Settings::from_toml(&text, "w.toml", Path::new("/etc/w"), &no_env).unwrap();
        assert_eq!(s.connections.header_timeout_ns, 2 * NANOS_PER_SEC);
        assert_eq!(s.connections.max_connections_per_ip, 5);
        assert_eq!(s.admin_listen.as_deref(), Some("127.0.0.1:9"));
        let tls = s.tls.unwrap();
        assert_eq!(tls.key, Path::new("/etc/w/k.pem"));
        assert!(!tls.require_client_cert);

        let env = |k: &str| (k == "WARDEN_ADMIN_LISTEN").then(|| "127.0.0.1:7".to_owned());
        let s = Settings::from_toml(&text, "w.toml", Path::new("."), &env).unwrap();
        assert_eq!(s.admin_listen.as_deref(), Some("127.0.0.1:7"));

        for (good, bad, name) in [
            (
                "max_connections_per_ip = 5",
                "max_connections_per_ip = 50",
                "server.max_connections_per_ip",
            ),
            ("\"2s\"", "\"2\"", "server.header_timeout"),
            (
                "key = \"k.pem\"",
                "key = \"k.pem\"\nrequire_client_cert = true",
                "server.tls.require_client_cert",
            ),
            ("127.0.0.1:9", "127.0.0.1:8480", "server.admin_listen"),
        ] {
            let text = text.replace(good, bad);
            let err = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn an_mcp_servers_environment_is_read_and_warden_names_are_refused() {
        let entry = |extra: &str| format!("{MINIMAL}[[mcp_servers]]\nname = \"gh\"\n{extra}\n");
        let text = entry("pass_env = [\"GITHUB_TOKEN\"]\nenv = { LOG_LEVEL = \"debug\" }");
        let s = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env).unwrap();
        let gh = &s.mcp_servers["gh"];
        assert_eq!(gh.pass_env, ["GITHUB_TOKEN"]);
        assert_eq!(gh.env["LOG_LEVEL"], "debug");

        for (extra, what) in [
            ("pass_env = [\"WARDEN_TOKEN\"]", "mcp_servers[0].pass_env"),
            ("pass_env = [\"warden_server\"]", "mcp_servers[0].pass_env"),
            ("env = { WARDEN_TOKEN = \"x\" }", "mcp_servers[0].env"),
            ("pass_env = [\"A=B\"]", "mcp_servers[0].pass_env"),
            ("pass_env = [\"\"]", "mcp_servers[0].pass_env"),
        ] {
            let err = Settings::from_toml(&entry(extra), "w.toml", Path::new("."), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{extra}: {err}");
        }
        let err = check_child_env_name("WARDEN_TOKEN").unwrap_err();
        assert!(err.contains("never reach the MCP server"), "{err}");
        assert!(check_child_env_name("WARDENS").is_ok());
    }

    #[test]
    fn passthrough_never_lets_tool_calls_through_and_session_limits_are_read() {
        let server = |extra: &str| format!("{MINIMAL}\n[[mcp_servers]]\nname = \"up\"\n{extra}\n");
        let s = Settings::from_toml(&server(""), "w.toml", Path::new("."), &no_env).unwrap();
        assert_eq!(
            s.mcp_servers["up"].passthrough,
            DEFAULT_PASSTHROUGH.map(String::from)
        );
        assert_eq!(
            (s.mcp_sessions_max, s.mcp_session_idle_ns),
            (10_000, 30 * 60 * NANOS_PER_SEC)
        );
        let s = Settings::from_toml(
            &server("passthrough = [\"ping\", \"resources/*\"]"),
            "w.toml",
            Path::new("."),
            &no_env,
        )
        .unwrap();
        assert_eq!(s.mcp_servers["up"].passthrough, ["ping", "resources/*"]);
        // A careless operator cannot wave tool calls through, however it is spelled.
        for bad in ["tools/call", "tools/*", "*", ""] {
            let text = server(&format!("passthrough = [\"ping\", \"{bad}\"]"));
            let e = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env).unwrap_err();
            assert!(
                e.to_string().contains("mcp_servers[0].passthrough"),
                "{bad}: {e}"
            );
        }
        let text = format!("[server]\nmcp_sessions_max = 0\n{MINIMAL}");
        let e = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env).unwrap_err();
        assert!(e.to_string().contains("server.mcp_sessions_max"), "{e}");
    }

    #[test]
    fn upstream_tls_is_for_https_servers_and_a_client_cert_needs_its_key() {
        let server = |extra: &str, url: &str| {
            format!("{MINIMAL}\n[[mcp_servers]]\nname = \"up\"\nurl = \"{url}\"\n{extra}\n")
        };
        let text = server(
            "ca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"",
            "https://tools.internal/mcp",
        );
        let s = Settings::from_toml(&text, "w.toml", Path::new("/etc/w"), &no_env).unwrap();
        let tls = &s.mcp_servers["up"].tls;
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/etc/w/ca.pem")));
        assert_eq!(
            tls.identity,
            Some(ClientIdentity {
                cert: PathBuf::from("/etc/w/c.pem"),
                key: PathBuf::from("/etc/w/c.key"),
            })
        );
        let s = Settings::from_toml(
            &server("", "http://h/mcp"),
            "w.toml",
            Path::new("."),
            &no_env,
        )
        .unwrap();
        assert_eq!(s.mcp_servers["up"].tls, UpstreamTls::default());

        for (extra, url, field) in [
            (
                "client_cert = \"c.pem\"",
                "https://h/mcp",
                "mcp_servers[0].client_key",
            ),
            (
                "client_key = \"c.key\"",
                "https://h/mcp",
                "mcp_servers[0].client_cert",
            ),
            (
                "ca_file = \"ca.pem\"",
                "http://h/mcp",
                "mcp_servers[0].ca_file",
            ),
            (
                "client_cert = \"c.pem\"\nclient_key = \"c.key\"",
                "http://h/mcp",
                "mcp_servers[0].client_cert",
            ),
        ] {
            let err = Settings::from_toml(&server(extra, url), "w.toml", Path::new("."), &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{extra} {url}: {err}");
        }
        // No url at all (a stdio server for `mcp-proxy --name`): nothing to speak TLS to.
        let text = format!("{MINIMAL}\n[[mcp_servers]]\nname = \"up\"\nca_file = \"ca.pem\"\n");
        let err = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn a_tool_may_declare_its_input_schema_inline() {
        let text = MINIMAL.replace(
            "classification = \"confidential\"\n",
            "classification = \"confidential\"\n\
             [tools.input_schema]\n\
             type = \"object\"\n\
             required = [\"claim_id\"]\n\
             properties = { claim_id = { type = \"string\" }, amount = { type = [\"number\", \"null\"] } }\n",
        );
        let s = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env).unwrap();
        let schema = s.tools["get_claim"].input_schema.clone().unwrap();
        let mut args = serde_json::json!({"claim_id": "c", "amount": 5});
        schema.normalize(&mut args).unwrap();
        assert_eq!(args["amount"].as_f64(), Some(5.0));
        assert_eq!(args["amount"].as_i64(), None);
        assert!(
            Settings::from_toml(MINIMAL, "w.toml", Path::new("."), &no_env)
                .unwrap()
                .tools["get_claim"]
                .input_schema
                .is_none()
        );

        // A schema that cannot be used is a config error naming the tool and the spot.
        for (bad, says) in [
            (
                "properties = { amount = { type = \"decimal\" } }",
                "/properties/amount",
            ),
            (
                "properties = { a = { \"$ref\" = \"#/$defs/missing\" } }",
                "names nothing",
            ),
            ("const = 1979-05-27", "TOML date"),
        ] {
            let text = MINIMAL.replace(
                "classification = \"confidential\"\n",
                &format!("classification = \"confidential\"\n[tools.input_schema]\n{bad}\n"),
            );
            let e = Settings::from_toml(&text, "w.toml", Path::new("."), &no_env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("tools[0].input_schema")
                    && e.contains("`get_claim`")
                    && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_overlap("0s"), Ok(0));
        assert_eq!(parse_overlap("0"), Ok(0));
        assert_eq!(parse_overlap("15m"), Ok(15 * 60 * NANOS_PER_SEC));
        assert!(parse_overlap("").is_err());
        assert!(parse_overlap("0y").is_err());
        assert!(parse_overlap("-1s").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), 250 * NANOS_PER_MILLI);
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400 * NANOS_PER_SEC);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999d").is_err());
    }
}
