//! The client side of a tunnel, shared by the agent and the connector: enrollment
//! state on disk, connecting to the first broker endpoint that answers, the hello
//! exchange, and the control loop (keepalive, range updates, the broker's bye).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use reachback_proto::{ClientRole, Control, Liveness, LivenessAction, Welcome};
use serde::{Deserialize, Serialize};

use crate::TlsMaterial;
use crate::{Connection, RecvStream, SendStream, TunnelConnector, read_frame, write_frame};

/// What enrollment left in the state directory (besides the key and certificates).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrolledState {
    /// the server's API address
    pub server: String,
    /// device id (agents) or connector id (connectors)
    pub id: String,
    pub broker_endpoints: Vec<String>,
    /// the agent's virtual address as last learnt
    #[serde(default)]
    pub virtual_ip: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// the CA pin the API was verified with (kept for renewals over the API)
    #[serde(default)]
    pub ca_pin: Option<String>,
    /// whether plain HTTP to a non-loopback API address was allowed
    #[serde(default)]
    pub insecure_http: bool,
    /// SHA-256 (hex) of the key this component enrolled with: another key means another identity
    #[serde(default)]
    pub enrolled_with: Option<String>,
}

impl EnrolledState {
    /// How to trust the API this state was enrolled with.
    pub fn trust(&self) -> crate::api_client::ApiTrust {
        crate::api_client::ApiTrust { ca_pin: self.ca_pin.clone(), insecure_http: self.insecure_http }
    }
}

/// The fingerprint of an enrollment or provisioning key kept in the state (SHA-256, hex):
/// enough to tell whether a key is the one enrolled with, useless to enroll again.
pub fn key_fingerprint(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.trim().as_bytes()).as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Whether the server behind `api` is the one this state was enrolled with: the
/// same internal CA (replicas and other names of one service share it). With a pin,
/// the CA is the one the connection was verified against; otherwise the server's
/// own word over a connection the platform's trust store verified.
pub fn same_server(state_dir: &Path, state: &EnrolledState, api: &crate::ApiClient) -> anyhow::Result<bool> {
    let saved = std::fs::read_to_string(state_dir.join(CA_FILE)).with_context(|| format!("reading {}", state_dir.join(CA_FILE).display()))?;
    let saved = crate::api_client::pin_of_pem(&saved)?;
    let current = match &api.pinned_ca_pem {
        Some(pem) => crate::api_client::pin_of_pem(pem)?,
        None if api.base.starts_with("http://") => {
            // plain HTTP (loopback, or --insecure-http): the address decides, nothing can be verified
            return Ok(state.server.trim_end_matches('/').eq_ignore_ascii_case(&api.base) || saved == api.server_ca_pin()?);
        }
        None => api.server_ca_pin()?,
    };
    Ok(saved == current)
}

pub const STATE_FILE: &str = "state.json";
pub const KEY_FILE: &str = "key.pem";
pub const CERTIFICATE_FILE: &str = "certificate.pem";
pub const CA_FILE: &str = "ca.pem";

/// Writes a file readable by its owner only (0600), atomically (write, then rename).
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("opening {}", temporary.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Creates the state directory (0700) if needed.
pub fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("securing {}", dir.display()))?;
    Ok(())
}

/// The default state directory: `/var/lib/reachback/<component>` as root, else under `$XDG_STATE_HOME`.
pub fn default_state_dir(component: &str) -> PathBuf {
    let root = std::env::var("USER").is_ok_and(|user| user == "root")
        || std::fs::metadata("/proc/self").is_ok_and(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0);
    if root {
        return PathBuf::from("/var/lib/reachback").join(component);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("reachback").join(component)
}

pub fn save_state(dir: &Path, state: &EnrolledState) -> anyhow::Result<()> {
    write_private(&dir.join(STATE_FILE), &serde_json::to_string_pretty(state)?)
}

/// Loads the state and TLS material of an enrolled component.
pub fn load_state(dir: &Path) -> anyhow::Result<(EnrolledState, TlsMaterial)> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).with_context(|| format!("reading {} (enroll first)", dir.join(name).display()));
    let state: EnrolledState = serde_json::from_str(&read(STATE_FILE)?).with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
    let material = TlsMaterial { certificate_pem: read(CERTIFICATE_FILE)?, private_key_pem: read(KEY_FILE)?, ca_pem: read(CA_FILE)? };
    Ok((state, material))
}

