//! Scale-out benchmark (issue 21): N agents (10,000 by default) held by three
//! `reachback server` replicas (release build) on one PostgreSQL database, on this
//! machine. The agents run in this process — the agent library's own `run` (real
//! TLS 1.3 with client certificates, the real multiplexer, the control loop with its
//! keepalives), each in its own state directory — and name all three replicas'
//! tunnel endpoints, so they spread over them as real agents do (shuffled at each
//! connection attempt).
//!
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p reachback --bench scale
//!
//! Measures and prints: enrollments (through the API, the agent library's `enroll`);
//! the time to connect every agent (in waves); sessions per replica (the registry's
//! count and each replica's own gauge); each replica's resident memory and open file
//! descriptors before and after its sessions (per session); the CPU each replica,
//! PostgreSQL and this process (the agents) spend over an idle window with every
//! session held (keepalives, heartbeats, the devices' last-seen touch); the database
//! writes in that window (commits, rows inserted/updated/deleted per table, WAL
//! bytes); the rows and bytes the database holds per agent; then flows to a random
//! agent through a random replica (a SOCKS5 connector attached to each replica,
//! connect + 1-byte echo + close), their p50 and p99 and failures.
//!
//! REACHBACK_BENCH_AGENTS (10000), REACHBACK_BENCH_IDLE_SECONDS (120: two of the
//! devices' one-minute touches),
//! REACHBACK_BENCH_FLOWS (200), REACHBACK_BENCH_WAVE (agents started at once, 500),
//! REACHBACK_BENCH_SERVER_ARGS (more arguments for every replica, space-separated,
//! e.g. `--client-keepalive 10` where the server has that flag), REACHBACK_BENCH_BINARY
//! (another `reachback` binary as the replicas), REACHBACK_BENCH_REPLICA_NOFILE (the
//! replicas' soft open-file limit, e.g. 1024 as in a shell).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reachback_testkit::bench::{Process, env_number, free_port};
use reachback_testkit::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";

fn http() -> ureq::Agent {
    reachback_testkit::bench::http(Duration::from_secs(60))
}

fn call(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    reachback_testkit::bench::call(agent, TOKEN, method, url, body)
}
const REPLICAS: usize = 3;
/// Open files this process and the replicas (which inherit it) may hold.
const FILE_LIMIT: u64 = 65_536;

/// `psql -At` of one query on `url`: rows of `|`-separated cells.
fn psql(url: &str, query: &str) -> Vec<Vec<String>> {
    let output = Command::new("psql").args([url, "-qAtc", query]).output().expect("psql");
    assert!(output.status.success(), "psql {query}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|line| line.split('|').map(str::to_string).collect()).collect()
}

fn psql_number(url: &str, query: &str) -> f64 {
    psql(url, query).first().and_then(|row| row.first()).and_then(|cell| cell.parse().ok()).unwrap_or(f64::NAN)
}

/// Resident memory of a process (VmRSS), bytes.
fn rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib * 1024.0)
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |entries| entries.count())
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // after the command: state is field 3, utime 14, stime 15
    let field = |index: usize| fields.get(index - 3).and_then(|value| value.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// CPU ticks of every PostgreSQL process of the machine, by process id (the exclusive
/// lock keeps other users away).
fn postgres_ticks() -> HashMap<u32, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return HashMap::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres"))
        .map(|pid| (pid, cpu_ticks(pid)))
        .collect()
}

/// The ticks PostgreSQL spent between two readings: processes that lived through both,
/// and the whole of those that started meanwhile (those that ended are lost).
fn postgres_spent(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after.iter().map(|(pid, ticks)| ticks.saturating_sub(before.get(pid).copied().unwrap_or(0))).sum()
}

fn ticks_per_second() -> f64 {
    Command::new("getconf").arg("CLK_TCK").output().ok().and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok()).unwrap_or(100.0)
}

fn mib(bytes: f64) -> f64 {
    bytes / 1_048_576.0
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() as f64 - 1.0) * fraction).round() as usize).min(sorted.len() - 1)]
}

/// A line of the Prometheus text a replica serves, summed over its labels.
fn metric(base: &str, name: &str) -> f64 {
    ureq::get(&format!("{base}/metrics"))
        .call()
        .ok()
        .and_then(|mut reply| reply.body_mut().read_to_string().ok())
        .map(|text| {
            text.lines().filter(|line| line.split(['{', ' ']).next() == Some(name)).filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok()).sum()
        })
        .unwrap_or(f64::NAN)
}

