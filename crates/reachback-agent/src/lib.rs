//! `reachback agent`: enrolls once (key pair made here, certificate from the
//! server's CA, both kept in the state directory, 0600), then keeps one tunnel to
//! the broker and connects each flow the broker hands over to a local port on
//! its allow-list. Needs no root, no TUN device and no inbound port.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use reachback_policy::{PortRange, parse_port_range};
use reachback_proto::datagram::DatagramDecoder;
use reachback_proto::{Backoff, ClientRole, FlowOpen, FlowReply, Refusal, Transport};
pub use reachback_tunnel::client::is_enrolled;
use reachback_tunnel::client::{self, EnrolledState};
use reachback_tunnel::{ApiClient, ApiTrust, Connection, End, RecvStream, RelayOptions, SendStream, TunnelConnector, read_frame, write_frame};
use serde_json::{Value, json};

/// Ports allowed when `--allow-ports` is not given: SSH, SMB, RDP, WinRM.
pub const DEFAULT_ALLOWED_PORTS: &str = "22,445,3389,5985-5986";
/// How long the local connect may take before the flow is refused.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// What `agent enroll` sends.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    pub server: String,
    pub key: String,
    pub hostname: String,
    pub platform: String,
    pub location: Option<Value>,
    pub state_dir: PathBuf,
    /// how to trust the API (CA pin, plain HTTP allowed or not)
    pub trust: ApiTrust,
    /// discard an enrollment with another server found in the state directory
    pub force: bool,
}

/// Parses `22,445,3389,5985-5986` (`--allow-ports`).
pub fn parse_allow_ports(text: &str) -> anyhow::Result<Vec<PortRange>> {
    parse_ports("--allow-ports", text)
}

/// Parses `53,161-162` (`--allow-udp-ports`; empty: no UDP port).
pub fn parse_allow_udp_ports(text: &str) -> anyhow::Result<Vec<PortRange>> {
    parse_ports("--allow-udp-ports", text)
}

fn parse_ports(flag: &str, text: &str) -> anyhow::Result<Vec<PortRange>> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| parse_port_range(part).map_err(|error| anyhow::anyhow!("{flag}: {error}")))
        .collect()
}

/// This machine's platform name as the server knows it.
pub fn local_platform() -> &'static str {
    match std::env::consts::OS {
        "windows" => "windows",
        "macos" => "macos",
        "ios" => "ios",
        "android" => "android",
        _ => "linux",
    }
}

fn text_of(value: &Value, key: &str) -> anyhow::Result<String> {
    value[key].as_str().map(str::to_string).with_context(|| format!("the server's answer has no {key}"))
}

/// How long an API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Enrolls and keeps the result in the state directory. A state directory that
/// already holds an enrollment with the same server keeps its key pair (the server
/// then gives the device its binding back); one that holds an enrollment with
/// another server is refused unless `force` discards it.
pub fn enroll(options: &EnrollOptions) -> anyhow::Result<EnrolledState> {
    let api = ApiClient::new(&options.server, &options.trust, API_TIMEOUT)?;
    let mut key_pem = None;
    // an enrollment with another server that --force replaces (once the new one succeeded)
    let mut replaced = None;
    if let Ok((previous, material)) = client::load_state(&options.state_dir) {
        if client::same_server(&options.state_dir, &previous, &api)? {
            key_pem = Some(material.private_key_pem);
        } else if options.force {
            replaced = Some(previous.id.clone());
        } else {
            anyhow::bail!(
                "{} holds the enrollment of device {} with {}, not {}: pass --force to discard it and enroll afresh, or use another --state-dir",
                options.state_dir.display(),
                previous.id,
                previous.server,
                options.server
            );
        }
    }
    let key = match &key_pem {
        Some(pem) => rcgen::KeyPair::from_pem(pem).context("reading the enrolled key pair")?,
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the key pair")?,
    };
    let mut body = json!({
        "enrollment_key": options.key,
        "hostname": options.hostname,
        "platform": options.platform,
        "public_key": key.public_key_pem(),
    });
    if let Some(location) = &options.location {
        body["location"] = location.clone();
    }
    let answer = api.post_json("/api/v1/enroll", &body)?;
    let ca_pem = text_of(&answer, "ca_certificate")?;
    options.trust.check_tunnel_ca(&ca_pem)?;
    let brokers: Vec<String> = answer["broker_endpoints"].as_array().into_iter().flatten().filter_map(|item| item.as_str().map(str::to_string)).collect();
    let state = EnrolledState {
        server: api.base.clone(),
        id: text_of(&answer, "device_id")?,
        broker_endpoints: brokers,
        virtual_ip: answer["virtual_ip"].as_str().map(str::to_string),
        hostname: Some(options.hostname.clone()),
        ca_pin: options.trust.ca_pin.clone(),
        insecure_http: options.trust.insecure_http,
        enrolled_with: Some(client::key_fingerprint(&options.key)),
    };
    if let Some(previous_id) = replaced {
        // the old server is told (its device goes, its address is released), then the files go
        if let Err(error) = client::leave(&options.state_dir, "device") {
            tracing::warn!(device_id = %previous_id, error = format!("{error:#}"), "could not tell the other server this device left");
        }
        client::discard_enrollment(&options.state_dir)?;
    }
    client::save_enrollment(&options.state_dir, &state, &key.serialize_pem(), &text_of(&answer, "certificate")?, &ca_pem)?;
    Ok(state)
}

