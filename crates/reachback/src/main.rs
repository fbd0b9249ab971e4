//! The `reachback` binary: the command tree and wiring, nothing else.

mod ctl;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reachback_server::ServerConfig;

#[derive(Parser)]
#[command(name = "reachback", version, about = "Servers reach end-user machines by virtual IP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: REST API, enrollment, allocation, CA, tunnel endpoint
    Server(ServerArgs),
    /// Administer a running server over its REST API
    Ctl(ctl::CtlArgs),
    /// The client agent: enroll once, then run
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The connector: next-hop router for the virtual ranges
    #[command(subcommand)]
    Connector(ConnectorCommand),
}

#[derive(clap::Subcommand)]
enum AgentCommand {
    /// Enroll this machine with an enrollment key (makes a key pair, gets a certificate and a virtual IP)
    Enroll(AgentEnrollArgs),
    /// Keep the tunnel to the broker and serve flows to allowed local ports
    Run(AgentRunArgs),
}

/// How a client trusts the server's API.
#[derive(clap::Args, Clone, Debug)]
pub struct TrustArgs {
    /// Trust the server's internal CA by its pin, sha256:<64 hex> (the server prints it at start) [default: the platform's trust store]
    #[arg(long, env = "REACHBACK_CA_PIN")]
    pub ca_pin: Option<String>,
    /// Allow plain http:// to an address that is not loopback (keys then cross the network in the clear)
    #[arg(long, env = "REACHBACK_INSECURE_HTTP")]
    pub insecure_http: bool,
}

impl TrustArgs {
    pub fn trust(&self) -> reachback_tunnel::ApiTrust {
        reachback_tunnel::ApiTrust { ca_pin: self.ca_pin.clone(), insecure_http: self.insecure_http }
    }
}

/// A key given on the command line, in the environment, or in a file (to keep it out of the process list).
fn read_key(key: Option<String>, key_file: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    match (key, key_file) {
        (Some(_), Some(_)) => anyhow::bail!("give the key with --key or --key-file, not both"),
        (Some(key), None) => Ok(Some(key)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --key-file {}", path.display()))?;
            let key = text.trim().to_string();
            anyhow::ensure!(!key.is_empty(), "--key-file {} is empty", path.display());
            Ok(Some(key))
        }
        (None, None) => Ok(None),
    }
}