/// Keeps everything enrollment returned.
pub fn save_enrollment(dir: &Path, state: &EnrolledState, private_key_pem: &str, certificate_pem: &str, ca_pem: &str) -> anyhow::Result<()> {
    prepare_state_dir(dir)?;
    write_private(&dir.join(KEY_FILE), private_key_pem)?;
    write_private(&dir.join(CERTIFICATE_FILE), certificate_pem)?;
    write_private(&dir.join(CA_FILE), ca_pem)?;
    save_state(dir, state)
}

/// Removes an enrollment's files from the state directory (another identity takes its place).
pub fn discard_enrollment(dir: &Path) -> anyhow::Result<()> {
    for name in [STATE_FILE, CERTIFICATE_FILE, KEY_FILE, CA_FILE] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).with_context(|| format!("removing {}", dir.join(name).display())),
        }
    }
    Ok(())
}

/// Whether the state directory holds an enrollment.
pub fn is_enrolled(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

/// A tunnel that said hello and got its welcome.
pub struct Tunnel {
    pub connection: Connection,
    pub welcome: Welcome,
    send: SendStream,
    recv: RecvStream,
    /// the replica's address this tunnel went to
    address: SocketAddr,
}

/// What the broker pushes on the control stream besides liveness.
#[derive(Debug)]
pub enum Update {
    /// the virtual ranges (connectors route them)
    Ranges(Vec<String>),
    /// a piece of the DNS table (connectors asked for it)
    Names(reachback_proto::NameUpdate),
}

/// How a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// the broker said not to come back (revoked)
    Final(String),
    /// lost or closed; reconnect
    Lost(String),
    /// the replica is going away (a `Bye` that is not final): reconnect elsewhere now
    Moved(String),
}

/// Clients told to move reconnect within this, spread at random (a draining replica's
/// clients do not all land on the others in the same instant).
const MOVE_SPREAD: Duration = Duration::from_millis(500);

async fn resolve(endpoint: &str) -> anyhow::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host(endpoint).await.with_context(|| format!("resolving {endpoint}"))?.collect())
}

/// Connects to the first endpoint that answers and exchanges hello and welcome.
/// `version` is the client's release, shown in the connector list.
pub async fn connect(connector: &TunnelConnector, brokers: &[String], role: ClientRole, mode: Option<&str>, version: &str) -> anyhow::Result<Tunnel> {
    connect_with(connector, brokers, Hello { role, mode, version, names: false, dns_listen: &[] }).await
}

/// What a client says in its hello.
#[derive(Clone, Copy, Debug)]
pub struct Hello<'a> {
    pub role: ClientRole,
    pub mode: Option<&'a str>,
    pub version: &'a str,
    /// a connector answering DNS asks for the bound hostnames
    pub names: bool,
    /// where a connector answers DNS
    pub dns_listen: &'a [String],
}

