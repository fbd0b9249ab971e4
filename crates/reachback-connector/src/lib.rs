//! `reachback connector`: the next-hop router for the virtual ranges. In `tproxy`
//! mode it installs nftables TPROXY rules and policy routing for the ranges the
//! broker announces (and removes them on exit), accepts the intercepted TCP
//! connections with their original destination, and opens one tunnel stream per
//! connection; a refused flow is answered with a TCP reset. In `socks5` mode (no
//! privileges) it is a SOCKS5 proxy: the client's CONNECT is answered only once
//! the agent's local connect succeeded, or with the refusal's reply code. In `tun`
//! mode (CAP_NET_ADMIN, no nftables) it routes the ranges into a TUN device of its
//! own and terminates the servers' TCP in a userspace stack (`tun.rs`), answering
//! each SYN only once the agent's local connect succeeded.

pub mod dns;
pub mod metrics;
pub mod nft;
pub mod tun;
pub mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use reachback_proto::{Backoff, ClientRole, FlowOpen};
use reachback_tunnel::client::{self, EnrolledState};
use reachback_tunnel::{ApiClient, ApiTrust, AwaitReply, Connection, End, RelayOptions, TunnelConnector, write_frame};
use serde_json::json;
use tokio::sync::watch;

/// How long the broker has to answer a flow request (its open at the agent included).
const FLOW_REPLY_TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub server: String,
    pub key: Option<String>,
    pub state_dir: PathBuf,
    /// the port TPROXY hands intercepted connections to
    pub tproxy_port: u16,
    pub routing: nft::Routing,
    /// this release, reported to the broker
    pub version: String,
    /// `Some`: SOCKS5 mode on this address instead of TPROXY
    pub socks5_listen: Option<SocketAddr>,
    /// `Some`: TUN mode with this device instead of TPROXY
    pub tun: Option<tun::TunOptions>,
    /// TCP congestion control of the tunnel and of the intercepted connections
    pub tcp_congestion: reachback_tunnel::Congestion,
    /// how to trust the API (CA pin, plain HTTP allowed or not)
    pub trust: ApiTrust,
    /// SOCKS5 users and passwords (RFC 1929); required on a listener that is not loopback
    pub socks5_credentials: Option<Arc<Socks5Credentials>>,
    /// DNS for client hostnames (`--dns-listen`), when set
    pub dns: Option<dns::DnsOptions>,
    /// UDP flows (idle timeout, caps)
    pub udp: udp::UdpOptions,
    /// where `GET /metrics` is served, when set
    pub metrics_listen: Option<SocketAddr>,
}

/// The users a SOCKS5 listener accepts: a file of `username:password` lines
/// (`#` starts a comment), readable by its owner only. Passwords are kept as their
/// SHA-256 and compared in constant time.
#[derive(Clone, Default)]
pub struct Socks5Credentials {
    users: std::collections::HashMap<String, [u8; 32]>,
}

impl std::fmt::Debug for Socks5Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Socks5Credentials").field("users", &self.users.len()).finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl Socks5Credentials {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Socks5Credentials> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).with_context(|| format!("reading --socks5-credentials {}", path.display()))?.permissions().mode();
        anyhow::ensure!(mode & 0o077 == 0, "--socks5-credentials {} is readable by others (mode {:o}): chmod 600 it", path.display(), mode & 0o777);
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --socks5-credentials {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("--socks5-credentials {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Socks5Credentials> {
        let mut users = std::collections::HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, password)) = line.split_once(':') else { anyhow::bail!("line {}: expected username:password", number + 1) };
            anyhow::ensure!(
                (1..=255).contains(&user.len()) && (1..=255).contains(&password.len()),
                "line {}: a username and a password are 1 to 255 bytes",
                number + 1
            );
            users.insert(user.to_string(), digest(password.as_bytes()));
        }
        anyhow::ensure!(!users.is_empty(), "no username:password line");
        Ok(Socks5Credentials { users })
    }

    /// Whether the pair is known; the work done does not depend on where a password differs.
    pub fn check(&self, user: &[u8], password: &[u8]) -> bool {
        let offered = digest(password);
        let Some(expected) = std::str::from_utf8(user).ok().and_then(|user| self.users.get(user)) else { return false };
        expected.iter().zip(offered.iter()).fold(0u8, |difference, (left, right)| difference | (left ^ right)) == 0
    }
}