#[derive(clap::Args)]
struct AgentEnrollArgs {
    /// The server's API address, e.g. https://reachback.corp.example:8080
    #[arg(long, env = "REACHBACK_SERVER")]
    server: String,
    /// The enrollment key
    #[arg(long, env = "REACHBACK_ENROLLMENT_KEY", hide_env_values = true, required_unless_present = "key_file")]
    key: Option<String>,
    /// A file holding the enrollment key
    #[arg(long, env = "REACHBACK_ENROLLMENT_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
    /// Discard an enrollment with another server found in the state directory
    #[arg(long)]
    force: bool,
    /// This machine's FQDN [default: the host name]
    #[arg(long)]
    hostname: Option<String>,
    /// windows, macos, linux, ios or android [default: this machine's]
    #[arg(long)]
    platform: Option<String>,
    #[arg(long)]
    city: Option<String>,
    #[arg(long)]
    state: Option<String>,
    /// ISO 3166-1 alpha-2 country code
    #[arg(long)]
    country: Option<String>,
    /// Where the key pair, certificates and state live [default: /var/lib/reachback/agent as root, else $XDG_STATE_HOME/reachback/agent]
    #[arg(long, env = "REACHBACK_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct AgentRunArgs {
    /// Local ports flows may reach, comma-separated, ranges allowed
    #[arg(long, env = "REACHBACK_ALLOW_PORTS", default_value = reachback_agent::DEFAULT_ALLOWED_PORTS)]
    allow_ports: String,
    /// Local UDP ports flows may reach, comma-separated, ranges allowed (e.g. 53,161) [default: none]
    #[arg(long, env = "REACHBACK_ALLOW_UDP_PORTS", default_value = "")]
    allow_udp_ports: String,
    /// Address allowed flows connect to
    #[arg(long, env = "REACHBACK_CONNECT_HOST", default_value = "127.0.0.1")]
    connect_host: std::net::IpAddr,
    /// TCP congestion control of the tunnel and of the local connections to services: `system` keeps the machine's [default: cubic where available]
    #[arg(long, env = "REACHBACK_TCP_CONGESTION")]
    tcp_congestion: Option<String>,
    #[arg(long, env = "REACHBACK_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log format
    #[arg(long, env = "REACHBACK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(clap::Subcommand)]
enum ConnectorCommand {
    /// Enroll (first run) and route the virtual ranges through the tunnel
    Run(ConnectorRunArgs),
}

#[derive(clap::Args)]
struct ConnectorRunArgs {
    /// The server's API address, e.g. https://reachback.corp.example:8080
    #[arg(long, env = "REACHBACK_SERVER")]
    server: Option<String>,
    /// The provisioning key (needed for the first run, or to enroll as another connector)
    #[arg(long, env = "REACHBACK_PROVISIONING_KEY", hide_env_values = true)]
    key: Option<String>,
    /// A file holding the provisioning key
    #[arg(long, env = "REACHBACK_PROVISIONING_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
    /// Ingress mode: tproxy (root; nftables TPROXY, kernel TCP, fastest), tun (CAP_NET_ADMIN; a TUN device and a userspace TCP/IP stack, where TPROXY is unavailable) or socks5 (no privileges)
    #[arg(long, env = "REACHBACK_CONNECTOR_MODE", default_value = "tproxy", value_parser = ["tproxy", "tun", "socks5"])]
    mode: String,
    /// TUN device name (tun mode)
    #[arg(long, env = "REACHBACK_TUN_NAME", default_value = "reachback0")]
    tun_name: String,
    /// TUN device MTU (tun mode): at least the MTU of the links servers send from
    #[arg(long, env = "REACHBACK_TUN_MTU", default_value_t = reachback_connector::tun::DEFAULT_MTU)]
    tun_mtu: u16,
    /// SOCKS5 listen address (socks5 mode)
    #[arg(long, env = "REACHBACK_SOCKS5_LISTEN", default_value = "127.0.0.1:1080")]
    socks5_listen: SocketAddr,
    /// Answer DNS for client hostnames on this address, UDP and TCP (repeatable or comma-separated; e.g. 0.0.0.0:53)
    #[arg(long = "dns-listen", env = "REACHBACK_DNS_LISTEN", value_delimiter = ',')]
    dns_listen: Vec<SocketAddr>,
    /// Forward DNS queries outside the client domains to this server [default: refuse them]
    #[arg(long, env = "REACHBACK_DNS_UPSTREAM")]
    dns_upstream: Option<SocketAddr>,
    /// TTL in seconds of DNS answers and of negative answers
    #[arg(long, env = "REACHBACK_DNS_TTL", default_value_t = 10)]
    dns_ttl: u32,
    /// DNS queries per second one source address may ask (0: no limit)
    #[arg(long, env = "REACHBACK_DNS_RATE_LIMIT", default_value_t = 2000)]
    dns_rate_limit: u32,
    /// SOCKS5 users: a file of username:password lines, mode 600 (required when --socks5-listen is not loopback)
    #[arg(long, env = "REACHBACK_SOCKS5_CREDENTIALS")]
    socks5_credentials: Option<PathBuf>,
    /// Seconds a UDP flow may go without a datagram either way before it ends
    #[arg(long, env = "REACHBACK_UDP_IDLE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    udp_idle_timeout: u64,
    /// The most UDP flows held at once (datagrams of further pairs are dropped and counted)
    #[arg(long, env = "REACHBACK_UDP_MAX_FLOWS", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    udp_max_flows: u64,
    /// Serve Prometheus metrics (UDP flows and drops, DNS queries, table size, sync lag) at http://ADDR:PORT/metrics [default: off]
    #[arg(long, env = "REACHBACK_CONNECTOR_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Local port intercepted connections are handed to
    #[arg(long, env = "REACHBACK_TPROXY_PORT", default_value_t = 15001)]
    tproxy_port: u16,
    /// nftables table name
    #[arg(long, env = "REACHBACK_NFT_TABLE", default_value = "reachback")]
    nft_table: String,
    /// Firewall mark and routing table for intercepted packets
    #[arg(long, env = "REACHBACK_FWMARK", default_value_t = 1)]
    fwmark: u32,
    #[arg(long, env = "REACHBACK_ROUTE_TABLE", default_value_t = 100)]
    route_table: u32,
    /// TOML file with any of the keys above, named as the flags with `_` for `-` (server, mode, dns_listen = ["…"], ca_pin, key_file, …); flags and environment variables win over it
    #[arg(long, env = "REACHBACK_CONNECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// TCP congestion control of the tunnel and of the intercepted connections: `system` keeps the machine's [default: cubic where available]
    #[arg(long, env = "REACHBACK_TCP_CONGESTION")]
    tcp_congestion: Option<String>,
    #[arg(long, env = "REACHBACK_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log format
    #[arg(long, env = "REACHBACK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// API and console address [default: 127.0.0.1:8080]
    #[arg(long, env = "REACHBACK_LISTEN")]
    listen: Option<SocketAddr>,
    /// Tunnel endpoint for agents and connectors [default: 127.0.0.1:8443]
    #[arg(long, env = "REACHBACK_TUNNEL_LISTEN")]
    tunnel_listen: Option<SocketAddr>,
    /// Data directory, created if missing [default: ./reachback-data]
    #[arg(long, env = "REACHBACK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: postgres://… for PostgreSQL [default: SQLite in the data directory]
    #[arg(long = "database", env = "REACHBACK_DATABASE_URL")]
    database_url: Option<String>,
    /// API key of the first superadmin, used only when the database is empty
    #[arg(long, env = "REACHBACK_BOOTSTRAP_TOKEN", hide_env_values = true)]
    bootstrap_token: Option<String>,
    /// Tunnel endpoints handed to agents, comma-separated [default: the tunnel listen address]
    #[arg(long, env = "REACHBACK_BROKER_ENDPOINTS", value_delimiter = ',')]
    broker_endpoints: Option<Vec<String>>,
    /// Name of this replica [default: the host name]
    #[arg(long, env = "REACHBACK_NODE_NAME")]
    node_name: Option<String>,
    /// Seconds a relayed flow may stay silent both ways before it is reset [default: 3600]
    #[arg(long, env = "REACHBACK_FLOW_IDLE_TIMEOUT")]
    flow_idle_timeout: Option<u64>,
    /// Seconds a stopping server (SIGTERM) waits for open flows after telling agents and connectors to move to another replica [default: 30]
    #[arg(long, env = "REACHBACK_DRAIN_TIMEOUT")]
    drain_timeout: Option<u64>,
    /// Seconds between keepalives on quiet tunnels; agents and connectors give up on a replica that stopped answering after 2.5 of them and move to another (a replica whose host or network vanished is left within 3 s whatever this is) [default: 10]
    #[arg(long, env = "REACHBACK_CLIENT_KEEPALIVE")]
    client_keepalive: Option<u64>,
    /// TCP congestion control of the tunnels: `system` keeps the machine's [default: cubic where available]
    #[arg(long, env = "REACHBACK_TCP_CONGESTION")]
    tcp_congestion: Option<String>,
    /// The API's certificate chain (PEM) [default: HTTPS with a certificate from the internal CA when --listen is not loopback]
    #[arg(long, env = "REACHBACK_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, env = "REACHBACK_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Names (DNS names or addresses) the internal CA's certificate for the API is issued for, comma-separated [default: the host name and the listen address, or every local address for a wildcard]
    #[arg(long, env = "REACHBACK_API_NAMES", value_delimiter = ',')]
    api_names: Option<Vec<String>>,
    /// Serve plain HTTP on a non-loopback address (for a TLS-terminating proxy in front)
    #[arg(long, env = "REACHBACK_INSECURE_HTTP")]
    insecure_http: bool,
    /// Lifetime in seconds of the certificates the internal CA issues (devices, connectors, broker, API); they renew after two thirds of it [default: 7776000, 90 days]
    #[arg(long, env = "REACHBACK_CERTIFICATE_LIFETIME")]
    certificate_lifetime: Option<u64>,
    /// API connections served at once [default: 4096]
    #[arg(long, env = "REACHBACK_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Seconds a client has to send a request's head [default: 10]
    #[arg(long, env = "REACHBACK_HEADER_READ_TIMEOUT")]
    header_read_timeout: Option<u64>,
    /// Seconds a request may take to its response head [default: 60]
    #[arg(long, env = "REACHBACK_REQUEST_TIMEOUT")]
    request_timeout: Option<u64>,
    /// Flows one tunnel (agent or connector) may hold at once; more are refused [default: 16384]
    #[arg(long, env = "REACHBACK_TUNNEL_MAX_FLOWS")]
    tunnel_max_flows: Option<usize>,
    /// Bytes (MiB) a peer may have in flight towards the server on one tunnel, its memory budget [default: 64]
    #[arg(long, env = "REACHBACK_TUNNEL_MEMORY_MIB")]
    tunnel_memory_mib: Option<u64>,
    /// File holding the 32-byte secret that encrypts the CA key in the database (64 hex digits or base64); every replica needs the same [default: REACHBACK_SECRET_KEY, else DATA_DIR/secret.key, generated]
    #[arg(long, env = "REACHBACK_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// Bearer token GET /metrics requires [default: none, /metrics is open]
    #[arg(long, env = "REACHBACK_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// TOML file with any of the keys above (listen, tunnel_listen, data_dir, database_url, …)
    #[arg(long, env = "REACHBACK_CONFIG")]
    config: Option<PathBuf>,
    /// Log format
    #[arg(long, env = "REACHBACK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Seconds between full checks for other replicas' changes (PostgreSQL), a backstop
    /// for lost notifications; for tests and benchmarks that show the notifications alone
    #[arg(long, env = "REACHBACK_SYNC_BACKSTOP_SECONDS", hide = true, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    sync_backstop_seconds: Option<u64>,
}

/// The TOML configuration file: every key optional, unknown keys refused.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    tunnel_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    bootstrap_token: Option<String>,
    broker_endpoints: Option<Vec<String>>,
    node_name: Option<String>,
    flow_idle_timeout: Option<u64>,
    drain_timeout: Option<u64>,
    client_keepalive: Option<u64>,
    tcp_congestion: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    api_names: Option<Vec<String>>,
    insecure_http: Option<bool>,
    certificate_lifetime: Option<u64>,
    max_connections: Option<usize>,
    header_read_timeout: Option<u64>,
    request_timeout: Option<u64>,
    tunnel_max_flows: Option<usize>,
    tunnel_memory_mib: Option<u64>,
    secret_key_file: Option<PathBuf>,
    metrics_token: Option<String>,
}

