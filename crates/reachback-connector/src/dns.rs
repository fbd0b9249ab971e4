//! The connector's DNS listeners (`--dns-listen`, UDP and TCP on each address): a
//! thin shell around `reachback_dns::Answerer` over the table the broker keeps in
//! step ([`Names`]). No round trip to the server per query; the table outlives a
//! lost tunnel, so answers keep coming while the server is away.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use reachback_dns::{Answerer, Outcome, Range, RateLimiter, Table, Transport};
use reachback_proto::NameUpdate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What `--dns-*` set.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    pub listen: Vec<SocketAddr>,
    /// where queries outside the client domains go; `None` refuses them
    pub upstream: Option<SocketAddr>,
    /// TTL of answers and of negative answers
    pub ttl: u32,
    /// queries per second per source address (0: no limit)
    pub rate_limit: u32,
}

/// The table answers come from, and the one a snapshot is being read into.
#[derive(Debug, Default)]
pub struct Names {
    table: RwLock<Table>,
    staging: Mutex<Option<Table>>,
    /// when the table last took a change
    updated: Mutex<Option<Instant>>,
    /// microseconds from the last change's time in the store to the table holding it
    lag_micros: std::sync::atomic::AtomicI64,
    /// queries answered, by type and answer code
    pub counts: QueryCounts,
    /// queries dropped by the per-source rate limit
    pub rate_limited: std::sync::atomic::AtomicU64,
}

/// The query types counted by name; the rest count as `other`.
pub const COUNTED_TYPES: [(u16, &str); 7] = [(1, "A"), (28, "AAAA"), (12, "PTR"), (6, "SOA"), (2, "NS"), (255, "ANY"), (0, "other")];
/// Answer codes 0–15, then queries handed to the upstream, then queries dropped unanswered.
pub const OUTCOMES: usize = 18;
pub const FORWARDED: usize = 16;
pub const DROPPED: usize = 17;

/// Counts of DNS queries by type and answer code: plain atomics on the answering
/// path (no label look-up per query), read into Prometheus families on scrape.
#[derive(Debug, Default)]
pub struct QueryCounts {
    cells: [[std::sync::atomic::AtomicU64; OUTCOMES]; COUNTED_TYPES.len()],
}

