//! `reachback ctl`: the admin CLI over the REST API, tables by default, `--output json`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

#[derive(Args)]
pub struct CtlArgs {
    /// Server API address
    #[arg(long, env = "REACHBACK_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// API key
    #[arg(long, env = "REACHBACK_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Trust the server's internal CA by its pin, sha256:<64 hex> (the server prints it at start) [default: the platform's trust store]
    #[arg(long, env = "REACHBACK_CA_PIN", global = true)]
    ca_pin: Option<String>,
    /// Allow plain http:// to an address that is not loopback (the token then crosses the network in the clear)
    #[arg(long, env = "REACHBACK_INSECURE_HTTP", global = true)]
    insecure_http: bool,
    /// Output format
    #[arg(long, short, default_value = "table", value_parser = ["table", "json"], global = true)]
    output: String,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// IP ranges
    #[command(subcommand)]
    Ranges(RangeCommand),
    /// IP bindings
    #[command(subcommand)]
    Bindings(BindingCommand),
    /// Enrollment keys
    #[command(subcommand)]
    Keys(KeyCommand),
    /// Enrolled devices
    #[command(subcommand)]
    Devices(DeviceCommand),
    /// Administrators and their API keys
    #[command(subcommand)]
    Admins(AdminCommand),
    /// Admin sessions
    #[command(subcommand)]
    Sessions(SessionCommand),
    /// Settings
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// The audit log
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Application segments (destinations and ports)
    #[command(subcommand)]
    Segments(SegmentCommand),
    /// Access policies (ordered rules, first match wins, default deny)
    #[command(subcommand)]
    Policies(PolicyCommand),
    /// Connectors
    #[command(subcommand)]
    Connectors(ConnectorCommand),
    /// Live client sessions (agent tunnels)
    #[command(subcommand)]
    ClientSessions(ClientSessionCommand),
    /// Event sinks: webhooks and syslog servers that receive the events (superadmin)
    #[command(subcommand)]
    EventSinks(EventSinkCommand),
    /// The flow log: one row per flow through a connector, newest first (filters narrow it)
    Flows {
        #[command(flatten)]
        list: ListArgs,
        #[command(flatten)]
        filters: FlowFilters,
        /// Download every matching flow as CSV to this file ('-' for standard output) instead of listing a page
        #[arg(long)]
        export: Option<String>,
    },
    /// The server replicas sharing the database: alive or dead, their client sessions, connectors and open flows
    Replicas {
        /// Page number (1-based)
        #[arg(long)]
        page: Option<u64>,
        /// Rows per page (at most 1000)
        #[arg(long)]
        page_size: Option<u64>,
    },
    /// Who the token belongs to
    Me,
    /// The internal certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA pin (sha256:…) that agents, connectors and ctl pass as --ca-pin
    Pin {
        /// Read the CA certificate from this data directory instead of asking the server (on the server host: needs no trust yet)
        #[arg(long, env = "REACHBACK_DATA_DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum SegmentCommand {
    /// List segments
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Create a segment
    Create {
        #[arg(long)]
        name: String,
        /// an address, CIDR or hostname pattern (*.laptops.corp.example); repeat for more
        #[arg(long = "destination", required = true)]
        destinations: Vec<String>,
        /// TCP ports and ranges, comma-separated (445,5985-5986)
        #[arg(long, value_delimiter = ',')]
        tcp_ports: Vec<String>,
        /// UDP ports and ranges, comma-separated (53,161-162)
        #[arg(long, value_delimiter = ',')]
        udp_ports: Vec<String>,
        #[arg(long)]
        disabled: bool,
    },
    /// Delete a segment
    Delete { id: String },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// List policies in evaluation order
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Create a policy (empty conditions mean "any")
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["allow", "deny"])]
        action: String,
        /// evaluation order (lowest first) [default: after the last]
        #[arg(long)]
        order: Option<i64>,
        #[arg(long = "segment")]
        segment_ids: Vec<String>,
        #[arg(long = "connector")]
        connector_ids: Vec<String>,
        #[arg(long = "source-cidr")]
        source_cidrs: Vec<String>,
        #[arg(long = "username")]
        usernames: Vec<String>,
        #[arg(long = "platform")]
        platforms: Vec<String>,
        #[arg(long = "range")]
        range_ids: Vec<String>,
    },
    /// Enable a policy
    Enable { id: String },
    /// Disable a policy (it no longer matches any flow)
    Disable { id: String },
    /// Delete a policy
    Delete { id: String },
}

#[derive(Subcommand)]
enum ConnectorCommand {
    /// List connectors with their status
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Create a connector (its provisioning key is shown once)
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        key: ProvisioningKeyArgs,
    },
    /// Issue a connector a new provisioning key, shown once (to enroll it again; the earlier key stops working)
    ProvisioningKey {
        id: String,
        #[command(flatten)]
        key: ProvisioningKeyArgs,
    },
    /// Revoke a connector and disconnect it
    Delete { id: String },
}