/// How long an attempt has to itself before the next address is tried alongside it:
/// a replica that died without a word (no reset, the host gone) costs this, not a
/// whole connect timeout.
const ATTEMPT_STAGGER: Duration = Duration::from_millis(400);
/// How long one attempt (TCP, TLS, hello and welcome) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the broker endpoints, saying `hello`: every address of every
/// endpoint (a DNS name may stand for several replicas), in an order drawn afresh
/// for each call so that clients spread over the replicas, tried one after the
/// other but overlapping (a new attempt starts every [`ATTEMPT_STAGGER`] while
/// earlier ones are pending); the first welcome wins and the others are dropped.
/// A final refusal (a revoked certificate) ends the search at once.
pub async fn connect_with(connector: &TunnelConnector, brokers: &[String], hello_message: Hello<'_>) -> anyhow::Result<Tunnel> {
    let mut last_error = anyhow::anyhow!("no broker endpoint configured");
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for broker in brokers {
        match resolve(broker).await {
            Ok(resolved) => addresses.extend(resolved.into_iter().filter(|address| !addresses.contains(address)).collect::<Vec<_>>()),
            Err(error) => last_error = error,
        }
    }
    shuffle(&mut addresses, jitter());
    // where a tunnel was just lost or an attempt just failed goes last: a replica
    // whose host died is not the first one tried again
    suspected::put_last(&mut addresses);
    let Hello { role, mode, version, names, dns_listen } = hello_message;
    let hello = Control::Hello { role, version: version.to_string(), mode: mode.map(str::to_string), names, dns_listen: dns_listen.to_vec() };
    let mut waiting = addresses.into_iter();
    let mut attempts = tokio::task::JoinSet::new();
    let start = |attempts: &mut tokio::task::JoinSet<(SocketAddr, anyhow::Result<Tunnel>)>, address: SocketAddr| {
        let connector = connector.clone();
        let hello = hello.clone();
        attempts.spawn(async move {
            let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, say_hello(&connector, address, hello)).await {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("no answer in {} s", ATTEMPT_TIMEOUT.as_secs())),
            };
            (address, result)
        });
    };
    match waiting.next() {
        Some(address) => start(&mut attempts, address),
        None => return Err(last_error),
    }
    loop {
        let more = waiting.len() > 0;
        tokio::select! {
            finished = attempts.join_next() => match finished {
                Some(Ok((address, Ok(tunnel)))) => {
                    suspected::clear(address);
                    // a slower attempt that also got in is closed, not left holding a session
                    attempts.abort_all();
                    while let Some(finished) = attempts.try_join_next() {
                        if let Ok((_, Ok(extra))) = finished {
                            extra.connection.close(0, b"another broker answered first");
                        }
                    }
                    return Ok(tunnel);
                }
                Some(Ok((address, Err(error)))) => {
                    if error.downcast_ref::<FinalRefusal>().is_some() {
                        return Err(error);
                    }
                    suspected::note(address);
                    last_error = error.context(format!("broker {address}"));
                    // a failure that came quickly (refused, reset) hands over at once
                    if let Some(address) = waiting.next() {
                        start(&mut attempts, address);
                    }
                }
                Some(Err(error)) => last_error = anyhow::anyhow!("a connection attempt failed: {error}"),
                None => return Err(last_error),
            },
            _ = tokio::time::sleep(ATTEMPT_STAGGER), if more => {
                if let Some(address) = waiting.next() {
                    start(&mut attempts, address);
                }
            }
        }
    }
}

/// Broker addresses this process lately lost a tunnel to or failed to reach. A
/// reconnection tries them after the others (they stay in the list: with one
/// replica, or all of them suspected, the order is the shuffle's). Bounded in count
/// and in age.
mod suspected {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// How long a failure counts against an address.
    const MEMORY: Duration = Duration::from_secs(30);
    /// Addresses remembered at most (oldest forgotten first).
    const CAPACITY: usize = 32;

    static SUSPECTED: Mutex<Vec<(SocketAddr, Instant)>> = Mutex::new(Vec::new());

    fn with<T>(work: impl FnOnce(&mut Vec<(SocketAddr, Instant)>) -> T) -> T {
        let mut list = SUSPECTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        list.retain(|(_, at)| at.elapsed() < MEMORY);
        work(&mut list)
    }

    pub fn note(address: SocketAddr) {
        with(|list| {
            list.retain(|(known, _)| *known != address);
            if list.len() >= CAPACITY {
                list.remove(0);
            }
            list.push((address, Instant::now()));
        });
    }

    pub fn clear(address: SocketAddr) {
        with(|list| list.retain(|(known, _)| *known != address));
    }

    pub fn put_last(addresses: &mut [SocketAddr]) {
        let suspected: Vec<SocketAddr> = with(|list| list.iter().map(|(address, _)| *address).collect());
        order(addresses, &suspected);
    }

    /// Stable: the shuffle's order holds within the trusted and within the suspected.
    pub(super) fn order(addresses: &mut [SocketAddr], suspected: &[SocketAddr]) {
        addresses.sort_by_key(|address| suspected.contains(address));
    }
}