/// A secret that prints as a mask.
struct Masked<'a>(&'a Option<String>);

impl std::fmt::Debug for Masked<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(****)" } else { "None" })
    }
}

impl ServerArgs {
    fn into_config(self) -> anyhow::Result<ServerConfig> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<ConfigFile>(&text).with_context(|| format!("reading {}", path.display()))?
            }
            None => ConfigFile::default(),
        };
        let listen = self.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let tunnel_listen = self.tunnel_listen.or(file.tunnel_listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8443)));
        let config = ServerConfig {
            listen,
            tunnel_listen,
            data_dir: self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("reachback-data")),
            database_url: self.database_url.or(file.database_url),
            bootstrap_token: self.bootstrap_token.or(file.bootstrap_token),
            broker_endpoints: self.broker_endpoints.or(file.broker_endpoints).unwrap_or_default(),
            // HOSTNAME is a shell variable that is rarely exported (never under systemd): without the
            // kernel's host name every replica was "reachback", and one replica's start cleared the others' sessions
            node_name: self
                .node_name
                .or(file.node_name)
                .or_else(|| std::env::var("HOSTNAME").ok().filter(|name| !name.trim().is_empty()))
                .unwrap_or_else(reachback_server::state::local_host_name),
            flow_idle_timeout: std::time::Duration::from_secs(self.flow_idle_timeout.or(file.flow_idle_timeout).unwrap_or(3600)),
            drain_timeout: std::time::Duration::from_secs(self.drain_timeout.or(file.drain_timeout).unwrap_or(30)),
            client_keepalive: std::time::Duration::from_secs(self.client_keepalive.or(file.client_keepalive).unwrap_or(10)),
            tcp_congestion: reachback_tunnel::Congestion::resolve(self.tcp_congestion.or(file.tcp_congestion).as_deref())?,
            tls_files: match (self.tls_cert.or(file.tls_cert), self.tls_key.or(file.tls_key)) {
                (Some(certificate), Some(key)) => Some((certificate, key)),
                (None, None) => None,
                _ => anyhow::bail!("--tls-cert and --tls-key go together"),
            },
            api_names: self.api_names.or(file.api_names).unwrap_or_default(),
            insecure_http: self.insecure_http || file.insecure_http.unwrap_or(false),
            certificate_lifetime: self
                .certificate_lifetime
                .or(file.certificate_lifetime)
                .map_or(reachback_server::state::DEFAULT_CERTIFICATE_LIFETIME, std::time::Duration::from_secs),
            http_limits: {
                let defaults = reachback_server::state::HttpLimits::default();
                reachback_server::state::HttpLimits {
                    max_connections: self.max_connections.or(file.max_connections).unwrap_or(defaults.max_connections),
                    header_read_timeout: self
                        .header_read_timeout
                        .or(file.header_read_timeout)
                        .map_or(defaults.header_read_timeout, std::time::Duration::from_secs),
                    request_timeout: self.request_timeout.or(file.request_timeout).map_or(defaults.request_timeout, std::time::Duration::from_secs),
                    tls_handshake_timeout: defaults.tls_handshake_timeout,
                }
            },
            tunnel_max_flows: self.tunnel_max_flows.or(file.tunnel_max_flows).unwrap_or(reachback_server::state::DEFAULT_TUNNEL_MAX_FLOWS),
            tunnel_memory: self
                .tunnel_memory_mib
                .or(file.tunnel_memory_mib)
                .map_or(reachback_server::state::DEFAULT_TUNNEL_MEMORY, |mib| mib.saturating_mul(1024 * 1024)),
            security: security_config(self.secret_key_file.or(file.secret_key_file), self.metrics_token.or(file.metrics_token))?,
            sync_backstop: self.sync_backstop_seconds.map_or(reachback_server::replicas::DEFAULT_BACKSTOP, std::time::Duration::from_secs),
        };
        validate(&config)?;
        tracing::debug!(listen = %config.listen, data_dir = %config.data_dir.display(), bootstrap_token = ?Masked(&config.bootstrap_token), "configuration");
        Ok(config)
    }
}