#[derive(Subcommand)]
enum EventSinkCommand {
    /// List sinks with their delivery state (pending events, failures, last error)
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Add a sink; a webhook's signing secret is shown once
    Create {
        #[arg(long)]
        name: String,
        /// webhook or syslog
        #[arg(long)]
        kind: String,
        /// a webhook's https:// URL, or tcp://host:port / tls://host:port for syslog
        #[arg(long)]
        target: String,
        /// CloudEvents type prefixes to send (repeat; e.g. com.reachback.binding.) [default: every event]
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// PEM file of the CA certificates the sink's TLS certificate is checked against [default: the system's]
        #[arg(long)]
        ca_certificate: Option<std::path::PathBuf>,
    },
    /// Stop sending to a sink (what waited for it is dropped)
    Disable { id: String },
    /// Send to a sink again (from the events of now on)
    Enable { id: String },
    /// Remove a sink
    Delete { id: String },
}

/// How long a provisioning key lasts and whether it serves more than one enrollment.
#[derive(clap::Args)]
struct ProvisioningKeyArgs {
    /// Seconds the provisioning key stays valid [default: the server's provisioning_key_ttl_seconds setting, 86400]
    #[arg(long)]
    provisioning_key_ttl: Option<i64>,
    /// Let the provisioning key enroll more than once (until it expires)
    #[arg(long)]
    provisioning_key_reusable: bool,
}

impl ProvisioningKeyArgs {
    fn body(&self) -> Value {
        let mut body = json!({"provisioning_key_reusable": self.provisioning_key_reusable});
        if let Some(ttl) = self.provisioning_key_ttl {
            body["provisioning_key_ttl_seconds"] = json!(ttl);
        }
        body
    }
}

#[derive(Subcommand)]
enum ClientSessionCommand {
    /// List live sessions (text filters match substrings, case-insensitively)
    List {
        #[command(flatten)]
        list: ListArgs,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        client_hostname: Option<String>,
        #[arg(long)]
        virtual_ip: Option<String>,
        /// windows, macos, linux, ios or android
        #[arg(long)]
        platform: Option<String>,
    },
    /// Disconnect a session (the agent may reconnect unless its device is deleted)
    Delete { id: String },
}

#[derive(Args, Default)]
struct ListArgs {
    /// Page number (1-based)
    #[arg(long)]
    page: Option<u64>,
    /// Rows per page (at most 1000)
    #[arg(long)]
    page_size: Option<u64>,
    /// Sort field, '-' prefix for descending
    #[arg(long, allow_hyphen_values = true)]
    sort: Option<String>,
}

#[derive(Args, Default)]
struct RangeFields {
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// A subnet (100.64.0.0/16) or range (100.64.0.10-100.64.0.200)
    #[arg(long)]
    range: Option<String>,
    #[arg(long)]
    city: Option<String>,
    #[arg(long)]
    state: Option<String>,
    /// ISO 3166-1 alpha-2 country code
    #[arg(long)]
    country: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    latitude: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    longitude: Option<f64>,
    /// Make the range global (no location)
    #[arg(long)]
    no_location: bool,
}