/// Puts `items` in a pseudo-random order drawn from `seed` in `[0, 1)`.
fn shuffle<T>(items: &mut [T], seed: f64) {
    let mut state = ((seed * (1u64 << 53) as f64) as u64) | 1;
    for index in (1..items.len()).rev() {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let draw = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        items.swap(index, (draw % (index as u64 + 1)) as usize);
    }
}

async fn say_hello(connector: &TunnelConnector, address: SocketAddr, hello: Control) -> anyhow::Result<Tunnel> {
    let connection = connector.connect(address).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    write_frame(&mut send, &hello).await?;
    match read_frame::<Control>(&mut recv).await? {
        Some(Control::Welcome(welcome)) => Ok(Tunnel { connection, welcome, send, recv, address }),
        Some(Control::Bye { reason, r#final: true }) => Err(anyhow::anyhow!(FinalRefusal(reason))),
        // a replica that is draining: another one takes the client
        Some(Control::Bye { reason, .. }) => anyhow::bail!("the broker turned the client away: {reason}"),
        Some(other) => anyhow::bail!("unexpected answer to hello: {other:?}"),
        None => anyhow::bail!("the broker closed the control stream"),
    }
}

/// The broker refused this client for good (revoked certificate).
#[derive(Debug)]
pub struct FinalRefusal(pub String);

impl std::fmt::Display for FinalRefusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "the broker refused this client: {}", self.0)
    }
}

impl std::error::Error for FinalRefusal {}

/// The state directory and the certificate of a client: it asks the broker for a
/// fresh certificate once two thirds of the current one's lifetime have passed,
/// and keeps what it gets (the next tunnel presents it; this one goes on).
pub struct Renewal {
    pub state_dir: PathBuf,
    /// the certificate the tunnel was opened with (PEM)
    pub certificate_pem: String,
}

impl Renewal {
    /// When to ask next, from the certificate in hand.
    fn next_request(&self) -> Instant {
        match crate::tls::certificate_validity(&self.certificate_pem) {
            Ok((not_before, not_after)) => Instant::now() + reachback_proto::renewal::until_renewal(not_before, not_after, std::time::SystemTime::now()),
            // unreadable: ask now, the broker's answer replaces it
            Err(_) => Instant::now(),
        }
    }

    /// Keeps a certificate from the broker when it is for this client's key.
    fn accept(&mut self, certificate: &str) -> anyhow::Result<()> {
        anyhow::ensure!(spki_of(certificate)? == spki_of(&self.certificate_pem)?, "the broker's certificate is for another key; the current one is kept");
        write_private(&self.state_dir.join(CERTIFICATE_FILE), certificate)?;
        self.certificate_pem = certificate.to_string();
        Ok(())
    }
}

fn spki_of(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next().context("no certificate")?.context("reading the certificate")?;
    let (_, certificate) = x509_parser::parse_x509_certificate(&der).map_err(|error| anyhow::anyhow!("unreadable certificate: {error}"))?;
    Ok(certificate.public_key().raw.to_vec())
}

/// The TLS material for the next tunnel, read from the state directory (so a
/// certificate renewed on the last tunnel is used). A certificate that expired
/// while the client was offline is renewed over the API first (`kind` is `device`
/// or `connector`), with a signature of the enrolled key.
pub async fn material_for_next_tunnel(dir: &Path, kind: &'static str) -> anyhow::Result<(EnrolledState, TlsMaterial)> {
    let (state, material) = load_state(dir)?;
    let expired = crate::tls::certificate_validity(&material.certificate_pem).is_ok_and(|(_, not_after)| not_after <= std::time::SystemTime::now());
    if !expired {
        return Ok((state, material));
    }
    tracing::info!(kind, id = %state.id, "the certificate has expired: renewing it over the API");
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        renew_over_api(&dir, kind, &state, &material)?;
        load_state(&dir)
    })
    .await
    .context("the renewal task failed")?
}