/// The secret key's source (a file, or `REACHBACK_SECRET_KEY` itself, not both) and the metrics token.
fn security_config(secret_key_file: Option<PathBuf>, metrics_token: Option<String>) -> anyhow::Result<reachback_server::SecurityConfig> {
    let secret_key = match (secret_key_file, std::env::var("REACHBACK_SECRET_KEY").ok().filter(|value| !value.is_empty())) {
        (Some(_), Some(_)) => anyhow::bail!("give the secret key in REACHBACK_SECRET_KEY or in --secret-key-file (REACHBACK_SECRET_KEY_FILE), not both"),
        (Some(path), None) => reachback_server::SecretKeySource::File(path),
        (None, Some(text)) => reachback_server::SecretKeySource::Value(
            reachback_server::crypto::SecretKey::parse(&text).map_err(|message| anyhow::anyhow!("REACHBACK_SECRET_KEY: {message}"))?,
        ),
        (None, None) => reachback_server::SecretKeySource::DataDir,
    };
    if let Some(token) = &metrics_token
        && (token.len() < 16 || token.len() > 256 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        anyhow::bail!("--metrics-token must be 16 to 256 characters without spaces");
    }
    Ok(reachback_server::SecurityConfig { secret_key, metrics_token })
}

fn validate(config: &ServerConfig) -> anyhow::Result<()> {
    if let Some(url) = &config.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:"))
    {
        anyhow::bail!("--database must be a postgres:// or sqlite: URL");
    }
    if let Some(token) = &config.bootstrap_token
        && (token.len() < 16 || token.len() > 256 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        anyhow::bail!("--bootstrap-token must be 16 to 256 characters without spaces");
    }
    if config.flow_idle_timeout.is_zero() || config.flow_idle_timeout.as_secs() > 7 * 86_400 {
        anyhow::bail!("--flow-idle-timeout must be 1 to 604800 seconds");
    }
    if config.drain_timeout.as_secs() > 3600 {
        anyhow::bail!("--drain-timeout must be 0 to 3600 seconds");
    }
    if !(1..=300).contains(&config.client_keepalive.as_secs()) {
        anyhow::bail!("--client-keepalive must be 1 to 300 seconds");
    }
    if config.broker_endpoints.iter().any(|endpoint| endpoint.trim().is_empty()) {
        anyhow::bail!("--broker-endpoints may not hold an empty endpoint");
    }
    if config.certificate_lifetime.as_secs() < 1 || config.certificate_lifetime.as_secs() > 10 * 365 * 86_400 {
        anyhow::bail!("--certificate-lifetime must be 1 second to 10 years");
    }
    if config.http_limits.max_connections == 0 || config.http_limits.header_read_timeout.is_zero() || config.http_limits.request_timeout.is_zero() {
        anyhow::bail!("--max-connections, --header-read-timeout and --request-timeout must be above 0");
    }
    if !(16..=1_000_000).contains(&config.tunnel_max_flows) {
        anyhow::bail!("--tunnel-max-flows must be 16 to 1000000");
    }
    if !(16 * 1024 * 1024..=1024 * 1024 * 1024).contains(&config.tunnel_memory) {
        anyhow::bail!("--tunnel-memory-mib must be 16 to 1024");
    }
    for name in &config.api_names {
        if name.trim().is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            anyhow::bail!("--api-names: '{name}' is not a DNS name or address");
        }
    }
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => {
            let _ = interrupt.await;
            return;
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}

fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    tune_allocator();
    // every agent and connector tunnel holds a descriptor: the soft limit (often 1,024 in a
    // shell) is raised to the hard one, as the agent and the connector do
    reachback_tunnel::socket::raise_file_limit();
    init_logging(&args.log_format);
    let config = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listen = config.listen;
        let insecure_http = config.insecure_http && config.tls_files.is_none() && !listen.ip().is_loopback();
        let mut app = reachback_server::build(config).await?;
        let tunnel = app.start_broker().await?;
        println!("Reachback tunnel endpoint listening on tcp://{tunnel} (TLS)");
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        let local = listener.local_addr()?;
        tracing::info!(address = %local, scheme = app.api_scheme(), "API listening");
        // a wildcard is no address to give anyone: name the host instead
        let shown = if local.ip().is_unspecified() { format!("{}:{}", reachback_server::state::local_host_name(), local.port()) } else { local.to_string() };
        // one write, so whoever waits for the first line finds the pin beside it
        let pin = app.ca_pin()?;
        print!("Reachback API listening on {}://{shown}\nCA pin: {pin}\n", app.api_scheme());
        if insecure_http {
            println!("WARNING: plain HTTP on {local} (--insecure-http): keys and tokens cross the network in the clear unless a TLS proxy is in front");
            tracing::warn!(address = %local, "serving the API over plain HTTP on a non-loopback address (--insecure-http)");
        }
        app.serve(listener, shutdown_signal()).await
    })
}