#[derive(Subcommand)]
enum RangeCommand {
    /// List ranges
    List {
        #[command(flatten)]
        list: ListArgs,
        #[arg(long)]
        name: Option<String>,
        /// An address (ranges containing it) or text
        #[arg(long)]
        range: Option<String>,
        #[arg(long)]
        country: Option<String>,
        /// enabled or disabled
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one range
    Get { id: String },
    /// Create a range
    Create {
        #[command(flatten)]
        fields: RangeFields,
        /// Create it disabled
        #[arg(long)]
        disabled: bool,
    },
    /// Change a range
    Update {
        id: String,
        #[command(flatten)]
        fields: RangeFields,
    },
    /// Enable a range: new addresses are assigned from it again
    Enable { id: String },
    /// Disable a range: no new addresses from it; bound ones keep working
    Disable { id: String },
    /// Delete a range (--force releases its bindings)
    Delete {
        id: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Default)]
struct BindingFilters {
    /// An address or CIDR
    #[arg(long)]
    ip: Option<String>,
    #[arg(long)]
    range_name: Option<String>,
    #[arg(long)]
    range_location: Option<String>,
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    platform: Option<String>,
    #[arg(long)]
    client_hostname: Option<String>,
    #[arg(long)]
    updated_after: Option<String>,
    #[arg(long)]
    updated_before: Option<String>,
}

#[derive(Subcommand)]
enum BindingCommand {
    /// List bindings (text filters match substrings, case-insensitively)
    List {
        #[command(flatten)]
        list: ListArgs,
        #[command(flatten)]
        filters: BindingFilters,
    },
    /// Show the binding of one address
    Get { ip: String },
    /// Release a binding (the address goes into quarantine)
    Release { ip: String },
    /// Download bindings as CSV
    Export {
        /// File to write ('-' for standard output)
        #[arg(long)]
        file: String,
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        #[command(flatten)]
        filters: BindingFilters,
    },
    /// Who held an address at an instant, with the holders just before and after
    Trace {
        /// The virtual IP address
        ip: String,
        /// The instant: RFC 3339 (2026-01-31T14:02:00Z, or with an offset) or 'now'
        #[arg(long, default_value = "now")]
        at: String,
    },
    /// The binding history: one row per interval an address was bound to a device, newest first
    History {
        #[command(flatten)]
        list: ListArgs,
        #[command(flatten)]
        filters: HistoryFilters,
        /// Download every matching row as CSV to this file ('-' for standard output) instead of listing a page
        #[arg(long)]
        export: Option<String>,
    },
}

#[derive(Args, Default)]
struct HistoryFilters {
    /// An address or CIDR
    #[arg(long)]
    ip: Option<String>,
    /// Only the intervals holding at this instant (RFC 3339)
    #[arg(long)]
    at: Option<String>,
    #[arg(long)]
    device_id: Option<String>,
    /// Substring, case-insensitively
    #[arg(long)]
    username: Option<String>,
    /// Substring, case-insensitively
    #[arg(long)]
    client_hostname: Option<String>,
    /// Only intervals held at some instant from this time on (RFC 3339)
    #[arg(long)]
    from: Option<String>,
    /// Only intervals held at some instant up to this time (RFC 3339)
    #[arg(long)]
    to: Option<String>,
}

#[derive(Args, Default)]
struct FlowFilters {
    #[arg(long)]
    device_id: Option<String>,
    /// Substring, case-insensitively
    #[arg(long)]
    username: Option<String>,
    /// Substring, case-insensitively
    #[arg(long)]
    client_hostname: Option<String>,
    /// The virtual address asked for: an address or CIDR
    #[arg(long)]
    virtual_ip: Option<String>,
    /// The server's source address: an address or CIDR
    #[arg(long)]
    server_ip: Option<String>,
    #[arg(long)]
    connector_id: Option<String>,
    /// allowed, denied, offline, refused_by_agent or failed
    #[arg(long)]
    verdict: Option<String>,
    /// tcp or udp
    #[arg(long)]
    protocol: Option<String>,
    /// Only flows still going on at or after this time (RFC 3339)
    #[arg(long)]
    from: Option<String>,
    /// Only flows started at or before this time (RFC 3339)
    #[arg(long)]
    to: Option<String>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List enrollment keys (without their secrets)
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Create an enrollment key (the secret is shown once)
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        reusable: bool,
        /// RFC 3339 expiry
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Limit the key to one hostname (host.corp.example) or to the names under a domain (*.corp.example)
        #[arg(long)]
        hostname_pattern: Option<String>,
    },
    /// Revoke an enrollment key
    Revoke { id: String },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List enrolled devices (text filters match substrings, case-insensitively)
    List {
        #[command(flatten)]
        list: ListArgs,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        username: Option<String>,
        /// windows, macos, linux, ios or android
        #[arg(long)]
        platform: Option<String>,
    },
    /// Show one device
    Get { id: String },
    /// Delete a device: revoke its certificate and release its address
    Delete { id: String },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// List administrators
    List,
    /// Create an administrator
    Create {
        #[arg(long)]
        username: String,
        /// superadmin, admin or viewer
        #[arg(long)]
        role: String,
        /// Read a console password from standard input
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set an admin's console password, read from standard input
    SetPassword {
        /// the admin's id or username (`admin` for the bootstrap superadmin)
        id: String,
    },
    /// Create an API key for an admin (the secret is shown once)
    CreateKey {
        id: String,
        #[arg(long)]
        name: String,
    },
    /// Delete an administrator (and their API keys and sessions)
    Delete { id: String },
}

#[derive(Subcommand)]
enum SessionCommand {
    /// List admin sessions: console logins and API keys in use
    List,
    /// End a session or revoke its API key
    Delete { id: String },
}

#[derive(Subcommand)]
enum SettingsCommand {
    /// Show the settings
    Get,
    /// Change settings (only the ones given)
    Set {
        /// Comma-separated client domains ('' for none)
        #[arg(long)]
        client_domains: Option<String>,
        #[arg(long)]
        release_quarantine_seconds: Option<i64>,
        #[arg(long)]
        binding_idle_ttl_seconds: Option<i64>,
        #[arg(long)]
        export_limit: Option<i64>,
        /// Days closed binding-history intervals are kept (1-3650)
        #[arg(long)]
        binding_history_retention_days: Option<i64>,
        /// Record every flow in the flow log (on or off)
        #[arg(long, value_parser = ["on", "off"])]
        flow_log: Option<String>,
        /// Days ended flows are kept in the flow log (1-3650)
        #[arg(long)]
        flow_log_retention_days: Option<i64>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List changes, newest first
    List {
        #[command(flatten)]
        list: ListArgs,
        #[command(flatten)]
        filters: AuditFilters,
    },
    /// Download the audit log as CSV (the same filters as list)
    Export {
        /// File to write ('-' for standard output)
        #[arg(long)]
        file: String,
        #[command(flatten)]
        filters: AuditFilters,
    },
}

#[derive(Args)]
struct AuditFilters {
    /// An admin's username (substring)
    #[arg(long)]
    actor: Option<String>,
    /// create, update, delete, release, … (substring)
    #[arg(long)]
    action: Option<String>,
    /// ip_range, ip_binding, enrollment_key, … (substring)
    #[arg(long)]
    resource_type: Option<String>,
    /// Only changes after this time (RFC 3339)
    #[arg(long)]
    after: Option<String>,
    /// Only changes before this time (RFC 3339)
    #[arg(long)]
    before: Option<String>,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    fn url(&self, path: &str, query: &[(&str, Option<String>)]) -> String {
        let mut url = format!("{}{}", self.base.trim_end_matches('/'), path);
        let pairs: Vec<(&str, String)> = query.iter().filter_map(|(key, value)| value.clone().map(|value| (*key, value))).collect();
        if !pairs.is_empty() {
            let encoded = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
            url.push('?');
            url.push_str(&encoded);
        }
        url
    }