/// The body of a request signed with the enrolled key: the public key, `signed_at`
/// and the signature of `message(kind, id, signed_at)`.
fn signed_body(
    kind: &str,
    state: &EnrolledState,
    material: &TlsMaterial,
    message: fn(&str, &str, i64) -> String,
) -> anyhow::Result<(serde_json::Value, Vec<u8>)> {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(material.private_key_pem.as_bytes()).context("reading the enrolled key (PKCS#8)")?;
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, key.secret_pkcs8_der(), &rng)
        .map_err(|_| anyhow::anyhow!("the enrolled key is not an ECDSA P-256 key"))?;
    let signed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs() as i64).unwrap_or(0);
    let signature = pair.sign(&rng, message(kind, &state.id, signed_at).as_bytes()).map_err(|_| anyhow::anyhow!("signing failed"))?;
    let spki = spki_of(&material.certificate_pem)?;
    let body = serde_json::json!({
        "public_key": crate::api_client::pem("PUBLIC KEY", &spki),
        "signed_at": signed_at,
        "signature": base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
    });
    Ok((body, spki))
}

fn renew_over_api(dir: &Path, kind: &str, state: &EnrolledState, material: &TlsMaterial) -> anyhow::Result<()> {
    let (body, spki) = signed_body(kind, state, material, reachback_proto::renewal::renewal_message)?;
    let api = crate::ApiClient::new(&state.server, &state.trust(), Duration::from_secs(30))?;
    let answer = api.post_json(&format!("/api/v1/{kind}s/{}/renew", state.id), &body)?;
    let certificate = answer["certificate"].as_str().context("the server's answer has no certificate")?;
    anyhow::ensure!(spki_of(certificate)? == spki, "the server's certificate is for another key");
    write_private(&dir.join(CERTIFICATE_FILE), certificate)?;
    tracing::info!(kind, id = %state.id, "certificate renewed over the API");
    Ok(())
}

/// Tells the server of the enrollment in `dir` that this identity is discarded (the
/// client enrolled as another one), signed with the enrolled key. Best effort: the
/// caller discards the files whatever the answer.
pub fn leave(dir: &Path, kind: &str) -> anyhow::Result<()> {
    let (state, material) = load_state(dir)?;
    let (body, _) = signed_body(kind, &state, &material, reachback_proto::renewal::leave_message)?;
    let api = crate::ApiClient::new(&state.server, &state.trust(), Duration::from_secs(10))?;
    let url = api.url(&format!("/api/v1/{kind}s/{}/leave", state.id));
    let response =
        api.agent.post(&url).header("Content-Type", "application/json").send(body.to_string()).map_err(|error| crate::api_client::explain(&url, error))?;
    anyhow::ensure!(response.status().is_success(), "the server answered {}", response.status());
    tracing::info!(kind, id = %state.id, "the server was told this identity is discarded");
    Ok(())
}

/// How long a client waits without a frame from its replica before it gives the
/// tunnel up and moves: two keepalive intervals and a half (the replica pings a
/// quiet tunnel every interval, so a live one is heard at least that often). This
/// catches a replica process that stopped answering while its kernel still
/// acknowledges (25 s at the default of 10 s); a replica whose host or network
/// vanished is left sooner, by the kernel ([`crate::tls::CLIENT_DEAD_AFTER`]).
pub fn dead_after(keepalive: Duration) -> Duration {
    keepalive * 5 / 2
}

