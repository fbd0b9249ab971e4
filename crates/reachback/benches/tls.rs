//! What security by default costs, measured in one run on one machine (release build):
//!
//! - enrollments per second over HTTPS (the internal CA's certificate, TLS 1.3,
//!   keep-alive connections) against plain HTTP, two servers side by side on SQLite,
//!   rounds alternating between them so drift hits both; medians and their ratio
//!   (goal ≥ 0.8);
//! - renewing 2,000 device certificates at once over the API (each request signed
//!   with the device's enrolled key; the server verifies, signs and audits each):
//!   seconds for all, renewals per second.
//!
//!   cargo bench -p reachback --bench tls
//!
//! REACHBACK_BENCH_ROUNDS (default 6 per server) and REACHBACK_BENCH_ROUND (default
//! 10,000 enrollments) size the enrollment part; REACHBACK_BENCH_CONNECTIONS (64).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

struct Server {
    child: Child,
    port: u16,
    /// the internal CA's certificate when the server speaks HTTPS
    ca_pem: Option<String>,
}

impl Server {
    /// A server on 0.0.0.0 (HTTPS by default) or 127.0.0.1 (plain HTTP).
    fn start(data_dir: &std::path::Path, https: bool) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let listen = if https { format!("0.0.0.0:{port}") } else { format!("127.0.0.1:{port}") };
        let child = Command::new(BIN)
            .args(["server", "--listen", &listen, "--tunnel-listen", "127.0.0.1:0", "--bootstrap-token", TOKEN, "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("server");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let ca_pem = https.then(|| std::fs::read_to_string(data_dir.join("ca.pem")).expect("ca.pem"));
        Server { child, port, ca_pem }
    }

    fn client(&self) -> reachback_tunnel::ApiClient {
        let base = if self.ca_pem.is_some() { format!("https://127.0.0.1:{}", self.port) } else { format!("http://127.0.0.1:{}", self.port) };
        let pin = self.ca_pem.as_deref().map(|pem| reachback_tunnel::api_client::pin_of_pem(pem).expect("pin"));
        reachback_tunnel::ApiClient::new(&base, &reachback_tunnel::ApiTrust { ca_pin: pin, insecure_http: false }, Duration::from_secs(600)).expect("client")
    }

    fn tls(&self) -> Option<tokio_rustls::TlsConnector> {
        let pem = self.ca_pem.as_ref()?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
            roots.add(certificate.expect("CA")).expect("root");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api(client: &reachback_tunnel::ApiClient, method: &str, path: &str, body: Value) -> Value {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(client.url(path))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .expect("request");
    let mut reply = client.agent.run(request).expect("request");
    serde_json::from_str(&reply.body_mut().read_to_string().unwrap_or_default()).unwrap_or(Value::Null)
}

/// Sends requests on one keep-alive connection until `next` passes `total`; counts replies whose status line holds `expect`.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    next: Arc<AtomicUsize>,
    total: usize,
    expect: &str,
    request: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>,
) -> usize {
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    let mut matched = 0;
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= total {
            return matched;
        }
        writer.write_all(&request(index)).await.expect("write");
        writer.flush().await.expect("flush");
        line.clear();
        reader.read_line(&mut line).await.expect("status line");
        if line.contains(expect) {
            matched += 1;
        }
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).await.expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).await.expect("body");
    }
}