/// Enrolls with the provisioning key unless the state directory holds this
/// connector's enrollment already. Saved state from another provisioning key or
/// another server is never reused silently: a new key enrolls afresh (the old
/// identity is replaced once the new enrollment succeeded), another server without
/// a key is refused with what to do.
fn ensure_enrolled(options: &RunOptions) -> anyhow::Result<()> {
    let previous = client::load_state(&options.state_dir).ok().map(|(state, _)| state);
    let key = options.key.as_deref().map(str::trim).filter(|key| !key.is_empty());
    let api = || ApiClient::new(&options.server, &options.trust, Duration::from_secs(30));
    if let Some(previous) = &previous {
        let same_key = key.is_none_or(|key| previous.enrolled_with.as_deref() == Some(client::key_fingerprint(key).as_str()));
        // the same address needs no question to the server (which may be down: the tunnel loop retries)
        let same_address = previous.server.trim_end_matches('/').eq_ignore_ascii_case(options.server.trim().trim_end_matches('/'));
        if same_key && (same_address || client::same_server(&options.state_dir, previous, &api()?)?) {
            return Ok(());
        }
        if key.is_none() {
            anyhow::bail!(
                "{} holds connector {} enrolled with {}, another server than {}: pass --key (or --key-file) with a provisioning key from {} to enroll there, or use another --state-dir",
                options.state_dir.display(),
                previous.id,
                previous.server,
                options.server,
                options.server
            );
        }
        tracing::info!(previous_connector_id = %previous.id, "the provisioning key or the server differs from the saved enrollment: enrolling afresh");
    }
    let key = key.context("not enrolled yet: --key (the provisioning key) is needed")?;
    let api = api()?;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the key pair")?;
    let answer =
        api.post_json("/api/v1/connectors/enroll", &json!({"provisioning_key": key, "public_key": pair.public_key_pem()})).map_err(
            |error| match &previous {
                Some(previous) => error.context(format!(
                    "enrolling with the new key failed; connector {} in {} was kept: run without --key to go on serving as it",
                    previous.id,
                    options.state_dir.display()
                )),
                None => error,
            },
        )?;
    let text = |key: &str| answer[key].as_str().map(str::to_string).with_context(|| format!("the server's answer has no {key}"));
    let ca_pem = text("ca_certificate")?;
    options.trust.check_tunnel_ca(&ca_pem)?;
    let state = EnrolledState {
        server: api.base.clone(),
        id: text("connector_id")?,
        broker_endpoints: answer["broker_endpoints"].as_array().into_iter().flatten().filter_map(|item| item.as_str().map(str::to_string)).collect(),
        virtual_ip: None,
        hostname: None,
        ca_pin: options.trust.ca_pin.clone(),
        insecure_http: options.trust.insecure_http,
        enrolled_with: Some(client::key_fingerprint(key)),
    };
    if let Some(previous) = &previous {
        // the server of the old identity is told, then its files go (best effort: it may be gone)
        if let Err(error) = client::leave(&options.state_dir, "connector") {
            tracing::info!(previous_connector_id = %previous.id, error = format!("{error:#}"), "could not tell the server the earlier identity left");
        }
        client::discard_enrollment(&options.state_dir)?;
        tracing::info!(previous_connector_id = %previous.id, connector_id = %state.id, "the earlier identity was discarded");
    }
    client::save_enrollment(&options.state_dir, &state, &pair.serialize_pem(), &text("certificate")?, &ca_pem)?;
    tracing::info!(connector_id = %state.id, "connector enrolled");
    Ok(())
}

/// A listening socket that accepts connections addressed to any destination (IP_TRANSPARENT).
/// Accepted connections inherit its congestion control.
fn transparent_listener(address: SocketAddr, congestion: &reachback_tunnel::Congestion) -> anyhow::Result<tokio::net::TcpListener> {
    let domain = if address.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv4() {
        socket.set_ip_transparent_v4(true).context("IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)")?;
    } else {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true).context("IPV6_TRANSPARENT needs CAP_NET_ADMIN (run as root)")?;
    }
    socket.set_nonblocking(true)?;
    congestion.apply(&socket).context("setting the congestion control of the intercepted connections")?;
    socket.bind(&address.into()).with_context(|| format!("binding {address}"))?;
    socket.listen(4096)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