impl Tunnel {
    /// Runs the control stream until the tunnel ends; `on_update` sees range and name updates.
    /// With `renewal`, the certificate is renewed over this stream when it is due.
    pub async fn run_control(self, mut renewal: Option<Renewal>, mut on_update: impl FnMut(Update)) -> TunnelEnd {
        let Tunnel { connection, welcome, mut send, recv, address } = self;
        let keepalive = Duration::from_secs(welcome.keepalive_seconds.clamp(1, 300));
        let mut liveness = Liveness::new(Instant::now(), keepalive, dead_after(keepalive));
        let (mut frames, reader) = crate::spawn_reader::<Control>(recv);
        let mut renew_at = renewal.as_ref().map(Renewal::next_request);
        let end = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(renew_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)).into()), if renew_at.is_some() => {
                    if write_frame(&mut send, &Control::Renew).await.is_err() {
                        break TunnelEnd::Lost("control stream broke".into());
                    }
                    // unanswered, it is asked again
                    renew_at = Some(Instant::now() + reachback_proto::renewal::RENEWAL_RETRY);
                }
                frame = frames.recv() => {
                    liveness.heard(Instant::now());
                    match frame {
                        Some(Ok(Some(Control::Ping { seq }))) => {
                            if write_frame(&mut send, &Control::Pong { seq }).await.is_err() {
                                break TunnelEnd::Lost("control stream broke".into());
                            }
                            liveness.sent(Instant::now());
                        }
                        Some(Ok(Some(Control::Pong { .. }))) => {}
                        Some(Ok(Some(Control::Ranges { ranges }))) => on_update(Update::Ranges(ranges)),
                        Some(Ok(Some(Control::Names(update)))) => on_update(Update::Names(update)),
                        Some(Ok(Some(Control::Certificate { certificate }))) => {
                            if let Some(renewal) = renewal.as_mut() {
                                match renewal.accept(&certificate) {
                                    Ok(()) => {
                                        tracing::info!("certificate renewed over the tunnel");
                                        renew_at = Some(renewal.next_request());
                                    }
                                    Err(error) => tracing::warn!(error = format!("{error:#}"), "a renewed certificate was not kept"),
                                }
                            }
                        }
                        Some(Ok(Some(Control::Bye { reason, r#final: true }))) => break TunnelEnd::Final(reason),
                        Some(Ok(Some(Control::Bye { reason, .. }))) => break TunnelEnd::Moved(reason),
                        Some(Ok(Some(other))) => break TunnelEnd::Lost(format!("unexpected control message {other:?}")),
                        Some(Ok(None)) | None => break TunnelEnd::Lost("the broker closed the control stream".into()),
                        Some(Err(error)) => break TunnelEnd::Lost(format!("{error:#}")),
                    }
                }
                _ = tokio::time::sleep_until(liveness.poll_timeout().into()) => {
                    match liveness.handle_timeout(Instant::now()) {
                        Some(LivenessAction::SendPing(seq)) if write_frame(&mut send, &Control::Ping { seq }).await.is_err() => {
                            break TunnelEnd::Lost("control stream broke".into());
                        }
                        Some(LivenessAction::Dead) => break TunnelEnd::Lost("the broker stopped answering".into()),
                        Some(LivenessAction::SendPing(_)) | None => {}
                    }
                }
                reason = connection.closed() => break TunnelEnd::Lost(reason),
            }
        };
        reader.abort();
        // a replica that went silent, closed or is draining is tried last next time
        if matches!(end, TunnelEnd::Lost(_) | TunnelEnd::Moved(_)) {
            suspected::note(address);
        }
        end
    }
}