    fn request(&self, method: &str, url: &str, body: Option<Value>) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut builder = ureq::http::Request::builder().method(method).uri(url);
        if let Some(token) = &self.token {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        let response = match body {
            Some(body) => self.agent.run(builder.header("Content-Type", "application/json").body(body.to_string())?),
            None => self.agent.run(builder.body(())?),
        }
        .map_err(|error| reachback_tunnel::api_client::explain(url, error))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let mut text = String::new();
        let _ = response.into_body().into_reader().take(64 * 1024).read_to_string(&mut text);
        let problem: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let detail = problem["detail"].as_str().unwrap_or(text.trim());
        let title = problem["title"].as_str().unwrap_or(status.canonical_reason().unwrap_or(""));
        // a 422's detail joins its field errors on one line: show them one a line instead
        let message = match problem["errors"].as_array().filter(|errors| status == 422 && !errors.is_empty()) {
            Some(errors) => errors.iter().fold(format!("{} {title}:", status.as_u16()), |message, error| {
                format!("{message}\n  {}: {}", error["field"].as_str().unwrap_or(""), error["message"].as_str().unwrap_or(""))
            }),
            None => format!("{} {title}: {detail}", status.as_u16()),
        };
        bail!(message)
    }

    /// The command that enrolls with `key` against this server, ready to paste: the
    /// server's own address for clients (not this CLI's loopback) and its CA pin.
    fn enroll_command(&self, command: &str, key: &str) -> anyhow::Result<String> {
        let ca = self.json("GET", "/api/v1/ca", &[], None)?;
        let urls: Vec<&str> = ca["api_urls"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let url = urls
            .iter()
            .find(|url| {
                let host = url.split("://").nth(1).unwrap_or_default().rsplit_once(':').map_or("", |(host, _)| host);
                !reachback_tunnel::api_client::is_loopback_host(host)
            })
            .or(urls.first())
            .map_or(self.base.clone(), |url| url.to_string());
        let mut line = format!("{command} --server {url} --key {key}");
        if url.starts_with("https://")
            && let Some(pin) = ca["pin"].as_str()
        {
            line.push_str(&format!(" --ca-pin {pin}"));
        } else if !reachback_tunnel::api_client::is_loopback_host(url.split("://").nth(1).unwrap_or_default().rsplit_once(':').map_or("", |(host, _)| host)) {
            line.push_str(" --insecure-http");
        }
        Ok(line)
    }

    fn json(&self, method: &str, path: &str, query: &[(&str, Option<String>)], body: Option<Value>) -> anyhow::Result<Value> {
        let url = self.url(path, query);
        let response = self.request(method, &url, body)?;
        if response.status() == 204 {
            return Ok(Value::Null);
        }
        let mut text = String::new();
        response.into_body().into_reader().read_to_string(&mut text)?;
        serde_json::from_str(&text).context("the server's answer is not JSON")
    }

    /// Streams a download into a file, with a progress line on standard error.
    fn download(&self, path: &str, query: &[(&str, Option<String>)], file: &str) -> anyhow::Result<()> {
        let url = self.url(path, query);
        let response = self.request("GET", &url, None)?;
        let mut reader = response.into_body().into_reader();
        let mut output: Box<dyn Write> = if file == "-" {
            Box::new(std::io::stdout().lock())
        } else {
            Box::new(std::io::BufWriter::new(std::fs::File::create(file).with_context(|| format!("creating {file}"))?))
        };
        let mut buffer = vec![0u8; 256 * 1024];
        let (mut bytes, mut lines) = (0u64, 0u64);
        let started = Instant::now();
        let mut last_report = Instant::now();
        let copied = (|| -> anyhow::Result<()> {
            loop {
                // a body cut short (the server failed mid-stream and dropped the connection
                // without the chunked terminator) is an error here, never a clean end
                let read = reader.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                output.write_all(&buffer[..read])?;
                bytes += read as u64;
                lines += buffer[..read].iter().filter(|&&byte| byte == b'\n').count() as u64;
                if file != "-" && last_report.elapsed() > Duration::from_millis(200) {
                    eprint!("\r{}, {:.1} MB", rows(lines), bytes as f64 / 1e6);
                    last_report = Instant::now();
                }
            }
            output.flush()?;
            Ok(())
        })();
        if let Err(error) = copied {
            drop(output);
            if file == "-" {
                anyhow::bail!("the export was cut off after {} ({error:#}): what was printed is incomplete", rows(lines));
            }
            let _ = std::fs::remove_file(file);
            anyhow::bail!("the export was cut off after {} ({error:#}); the partial file {file} was removed", rows(lines));
        }
        if file != "-" {
            eprintln!("\r{}, {:.1} MB written to {file} in {:.1}s", rows(lines), bytes as f64 / 1e6, started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

/// "N rows" for a CSV of `lines` lines with a header.
fn rows(lines: u64) -> String {
    match lines.saturating_sub(1) {
        1 => "1 row".to_string(),
        count => format!("{count} rows"),
    }
}

fn list_query(list: &ListArgs) -> Vec<(&'static str, Option<String>)> {
    vec![("page", list.page.map(|n| n.to_string())), ("page_size", list.page_size.map(|n| n.to_string())), ("sort", list.sort.clone())]
}

fn audit_query(filters: AuditFilters) -> Vec<(&'static str, Option<String>)> {
    vec![("actor", filters.actor), ("action", filters.action), ("resource_type", filters.resource_type), ("after", filters.after), ("before", filters.before)]
}

fn binding_query(filters: &BindingFilters) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("ip", filters.ip.clone()),
        ("range_name", filters.range_name.clone()),
        ("range_location", filters.range_location.clone()),
        ("username", filters.username.clone()),
        ("platform", filters.platform.clone()),
        ("client_hostname", filters.client_hostname.clone()),
        ("updated_after", filters.updated_after.clone()),
        ("updated_before", filters.updated_before.clone()),
    ]
}

fn history_query(filters: HistoryFilters) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("ip", filters.ip),
        ("at", filters.at),
        ("device_id", filters.device_id),
        ("username", filters.username),
        ("client_hostname", filters.client_hostname),
        ("from", filters.from),
        ("to", filters.to),
    ]
}

fn flow_query(filters: FlowFilters) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("device_id", filters.device_id),
        ("username", filters.username),
        ("client_hostname", filters.client_hostname),
        ("virtual_ip", filters.virtual_ip),
        ("server_ip", filters.server_ip),
        ("connector_id", filters.connector_id),
        ("verdict", filters.verdict),
        ("protocol", filters.protocol),
        ("from", filters.from),
        ("to", filters.to),
    ]
}

/// The columns of a flow in tables.
const FLOW_COLUMNS: &[&str] = &[
    "started_at",
    "ended_at",
    "protocol",
    "verdict",
    "server_ip",
    "server_port",
    "virtual_ip",
    "virtual_port",
    "username",
    "client_hostname",
    "connector_name",
    "bytes_to_client",
    "bytes_from_client",
];

/// The columns of a binding-history interval in tables.
const HISTORY_COLUMNS: &[&str] = &["ip", "username", "client_hostname", "platform", "bound_at", "released_at", "reason", "range_name", "device_id"];

/// Prints a trace: a line saying who held the address then, and the intervals
/// before, at and after the instant as a table.
fn print_trace(trace: &Value, output: &str) {
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(trace).unwrap_or_default());
        return;
    }
    let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
    let holder = &trace["holder"];
    let summary = if holder.is_null() {
        "nobody".to_string()
    } else {
        format!("{} ({}, {}, device {})", text(&holder["username"]), text(&holder["client_hostname"]), text(&holder["platform"]), text(&holder["device_id"]))
    };
    println!("{} at {}: held by {summary}", text(&trace["ip"]), text(&trace["at"]));
    let columns: Vec<&str> = ["when"].iter().chain(HISTORY_COLUMNS.iter().skip(1)).copied().collect();
    let items: Vec<Value> = [("before", &trace["previous"]), ("then", holder), ("after", &trace["next"])]
        .into_iter()
        .map(|(when, row)| {
            let mut item = if row.is_null() { json!({"username": "(none)"}) } else { row.clone() };
            item["when"] = json!(when);
            item
        })
        .collect();
    table(&items, &columns);
}