/// Runs the connector until `shutdown` resolves; the routing it installed is removed on the way out.
pub async fn run(options: RunOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    if let Some(listen) = options.socks5_listen {
        // refused before anything else happens (no enrollment, no listener)
        anyhow::ensure!(
            options.socks5_credentials.is_some() || listen.ip().is_loopback(),
            "a SOCKS5 listener on {listen} (not loopback) needs --socks5-credentials FILE (lines username:password, mode 600)"
        );
    }
    ensure_enrolled(&options)?;
    let (state, _) = client::load_state(&options.state_dir)?;
    reachback_tunnel::socket::raise_file_limit();
    // DNS listens from the start (a bind failure stops the connector); answers begin
    // with the broker's snapshot and go on while the tunnel is down
    let names = Arc::new(dns::Names::default());
    let metrics = Arc::new(metrics::Metrics::default());
    let mut tasks = match &options.dns {
        Some(dns_options) => dns::serve(dns_options.clone(), names.clone()).await?,
        None => Vec::new(),
    };
    if let Some(listen) = options.metrics_listen {
        tasks.push(metrics::serve(listen, metrics.clone(), names.clone()).await?);
    }
    let result = run_ingress(&options, &state, names, metrics, shutdown).await;
    for task in tasks {
        task.abort();
    }
    result
}

async fn run_ingress(
    options: &RunOptions,
    state: &EnrolledState,
    names: Arc<dns::Names>,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some(listen) = options.socks5_listen {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the SOCKS5 listener on {listen}"))?;
        tracing::info!(address = %listener.local_addr()?, "SOCKS5 listener ready");
        let (connection_tx, connection_rx) = watch::channel::<Option<Connection>>(None);
        let credentials = options.socks5_credentials.clone();
        let ingress = udp::UdpIngress::new(options.udp.clone(), connection_rx.clone(), metrics);
        let accept = tokio::spawn(accept_loop(listener, connection_rx, move |stream, source, tunnel| {
            let (credentials, ingress) = (credentials.clone(), ingress.clone());
            async move {
                if let Err(error) = serve_socks(stream, source, tunnel, credentials, ingress).await {
                    tracing::debug!(%source, error = format!("{error:#}"), "SOCKS5 client dropped");
                }
            }
        }));
        let result = tunnel_loop(state, options, Interception::Socks5, names, connection_tx, shutdown).await;
        accept.abort();
        return result;
    }
    if let Some(tun_options) = &options.tun {
        // the device is up before the tunnel: routes follow the ranges of each welcome
        let tun = Arc::new(tun::TunIngress::create(tun_options)?);
        let (connection_tx, connection_rx) = watch::channel::<Option<Connection>>(None);
        let udp = udp::UdpIngress::new(options.udp.clone(), connection_rx.clone(), metrics.clone());
        let driver = tokio::spawn(tun.clone().drive(connection_rx, udp, metrics));
        let result = tunnel_loop(state, options, Interception::Tun(tun.clone()), names, connection_tx, shutdown).await;
        driver.abort();
        tun.close();
        return result;
    }
    let mut listeners = vec![transparent_listener(SocketAddr::from(([0, 0, 0, 0], options.tproxy_port)), &options.tcp_congestion)?];
    match transparent_listener(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, options.tproxy_port)), &options.tcp_congestion) {
        Ok(listener) => listeners.push(listener),
        Err(error) => tracing::info!(error = format!("{error:#}"), "no IPv6 interception"),
    }
    let (connection_tx, connection_rx) = watch::channel::<Option<Connection>>(None);
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        accept_tasks.push(tokio::spawn(accept_loop(listener, connection_rx.clone(), serve_connection)));
    }
    // UDP to the same port: TPROXY hands each flow's first datagram to these listeners
    let ingress = udp::UdpIngress::new(options.udp.clone(), connection_rx.clone(), metrics);
    accept_tasks.push(tokio::spawn(udp::serve_transparent(udp::transparent_listener(SocketAddr::from(([0, 0, 0, 0], options.tproxy_port)))?, ingress.clone())));
    match udp::transparent_listener(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, options.tproxy_port))) {
        Ok(listener) => accept_tasks.push(tokio::spawn(udp::serve_transparent(listener, ingress.clone()))),
        Err(error) => tracing::info!(error = format!("{error:#}"), "no IPv6 UDP interception"),
    }
    let routing = Arc::new(options.routing.clone());
    let result = tunnel_loop(state, options, Interception::Tproxy(routing.clone()), names, connection_tx, shutdown).await;
    for task in accept_tasks {
        task.abort();
    }
    if let Err(error) = nft::remove(&routing) {
        tracing::warn!(error = format!("{error:#}"), "could not remove the interception rules");
    } else {
        tracing::info!("interception rules removed");
    }
    result
}