/// Keeps the tunnel a draining replica told this client to leave until the flows
/// still open on it end (or the replica closes it at its drain deadline): the client
/// reconnects elsewhere at once, and dropping its last handle would reset them.
///
/// The tunnel takes no new streams meanwhile (the replica's flows opened after its
/// `Bye` are refused at once, not left waiting), and at most [`MAX_LINGERING`]
/// tunnels linger at once: past that the tunnel is closed now.
pub fn linger(connection: Connection) {
    connection.stop_accepting();
    let lingering = LINGERING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if lingering >= MAX_LINGERING {
        LINGERING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        connection.close(0, b"moved to another replica");
        return;
    }
    tokio::spawn(async move {
        let flows_ended = async {
            while connection.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = flows_ended => {}
            _ = connection.closed() => {}
            // the replica's --drain-timeout is at most an hour
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        connection.close(0, b"moved to another replica");
        LINGERING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    });
}

/// Moved-from tunnels kept at once for their flows (a replica that says "move" again
/// and again cannot make a client hold more).
const MAX_LINGERING: usize = 4;
static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What a client's reconnect loop does after a tunnel attempt ended: stop for
/// good when the broker refused this client, else wait a backoff delay.
pub fn after_tunnel(backoff: &mut reachback_proto::Backoff, outcome: Result<TunnelEnd, anyhow::Error>) -> anyhow::Result<Duration> {
    let (reason, what) = match outcome {
        Ok(TunnelEnd::Final(reason)) => anyhow::bail!(FinalRefusal(reason)),
        Err(error) if error.downcast_ref::<FinalRefusal>().is_some() => return Err(error),
        Ok(TunnelEnd::Lost(reason)) => (reason, "tunnel lost"),
        Ok(TunnelEnd::Moved(reason)) => {
            // spread, and never faster than the backoff: a replica that welcomes and then
            // says "move" again and again (buggy, or behind a balancer that lands on it
            // each time) is retried less and less often, as a failing one is
            let delay = MOVE_SPREAD.mul_f64(jitter()).max(backoff.next_delay(Instant::now(), jitter()));
            tracing::info!(%reason, retry_in_ms = delay.as_millis() as u64, "told to move to another replica");
            return Ok(delay);
        }
        Err(error) => (format!("{error:#}"), "cannot reach the broker"),
    };
    let delay = backoff.next_delay(Instant::now(), jitter());
    tracing::info!(%reason, retry_in_ms = delay.as_millis() as u64, "{what}");
    Ok(delay)
}

/// A uniform random number in `[0, 1)` for backoff jitter, without a RNG crate.
pub fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.subsec_nanos()).unwrap_or(0);
    let mixed = (nanos as u64 ^ (std::process::id() as u64).rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::shuffle;

    #[test]
    fn a_shuffle_keeps_every_endpoint_and_spreads_the_first_choice() {
        let endpoints: Vec<u32> = (0..3).collect();
        let mut first = [0usize; 3];
        for draw in 0..3000 {
            let mut order = endpoints.clone();
            shuffle(&mut order, draw as f64 / 3000.0);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, endpoints, "a permutation");
            first[order[0] as usize] += 1;
        }
        // clients spread over the replicas: each is tried first by about a third
        for (endpoint, count) in first.iter().enumerate() {
            assert!((700..1300).contains(count), "endpoint {endpoint} first {count} times of 3000: {first:?}");
        }
        let mut one: Vec<u32> = vec![7];
        shuffle(&mut one, 0.5);
        assert_eq!(one, [7]);
        shuffle(&mut Vec::<u32>::new(), 0.5);
    }

    #[test]
    fn suspected_addresses_go_last_and_the_rest_keep_their_order() {
        let address = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut addresses = vec![address(1), address(2), address(3), address(4)];
        super::suspected::order(&mut addresses, &[address(3), address(1)]);
        assert_eq!(addresses, [address(2), address(4), address(1), address(3)]);
        // all suspected: the shuffle's order stands
        let mut addresses = vec![address(2), address(1)];
        super::suspected::order(&mut addresses, &[address(1), address(2)]);
        assert_eq!(addresses, [address(2), address(1)]);
    }

    #[test]
    fn a_replica_that_says_move_again_and_again_is_retried_less_and_less_often() {
        use std::time::{Duration, Instant};
        let moved = || Ok(super::TunnelEnd::Moved("this replica is shutting down; reconnect to another".into()));
        let mut backoff = reachback_proto::Backoff::new(Duration::from_millis(250), Duration::from_secs(30), Duration::from_secs(60));
        // after a tunnel that stood a while: spread over half a second at most
        backoff.connected(Instant::now().checked_sub(Duration::from_secs(61)).expect("an instant a minute ago"));
        let first = super::after_tunnel(&mut backoff, moved()).expect("a delay");
        assert!(first <= Duration::from_millis(500), "{first:?}");
        // welcomed and told to move each time: the backoff's doubling, up to its ceiling
        let mut last = first;
        for _ in 0..8 {
            backoff.connected(Instant::now());
            last = super::after_tunnel(&mut backoff, moved()).expect("a delay");
        }
        assert!(last >= Duration::from_secs(15), "{last:?}");
    }

    #[test]
    fn dead_after_is_two_and_a_half_keepalives() {
        assert_eq!(super::dead_after(std::time::Duration::from_secs(1)), std::time::Duration::from_millis(2500));
        assert_eq!(super::dead_after(std::time::Duration::from_secs(10)), std::time::Duration::from_secs(25));
    }
}