/// glibc hands freed heap back to the kernel as soon as 128 KiB lie free at its
/// top, and the relay frees and allocates 64 KiB chunks all the time: pages went
/// back and forth and were zeroed again (measured: ~40 % more throughput with a
/// 64 MiB threshold, agent idle RSS unchanged). glibc reads its tunables only when
/// a process starts, so the relaying commands start themselves again once with
/// the threshold set (no `unsafe` needed); where that fails they run as they are.
fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    const TUNABLE: &str = "glibc.malloc.trim_threshold=67108864";
    if !cfg!(target_env = "gnu") || std::env::var_os("REACHBACK_ALLOCATOR_TUNED").is_some() {
        return;
    }
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("trim_threshold") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let value = if current.is_empty() { TUNABLE.to_string() } else { format!("{current}:{TUNABLE}") };
    let error = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("GLIBC_TUNABLES", value).env("REACHBACK_ALLOCATOR_TUNED", "1").exec();
    eprintln!("note: running without allocator tuning ({error})");
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|name| name.trim().to_string()).unwrap_or_default()
}

fn run_agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Enroll(args) => {
            let location = if args.city.is_some() || args.state.is_some() || args.country.is_some() {
                Some(serde_json::json!({"city": args.city, "state": args.state, "country": args.country}))
            } else {
                None
            };
            let key = read_key(args.key, args.key_file.as_ref())?.context("--key or --key-file is needed")?;
            let options = reachback_agent::EnrollOptions {
                server: args.server,
                key,
                trust: args.trust.trust(),
                force: args.force,
                hostname: args.hostname.unwrap_or_else(local_hostname),
                platform: args.platform.unwrap_or_else(|| reachback_agent::local_platform().to_string()),
                location,
                state_dir: args.state_dir.unwrap_or_else(reachback_agent::default_state_dir),
            };
            let state = reachback_agent::enroll(&options)?;
            println!(
                "Enrolled as device {} with virtual IP {}; state in {}",
                state.id,
                state.virtual_ip.as_deref().unwrap_or("(none)"),
                options.state_dir.display()
            );
            Ok(())
        }
        AgentCommand::Run(args) => {
            tune_allocator();
            init_logging(&args.log_format);
            let options = reachback_agent::RunOptions {
                state_dir: args.state_dir.unwrap_or_else(reachback_agent::default_state_dir),
                allow_ports: reachback_agent::parse_allow_ports(&args.allow_ports)?,
                allow_udp_ports: reachback_agent::parse_allow_udp_ports(&args.allow_udp_ports)?,
                connect_host: args.connect_host,
                version: env!("CARGO_PKG_VERSION").to_string(),
                tcp_congestion: reachback_tunnel::Congestion::resolve(args.tcp_congestion.as_deref())?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(reachback_agent::run(options, shutdown_signal()))
        }
    }
}