/// How servers' connections reach the connector, and what a change of the virtual ranges does to it.
enum Interception {
    /// nftables TPROXY rules and policy routing
    Tproxy(Arc<nft::Routing>),
    /// routes into the TUN device; the stack takes flows for the ranges
    Tun(Arc<tun::TunIngress>),
    /// nothing to install
    Socks5,
}

impl Interception {
    /// The mode the broker is told in the hello.
    fn mode(&self) -> &'static str {
        match self {
            Interception::Tproxy(_) => "tproxy",
            Interception::Tun(_) => "tun",
            Interception::Socks5 => "socks5",
        }
    }

    /// Installs (or replaces) what routes the ranges to this connector; says what it installed.
    fn install(&self, ranges: &[String], tproxy_port: u16) -> anyhow::Result<Option<&'static str>> {
        match self {
            Interception::Tproxy(routing) => {
                nft::install(routing, ranges, tproxy_port)?;
                Ok(Some("interception rules"))
            }
            Interception::Tun(tun) => {
                tun.set_ranges(ranges)?;
                Ok(Some("TUN routes"))
            }
            Interception::Socks5 => Ok(None),
        }
    }
}

async fn tunnel_loop(
    state: &EnrolledState,
    options: &RunOptions,
    interception: Interception,
    names: Arc<dns::Names>,
    connection_tx: watch::Sender<Option<Connection>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30), Duration::from_secs(60));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let attempt = async {
            // read at every attempt: a certificate renewed on the last tunnel (or over the API, when it expired) is used
            let (_, material) = client::material_for_next_tunnel(&options.state_dir, "connector").await?;
            // the broker never opens streams towards a connector: one that does is cut off
            let limits = reachback_tunnel::MuxLimits { accept_streams: false, ..reachback_tunnel::MuxLimits::default() };
            let endpoint = TunnelConnector::new(&material)?.with_congestion(options.tcp_congestion.clone()).with_limits(limits);
            let mode = interception.mode();
            let dns_listen: Vec<String> = options.dns.iter().flat_map(|dns| dns.listen.iter().map(SocketAddr::to_string)).collect();
            let hello = client::Hello {
                role: ClientRole::Connector,
                mode: Some(mode),
                version: &options.version,
                names: options.dns.is_some(),
                dns_listen: &dns_listen,
            };
            let tunnel = client::connect_with(&endpoint, &state.broker_endpoints, hello).await?;
            Ok::<_, anyhow::Error>((tunnel, material.certificate_pem))
        };
        let tunnel = tokio::select! {
            tunnel = attempt => tunnel,
            _ = &mut shutdown => return Ok(()),
        };
        let delay = match tunnel {
            Ok((tunnel, certificate_pem)) => {
                backoff.connected(Instant::now());
                // the welcome carries the current ranges: (re)install, the script replaces the table as a whole
                let ranges = tunnel.welcome.ranges.clone();
                names.set_ranges(&ranges);
                if let Some(what) = interception.install(&ranges, options.tproxy_port).context("installing the interception of the virtual ranges")? {
                    tracing::info!(ranges = ranges.len(), "{what} installed");
                }
                tracing::info!(connector_id = %tunnel.welcome.session_id, "tunnel up");
                let connection = tunnel.connection.clone();
                let _ = connection_tx.send(Some(connection.clone()));
                let port = options.tproxy_port;
                let on_update = |update: client::Update| match update {
                    client::Update::Ranges(ranges) => {
                        names.set_ranges(&ranges);
                        match interception.install(&ranges, port) {
                            Ok(Some(what)) => tracing::info!(ranges = ranges.len(), "virtual ranges changed; {what} replaced"),
                            Ok(None) => {}
                            Err(error) => tracing::warn!(error = format!("{error:#}"), "could not apply the new virtual ranges"),
                        }
                    }
                    client::Update::Names(update) => names.apply(update),
                };
                let end = tokio::select! {
                    end = tunnel.run_control(Some(client::Renewal { state_dir: options.state_dir.clone(), certificate_pem }), on_update) => Some(end),
                    _ = &mut shutdown => None,
                };
                let _ = connection_tx.send(None);
                match end {
                    None => return Ok(()),
                    Some(end) => {
                        // told to move: the flows open on the old tunnel finish there
                        if matches!(end, client::TunnelEnd::Moved(_)) {
                            client::linger(connection);
                        }
                        client::after_tunnel(&mut backoff, Ok(end))?
                    }
                }
            }
            Err(error) => client::after_tunnel(&mut backoff, Err(error))?,
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// Accepts connections for either ingress and hands each, with the tunnel of the
/// moment, to `serve` in a task of its own.
async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, connection: watch::Receiver<Option<Connection>>, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr, Option<Connection>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, source) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tunnel = connection.borrow().clone();
        tokio::spawn(serve(stream, source, tunnel));
    }
}