/// What `agent run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    pub allow_ports: Vec<PortRange>,
    /// UDP ports flows may reach (none unless given)
    pub allow_udp_ports: Vec<PortRange>,
    /// where allowed flows connect (127.0.0.1 by default)
    pub connect_host: IpAddr,
    /// this release, reported to the broker
    pub version: String,
    /// TCP congestion control of the tunnel and of the connections to local services
    pub tcp_congestion: reachback_tunnel::Congestion,
}

/// Keeps the tunnel up until `shutdown` resolves or the broker revokes this device.
pub async fn run(options: RunOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let (mut state, _) = client::load_state(&options.state_dir)?;
    reachback_tunnel::socket::raise_file_limit();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30), Duration::from_secs(60));
    let options = std::sync::Arc::new(options);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let attempt = async {
            // read at every attempt: a certificate renewed on the last tunnel (or over the API, when it expired) is used
            let (_, material) = client::material_for_next_tunnel(&options.state_dir, "device").await?;
            let connector = TunnelConnector::new(&material)?.with_congestion(options.tcp_congestion.clone());
            let tunnel = client::connect(&connector, &state.broker_endpoints, ClientRole::Agent, None, &options.version).await?;
            Ok::<_, anyhow::Error>((tunnel, material.certificate_pem))
        };
        let tunnel = tokio::select! {
            tunnel = attempt => tunnel,
            _ = &mut shutdown => break,
        };
        let wait = match tunnel {
            Ok((tunnel, certificate_pem)) => {
                backoff.connected(Instant::now());
                let welcome = tunnel.welcome.clone();
                tracing::info!(session_id = %welcome.session_id, virtual_ip = ?welcome.virtual_ip, "tunnel up");
                if welcome.virtual_ip != state.virtual_ip {
                    state.virtual_ip = welcome.virtual_ip.clone();
                    client::save_state(&options.state_dir, &state)?;
                }
                let connection = tunnel.connection.clone();
                let flows = tokio::spawn(accept_flows(connection.clone(), options.clone()));
                let end = tokio::select! {
                    end = tunnel.run_control(Some(client::Renewal { state_dir: options.state_dir.clone(), certificate_pem }), |_| {}) => Some(end),
                    _ = &mut shutdown => None,
                };
                flows.abort();
                match end {
                    None => {
                        connection.close(0, b"agent stopping");
                        break;
                    }
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
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => break,
        }
    }
    Ok(())
}

async fn accept_flows(connection: Connection, options: std::sync::Arc<RunOptions>) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        tokio::spawn(serve_flow(send, recv, options.clone()));
    }
}

async fn refuse(mut send: SendStream, refusal: Refusal) {
    let _ = write_frame(&mut send, &FlowReply::Refused(refusal)).await;
    let _ = send.finish();
}

