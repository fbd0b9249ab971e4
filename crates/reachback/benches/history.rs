//! Binding-history benchmark: `GET /ip-bindings/history?ip=&at=` (who held this
//! address at that instant) against a release server whose history holds
//! 10,000,000 intervals: 65,536 addresses, each bound and released about 150
//! times over ten months by users and hosts drawn from 5,000 of each. Prints
//! p50/p99 for the trace a security analyst runs (`ip` + `at`) at random
//! addresses and instants, and, for comparison in the same run, the same address
//! without `at` (its newest intervals) and `at` alone (every address held then).
//!
//!   cargo bench -p reachback --bench history                            # SQLite
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p reachback --bench history                          # and PostgreSQL
//!
//! REACHBACK_BENCH_HISTORY_ROWS (default 10000000); REACHBACK_BENCH_QUERIES (default 2000).

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::Connection;

use reachback_server::request::format_time;
use reachback_testkit::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";
/// The first interval's start (2026-01-01T00:00:00Z) in µs.
const T0: i64 = 1_767_225_600_000_000;
/// One interval: two days, minus a millisecond between holders.
const SPAN: i64 = 2 * 86_400_000_000;
const ADDRESSES: i64 = 65_536;

fn start(data_dir: &std::path::Path, database: Option<&str>) -> ServerProcess {
    ServerProcess::start(BIN, TOKEN, data_dir, database)
}

/// Fills the history with `rows` intervals in statements of 1,000,000.
async fn seed(url: &str, postgres: bool, rows: i64) {
    let mut connection = sqlx::AnyConnection::connect(url).await.expect("database");
    let per_address = rows / ADDRESSES;
    let chunk = 1_000_000i64;
    let mut first = 0i64;
    let started = Instant::now();
    while first < rows {
        let last = (first + chunk).min(rows) - 1;
        // n: the row number; a = n % 65,536 the address; k = n / 65,536 its k-th interval
        let (series, key, text, pad) = if postgres {
            (
                format!("SELECT n FROM generate_series({first}::bigint, {last}::bigint) AS n"),
                "decode('04000000000000000000000000' || lpad(to_hex(1681915904 + (n % 65536)), 8, '0'), 'hex')",
                "'100.64.' || ((n % 65536) / 256) || '.' || (n % 256)",
                "lpad(((n * 7 + n / 65536) % 5000)::text, 4, '0')",
            )
        } else {
            (
                format!("WITH RECURSIVE s(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM s WHERE n < {last}) SELECT n FROM s"),
                "unhex('04000000000000000000000000' || printf('%08x', 1681915904 + (n % 65536)))",
                "'100.64.' || ((n % 65536) / 256) || '.' || (n % 256)",
                "printf('%04d', (n * 7 + n / 65536) % 5000)",
            )
        };
        let sql = format!(
            "INSERT INTO binding_history (ip_key, ip, device_id, username, client_hostname, platform, range_id, range_name, bound_at, bound_reason, released_at, reason) \
             SELECT {key}, {text}, 'dev-' || {pad}, 'u' || {pad} || '@corp.example', 'host-' || {pad} || '.corp.example', 'windows', 'bench', 'Bench', \
                    {T0} + (n / 65536) * {SPAN} + (n % 65536) * 1000, 'enrolled', \
                    CASE WHEN n / 65536 >= {per_address} - 1 THEN NULL ELSE {T0} + (n / 65536 + 1) * {SPAN} + (n % 65536) * 1000 - 1000 END, \
                    CASE WHEN n / 65536 >= {per_address} - 1 THEN NULL ELSE 'admin_release' END \
             FROM ({series}) AS numbers"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut connection).await.expect("seed");
        first = last + 1;
        println!("  seeded {first} rows ({:.0} s)", started.elapsed().as_secs_f64());
    }
    let analyze = if postgres { "ANALYZE binding_history" } else { "ANALYZE" };
    sqlx::raw_sql(analyze).execute(&mut connection).await.expect("analyze");
}