/// One intercepted connection: ask the broker, then relay or reset.
async fn serve_connection(stream: tokio::net::TcpStream, source: SocketAddr, tunnel: Option<Connection>) {
    // TPROXY keeps the original destination as the accepted socket's local address
    let Ok(destination) = stream.local_addr() else { return End::Tcp(stream).reset() };
    let Some(tunnel) = tunnel else {
        tracing::debug!(%destination, "no tunnel to the broker; flow reset");
        return End::Tcp(stream).reset();
    };
    let _ = stream.set_nodelay(true);
    let (mut send, recv) = match tunnel.open_bi().await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::info!(%destination, %error, "no stream to the broker; flow reset");
            return End::Tcp(stream).reset();
        }
    };
    if write_frame(&mut send, &FlowOpen { destination, source, user: None, protocol: Default::default() }).await.is_err() {
        return End::Tcp(stream).reset();
    }
    // bytes the server sent with its connect ride in the same TLS record as the request
    match early_bytes(&stream) {
        Ok(Some(bytes)) => {
            if send.write_chunk(bytes).await.is_err() {
                return End::Tcp(stream).reset();
            }
        }
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(%destination, %error, "the server's connection failed before the flow opened");
            send.reset(1);
            return End::Tcp(stream).reset();
        }
    }
    // the server's first bytes follow the request at once; its connection is reset if the answer is no
    let options = RelayOptions {
        idle_timeout: Duration::from_secs(7 * 86_400),
        await_reply: Some(AwaitReply { timeout: FLOW_REPLY_TIMEOUT, forward: false }),
        on_bytes: &|_, _| {},
        on_accepted: &|| {},
    };
    let totals = reachback_tunnel::relay(End::Tcp(stream), End::Stream { send, recv }, options).await;
    match totals.refusal {
        Some(refusal) => tracing::info!(%destination, %source, %refusal, "flow refused"),
        None if !totals.clean => tracing::debug!(%destination, %source, "flow reset"),
        None => tracing::trace!(%destination, %source, "flow closed"),
    }
}

/// The most read from an intercepted connection before its flow is requested.
const EARLY_READ: usize = 16 * 1024;

/// What the server already sent on a connection just accepted, read without
/// waiting: `Ok(None)` when nothing is there yet or the server already sent its
/// FIN (the relay sees either for itself). A freshly accepted socket's readiness
/// is not known to the runtime until its next poll of epoll, so without this the
/// request would leave alone and the first bytes a moment later, in a second
/// record that wakes the broker and the agent a second time.
fn early_bytes(stream: &tokio::net::TcpStream) -> std::io::Result<Option<bytes::Bytes>> {
    // on the stack: most flows find nothing yet, and those pay no allocation
    let mut buffer = [0u8; EARLY_READ];
    match std::io::Read::read(&mut &*socket2::SockRef::from(stream), &mut buffer) {
        Ok(0) => Ok(None),
        Ok(read) => Ok(Some(bytes::Bytes::copy_from_slice(&buffer[..read]))),
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(error) => Err(error),
    }
}