/// One flow: check the port against the allow-list, connect locally, relay.
async fn serve_flow(mut send: SendStream, mut recv: RecvStream, options: std::sync::Arc<RunOptions>) {
    let open: FlowOpen = match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(Some(open))) => open,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::info!(error = %error, "bad flow request from the broker");
            return refuse(send, Refusal::BadRequest { reason: error.to_string() }).await;
        }
        Err(_) => return End::Stream { send, recv }.reset(),
    };
    let port = open.destination.port();
    if open.protocol == Transport::Udp {
        return serve_udp_flow(send, recv, open, options).await;
    }
    if !options.allow_ports.iter().any(|range| range.contains(port)) {
        tracing::info!(port, source = %open.source, "flow refused: port not in the allow-list");
        return refuse(send, Refusal::PortNotAllowed).await;
    }
    let target = std::net::SocketAddr::new(options.connect_host, port);
    let stream = match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%target, %error, "local connect failed");
            return refuse(send, Refusal::ConnectFailed { reason: error.to_string() }).await;
        }
        Err(_) => return refuse(send, Refusal::ConnectFailed { reason: "the local connect timed out".into() }).await,
    };
    let _ = stream.set_nodelay(true);
    let _ = options.tcp_congestion.apply(&stream);
    if write_frame(&mut send, &FlowReply::Ok).await.is_err() {
        return End::Tcp(stream).reset();
    }
    tracing::trace!(%target, source = %open.source, "flow open");
    // the broker enforces the idle timeout; this bound only frees a forgotten flow
    let options = RelayOptions { idle_timeout: Duration::from_secs(7 * 86_400), await_reply: None, on_bytes: &|_, _| {}, on_accepted: &|| {} };
    reachback_tunnel::relay(End::Stream { send, recv }, End::Tcp(stream), options).await;
}

/// How long a UDP flow may stay silent at the agent. The connector ends idle flows
/// (after its own, shorter, timeout); this only frees a flow it forgot.
const UDP_BACKSTOP_IDLE: Duration = Duration::from_secs(3600);

/// One UDP flow: check the port against the UDP allow-list, connect a UDP socket
/// to the local port, then relay datagrams both ways until the connector ends the
/// stream. Replies that find no credit on the tunnel are dropped, as are datagrams
/// the local socket cannot take at once: UDP is never made to wait.
async fn serve_udp_flow(mut send: SendStream, mut recv: RecvStream, open: FlowOpen, options: std::sync::Arc<RunOptions>) {
    let port = open.destination.port();
    if !options.allow_udp_ports.iter().any(|range| range.contains(port)) {
        tracing::info!(port, source = %open.source, "UDP flow refused: port not in the UDP allow-list");
        return refuse(send, Refusal::PortNotAllowed).await;
    }
    let target = std::net::SocketAddr::new(options.connect_host, port);
    let bind: std::net::SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = match tokio::net::UdpSocket::bind(bind).await {
        Ok(socket) => socket,
        Err(error) => return refuse(send, Refusal::ConnectFailed { reason: error.to_string() }).await,
    };
    if let Err(error) = socket.connect(target).await {
        return refuse(send, Refusal::ConnectFailed { reason: error.to_string() }).await;
    }
    if write_frame(&mut send, &FlowReply::Ok).await.is_err() {
        return;
    }
    tracing::trace!(%target, source = %open.source, "UDP flow open");
    let mut decoder = DatagramDecoder::new();
    let (mut dropped, mut relayed) = (0u64, 0u64);
    loop {
        tokio::select! {
            chunk = recv.read_chunk() => match chunk {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk);
                    while let Some(datagram) = decoder.next_datagram() {
                        // straight to the non-blocking socket: tokio's try_send also waits for a
                        // readiness event a new socket has not had yet
                        let sent = socket2::SockRef::from(&socket).send(datagram);
                        tracing::trace!(%target, length = datagram.len(), ok = sent.is_ok(), "datagram to the local service");
                        match sent {
                            Ok(_) => relayed += 1,
                            // the local service is not there (ICMP unreachable): like UDP, nobody is told
                            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => dropped += 1,
                            Err(_) => dropped += 1,
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return recv.stop(1),
            },
            received = reachback_tunnel::datagram::recv_framed(&socket) => {
                // an error is an ICMP error from an earlier send; the socket goes on
                if let Ok(frame) = received {
                    tracing::trace!(%target, length = frame.len() - 2, "datagram from the local service");
                    match send.try_write_whole(frame) {
                        Ok(true) => relayed += 1,
                        Ok(false) => dropped += 1,
                        Err(_) => break,
                    }
                }
            }
            () = tokio::time::sleep(UDP_BACKSTOP_IDLE) => break,
        }
    }
    tracing::trace!(%target, relayed, dropped, "UDP flow closed");
    let _ = send.finish();
}

/// The default state directory of the agent.
pub fn default_state_dir() -> PathBuf {
    client::default_state_dir("agent")
}