/// A second number drawn from one (a different bit mix), up to 2^48.
fn spread(value: u64) -> u64 {
    value.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * fraction).round() as usize]
}

fn measure(base: &str, label: &str, queries: usize, seed: u64, query: impl Fn(u64) -> String) -> (f64, f64) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state >> 17
    };
    // warm-up
    for _ in 0..50 {
        let _ = agent.get(&format!("{base}/api/v1/ip-bindings/history?{}", query(next()))).header("authorization", format!("Bearer {TOKEN}")).call();
    }
    let mut times = Vec::with_capacity(queries);
    let mut matched = 0usize;
    for _ in 0..queries {
        let url = format!("{base}/api/v1/ip-bindings/history?{}", query(next()));
        let started = Instant::now();
        let mut reply = agent.get(&url).header("authorization", format!("Bearer {TOKEN}")).call().expect("answer");
        let body = reply.body_mut().read_to_string().unwrap_or_default();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(reply.status(), 200, "{url}: {body}");
        if !body.contains("\"total\":0") {
            matched += 1;
        }
    }
    times.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    println!("  {label:<42} p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   ({matched}/{queries} answered with rows)");
    (p50, p99)
}

fn run(label: &str, database: Option<(&str, &str)>) {
    let rows: i64 = std::env::var("REACHBACK_BENCH_HISTORY_ROWS").ok().and_then(|value| value.parse().ok()).unwrap_or(10_000_000);
    let queries: usize = std::env::var("REACHBACK_BENCH_QUERIES").ok().and_then(|value| value.parse().ok()).unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("reachback-history-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // the first start makes the schema; the history is filled while no server runs
    drop(start(&dir, database.map(|(server_url, _)| server_url)));
    let url = match database {
        Some((_, seed_url)) => seed_url.to_string(),
        None => format!("sqlite://{}?mode=rwc", dir.join("reachback.db").display()),
    };
    sqlx::any::install_default_drivers();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    println!("{label}: seeding {rows} intervals");
    let started = Instant::now();
    runtime.block_on(seed(&url, database.is_some(), rows));
    println!("{label}: seeded in {:.0} s", started.elapsed().as_secs_f64());
    let server = start(&dir, database.map(|(server_url, _)| server_url));
    let per_address = rows / ADDRESSES;
    let end = T0 + per_address * SPAN;
    let address = |value: u64| format!("100.64.{}.{}", (value >> 8) % 256, value % 256);
    let at = move |value: u64| format_time(T0 - 5 * 86_400_000_000 + (value as i64 % (end - T0 + 10 * 86_400_000_000)));
    println!("{label}: {queries} queries each, random addresses and instants over the whole period");
    let (_, p99) = measure(&server.base, "ip + at (the trace)", queries, 1, |value| format!("ip={}&at={}", address(value), at(spread(value))));
    measure(&server.base, "ip + at, sorted by bound_at", queries, 2, |value| format!("ip={}&at={}&sort=bound_at", address(value), at(spread(value))));
    measure(&server.base, "ip alone (newest intervals first)", queries, 3, |value| format!("ip={}", address(value)));
    measure(&server.base, "ip + from/to (one week)", queries, 4, |value| {
        let from = T0 + spread(value) as i64 % (end - T0);
        format!("ip={}&from={}&to={}", address(value), format_time(from), format_time(from + 7 * 86_400_000_000))
    });
    println!("{label}: the trace at p99 {p99:.2} ms (goal < 20 ms) over {rows} intervals");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    run("sqlite", None);
    if let Ok(url) = std::env::var("REACHBACK_BENCH_POSTGRES") {
        let database = format!("history_bench_{}", std::process::id());
        assert!(Command::new("psql").args([url.as_str(), "-qc", &format!("CREATE DATABASE {database}")]).status().expect("psql").success());
        let (base, _) = url.rsplit_once('/').expect("url");
        let target = format!("{base}/{database}");
        run("postgres", Some((&target, &target)));
        let _ = Command::new("psql").args([url.as_str(), "-qc", &format!("DROP DATABASE {database} WITH (FORCE)")]).status();
    }
}