/// SOCKS5 CONNECT through the proxy on `socks`, one byte each way, close: whether it worked.
async fn one_flow(socks: u16, target: SocketAddrV4) -> Result<(), String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", socks)).await.map_err(|error| format!("connect: {error}"))?;
        stream.set_nodelay(true).map_err(|error| error.to_string())?;
        stream.write_all(&[5, 1, 0]).await.map_err(|error| format!("greeting: {error}"))?;
        let mut method = [0u8; 2];
        stream.read_exact(&mut method).await.map_err(|error| format!("method: {error}"))?;
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&target.ip().octets());
        request.extend_from_slice(&target.port().to_be_bytes());
        stream.write_all(&request).await.map_err(|error| format!("request: {error}"))?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).await.map_err(|error| format!("reply: {error}"))?;
        if reply[1] != 0 {
            return Err(format!("SOCKS5 reply {}", reply[1]));
        }
        stream.write_all(b"x").await.map_err(|error| format!("write: {error}"))?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.map_err(|error| format!("echo: {error}"))?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.unwrap_or_else(|_| Err("timed out".into()))
}

/// The agents' local service: an echo on `listener`.
async fn echo(listener: tokio::net::TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut buffer = [0u8; 1024];
            while let Ok(read) = stream.read(&mut buffer).await {
                if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// What one process looked like at one moment.
#[derive(Clone, Copy)]
struct Snapshot {
    rss: f64,
    fds: usize,
    threads: usize,
}

fn snapshot(pid: u32) -> Snapshot {
    Snapshot { rss: rss(pid), fds: fds(pid), threads: threads(pid) }
}

/// The database's write counters: commits, rows inserted/updated/deleted, WAL position (bytes).
#[derive(Clone, Debug)]
struct DbCounters {
    commits: f64,
    inserted: f64,
    updated: f64,
    deleted: f64,
    wal: f64,
    /// table → (inserted, updated, deleted)
    tables: HashMap<String, (f64, f64, f64)>,
}

fn db_counters(admin: &str, name: &str, database: &str) -> DbCounters {
    let row = psql(
        admin,
        &format!(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') FROM pg_stat_database WHERE datname = '{name}'"
        ),
    );
    let cell = |index: usize| row.first().and_then(|row| row.get(index)).and_then(|cell| cell.parse::<f64>().ok()).unwrap_or(f64::NAN);
    let tables = psql(database, "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")
        .into_iter()
        .filter_map(|row| {
            let number = |index: usize| row.get(index).and_then(|cell| cell.parse::<f64>().ok()).unwrap_or(0.0);
            Some((row.first()?.clone(), (number(1), number(2), number(3))))
        })
        .collect();
    DbCounters { commits: cell(0), inserted: cell(1), updated: cell(2), deleted: cell(3), wal: cell(4), tables }
}

/// CPU ticks of the replicas, of this process and of PostgreSQL at one moment.
struct Cpu {
    replicas: Vec<u64>,
    own: u64,
    postgres: HashMap<u32, u64>,
}

fn cpu_now(pids: &[u32]) -> Cpu {
    Cpu { replicas: pids.iter().map(|&pid| cpu_ticks(pid)).collect(), own: cpu_ticks(std::process::id()), postgres: postgres_ticks() }
}

/// What a window cost: CPU-seconds of each replica, of this process and of PostgreSQL,
/// and the database's counters before and after; all per minute of wall time.
struct Window {
    replicas: Vec<f64>,
    own: f64,
    postgres: f64,
    seconds: f64,
    db: Option<(DbCounters, DbCounters)>,
}

impl Window {
    fn between(before: &Cpu, after: &Cpu, seconds: f64, hz: f64) -> Window {
        let per_minute = 60.0 / seconds / hz;
        Window {
            replicas: before.replicas.iter().zip(&after.replicas).map(|(before, after)| after.saturating_sub(*before) as f64 * per_minute).collect(),
            own: after.own.saturating_sub(before.own) as f64 * per_minute,
            postgres: postgres_spent(&before.postgres, &after.postgres) as f64 * per_minute,
            seconds,
            db: None,
        }
    }

    /// Sleeps `seconds` and measures it, the database's counters included.
    fn idle(pids: &[u32], seconds: u64, hz: f64, admin: &str, name: &str, database: &str) -> Window {
        let db_before = db_counters(admin, name, database);
        let before = cpu_now(pids);
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        let after = cpu_now(pids);
        let mut window = Window::between(&before, &after, started.elapsed().as_secs_f64(), hz);
        // PostgreSQL publishes its counters within a second or so of a transaction's end
        std::thread::sleep(Duration::from_millis(1500));
        window.db = Some((db_before, db_counters(admin, name, database)));
        window
    }

    /// A database counter's change per minute.
    fn db_rate(&self, get: impl Fn(&DbCounters) -> f64) -> f64 {
        self.db.as_ref().map_or(f64::NAN, |(before, after)| (get(after) - get(before)) * 60.0 / self.seconds)
    }

    fn print_db(&self) {
        println!(
            "  database per minute: {:.0} transactions committed (read-only ones included), {:.0} rows inserted, {:.0} updated, {:.0} deleted; WAL {:.2} MiB/min (the cluster's)",
            self.db_rate(|counters| counters.commits),
            self.db_rate(|counters| counters.inserted),
            self.db_rate(|counters| counters.updated),
            self.db_rate(|counters| counters.deleted),
            mib(self.db_rate(|counters| counters.wal))
        );
        let Some((before, after)) = &self.db else { return };
        let mut tables: Vec<&String> = after.tables.keys().collect();
        tables.sort();
        for table in tables {
            let (now, then) = (after.tables[table], before.tables.get(table).copied().unwrap_or_default());
            let rate = |now: f64, then: f64| (now - then) * 60.0 / self.seconds;
            let (inserted, updated, deleted) = (rate(now.0, then.0), rate(now.1, then.1), rate(now.2, then.2));
            if inserted + updated + deleted > 0.0 {
                println!("    {table}: {inserted:.0} inserted, {updated:.0} updated, {deleted:.0} deleted per minute");
            }
        }
    }
}

struct Replica {
    process: Process,
    base: String,
    tunnel: String,
    node: String,
}

fn start_replica(index: usize, work: &Path, database: &str, secret: &Path, extra: &[String]) -> Replica {
    let (port, tunnel) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let node = format!("replica-{index}");
    let log = std::fs::File::create(work.join(format!("{node}.log"))).expect("log");
    // REACHBACK_BENCH_REPLICA_NOFILE starts the replicas with that soft open-file limit
    // (as a shell's 1,024), the hard one unchanged
    let binary = std::env::var("REACHBACK_BENCH_BINARY").unwrap_or_else(|_| BIN.to_string());
    let mut command = match std::env::var("REACHBACK_BENCH_REPLICA_NOFILE") {
        Ok(soft) => {
            let mut command = Command::new("prlimit");
            command.arg(format!("--nofile={soft}:")).arg(&binary);
            command
        }
        Err(_) => Command::new(&binary),
    };
    command
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--tunnel-listen", &tunnel, "--broker-endpoints", &tunnel])
        .args(["--bootstrap-token", TOKEN, "--database", database, "--node-name", &node, "--secret-key-file"])
        .arg(secret)
        .arg("--data-dir")
        .arg(work.join(&node))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    let process = Process(command.spawn().expect("server"));
    let base = format!("http://127.0.0.1:{port}");
    wait_for("a replica to be ready", Duration::from_secs(120), || ureq::get(&format!("{base}/readyz")).call().is_ok_and(|reply| reply.status() == 200));
    Replica { process, base, tunnel, node }
}

fn main() {
    if std::env::args().any(|arg| arg == "--list" || arg == "--test") {
        return;
    }
    let Ok(admin_url) = std::env::var("REACHBACK_BENCH_POSTGRES") else {
        println!("REACHBACK_BENCH_POSTGRES not set: three replicas need PostgreSQL; nothing measured");
        return;
    };
    // before the replicas start: they inherit the limit
    let raised = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={FILE_LIMIT}:{FILE_LIMIT}")])
        .status()
        .is_ok_and(|status| status.success());
    if !raised {
        // without CAP_SYS_RESOURCE: as far as the hard limit goes
        let _ = Command::new("prlimit").args(["--pid", &std::process::id().to_string(), "--nofile=unlimited:"]).status();
        let hard =
            Command::new("sh").args(["-c", "ulimit -Hn"]).output().map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string()).unwrap_or_default();
        let _ = Command::new("prlimit").args(["--pid", &std::process::id().to_string(), &format!("--nofile={hard}:")]).status();
    }
    println!("{}", reachback_testkit::machine_line());
    println!("open-file limit of this process and the replicas (inherited): {}", open_file_limit());
    if let Ok(soft) = std::env::var("REACHBACK_BENCH_REPLICA_NOFILE") {
        println!("the replicas are started with a soft open-file limit of {soft}");
    }
    let name = format!("reachback_bench_scale_{}", std::process::id());
    let status = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("CREATE DATABASE {name}")]).status().expect("psql");
    assert!(status.success(), "cannot create the benchmark database");
    let base = admin_url.rsplit_once('/').map(|(base, _)| base.to_string()).unwrap_or(admin_url.clone());
    let database = format!("{base}/{name}");
    // the agents' state directories (four small files each, written with fsync) live in memory when they can
    let scratch = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let work = scratch.join(&name);
    std::fs::create_dir_all(&work).expect("work directory");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&admin_url, &name, &database, &work)));
    let _ = std::fs::remove_dir_all(&work);
    let _ = Command::new("psql").args([admin_url.as_str(), "-qc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")]).status();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The soft and hard open-file limits of this process, as /proc says them.