fn run_connector(command: ConnectorCommand) -> anyhow::Result<()> {
    let ConnectorCommand::Run(args) = command;
    tune_allocator();
    init_logging(&args.log_format);
    let options = reachback_connector::RunOptions {
        key: read_key(args.key, args.key_file.as_ref())?,
        server: args.server.clone().context("--server (or REACHBACK_SERVER, or server in --config) is required")?,
        trust: args.trust.trust(),
        dns: (!args.dns_listen.is_empty()).then(|| reachback_connector::dns::DnsOptions {
            listen: args.dns_listen.clone(),
            upstream: args.dns_upstream,
            ttl: args.dns_ttl,
            rate_limit: args.dns_rate_limit,
        }),
        socks5_credentials: match &args.socks5_credentials {
            Some(path) => Some(std::sync::Arc::new(reachback_connector::Socks5Credentials::load(path)?)),
            None => None,
        },
        state_dir: args.state_dir.unwrap_or_else(|| reachback_tunnel::client::default_state_dir("connector")),
        tproxy_port: args.tproxy_port,
        routing: reachback_connector::nft::Routing { table: args.nft_table, fwmark: args.fwmark, route_table: args.route_table },
        version: env!("CARGO_PKG_VERSION").to_string(),
        socks5_listen: (args.mode == "socks5").then_some(args.socks5_listen),
        tun: (args.mode == "tun").then(|| reachback_connector::tun::TunOptions { name: args.tun_name.clone(), mtu: args.tun_mtu }),
        udp: reachback_connector::udp::UdpOptions {
            idle_timeout: std::time::Duration::from_secs(args.udp_idle_timeout),
            max_flows: args.udp_max_flows as usize,
            ..Default::default()
        },
        metrics_listen: args.metrics_listen,
        tcp_congestion: reachback_tunnel::Congestion::resolve(args.tcp_congestion.as_deref())?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(reachback_connector::run(options, shutdown_signal()))
}

/// The connector's TOML configuration file (`--config`): every key optional,
/// unknown keys refused; a flag or an environment variable wins over the file,
/// which wins over the default.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectorFile {
    server: Option<String>,
    key_file: Option<PathBuf>,
    ca_pin: Option<String>,
    insecure_http: Option<bool>,
    mode: Option<String>,
    tun_name: Option<String>,
    tun_mtu: Option<u16>,
    socks5_listen: Option<SocketAddr>,
    socks5_credentials: Option<PathBuf>,
    dns_listen: Option<Vec<SocketAddr>>,
    dns_upstream: Option<SocketAddr>,
    dns_ttl: Option<u32>,
    dns_rate_limit: Option<u32>,
    udp_idle_timeout: Option<u64>,
    udp_max_flows: Option<u64>,
    metrics_listen: Option<SocketAddr>,
    tproxy_port: Option<u16>,
    nft_table: Option<String>,
    fwmark: Option<u32>,
    route_table: Option<u32>,
    tcp_congestion: Option<String>,
    state_dir: Option<PathBuf>,
    log_format: Option<String>,
}

