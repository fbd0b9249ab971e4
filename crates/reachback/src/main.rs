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
    /// TOML file with any of the keys above (listen, tunnel_listen, data_dir, database_url, …)
    #[arg(long, env = "REACHBACK_CONFIG")]
    config: Option<PathBuf>,
    /// Log format
    #[arg(long, env = "REACHBACK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
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
            broker_endpoints: self.broker_endpoints.or(file.broker_endpoints).unwrap_or_else(|| vec![tunnel_listen.to_string()]),
            node_name: self.node_name.or(file.node_name).unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "reachback".into())),
        };
        validate(&config)?;
        tracing::debug!(listen = %config.listen, data_dir = %config.data_dir.display(), bootstrap_token = ?Masked(&config.bootstrap_token), "configuration");
        Ok(config)
    }
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
    if config.broker_endpoints.is_empty() {
        anyhow::bail!("--broker-endpoints must name at least one endpoint");
    }
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
    init_logging(&args.log_format);
    let config = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listen = config.listen;
        let app = reachback_server::build(config).await?;
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        tracing::info!(address = %listener.local_addr()?, "API listening");
        println!("Reachback API listening on http://{}", listener.local_addr()?);
        app.serve(listener, shutdown_signal()).await
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => run_server(args),
        Command::Ctl(args) => ctl::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