impl QueryCounts {
    pub fn count(&self, qtype: u16, outcome: usize) {
        let row = COUNTED_TYPES.iter().position(|(code, _)| *code == qtype).unwrap_or(COUNTED_TYPES.len() - 1);
        if let Some(cell) = self.cells[row].get(outcome) {
            cell.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every non-zero count: (type name, outcome index, count).
    pub fn snapshot(&self) -> Vec<(&'static str, usize, u64)> {
        let mut counts = Vec::new();
        for (row, (_, name)) in self.cells.iter().zip(COUNTED_TYPES) {
            for (outcome, cell) in row.iter().enumerate() {
                let value = cell.load(std::sync::atomic::Ordering::Relaxed);
                if value > 0 {
                    counts.push((name, outcome, value));
                }
            }
        }
        counts
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn apply(table: &mut Table, update: &NameUpdate) {
    if let Some(zones) = &update.zones {
        let zones: Vec<&str> = zones.iter().map(String::as_str).collect();
        if let Err(error) = table.set_zones(&zones) {
            tracing::warn!(%error, "the server sent a client domain the table refuses");
        }
    }
    for range in update.unbind_ranges.iter().filter_map(|range| Range::parse(range)) {
        table.unbind_range(&range);
    }
    for address in update.unbind.iter().filter_map(|address| address.parse::<IpAddr>().ok()) {
        table.unbind_address(address);
    }
    for (hostname, address) in &update.bind {
        let Ok(address) = address.parse::<IpAddr>() else { continue };
        if let Err(error) = table.bind(hostname, address) {
            tracing::debug!(%error, "a hostname the table refuses");
        }
    }
}

impl Names {
    /// Takes one update from the broker: a snapshot is read into a table of its own
    /// and swapped in whole when it is done, so answers never come from half of one.
    pub fn apply(&self, update: NameUpdate) {
        let mut staging = lock(&self.staging);
        if update.reset {
            let mut fresh = Table::default();
            let ranges = read(&self.table).ranges().to_vec();
            fresh.set_ranges(&ranges);
            *staging = Some(fresh);
        }
        match staging.as_mut() {
            Some(table) => {
                apply(table, &update);
                if update.done
                    && let Some(complete) = staging.take()
                {
                    let names = complete.len();
                    *write(&self.table) = complete;
                    tracing::info!(names, "DNS table loaded");
                }
            }
            None => apply(&mut write(&self.table), &update),
        }
        *lock(&self.updated) = Some(Instant::now());
        if let Some(changed) = update.changed_at_us {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_micros() as i64).unwrap_or(0);
            self.lag_micros.store((now - changed).max(0), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Seconds from the last change's time at the server to the table holding it
    /// (the clocks of server and connector are assumed in step, as NTP keeps them).
    pub fn sync_lag_seconds(&self) -> f64 {
        self.lag_micros.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
    }

    /// The virtual ranges (their reverse names are answered).
    pub fn set_ranges(&self, ranges: &[String]) {
        let ranges: Vec<Range> = ranges.iter().filter_map(|range| Range::parse(range)).collect();
        write(&self.table).set_ranges(&ranges);
        if let Some(staging) = lock(&self.staging).as_mut() {
            staging.set_ranges(&ranges);
        }
    }

    pub fn len(&self) -> usize {
        read(&self.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Binds every listener (UDP and TCP on each address) and serves until the task is dropped.
pub async fn serve(options: DnsOptions, names: Arc<Names>) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let nameserver_addresses: Vec<IpAddr> = options.listen.iter().map(SocketAddr::ip).filter(|address| !address.is_unspecified()).collect();
    let answerer = Arc::new(Answerer { ttl: options.ttl, forward: options.upstream.is_some(), nameserver_addresses });
    let limiter = Arc::new(Mutex::new(RateLimiter::new(options.rate_limit, 65_536, Instant::now())));
    let mut tasks = Vec::new();
    for address in &options.listen {
        let udp = std::net::UdpSocket::bind(address).with_context(|| format!("binding DNS on UDP {address}"))?;
        // room for a burst of queries while one is being answered (the kernel caps it at rmem_max)
        let _ = socket2::SockRef::from(&udp).set_recv_buffer_size(4 * 1024 * 1024);
        let udp = Arc::new(udp);
        let tcp = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding DNS on TCP {address}"))?;
        tracing::info!(%address, "DNS listening (UDP and TCP)");
        // UDP on a thread of its own, blocking: no runtime between the datagram and its answer,
        // and the connector's flows keep their core
        let (udp_answerer, udp_names, udp_limiter, upstream, runtime) =
            (answerer.clone(), names.clone(), limiter.clone(), options.upstream, tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name(format!("dns-udp-{address}"))
            .spawn(move || serve_udp(udp, udp_answerer, udp_names, udp_limiter, upstream, runtime))
            .context("starting the DNS thread")?;
        tasks.push(tokio::spawn(serve_tcp(tcp, answerer.clone(), names.clone(), limiter.clone(), options.upstream)));
    }
    Ok(tasks)
}

/// Forwarded queries in flight at once (more are dropped: the client retries).
const MAX_FORWARDS: usize = 256;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP clients at once, and how long one may stay idle.
const MAX_TCP_CLIENTS: usize = 256;
const TCP_IDLE: Duration = Duration::from_secs(10);

async fn forward(upstream: SocketAddr, query: &[u8]) -> anyhow::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(FORWARD_TIMEOUT, socket.recv(&mut buffer)).await.context("the upstream did not answer")??;
    // the answer must be to this query (same id)
    anyhow::ensure!(length >= 2 && query.len() >= 2 && buffer[..2] == query[..2], "an answer to another query");
    buffer.truncate(length);
    Ok(buffer)
}

fn answer(answerer: &Answerer, names: &Names, query: &[u8], transport: Transport) -> Outcome {
    let table = read(&names.table);
    let outcome = answerer.answer(&table, query, transport);
    drop(table);
    match &outcome {
        Outcome::Reply { rcode, qtype, .. } => {
            tracing::trace!(rcode, qtype, "DNS answer");
            // BADVERS (16) has a slot of its own; codes no answer here uses share one
            let slot = match *rcode {
                code @ 0..=5 => code as usize,
                16 => 15,
                _ => 14,
            };
            names.counts.count(*qtype, slot);
        }
        Outcome::Forward { qtype } => names.counts.count(*qtype, FORWARDED),
        Outcome::Drop => names.counts.count(0, DROPPED),
    }
    outcome
}

/// Queries read (and answers written) per system call: `recvmmsg` and `sendmmsg`
/// take a burst at once, so a busy listener pays one system call per burst, not two per query.
const UDP_BATCH: usize = 32;
/// The largest query read over UDP (an EDNS client may announce up to 4,096).
const UDP_QUERY: usize = 4096;

fn serve_udp(
    socket: Arc<std::net::UdpSocket>,
    answerer: Arc<Answerer>,
    names: Arc<Names>,
    limiter: Arc<Mutex<RateLimiter>>,
    upstream: Option<SocketAddr>,
    runtime: tokio::runtime::Handle,
) {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
    use std::os::fd::AsRawFd;
    let forwards = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    let descriptor = socket.as_raw_fd();
    let mut buffers = vec![[0u8; UDP_QUERY]; UDP_BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
    let mut received: Vec<(usize, SocketAddr)> = Vec::with_capacity(UDP_BATCH);
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(UDP_BATCH);
    loop {
        received.clear();
        {
            let mut slices: Vec<[std::io::IoSliceMut<'_>; 1]> = buffers.iter_mut().map(|buffer| [std::io::IoSliceMut::new(&mut buffer[..])]).collect();
            // blocks for the first query, then takes what else is already there
            match recvmmsg(descriptor, &mut headers, slices.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(messages) => {
                    for message in messages {
                        if let Some(source) = message.address.as_ref().and_then(socket_address) {
                            received.push((message.bytes, source));
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "DNS receive failed");
                    continue;
                }
            }
        }
        replies.clear();
        let now = Instant::now();
        for (index, (length, source)) in received.iter().enumerate() {
            let (length, source) = (*length, *source);
            if !lock(&limiter).allow(source.ip(), now) {
                names.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            let query = &buffers[index][..length];
            match answer(&answerer, &names, query, Transport::Udp) {
                Outcome::Reply { bytes, .. } => replies.push((bytes, source)),
                Outcome::Forward { .. } => {
                    let (Some(upstream), Ok(permit)) = (upstream, forwards.clone().try_acquire_owned()) else { continue };
                    let (socket, query) = (socket.clone(), query.to_vec());
                    runtime.spawn(async move {
                        let _permit = permit;
                        match forward(upstream, &query).await {
                            Ok(reply) => {
                                let _ = socket.send_to(&reply, source);
                            }
                            Err(error) => tracing::debug!(%upstream, error = format!("{error:#}"), "DNS forward failed"),
                        }
                    });
                }
                Outcome::Drop => {}
            }
        }
        send_replies(&socket, &mut send_headers, &replies);
    }
}

/// Writes the answers of one burst with one `sendmmsg`; what it did not take goes one by one.
fn send_replies(
    socket: &std::net::UdpSocket,
    headers: &mut nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
    replies: &[(Vec<u8>, SocketAddr)],
) {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmmsg};
    use std::os::fd::AsRawFd;
    if replies.is_empty() {
        return;
    }
    let slices: Vec<[std::io::IoSlice<'_>; 1]> = replies.iter().map(|(bytes, _)| [std::io::IoSlice::new(bytes)]).collect();
    let addresses: Vec<Option<SockaddrStorage>> = replies.iter().map(|(_, address)| Some(SockaddrStorage::from(*address))).collect();
    let no_control: [ControlMessage<'_>; 0] = [];
    let sent = match sendmmsg(socket.as_raw_fd(), headers, slices.iter(), &addresses, no_control, MsgFlags::MSG_DONTWAIT) {
        Ok(results) => results.count(),
        Err(_) => 0,
    };
    for (bytes, address) in replies.iter().skip(sent) {
        let _ = socket.send_to(bytes, address);
    }
}

fn socket_address(storage: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(address) = storage.as_sockaddr_in() {
        return Some(SocketAddr::from((address.ip(), address.port())));
    }
    storage.as_sockaddr_in6().map(|address| SocketAddr::new(IpAddr::V6(address.ip()), address.port()))
}

async fn serve_tcp(
    listener: tokio::net::TcpListener,
    answerer: Arc<Answerer>,
    names: Arc<Names>,
    limiter: Arc<Mutex<RateLimiter>>,
    upstream: Option<SocketAddr>,
) {
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let Ok(permit) = clients.clone().acquire_owned().await else { return };
        let (mut stream, source) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (answerer, names, limiter) = (answerer.clone(), names.clone(), limiter.clone());
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                // RFC 1035 4.2.2 / RFC 7766: each message after a two-byte length
                let mut length = [0u8; 2];
                let Ok(Ok(_)) = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut length)).await else { return };
                let mut query = vec![0u8; u16::from_be_bytes(length) as usize];
                let Ok(Ok(_)) = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await else { return };
                if !lock(&limiter).allow(source.ip(), Instant::now()) {
                    names.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                let reply = match answer(&answerer, &names, &query, Transport::Tcp) {
                    Outcome::Reply { bytes, .. } => bytes,
                    Outcome::Forward { .. } => match upstream {
                        Some(upstream) => match forward(upstream, &query).await {
                            Ok(reply) => reply,
                            Err(_) => return,
                        },
                        None => return,
                    },
                    Outcome::Drop => return,
                };
                let Ok(length) = u16::try_from(reply.len()) else { return };
                if stream.write_all(&length.to_be_bytes()).await.is_err() || stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
    }
}