/// One SOCKS5 client: handshake, then the flow; the CONNECT is answered only
/// after the agent answered (a true connect result, unlike TPROXY).
async fn serve_socks(
    mut stream: tokio::net::TcpStream,
    source: SocketAddr,
    tunnel: Option<Connection>,
    credentials: Option<Arc<Socks5Credentials>>,
    ingress: Arc<udp::UdpIngress>,
) -> anyhow::Result<()> {
    use reachback_proto::socks5;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.set_nodelay(true);
    let mut user = None;
    let handshake = async {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        let length = socks5::greeting_length(head).context("not a SOCKS5 greeting")?;
        let mut greeting = vec![0u8; length];
        greeting[..2].copy_from_slice(&head);
        stream.read_exact(&mut greeting[2..]).await?;
        let method = socks5::choose_method(&greeting, credentials.is_some());
        stream.write_all(&method).await?;
        anyhow::ensure!(method[1] != socks5::METHOD_REFUSED, "the client offers no acceptable method");
        if let Some(credentials) = &credentials {
            // RFC 1929: [1, ulen, user, plen, password]
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await?;
            let mut rest = vec![0u8; head[1] as usize + 1];
            stream.read_exact(&mut rest).await?;
            let password_length = rest.last().copied().unwrap_or(0) as usize;
            let mut password = vec![0u8; password_length];
            stream.read_exact(&mut password).await?;
            let mut request = head.to_vec();
            request.extend_from_slice(&rest);
            request.extend_from_slice(&password);
            let accepted = socks5::parse_password_request(&request).filter(|(name, password)| credentials.check(name, password));
            stream.write_all(&socks5::password_reply(accepted.is_some())).await?;
            let Some((name, _)) = accepted else { anyhow::bail!("SOCKS5 authentication failed") };
            user = Some(String::from_utf8_lossy(name).into_owned());
        }
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await?;
        let Some(length) = socks5::request_length(head) else {
            stream.write_all(&socks5::reply(socks5::GENERAL_FAILURE)).await?;
            anyhow::bail!("malformed SOCKS5 request");
        };
        let mut request = vec![0u8; length];
        request[..5].copy_from_slice(&head);
        stream.read_exact(&mut request[5..]).await?;
        Ok::<_, anyhow::Error>(socks5::parse_request(&request))
    };
    let request = tokio::time::timeout(Duration::from_secs(10), handshake).await.context("SOCKS5 handshake timed out")??;
    let destination = match request {
        socks5::SocksRequest::Connect(destination) => destination,
        socks5::SocksRequest::UdpAssociate(requested) => return udp::serve_socks_association(stream, source, requested, ingress).await,
        socks5::SocksRequest::Refuse(code) => {
            stream.write_all(&socks5::reply(code)).await?;
            return Ok(());
        }
    };
    let Some(tunnel) = tunnel else {
        stream.write_all(&socks5::reply(socks5::GENERAL_FAILURE)).await?;
        anyhow::bail!("no tunnel to the broker");
    };
    let (mut send, mut recv) = tunnel.open_bi().await?;
    write_frame(&mut send, &FlowOpen { destination, source, user, protocol: Default::default() }).await?;
    let answer = tokio::time::timeout(FLOW_REPLY_TIMEOUT, reachback_tunnel::read_frame::<reachback_proto::FlowReply>(&mut recv)).await;
    match answer {
        Ok(Ok(Some(reachback_proto::FlowReply::Ok))) => {
            stream.write_all(&socks5::reply(socks5::SUCCEEDED)).await?;
            tracing::trace!(%destination, %source, "SOCKS5 flow open");
            let options = RelayOptions { idle_timeout: Duration::from_secs(7 * 86_400), await_reply: None, on_bytes: &|_, _| {}, on_accepted: &|| {} };
            reachback_tunnel::relay(End::Tcp(stream), End::Stream { send, recv }, options).await;
        }
        Ok(Ok(Some(reachback_proto::FlowReply::Refused(refusal)))) => {
            tracing::info!(%destination, %source, %refusal, "flow refused");
            stream.write_all(&socks5::reply(socks5::refusal_code(&refusal))).await?;
        }
        _ => {
            End::Stream { send, recv }.reset();
            stream.write_all(&socks5::reply(socks5::TTL_EXPIRED)).await?;
        }
    }
    Ok(())
}