fn open_file_limit() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .map(|line| line.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" soft, ") + " hard")
        .unwrap_or_default()
}

/// The execution time of one statement as PostgreSQL measures it (EXPLAIN ANALYZE), ms;
/// a write is rolled back.
fn statement_ms(url: &str, statement: &str) -> f64 {
    let output = Command::new("psql")
        .args([url, "-qAt", "-c", "BEGIN", "-c", &format!("EXPLAIN (ANALYZE, FORMAT JSON) {statement}"), "-c", "ROLLBACK"])
        .output()
        .expect("psql");
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find('[').unwrap_or(0);
    let end = text.rfind(']').map_or(text.len(), |end| end + 1);
    serde_json::from_str::<Value>(&text[start..end]).ok().and_then(|plan| plan[0]["Execution Time"].as_f64()).unwrap_or(f64::NAN)
}

fn run(admin_url: &str, name: &str, database: &str, work: &Path) {
    let agents = env_number("REACHBACK_BENCH_AGENTS", 10_000);
    let idle_seconds = env_number("REACHBACK_BENCH_IDLE_SECONDS", 120);
    let baseline_seconds = env_number("REACHBACK_BENCH_BASELINE_SECONDS", 30);
    let flows = env_number("REACHBACK_BENCH_FLOWS", 200);
    let wave = env_number("REACHBACK_BENCH_WAVE", 500).max(1);
    let extra: Vec<String> = std::env::var("REACHBACK_BENCH_SERVER_ARGS").unwrap_or_default().split_whitespace().map(str::to_string).collect();
    let hz = ticks_per_second();
    let secret = work.join("secret.key");
    std::fs::write(&secret, format!("{}\n", "5c".repeat(32))).expect("secret");
    let help = Command::new(BIN).args(["server", "--help"]).output().map(|output| String::from_utf8_lossy(&output.stdout).into_owned()).unwrap_or_default();
    let keepalive = if extra.iter().any(|arg| arg == "--client-keepalive") {
        format!("client keepalive as given ({})", extra.join(" "))
    } else if help.contains("--client-keepalive") {
        "client keepalive: the server's default (--client-keepalive not given)".to_string()
    } else {
        "client keepalive: 10 s (the broker's constant; this build has no --client-keepalive)".to_string()
    };

    let replicas: Vec<Replica> = (0..REPLICAS).map(|index| start_replica(index, work, database, &secret, &extra)).collect();
    let http = http();
    let api = |index: usize, method: &str, path: &str, body: Option<Value>| call(&http, method, &format!("{}/api/v1{path}", replicas[index].base), body);
    let (status, range) = api(0, "POST", "/ip-ranges", Some(json!({"name": "scale", "range": "100.64.0.0/16"})));
    assert_eq!(status, 201, "{range}");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let echo_listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("echo");
    let echo_port = echo_listener.local_addr().expect("address").port();
    runtime.spawn(echo(echo_listener));
    let (status, segment) =
        api(0, "POST", "/app-segments", Some(json!({"name": "scale", "destinations": ["100.64.0.0/16"], "tcp_ports": [echo_port.to_string()]})));
    assert_eq!(status, 201, "{segment}");
    let (status, policy) = api(0, "POST", "/access-policies", Some(json!({"name": "scale", "action": "allow", "segment_ids": [segment["id"]]})));
    assert_eq!(status, 201, "{policy}");
    let (status, key) = api(0, "POST", "/enrollment-keys", Some(json!({"username": "scale@corp.example", "reusable": true})));
    assert_eq!(status, 201, "{key}");
    let key = key["key"].as_str().expect("key").to_string();

    println!(
        "three replicas on PostgreSQL ({agents} agents in this process, each naming all three tunnel endpoints; {keepalive}; replicas' extra arguments: {})",
        if extra.is_empty() { "none".to_string() } else { extra.join(" ") }
    );

    // enrollment: the agent library's own, through replica 0's API, 16 at a time
    let endpoints: Vec<String> = replicas.iter().map(|replica| replica.tunnel.clone()).collect();
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let enrolled: Vec<(usize, PathBuf, Ipv4Addr)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..16)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let number = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if number >= agents {
                            return done;
                        }
                        let state_dir = work.join("agents").join(number.to_string());
                        let options = reachback_agent::EnrollOptions {
                            server: replicas[0].base.clone(),
                            key: key.clone(),
                            hostname: format!("a{number}.scale.example"),
                            platform: "linux".into(),
                            location: None,
                            state_dir: state_dir.clone(),
                            trust: reachback_tunnel::ApiTrust::default(),
                            force: false,
                        };
                        let mut state = reachback_agent::enroll(&options).unwrap_or_else(|error| panic!("enrolling agent {number}: {error:#}"));
                        let ip: Ipv4Addr = state.virtual_ip.as_deref().expect("an address").parse().expect("IPv4");
                        // every replica: the agent shuffles them at each attempt
                        state.broker_endpoints = endpoints.clone();
                        reachback_tunnel::client::save_state(&state_dir, &state).expect("state");
                        done.push((number, state_dir, ip));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|worker| worker.join().expect("enrolling")).collect()
    });
    assert_eq!(enrolled.len(), agents);
    let enroll_seconds = started.elapsed().as_secs_f64();
    println!("  enrolled {agents} agents through replica-0's API in {enroll_seconds:.1} s ({:.0}/s, 16 at a time)", agents as f64 / enroll_seconds);

    let total_sessions = |index: usize| -> f64 {
        let (_, list) = api(index, "GET", "/replicas", None);
        list["items"].as_array().map_or(f64::NAN, |items| items.iter().filter_map(|item| item["client_sessions"].as_f64()).sum())
    };
    // the server's own vacuum after the enrollments' inserts runs within 10 s: not in the baseline
    std::thread::sleep(Duration::from_secs(12));
    let pids: Vec<u32> = replicas.iter().map(|replica| replica.process.0.id()).collect();
    let own = std::process::id();
    let before: Vec<Snapshot> = pids.iter().map(|&pid| snapshot(pid)).collect();
    let own_before = snapshot(own);
    // what the replicas cost with no session at all (heartbeats, registry, listener)
    let baseline = Window::idle(&pids, baseline_seconds as u64, hz, admin_url, name, database);
    let connect_before = cpu_now(&pids);

    // the agents: the library's `run`, in waves (a wave connects before the next starts)
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let allow_ports = reachback_agent::parse_allow_ports(&echo_port.to_string()).expect("ports");
    let congestion = reachback_tunnel::Congestion::resolve(None).expect("congestion control");
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(agents);
    let mut slowest_wave = 0.0f64;
    for chunk in enrolled.chunks(wave) {
        let wave_started = Instant::now();
        for (_, state_dir, _) in chunk {
            let options = reachback_agent::RunOptions {
                state_dir: state_dir.clone(),
                allow_ports: allow_ports.clone(),
                allow_udp_ports: Vec::new(),
                connect_host: std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
                version: "bench".into(),
                tcp_congestion: congestion.clone(),
            };
            let mut stopped = stopped.clone();
            let failures = failures.clone();
            tasks.push(runtime.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(error) = reachback_agent::run(options, shutdown).await
                    && failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5
                {
                    eprintln!("an agent stopped: {error:#}");
                }
            }));
        }
        let want = tasks.len() as f64;
        let limit = Duration::from_secs(env_number("REACHBACK_BENCH_CONNECT_TIMEOUT", 300) as u64);
        while total_sessions(0) < want {
            if wave_started.elapsed() > limit {
                let held = total_sessions(0);
                for replica in &replicas {
                    let log = std::fs::read_to_string(work.join(format!("{}.log", replica.node))).unwrap_or_default();
                    let failed = log.lines().filter(|line| line.contains("accepting a tunnel failed")).count();
                    let example = log.lines().find(|line| line.contains("accepting a tunnel failed")).unwrap_or("").to_string();
                    println!(
                        "  {}: gauge {:.0}; {failed} log lines 'accepting a tunnel failed' {example}",
                        replica.node,
                        metric(&replica.base, "reachback_client_sessions")
                    );
                }
                panic!("only {held:.0} of {want:.0} agents connected {:.0} s after their wave started", wave_started.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        slowest_wave = slowest_wave.max(wave_started.elapsed().as_secs_f64());
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    let connect = Window::between(&connect_before, &cpu_now(&pids), connect_seconds, hz);
    println!(
        "  connected {agents} agents in {connect_seconds:.1} s ({:.0} tunnels/s over the three replicas, waves of {wave}, slowest wave {slowest_wave:.1} s)",
        agents as f64 / connect_seconds
    );
    let spent = |per_minute: f64| per_minute * connect_seconds / 60.0;
    println!(
        "  CPU of the connects: replicas {:.1} s in all = {:.2} ms per tunnel (TLS handshake, hello, session row); PostgreSQL {:.1} s = {:.2} ms per tunnel; the agents {:.1} s = {:.2} ms per tunnel",
        spent(connect.replicas.iter().sum()),
        spent(connect.replicas.iter().sum()) * 1000.0 / agents as f64,
        spent(connect.postgres),
        spent(connect.postgres) * 1000.0 / agents as f64,
        spent(connect.own),
        spent(connect.own) * 1000.0 / agents as f64
    );
    // let the first minute's device touch and every allocation settle
    std::thread::sleep(Duration::from_secs(20));

    // all connected: the registry's count at each replica, and each replica's own gauge
    let (_, list) = api(0, "GET", "/replicas", None);
    let mut sessions = Vec::new();
    for replica in &replicas {
        let item = list["items"].as_array().and_then(|items| items.iter().find(|item| item["node_name"] == replica.node.as_str())).cloned().unwrap_or_default();
        sessions.push(item["client_sessions"].as_f64().unwrap_or(f64::NAN));
    }
    let gauges: Vec<f64> = replicas.iter().map(|replica| metric(&replica.base, "reachback_client_sessions")).collect();
    let counted: Vec<f64> = (0..REPLICAS).map(total_sessions).collect();
    let total: f64 = sessions.iter().sum();
    println!(
        "  sessions (GET /replicas): {} = {total:.0} of {agents}; each replica's gauge: {}; the total as each replica counts it: {}; agents stopped: {}",
        sessions.iter().zip(&replicas).map(|(count, replica)| format!("{} {count:.0}", replica.node)).collect::<Vec<_>>().join(", "),
        gauges.iter().map(|gauge| format!("{gauge:.0}")).collect::<Vec<_>>().join(" + "),
        counted.iter().map(|count| format!("{count:.0}")).collect::<Vec<_>>().join(", "),
        failures.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(total as usize, agents, "every agent holds a session");

    let after: Vec<Snapshot> = pids.iter().map(|&pid| snapshot(pid)).collect();
    let own_after = snapshot(own);
    println!("memory and descriptors (VmRSS, /proc/PID/fd), before the agents → with every session held:");
    let mut per_session_memory = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        let (before, after, count) = (before[index], after[index], gauges[index]);
        let memory = (after.rss - before.rss) / count;
        per_session_memory.push(memory);
        println!(
            "  {}: {count:.0} sessions; RSS {:.1} → {:.1} MiB = {:.1} KiB per session; fds {} → {} = {:.2} per session; threads {} → {}",
            replica.node,
            mib(before.rss),
            mib(after.rss),
            memory / 1024.0,
            before.fds,
            after.fds,
            (after.fds as f64 - before.fds as f64) / count,
            before.threads,
            after.threads
        );
    }
    per_session_memory.sort_by(f64::total_cmp);
    println!("  per session per replica, median of the three: {:.1} KiB", per_session_memory[REPLICAS / 2] / 1024.0);
    println!(
        "  this process (the {agents} agents, their runtime, the echo service): RSS {:.1} → {:.1} MiB = {:.1} KiB per agent; fds {} → {}",
        mib(own_before.rss),
        mib(own_after.rss),
        (own_after.rss - own_before.rss) / agents as f64 / 1024.0,
        own_before.fds,
        own_after.fds
    );

    // the idle window: nothing but keepalives, heartbeats and the devices' touch
    let idle = Window::idle(&pids, idle_seconds as u64, hz, admin_url, name, database);
    println!(
        "idle windows: {:.0} s before the agents (no session), {:.0} s with every session held; CPU-seconds per minute of wall time (1 core = 60):",
        baseline.seconds, idle.seconds
    );
    for (index, replica) in replicas.iter().enumerate() {
        let (without, with) = (baseline.replicas[index], idle.replicas[index]);
        println!(
            "  {}: {without:.2} without sessions → {with:.2} with {:.0} = {:.2} CPU-ms per session per minute over the baseline ({:.2} % of a core in all)",
            replica.node,
            gauges[index],
            (with - without) * 1000.0 / gauges[index],
            with / 60.0 * 100.0
        );
    }
    let (without, with) = (baseline.replicas.iter().sum::<f64>(), idle.replicas.iter().sum::<f64>());
    println!(
        "  the three replicas: {without:.2} → {with:.2} CPU-s/min = {:.2} CPU-ms per session per minute over the baseline",
        (with - without) * 1000.0 / agents as f64
    );
    println!(
        "  PostgreSQL (all its processes): {:.2} → {:.2} CPU-s/min = {:.3} CPU-ms per session per minute over the baseline",
        baseline.postgres,
        idle.postgres,
        (idle.postgres - baseline.postgres) * 1000.0 / agents as f64
    );
    println!("  the agents (this process): {:.2} CPU-s/min = {:.2} CPU-ms per agent per minute", idle.own, idle.own * 1000.0 / agents as f64);
    println!("  without sessions:");
    baseline.print_db();
    println!("  with every session held:");
    idle.print_db();

    // what the database holds per agent
    println!("database rows and bytes (table + indexes + TOAST) per agent, {agents} agents:");
    for table in ["devices", "bindings", "binding_history", "client_sessions", "audit_log", "event_outbox", "flow_log"] {
        let exists = psql_number(database, &format!("SELECT count(*) FROM pg_class WHERE relname = '{table}' AND relkind = 'r'"));
        if exists != 1.0 {
            continue;
        }
        let rows = psql_number(database, &format!("SELECT count(*) FROM {table}"));
        let bytes = psql_number(database, &format!("SELECT pg_total_relation_size('{table}')"));
        println!("  {table}: {rows:.0} rows = {:.2} per agent; {:.1} MiB = {:.0} bytes per agent", rows / agents as f64, mib(bytes), bytes / agents as f64);
    }
    let database_bytes = psql_number(database, "SELECT pg_database_size(current_database())");
    println!("  the whole database: {:.1} MiB = {:.0} bytes per agent", mib(database_bytes), database_bytes / agents as f64);
    // what the replicas' periodic statements cost at this size (median of 5, ms)
    let timed = |statement: &str| {
        let mut times: Vec<f64> = (0..5).map(|_| statement_ms(database, statement)).collect();
        times.sort_by(f64::total_cmp);
        times[2]
    };
    let node = &replicas[0].node;
    println!("  statements at this size ({}: {:.0} sessions), median of 5 (EXPLAIN ANALYZE, writes rolled back):", node, gauges[0]);
    println!(
        "    the registry listing with session counts (every replica, every second): {:.2} ms",
        timed("SELECT r.node_name, (SELECT COUNT(*) FROM client_sessions s WHERE s.broker_node = r.node_name) FROM replicas r ORDER BY r.node_name")
    );
    println!(
        "    one replica's session ids (the session sync: every 30 s and at every session deleted anywhere): {:.2} ms",
        timed(&format!("SELECT id FROM client_sessions WHERE broker_node = '{node}'"))
    );
    println!(
        "    one replica's devices marked seen (every replica, every minute): {:.2} ms",
        timed(&format!("UPDATE devices SET last_seen = last_seen + 1 WHERE id IN (SELECT device_id FROM client_sessions WHERE broker_node = '{node}')"))
    );
    let connections = psql(admin_url, &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'"));
    println!(
        "  PostgreSQL connections to the database from the three replicas: {}",
        connections.first().and_then(|row| row.first()).cloned().unwrap_or_default()
    );

    // flows: a SOCKS5 connector attached to each replica, to a random agent through a random one
    let mut connectors = Vec::new();
    let mut socks_ports = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        let (status, connector) = api(index, "POST", "/connectors", Some(json!({"name": format!("scale-{index}")})));
        assert_eq!(status, 201, "{connector}");
        let provisioning = connector["provisioning_key"].as_str().expect("provisioning key").to_string();
        let socks = free_port();
        let log = std::fs::File::create(work.join(format!("connector-{index}.log"))).expect("log");
        connectors.push(Process(
            Command::new(BIN)
                .args(["connector", "run", "--server", &replica.base, "--key", &provisioning, "--mode", "socks5"])
                .args(["--socks5-listen", &format!("127.0.0.1:{socks}"), "--state-dir"])
                .arg(work.join(format!("connector-{index}")))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("connector"),
        ));
        socks_ports.push(socks);
    }
    let holders: HashMap<Ipv4Addr, String> = psql(database, "SELECT virtual_ip, broker_node FROM client_sessions")
        .into_iter()
        .filter_map(|row| Some((row.first()?.parse().ok()?, row.get(1)?.clone())))
        .collect();
    let first = SocketAddrV4::new(enrolled[0].2, echo_port);
    for &socks in &socks_ports {
        wait_for("a flow through each connector", Duration::from_secs(60), || runtime.block_on(one_flow(socks, first)).is_ok());
    }
    let relayed_metric = || replicas.iter().map(|replica| metric(&replica.base, "reachback_replica_relayed_flows_total")).sum::<f64>() / 2.0;
    let relayed_before = relayed_metric();
    let mut draw = reachback_testkit::Draw(0x5ca1e);
    let mut latencies = [Vec::new(), Vec::new()];
    let mut failed = Vec::new();
    for _ in 0..flows {
        let (_, _, ip) = enrolled[draw.below(agents as u64) as usize];
        let entry = draw.below(REPLICAS as u64) as usize;
        let crossing = holders.get(&ip).is_none_or(|holder| *holder != replicas[entry].node);
        let flow_started = Instant::now();
        match runtime.block_on(one_flow(socks_ports[entry], SocketAddrV4::new(ip, echo_port))) {
            Ok(()) => latencies[usize::from(crossing)].push(flow_started.elapsed().as_secs_f64() * 1e6),
            Err(error) => failed.push(format!("{ip} via {}: {error}", replicas[entry].node)),
        }
    }
    let mut all: Vec<f64> = latencies.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    for list in &mut latencies {
        list.sort_by(f64::total_cmp);
    }
    println!(
        "flows to a random agent through a random replica ({flows} sequential: SOCKS5 connect + 1-byte echo + close): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; failures {}",
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(f64::NAN),
        failed.len()
    );
    println!(
        "  entering at the holding replica: {} flows, p50 {:.0} µs, p99 {:.0} µs; relayed to another replica: {} flows, p50 {:.0} µs, p99 {:.0} µs",
        latencies[0].len(),
        percentile(&latencies[0], 0.5),
        percentile(&latencies[0], 0.99),
        latencies[1].len(),
        percentile(&latencies[1], 0.5),
        percentile(&latencies[1], 0.99)
    );
    println!("  relayed flows counted by the replicas meanwhile (in + out, halved): {:.0}", relayed_metric() - relayed_before);
    for failure in failed.iter().take(10) {
        println!("  failed: {failure}");
    }

    let _ = stop.send(true);
    runtime.block_on(async {
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    });
    drop(connectors);
    drop(replicas);
    runtime.shutdown_timeout(Duration::from_secs(5));
    assert!(failed.is_empty(), "{} flows failed", failed.len());
}