fn range_body(fields: &RangeFields) -> Value {
    let mut body = Map::new();
    for (key, value) in [("name", &fields.name), ("description", &fields.description), ("range", &fields.range)] {
        if let Some(value) = value {
            body.insert(key.into(), json!(value));
        }
    }
    if fields.no_location {
        body.insert("location".into(), Value::Null);
    } else if fields.city.is_some() || fields.state.is_some() || fields.country.is_some() || fields.latitude.is_some() {
        body.insert(
            "location".into(),
            json!({"city": fields.city, "state": fields.state, "country": fields.country, "latitude": fields.latitude, "longitude": fields.longitude}),
        );
    }
    Value::Object(body)
}

fn read_password() -> anyhow::Result<String> {
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(password)
}

/// Prints a value: JSON as is, or a table of chosen columns.
fn print(value: &Value, output: &str, columns: &[&str]) {
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        return;
    }
    let (items, footer) = match value.get("items").and_then(Value::as_array) {
        Some(items) => (items.clone(), Some(format!("{} of {} (page {})", items.len(), value["total"], value["page"]))),
        None if value.is_null() => {
            println!("done");
            return;
        }
        None => {
            for (key, field) in value.as_object().into_iter().flatten() {
                let text = match field {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                println!("{key:>18}  {text}");
            }
            return;
        }
    };
    table(&items, columns);
    if let Some(footer) = footer {
        println!("{footer}");
    }
}