/// `total` requests over `connections` keep-alive connections (TLS when `tls`); (seconds, matched).
async fn load(
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    connections: usize,
    total: usize,
    expect: &'static str,
    request: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>,
) -> (f64, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, request, tls) = (next.clone(), request.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            match tls {
                Some(tls) => {
                    let name = ServerName::try_from("127.0.0.1").expect("name");
                    let stream = tls.connect(name, stream).await.expect("TLS");
                    drive(stream, next, total, expect, request).await
                }
                None => drive(stream, next, total, expect, request).await,
            }
        }));
    }
    let mut matched = 0;
    for task in tasks {
        matched += task.await.expect("task");
    }
    (started.elapsed().as_secs_f64(), matched)
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|arg| arg == "--list" || arg == "--test") {
        return;
    }
    let number = |name: &str, default: usize| std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default);
    let rounds = number("REACHBACK_BENCH_ROUNDS", 6);
    let round = number("REACHBACK_BENCH_ROUND", 10_000);
    let connections = number("REACHBACK_BENCH_CONNECTIONS", 64);
    println!("{}", reachback_testkit::machine_line());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let base = std::env::temp_dir().join(format!("reachback_bench_tls_{}", std::process::id()));
    let servers: Vec<(&str, Server)> = [("http", false), ("https", true)]
        .into_iter()
        .map(|(label, https)| {
            let dir = base.join(label);
            let _ = std::fs::remove_dir_all(&dir);
            (label, Server::start(&dir, https))
        })
        .collect();
    let public_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key").public_key_pem();
    let mut keys = Vec::new();
    for (_, server) in &servers {
        let client = server.client();
        api(&client, "POST", "/api/v1/ip-ranges", json!({"name": "bench", "range": "100.64.0.0/10"}));
        keys.push(
            api(&client, "POST", "/api/v1/enrollment-keys", json!({"username": "bench@corp.example", "reusable": true}))["key"]
                .as_str()
                .expect("key")
                .to_string(),
        );
    }

    println!("## Enrollments over HTTPS against HTTP ({connections} keep-alive connections, {round} per round, rounds alternating)");
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
    for round_number in 0..rounds {
        for (index, (label, server)) in servers.iter().enumerate() {
            let key = keys[index].clone();
            let public_key = public_key.clone();
            let offset = round_number * round;
            let request = Arc::new(move |n: usize| {
                let body = json!({"enrollment_key": key, "hostname": format!("d{}.bench.example", offset + n), "platform": "linux", "public_key": public_key});
                post("/api/v1/enroll", &body.to_string())
            });
            let (seconds, created) = runtime.block_on(load(server.port, server.tls(), connections, round, " 201 ", request));
            assert_eq!(created, round, "{label}: every enrollment succeeds");
            rates[index].push(round as f64 / seconds);
        }
    }
    let (http, https) = (median(rates[0].clone()), median(rates[1].clone()));
    println!("| transport | enrollments/s, median of {rounds} rounds | rounds |");
    println!("|---|---|---|");
    for (index, (label, _)) in servers.iter().enumerate() {
        println!("| {label} | {:.0} | {} |", median(rates[index].clone()), rates[index].iter().map(|rate| format!("{rate:.0}")).collect::<Vec<_>>().join(", "));
    }
    println!("HTTPS ÷ HTTP = {:.2} (goal ≥ 0.8)", https / http);

    // renewing 2,000 certificates at once: devices enrolled with P-256 keys of their own,
    // then each asks for a renewal signed with its key, all over the same connections
    println!("\n## Renewing 2,000 device certificates at once (API, HTTPS, {connections} connections)");
    let (_, server) = &servers[1];
    let client = server.client();
    let rng = ring::rand::SystemRandom::new();
    let mut devices = Vec::new();
    for index in 0..2_000 {
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("key");
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        let public_pem = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("rcgen key").public_key_pem();
        let answer = api(
            &client,
            "POST",
            "/api/v1/enroll",
            json!({"enrollment_key": keys[1], "hostname": format!("renew{index}.bench.example"), "platform": "linux", "public_key": public_pem}),
        );
        devices.push((answer["device_id"].as_str().expect("device").to_string(), public_pem, pair));
    }
    let signed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        devices
            .iter()
            .map(|(id, public_pem, pair)| {
                let message = reachback_proto::renewal::renewal_message("device", id, signed_at);
                let signature = pair.sign(&rng, message.as_bytes()).expect("sign");
                let body = json!({"public_key": public_pem, "signed_at": signed_at, "signature": base64::engine::general_purpose::STANDARD.encode(signature.as_ref())});
                post(&format!("/api/v1/devices/{id}/renew"), &body.to_string())
            })
            .collect(),
    );
    let request = Arc::new(move |n: usize| requests[n].clone());
    let (seconds, renewed) = runtime.block_on(load(server.port, server.tls(), connections, 2_000, " 200 ", request));
    assert_eq!(renewed, 2_000, "every renewal succeeds");
    println!("2,000 renewals in {seconds:.2} s: {:.0} renewals/s (each: signature check, a certificate signed, an audit row written)", 2_000.0 / seconds);
    drop(servers);
    let _ = std::fs::remove_dir_all(&base);
}
