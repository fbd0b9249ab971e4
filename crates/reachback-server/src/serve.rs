//! Serving the API: HTTP/1.1 over TCP, with TLS whenever the listen address is
//! not loopback (the operator's certificate, or one the internal CA issues and
//! renews), a cap on connections, a header-read timeout, a TLS-handshake timeout
//! and graceful shutdown.
//!
//! Our own accept loop over hyper rather than `axum::serve`: the latter has no
//! TLS, no header-read timeout and no connection cap.

use std::future::Future;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use reachback_tunnel::tls::CertificateSlot;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::state::{AppState, HttpLimits, ServerConfig};

/// Marks a request that arrived over our own TLS (the console's cookie is then `Secure`).
#[derive(Clone, Copy, Debug)]
pub struct ServedOverTls;

/// Where the API's certificate comes from.
#[derive(Clone, Debug)]
pub enum ApiCertificate {
    /// the operator's PEM files (`--tls-cert`, `--tls-key`), re-read on SIGHUP
    Files { certificate: PathBuf, key: PathBuf },
    /// issued by the internal CA for these names, renewed before it expires
    Internal { names: Vec<String> },
}

/// How the API is served: `None` is plain HTTP.
pub fn api_certificate(config: &ServerConfig) -> Option<ApiCertificate> {
    if let Some((certificate, key)) = &config.tls_files {
        return Some(ApiCertificate::Files { certificate: certificate.clone(), key: key.clone() });
    }
    if config.listen.ip().is_loopback() || config.insecure_http {
        return None;
    }
    let names = if config.api_names.is_empty() { default_api_names(config.listen.ip()) } else { config.api_names.clone() };
    Some(ApiCertificate::Internal { names })
}

/// The host name and the listen address, or for a wildcard every local address
/// (and `localhost`, so `ctl` on the server host works by either).
pub fn default_api_names(listen: IpAddr) -> Vec<String> {
    let mut names = vec![crate::state::local_host_name()];
    if listen.is_unspecified() {
        names.push("localhost".into());
        let addresses =
            if_addrs::get_if_addrs().map(|interfaces| interfaces.into_iter().map(|interface| interface.ip()).collect()).unwrap_or_else(|_| Vec::new());
        for address in addresses {
            // a wildcard of one family still accepts the other on dual-stack sockets; name both
            if !(address.is_unspecified() || address.is_ipv6() && is_link_local_v6(&address)) {
                names.push(address.to_string());
            }
        }
        names.push("127.0.0.1".into());
        names.push("::1".into());
    } else {
        names.push(listen.to_string());
    }
    let mut unique = Vec::new();
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
}

fn is_link_local_v6(address: &IpAddr) -> bool {
    matches!(address, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS side of the API: the acceptor and the task that keeps its certificate fresh.
pub struct ApiTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub slot: Arc<CertificateSlot>,
    pub source: ApiCertificate,
}

fn read_files(certificate: &PathBuf, key: &PathBuf) -> anyhow::Result<(String, String)> {
    let chain = std::fs::read_to_string(certificate).with_context(|| format!("reading --tls-cert {}", certificate.display()))?;
    let key = std::fs::read_to_string(key).with_context(|| format!("reading --tls-key {}", key.display()))?;
    Ok((chain, key))
}

impl ApiTls {
    /// Loads or issues the API's certificate.
    pub fn new(state: &AppState, source: ApiCertificate) -> anyhow::Result<ApiTls> {
        let (chain, key) = match &source {
            ApiCertificate::Files { certificate, key } => read_files(certificate, key)?,
            ApiCertificate::Internal { names } => state.ca.sign_api(names, state.config.certificate_lifetime)?,
        };
        let slot = Arc::new(CertificateSlot::new(&chain, &key)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ApiTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), slot, source })
    }

    /// Keeps the certificate fresh: an internal one is issued anew once two thirds of
    /// its lifetime have passed; the operator's files are read again on SIGHUP.
    pub fn spawn_upkeep(&self, state: std::sync::Weak<AppState>) -> tokio::task::JoinHandle<()> {
        let slot = self.slot.clone();
        let source = self.source.clone();
        tokio::spawn(async move {
            match source {
                ApiCertificate::Internal { names } => loop {
                    let wait = slot.until_renewal(SystemTime::now()).clamp(Duration::from_millis(200), Duration::from_secs(3600));
                    tokio::time::sleep(wait).await;
                    let Some(state) = state.upgrade() else { return };
                    if !slot.due_for_renewal(SystemTime::now()) {
                        continue;
                    }
                    match state.ca.sign_api(&names, state.config.certificate_lifetime).and_then(|(chain, key)| slot.replace(&chain, &key)) {
                        Ok(()) => tracing::info!("the API's certificate was renewed"),
                        Err(error) => tracing::warn!(error = format!("{error:#}"), "could not renew the API's certificate"),
                    }
                },
                ApiCertificate::Files { certificate, key } => {
                    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
                    while hangup.recv().await.is_some() {
                        match read_files(&certificate, &key).and_then(|(chain, key)| slot.replace(&chain, &key)) {
                            Ok(()) => tracing::info!(certificate = %certificate.display(), "the API's certificate was read again (SIGHUP)"),
                            Err(error) => tracing::warn!(error = format!("{error:#}"), "SIGHUP: keeping the current certificate"),
                        }
                    }
                }
            }
        })
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open
/// requests finish (up to 10 s).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // at the cap, stop accepting: further clients wait in the kernel's backlog
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.context("connection slots")?,
            _ = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // out of descriptors or similar: back off instead of spinning
                    tracing::warn!(%error, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let router = router.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            // a write that makes no progress for as long as a request head may take ends the connection
            let write_timeout = limits.header_read_timeout;
            match tls {
                None => serve_connection(TokioIo::new(WriteTimeout::new(stream, write_timeout)), router, remote, false, &limits, stop).await,
                Some(acceptor) => match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(WriteTimeout::new(stream, write_timeout))).await {
                    Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), router, remote, true, &limits, stop).await,
                    Ok(Err(error)) => tracing::debug!(%remote, %error, "API TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "API TLS handshake timed out"),
                },
            }
        });
    }
    let _ = stop_tx.send(true);
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await.is_err() {
        tracing::info!("some API connections were still open at shutdown");
    }
    Ok(())
}

/// A connection whose writes must make progress: a client that stops reading its
/// answers (a full socket buffer) is cut off after `timeout` instead of holding its
/// connection slot for ever. Reads are untouched (the header-read timeout bounds them).
struct WriteTimeout<I> {
    inner: I,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteTimeout<I> {
    fn new(inner: I, timeout: Duration) -> Self {
        WriteTimeout { inner, timeout, stalled: None }
    }

    /// After the inner writer said "pending": starts the clock, or reports that it ran out.
    fn check(&mut self, context: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Error> {
        let timeout = self.timeout;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(context) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(context, buffer)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<I> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>, data: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(context, data) {
            std::task::Poll::Pending => self.check(context).map(Err),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(context) {
            std::task::Poll::Pending => self.check(context).map(Err),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write_vectored(context, buffers) {
            std::task::Poll::Pending => self.check(context).map(Err),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn serve_connection<I>(io: TokioIo<I>, router: Router, remote: SocketAddr, over_tls: bool, limits: &HttpLimits, mut stop: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        if over_tls {
            request.extensions_mut().insert(ServedOverTls);
        }
        tower::ServiceExt::oneshot(router.clone(), request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%remote, %error, "API connection ended with an error");
            }
        }
        _ = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