/// Whether the user gave `id` (on the command line or in the environment), so the file does not override it.
fn given(matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable))
}

/// Fills what the user did not give from the connector's `--config` file.
fn apply_connector_file(args: &mut ConnectorRunArgs, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let Some(path) = args.config.clone() else { return Ok(()) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading --config {}", path.display()))?;
    let mut file: ConnectorFile = toml::from_str(&text).with_context(|| format!("--config {}", path.display()))?;
    macro_rules! plain {
        ($($field:ident),*) => {$(
            if let Some(value) = file.$field.take() && !given(matches, stringify!($field)) {
                args.$field = value;
            }
        )*};
    }
    macro_rules! optional {
        ($($field:ident),*) => {$(
            if let Some(value) = file.$field.take() && !given(matches, stringify!($field)) {
                args.$field = Some(value);
            }
        )*};
    }
    plain!(
        mode,
        tun_name,
        tun_mtu,
        socks5_listen,
        dns_ttl,
        dns_rate_limit,
        udp_idle_timeout,
        udp_max_flows,
        tproxy_port,
        nft_table,
        fwmark,
        route_table,
        log_format
    );
    optional!(server, key_file, socks5_credentials, dns_upstream, metrics_listen, tcp_congestion, state_dir);
    if let Some(listen) = file.dns_listen.take()
        && !given(matches, "dns_listen")
    {
        args.dns_listen = listen;
    }
    if let Some(pin) = file.ca_pin.take()
        && !given(matches, "ca_pin")
    {
        args.trust.ca_pin = Some(pin);
    }
    if let Some(insecure) = file.insecure_http.take()
        && !given(matches, "insecure_http")
    {
        args.trust.insecure_http = insecure;
    }
    // what the flags' parsers check, checked for the file's values too
    anyhow::ensure!(["tproxy", "tun", "socks5"].contains(&args.mode.as_str()), "--config {}: mode must be tproxy, tun or socks5", path.display());
    anyhow::ensure!(["text", "json"].contains(&args.log_format.as_str()), "--config {}: log_format must be text or json", path.display());
    anyhow::ensure!((1..=86_400).contains(&args.udp_idle_timeout), "--config {}: udp_idle_timeout must be 1 to 86400", path.display());
    anyhow::ensure!((1..=1_000_000).contains(&args.udp_max_flows), "--config {}: udp_max_flows must be 1 to 1000000", path.display());
    Ok(())
}

/// mimalloc: the server's exports and listings allocate and free a few strings per
/// row; with a million long-lived small allocations in the listing index, glibc's
/// malloc made the same export 1.3–1.6× slower (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let result = match cli.command {
        Command::Server(args) => run_server(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Agent(command) => run_agent(command),
        Command::Connector(ConnectorCommand::Run(mut args)) => {
            let run_matches = matches.subcommand_matches("connector").and_then(|connector| connector.subcommand_matches("run"));
            match run_matches.map(|run| apply_connector_file(&mut args, run)).unwrap_or(Ok(())) {
                Ok(()) => run_connector(ConnectorCommand::Run(args)),
                Err(error) => Err(error),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