/// Prints `items` as a table of `columns` (upper-case headers, cells cut at 48 characters).
fn table(items: &[Value], columns: &[&str]) {
    let cell = |item: &Value, column: &str| -> String {
        match &item[column] {
            Value::Null => String::new(),
            Value::String(text) => text.clone(),
            Value::Object(object) if column.ends_with("location") => {
                ["city", "state", "country"].iter().filter_map(|key| object.get(*key).and_then(Value::as_str)).collect::<Vec<_>>().join(", ")
            }
            other => other.to_string(),
        }
    };
    let rows: Vec<Vec<String>> = items.iter().map(|item| columns.iter().map(|column| cell(item, column)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(index, column)| rows.iter().map(|row| row[index].chars().count()).chain([column.len()]).max().unwrap_or(0).min(48))
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{:<width$}", cell.chars().take(*width).collect::<String>(), width = width))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(columns.iter().map(|column| column.to_uppercase()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    if let CtlCommand::Ca(CaCommand::Pin { data_dir: Some(dir) }) = &args.command {
        let path = dir.join("ca.pem");
        let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        println!("{}", reachback_tunnel::api_client::pin_of_pem(&pem)?);
        return Ok(());
    }
    let trust = reachback_tunnel::ApiTrust { ca_pin: args.ca_pin.clone(), insecure_http: args.insecure_http };
    let api = reachback_tunnel::ApiClient::new(&args.server, &trust, Duration::from_secs(3600))?;
    let client = Client { agent: api.agent, base: api.base, token: args.token.clone() };
    let output = args.output.as_str();
    const RANGE_COLUMNS: &[&str] = &["id", "name", "range", "location", "total_ips", "used_ips", "enabled"];
    const BINDING_COLUMNS: &[&str] = &["ip", "range_name", "range_location", "username", "platform", "client_hostname", "last_updated"];
    match args.command {
        CtlCommand::Me => print(&client.json("GET", "/api/v1/me", &[], None)?, output, &[]),
        CtlCommand::Ca(CaCommand::Pin { .. }) => {
            let ca = client.json("GET", "/api/v1/ca", &[], None)?;
            println!("{}", ca["pin"].as_str().context("the server's answer has no pin")?);
        }
        CtlCommand::Ranges(command) => match command {
            RangeCommand::List { list, name, range, country, status } => {
                let mut query = list_query(&list);
                query.extend([("name", name), ("range", range), ("country", country), ("status", status)]);
                print(&client.json("GET", "/api/v1/ip-ranges", &query, None)?, output, RANGE_COLUMNS);
            }
            RangeCommand::Get { id } => print(&client.json("GET", &format!("/api/v1/ip-ranges/{id}"), &[], None)?, output, &[]),
            RangeCommand::Create { fields, disabled } => {
                let mut body = range_body(&fields);
                if disabled {
                    body["enabled"] = json!(false);
                }
                print(&client.json("POST", "/api/v1/ip-ranges", &[], Some(body))?, output, &[]);
            }
            RangeCommand::Update { id, fields } => {
                print(&client.json("PATCH", &format!("/api/v1/ip-ranges/{id}"), &[], Some(range_body(&fields)))?, output, &[])
            }
            RangeCommand::Enable { id } => print(&client.json("POST", &format!("/api/v1/ip-ranges/{id}/enable"), &[], None)?, output, &[]),
            RangeCommand::Disable { id } => print(&client.json("POST", &format!("/api/v1/ip-ranges/{id}/disable"), &[], None)?, output, &[]),
            RangeCommand::Delete { id, force } => {
                print(&client.json("DELETE", &format!("/api/v1/ip-ranges/{id}"), &[("force", force.then(|| "true".to_string()))], None)?, output, &[])
            }
        },
        CtlCommand::Bindings(command) => match command {
            BindingCommand::List { list, filters } => {
                let mut query = list_query(&list);
                query.extend(binding_query(&filters));
                print(&client.json("GET", "/api/v1/ip-bindings", &query, None)?, output, BINDING_COLUMNS);
            }
            BindingCommand::Get { ip } => print(&client.json("GET", &format!("/api/v1/ip-bindings/{ip}"), &[], None)?, output, &[]),
            BindingCommand::Release { ip } => print(&client.json("DELETE", &format!("/api/v1/ip-bindings/{ip}"), &[], None)?, output, &[]),
            BindingCommand::Export { file, sort, filters } => {
                let mut query = binding_query(&filters);
                query.push(("sort", sort));
                client.download("/api/v1/ip-bindings/export.csv", &query, &file)?;
            }
            BindingCommand::Trace { ip, at } => {
                // without `at` the server traces the present
                let at = (!at.eq_ignore_ascii_case("now")).then_some(at);
                print_trace(&client.json("GET", "/api/v1/ip-bindings/history/trace", &[("ip", Some(ip)), ("at", at)], None)?, output);
            }
            BindingCommand::History { list, filters, export } => match export {
                Some(file) => {
                    if list.page.is_some() || list.page_size.is_some() {
                        bail!("--page and --page-size list one page; --export downloads every matching row");
                    }
                    let mut query = history_query(filters);
                    query.push(("sort", list.sort));
                    client.download("/api/v1/ip-bindings/history/export.csv", &query, &file)?;
                }
                None => {
                    let mut query = list_query(&list);
                    query.extend(history_query(filters));
                    print(&client.json("GET", "/api/v1/ip-bindings/history", &query, None)?, output, HISTORY_COLUMNS);
                }
            },
        },
        CtlCommand::Keys(command) => match command {
            KeyCommand::List { list } => print(
                &client.json("GET", "/api/v1/enrollment-keys", &list_query(&list), None)?,
                output,
                &["id", "username", "reusable", "used_count", "revoked", "expires_at", "hostname_pattern", "created_at"],
            ),
            KeyCommand::Create { username, reusable, expires_at, description, hostname_pattern } => {
                let mut body = json!({"username": username, "reusable": reusable, "expires_at": expires_at, "description": description.unwrap_or_default()});
                if let Some(pattern) = hostname_pattern {
                    body["hostname_pattern"] = json!(pattern);
                }
                let created = client.json("POST", "/api/v1/enrollment-keys", &[], Some(body))?;
                print(&created, output, &[]);
                if let Some(key) = created["key"].as_str() {
                    eprintln!("On the laptop:\n  {}", client.enroll_command("reachback agent enroll", key)?);
                }
            }
            KeyCommand::Revoke { id } => print(&client.json("DELETE", &format!("/api/v1/enrollment-keys/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Segments(command) => match command {
            SegmentCommand::List { list } => print(
                &client.json("GET", "/api/v1/app-segments", &list_query(&list), None)?,
                output,
                &["id", "name", "destinations", "tcp_ports", "udp_ports", "enabled"],
            ),
            SegmentCommand::Create { name, destinations, tcp_ports, udp_ports, disabled } => {
                let body = json!({"name": name, "destinations": destinations, "tcp_ports": tcp_ports, "udp_ports": udp_ports, "enabled": !disabled});
                print(&client.json("POST", "/api/v1/app-segments", &[], Some(body))?, output, &[]);
            }
            SegmentCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/app-segments/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Policies(command) => match command {
            PolicyCommand::List { list } => print(
                &client.json("GET", "/api/v1/access-policies", &list_query(&list), None)?,
                output,
                &["id", "order", "name", "action", "segment_ids", "usernames", "enabled"],
            ),
            PolicyCommand::Create { name, action, order, segment_ids, connector_ids, source_cidrs, usernames, platforms, range_ids } => {
                let mut body = json!({"name": name, "action": action, "segment_ids": segment_ids, "connector_ids": connector_ids,
                    "source_cidrs": source_cidrs, "usernames": usernames, "platforms": platforms, "range_ids": range_ids});
                if let Some(order) = order {
                    body["order"] = json!(order);
                }
                print(&client.json("POST", "/api/v1/access-policies", &[], Some(body))?, output, &[]);
            }
            PolicyCommand::Enable { id } => {
                print(&client.json("PATCH", &format!("/api/v1/access-policies/{id}"), &[], Some(json!({"enabled": true})))?, output, &[])
            }
            PolicyCommand::Disable { id } => {
                print(&client.json("PATCH", &format!("/api/v1/access-policies/{id}"), &[], Some(json!({"enabled": false})))?, output, &[])
            }
            PolicyCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/access-policies/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Connectors(command) => match command {
            ConnectorCommand::List { list } => {
                print(&client.json("GET", "/api/v1/connectors", &list_query(&list), None)?, output, &["id", "name", "status", "mode", "version", "last_seen"])
            }
            ConnectorCommand::Create { name, key } => {
                let mut body = key.body();
                body["name"] = json!(name);
                let created = client.json("POST", "/api/v1/connectors", &[], Some(body))?;
                print(&created, output, &[]);
                if let Some(key) = created["provisioning_key"].as_str() {
                    eprintln!("On the connector host:\n  {} --mode tproxy", client.enroll_command("reachback connector run", key)?);
                }
            }
            ConnectorCommand::ProvisioningKey { id, key } => {
                let issued = client.json("POST", &format!("/api/v1/connectors/{id}/provisioning-key"), &[], Some(key.body()))?;
                print(&issued, output, &[]);
                if let Some(key) = issued["provisioning_key"].as_str() {
                    eprintln!("On the connector host:\n  {} --mode tproxy", client.enroll_command("reachback connector run", key)?);
                }
            }
            ConnectorCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/connectors/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::EventSinks(command) => match command {
            EventSinkCommand::List { list } => print(
                &client.json("GET", "/api/v1/event-sinks", &list_query(&list), None)?,
                output,
                &["id", "name", "kind", "target", "enabled", "pending", "failures", "last_error"],
            ),
            EventSinkCommand::Create { name, kind, target, event_types, ca_certificate } => {
                let mut body = json!({"name": name, "kind": kind, "target": target, "event_types": event_types});
                if let Some(path) = ca_certificate {
                    let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    body["ca_certificate"] = json!(pem);
                }
                let created = client.json("POST", "/api/v1/event-sinks", &[], Some(body))?;
                print(&created, output, &[]);
                if created["secret"].is_string() {
                    eprintln!("Verify the webhook-signature header of each request with this secret (Standard Webhooks); it is not shown again.");
                }
            }
            EventSinkCommand::Disable { id } => {
                print(&client.json("PATCH", &format!("/api/v1/event-sinks/{id}"), &[], Some(json!({"enabled": false})))?, output, &[])
            }
            EventSinkCommand::Enable { id } => {
                print(&client.json("PATCH", &format!("/api/v1/event-sinks/{id}"), &[], Some(json!({"enabled": true})))?, output, &[])
            }
            EventSinkCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/event-sinks/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::ClientSessions(command) => match command {
            ClientSessionCommand::List { list, username, client_hostname, virtual_ip, platform } => {
                let mut query = list_query(&list);
                query.extend([("username", username), ("client_hostname", client_hostname), ("virtual_ip", virtual_ip), ("platform", platform)]);
                print(
                    &client.json("GET", "/api/v1/client-sessions", &query, None)?,
                    output,
                    &["id", "virtual_ip", "client_hostname", "username", "platform", "broker_node", "remote_addr", "connected_at"],
                );
            }
            ClientSessionCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/client-sessions/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Replicas { page, page_size } => print(
            &client.json("GET", "/api/v1/replicas", &[("page", page.map(|n| n.to_string())), ("page_size", page_size.map(|n| n.to_string()))], None)?,
            output,
            &["node_name", "status", "tunnel_endpoint", "client_sessions", "connectors", "flows", "started_at", "last_heartbeat"],
        ),
        CtlCommand::Flows { list, filters, export } => match export {
            Some(file) => {
                if list.page.is_some() || list.page_size.is_some() {
                    bail!("--page and --page-size list one page; --export downloads every matching flow");
                }
                let mut query = flow_query(filters);
                query.push(("sort", list.sort));
                client.download("/api/v1/flows/export.csv", &query, &file)?;
            }
            None => {
                let mut query = list_query(&list);
                query.extend(flow_query(filters));
                print(&client.json("GET", "/api/v1/flows", &query, None)?, output, FLOW_COLUMNS);
            }
        },
        CtlCommand::Devices(command) => match command {
            DeviceCommand::List { list, hostname, username, platform } => {
                let mut query = list_query(&list);
                query.extend([("hostname", hostname), ("username", username), ("platform", platform)]);
                print(&client.json("GET", "/api/v1/devices", &query, None)?, output, &["id", "hostname", "username", "platform", "virtual_ip", "last_seen"]);
            }
            DeviceCommand::Get { id } => print(&client.json("GET", &format!("/api/v1/devices/{id}"), &[], None)?, output, &[]),
            DeviceCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/devices/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Admins(command) => match command {
            AdminCommand::List => print(&client.json("GET", "/api/v1/admins", &[], None)?, output, &["id", "username", "role", "has_password", "created_at"]),
            AdminCommand::Create { username, role, password_stdin } => {
                let mut body = json!({"username": username, "role": role});
                if password_stdin {
                    body["password"] = json!(read_password()?);
                }
                print(&client.json("POST", "/api/v1/admins", &[], Some(body))?, output, &[]);
            }
            AdminCommand::SetPassword { id } => {
                // a username is looked up to its id
                let admins = client.json("GET", "/api/v1/admins", &[("page_size", Some("1000".to_string()))], None)?;
                let id = admins["items"]
                    .as_array()
                    .and_then(|items| items.iter().find(|item| item["username"].as_str().is_some_and(|name| name.eq_ignore_ascii_case(&id))))
                    .and_then(|item| item["id"].as_str())
                    .map(str::to_string)
                    .unwrap_or(id);
                let body = json!({"password": read_password()?});
                print(&client.json("PATCH", &format!("/api/v1/admins/{id}"), &[], Some(body))?, output, &[]);
            }
            AdminCommand::CreateKey { id, name } => {
                print(&client.json("POST", &format!("/api/v1/admins/{id}/api-keys"), &[], Some(json!({"name": name})))?, output, &[])
            }
            AdminCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/admins/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Sessions(command) => match command {
            SessionCommand::List => print(
                &client.json("GET", "/api/v1/admin-sessions", &[], None)?,
                output,
                &["id", "admin_username", "api_key_name", "client_ip", "active_since", "expires_at"],
            ),
            SessionCommand::Delete { id } => print(&client.json("DELETE", &format!("/api/v1/admin-sessions/{id}"), &[], None)?, output, &[]),
        },
        CtlCommand::Settings(command) => match command {
            SettingsCommand::Get => print(&client.json("GET", "/api/v1/settings", &[], None)?, output, &[]),
            SettingsCommand::Set {
                client_domains,
                release_quarantine_seconds,
                binding_idle_ttl_seconds,
                export_limit,
                binding_history_retention_days,
                flow_log,
                flow_log_retention_days,
            } => {
                let mut body = Map::new();
                if let Some(domains) = client_domains {
                    let list: Vec<&str> = domains.split(',').map(str::trim).filter(|domain| !domain.is_empty()).collect();
                    body.insert("client_domains".into(), json!(list));
                }
                for (key, value) in [
                    ("release_quarantine_seconds", release_quarantine_seconds),
                    ("binding_idle_ttl_seconds", binding_idle_ttl_seconds),
                    ("export_limit", export_limit),
                    ("binding_history_retention_days", binding_history_retention_days),
                    ("flow_log_retention_days", flow_log_retention_days),
                ] {
                    if let Some(value) = value {
                        body.insert(key.into(), json!(value));
                    }
                }
                if let Some(flow_log) = flow_log {
                    body.insert("flow_log_enabled".into(), json!(flow_log == "on"));
                }
                print(&client.json("PATCH", "/api/v1/settings", &[], Some(Value::Object(body)))?, output, &[]);
            }
        },
        CtlCommand::Audit(command) => match command {
            AuditCommand::List { list, filters } => {
                let mut query = list_query(&list);
                query.extend(audit_query(filters));
                print(
                    &client.json("GET", "/api/v1/audit-logs", &query, None)?,
                    output,
                    &["at", "actor", "action", "resource_type", "resource_id", "source_ip"],
                );
            }
            AuditCommand::Export { file, filters } => client.download("/api/v1/audit-logs/export.csv", &audit_query(filters), &file)?,
        },
    }
    Ok(())
}
