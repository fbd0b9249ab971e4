//! Bindings listing grid benchmark (issue 23): `GET /api/v1/ip-bindings` and the
//! CSV export's first byte against a release server holding 1,000,000 bindings,
//! swept over the whole grid: no filter, every filter form alone and every pair of
//! two different filters, each sort in both directions, the first, a middle and
//! the last page. Prints p50/p99 per combination, the worst ten, and how many
//! combinations are over the 50 ms goal.
//!
//! Data (seeded in SQL, like `history.rs`): 200 ranges (/18 each, 1,000 to 10,000
//! bindings) in 100 cities, 40 states, 15 countries; 1,000,000 addresses of which
//! 1 % sit in release quarantine; ~400,000 usernames with one to a few devices
//! each and 20 kiosk accounts with ~5,000 devices each; five platforms
//! (40/25/15/10/10 %); hostnames `city-kind-number.dept.corp.example` (shared
//! and unique parts); last updates spread over eight weeks.
//!
//! Every sample draws its filter values at random within the form (an exact
//! username is a one-device user or a kiosk; a substring is a prefix of a few
//! hundred users, "kiosk", "corp", a two-letter needle, one character most values
//! hold several times …), so a combination's
//! p99 covers selective and unselective values alike.
//!
//!   cargo bench -p reachback --bench listing                            # SQLite
//!   REACHBACK_BENCH_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p reachback --bench listing                          # and PostgreSQL
//!
//! REACHBACK_BENCH_BINDINGS (default 1000000); REACHBACK_BENCH_SAMPLES (default 5
//! per combination: with 5 samples the p99 is the slowest); REACHBACK_BENCH_PART
//! `k/n` sweeps the k-th of n slices of the filter sets (1-based), to split a sweep
//! over several runs; REACHBACK_BENCH_DATA keeps the data (an SQLite directory, or
//! with PostgreSQL a database name) and reuses it when it exists;
//! REACHBACK_BENCH_SKIP_SQLITE; REACHBACK_BENCH_BINARY runs another build;
//! REACHBACK_BENCH_ONLY runs only the filter sets whose label contains it.

use reachback_testkit::Draw;
use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use reachback_server::request::format_time;
use reachback_testkit::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_reachback");
const TOKEN: &str = "rbk_bench_bootstrap_token_0123456789";
/// 2026-10-01T00:00:00Z in µs: the first last-update.
const T0: i64 = 1_790_812_800_000_000;
const WEEK: i64 = 7 * 86_400_000_000;
const RANGES: usize = 200;
const PAGE_SIZE: i64 = 50;
const GOAL_MS: f64 = 50.0;

const PREFIXES: [&str; 10] = ["North", "South", "East", "West", "Lake", "Port", "Mount", "Fair", "Glen", "River"];
const SUFFIXES: [&str; 10] = ["field", "haven", "bridge", "ford", "wood", "ton", "dale", "view", "mouth", "stead"];
const COUNTRIES: [&str; 15] = ["FR", "DE", "US", "GB", "JP", "BR", "IN", "CA", "AU", "ES", "IT", "NL", "SE", "PL", "MX"];
const PLATFORMS: [&str; 5] = ["windows", "macos", "linux", "ios", "android"];
const KINDS: [&str; 4] = ["lt", "ws", "vm", "mb"];
const DEPTS: [&str; 6] = ["sales", "eng", "ops", "hr", "fin", "it"];

fn start(data_dir: &std::path::Path, database: Option<&str>) -> ServerProcess {
    ServerProcess::start(&std::env::var("REACHBACK_BENCH_BINARY").unwrap_or_else(|_| BIN.to_string()), TOKEN, data_dir, database)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

/// City `i` (0..100): name, state, country.
fn city(i: usize) -> (String, String, String) {
    let country = COUNTRIES[i % COUNTRIES.len()];
    // 40 states: 2 or 3 per country
    let state = format!("{country}-{}", (i / COUNTRIES.len()) % if i % COUNTRIES.len() < 10 { 3 } else { 2 });
    (format!("{}{}", PREFIXES[i % 10], SUFFIXES[i / 10]), state, country.to_string())
}

/// Range `r`: name, city index, first address (u32), bindings held.
fn range_spec(r: usize, total: i64) -> (String, usize, u32, i64) {
    let city_index = r % 100;
    let kind = if r < 100 { "laptops" } else { "servers" };
    let weights: i64 = (0..RANGES).map(|r| 1 + (r as i64 * 7) % 10).sum();
    let count = if r == RANGES - 1 {
        total - (0..RANGES - 1).map(|r| total * (1 + (r as i64 * 7) % 10) / weights).sum::<i64>()
    } else {
        total * (1 + (r as i64 * 7) % 10) / weights
    };
    (format!("{} {kind}", city(city_index).0), city_index, 0x6440_0000 + (r as u32) * 16_384, count)
}

fn sql_case(expression: &str, values: &[&str]) -> String {
    let arms: Vec<String> = values.iter().enumerate().map(|(index, value)| format!("WHEN {index} THEN '{value}'")).collect();
    format!("CASE {expression} {} END", arms.join(" "))
}

/// Devices and bindings of every range, in SQL: binding number n (over all
/// ranges) decides its device's attributes; every hundredth address is in quarantine.
async fn seed(url: &str, postgres: bool, range_ids: &[String], total: i64) {
    let mut connection = sqlx::AnyConnection::connect(url).await.expect("database");
    let started = Instant::now();
    let mut first_n = 0i64;
    // devices seen now: the idle release (30 days by default) leaves them bound
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_micros() as i64).unwrap_or(0);
    let platform =
        "CASE WHEN n % 20 < 8 THEN 'windows' WHEN n % 20 < 13 THEN 'macos' WHEN n % 20 < 16 THEN 'linux' WHEN n % 20 < 18 THEN 'ios' ELSE 'android' END";
    type Render = fn(&str) -> String;
    let (pad6, pad2, hex8): (Render, Render, Render) = if postgres {
        (|e: &str| format!("lpad(({e})::text, 6, '0')"), |e: &str| format!("lpad(({e})::text, 2, '0')"), |e: &str| format!("lpad(to_hex({e}), 8, '0')"))
    } else {
        (|e: &str| format!("printf('%06d', {e})"), |e: &str| format!("printf('%02d', {e})"), |e: &str| format!("printf('%08x', {e})"))
    };
    let username =
        format!("CASE WHEN n % 10 = 0 THEN 'kiosk' || {} ELSE 'user' || {} END || '@corp.example'", pad2("(n / 10) % 20"), pad6("(n * 7919) % 400000"));
    let kind = sql_case("n % 4", &KINDS);
    let dept = sql_case("(n / 7) % 6", &DEPTS);
    for (r, range_id) in range_ids.iter().enumerate() {
        let (_, city_index, base, count) = range_spec(r, total);
        let site = city(city_index).0.to_lowercase();
        let last_n = first_n + count - 1;
        let series = if postgres {
            format!("SELECT n, n - {first_n} AS i FROM generate_series({first_n}::bigint, {last_n}::bigint) AS n")
        } else {
            format!("WITH RECURSIVE s(n) AS (SELECT {first_n} UNION ALL SELECT n + 1 FROM s WHERE n < {last_n}) SELECT n, n - {first_n} AS i FROM s")
        };
        let hostname = format!("'{site}-' || {kind} || '-' || {} || '.' || {dept} || '.corp.example'", pad6("n"));
        let fingerprint = if postgres { "decode(md5(n::text), 'hex')" } else { "randomblob(16)" };
        let key = if postgres {
            format!("decode('04000000000000000000000000' || {}, 'hex')", hex8(&format!("{base} + 1 + i")))
        } else {
            format!("unhex('04000000000000000000000000' || {})", hex8(&format!("{base} + 1 + i")))
        };
        let ip = format!("'100.' || (({base} + 1 + i) / 65536 % 256) || '.' || (({base} + 1 + i) / 256 % 256) || '.' || (({base} + 1 + i) % 256)");
        let updated = format!("{T0} + ((n * 2654435761) % (8 * {WEEK} / 1000000)) * 1000000 + n % 1000000");
        let sql = format!(
            "INSERT INTO devices (id, hostname, hostname_key, username, platform, public_key_fingerprint, certificate_serial, created_at, last_seen) \
             SELECT 'dev' || {pad}, {hostname}, {hostname}, {username}, {platform}, {fingerprint}, 'serial' || n, {T0}, {now} FROM ({series}) AS numbers WHERE n % 100 <> 99;
             INSERT INTO bindings (ip_key, ip, range_id, device_id, username, platform, client_hostname, last_updated, released_at) \
             SELECT {key}, {ip}, '{range_id}', CASE WHEN n % 100 = 99 THEN NULL ELSE 'dev' || {pad} END, \
                    CASE WHEN n % 100 = 99 THEN NULL ELSE {username} END, CASE WHEN n % 100 = 99 THEN NULL ELSE {platform} END, \
                    CASE WHEN n % 100 = 99 THEN NULL ELSE {hostname} END, {updated}, CASE WHEN n % 100 = 99 THEN {updated} ELSE NULL END \
             FROM ({series}) AS numbers;
             UPDATE ip_ranges SET used_ips = (SELECT COUNT(*) FROM bindings WHERE range_id = '{range_id}' AND device_id IS NOT NULL) WHERE id = '{range_id}';",
            pad = pad6("n"),
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut connection).await.expect("seed");
        first_n = last_n + 1;
        if r % 20 == 19 {
            println!("  seeded {first_n} addresses ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    let analyze = if postgres { "VACUUM ANALYZE" } else { "ANALYZE" };
    sqlx::raw_sql(analyze).execute(&mut connection).await.expect("analyze");
}

/// The filter forms of the grid: (label, parameter, value drawn per sample).
type Form = (&'static str, &'static str, fn(&mut Draw, i64) -> String);

fn bound_n(draw: &mut Draw, total: i64) -> i64 {
    let n = draw.below(total as u64) as i64;
    if n % 100 == 99 { n - 1 } else { n }
}

fn forms() -> Vec<Form> {
    vec![
        ("ip=address", "ip", |draw, _| format!("100.{}.{}.{}", 64 + draw.below(50), draw.below(256), draw.below(256))),
        ("ip=cidr", "ip", |draw, _| {
            let prefix = [24u32, 20, 16, 12][draw.below(4) as usize];
            let value = (0x6440_0000u32 + (draw.below(RANGES as u64 * 16_384) as u32)) & (u32::MAX << (32 - prefix));
            format!("{}.{}.{}.{}/{prefix}", value >> 24, (value >> 16) & 255, (value >> 8) & 255, value & 255)
        }),
        ("range_name=exact", "range_name", |draw, total| range_spec(draw.below(RANGES as u64) as usize, total).0),
        ("range_name=substring", "range_name", |draw, _| {
            ["laptops", "servers", PREFIXES[draw.below(10) as usize], SUFFIXES[draw.below(10) as usize], "o"][draw.below(5) as usize].to_lowercase()
        }),
        ("range_location=city", "range_location", |draw, _| city(draw.below(100) as usize).0),
        ("range_location=state", "range_location", |draw, _| city(draw.below(100) as usize).1),
        ("range_location=country", "range_location", |draw, _| COUNTRIES[draw.below(15) as usize].to_string()),
        ("username=exact", "username", |draw, total| {
            let n = bound_n(draw, total);
            if n % 10 == 0 { format!("kiosk{:02}@corp.example", (n / 10) % 20) } else { format!("user{:06}@corp.example", (n * 7919) % 400_000) }
        }),
        ("username=substring", "username", |draw, _| match draw.below(6) {
            0 => format!("user{:04}", draw.below(10_000)),
            1 => format!("user{:03}", draw.below(1_000)),
            2 => "kiosk".to_string(),
            3 => "corp".to_string(),
            // one character, which nearly every value holds (several times)
            4 => draw.pick(&["e", "r", "o", "@", ".", "1", "7", "k"]).to_string(),
            _ => format!("{}", draw.below(90) + 10),
        }),
        ("platform", "platform", |draw, _| draw.pick(&PLATFORMS).to_string()),
        ("client_hostname=exact", "client_hostname", |draw, total| {
            let n = bound_n(draw, total);
            // the range of binding n: walk the ranges' counts
            let mut first = 0i64;
            let mut city_index = 0;
            for r in 0..RANGES {
                let (_, c, _, count) = range_spec(r, total);
                if n < first + count {
                    city_index = c;
                    break;
                }
                first += count;
            }
            format!("{}-{}-{n:06}.{}.corp.example", city(city_index).0.to_lowercase(), KINDS[(n % 4) as usize], DEPTS[((n / 7) % 6) as usize])
        }),
        ("client_hostname=substring", "client_hostname", |draw, _| match draw.below(6) {
            0 => format!("-{}-", draw.pick(&KINDS)),
            1 => format!(".{}.", draw.pick(&DEPTS)),
            2 => city(draw.below(100) as usize).0.to_lowercase(),
            3 => format!("{:04}", draw.below(10_000)),
            // one character, which nearly every value holds (several times)
            4 => draw.pick(&["e", "a", "o", "t", ".", "-", "0", "s", "l"]).to_string(),
            _ => "corp".to_string(),
        }),
        ("updated=window", "updated_after", |draw, _| {
            let length = [86_400_000_000i64, WEEK, 4 * WEEK][draw.below(3) as usize];
            let from = T0 + draw.below((8 * WEEK - length) as u64 / 1_000_000) as i64 * 1_000_000;
            format!("{}&updated_before={}", format_time(from), format_time(from + length))
        }),
    ]
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>().replace("%26updated_before%3D", "&updated_before=")
}

/// Every filter set of the grid: none, each form, each pair of forms on different parameters.
fn filter_sets() -> Vec<Vec<usize>> {
    let forms = forms();
    let mut sets = vec![Vec::new()];
    sets.extend((0..forms.len()).map(|index| vec![index]));
    for a in 0..forms.len() {
        for b in a + 1..forms.len() {
            if forms[a].1 != forms[b].1 {
                sets.push(vec![a, b]);
            }
        }
    }
    sets
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * fraction).round() as usize]
}

struct Outcome {
    label: String,
    p50: f64,
    p99: f64,
    slowest_query: String,
}

fn timed_get(agent: &ureq::Agent, url: &str) -> (f64, Value) {
    let started = Instant::now();
    let mut reply = agent.get(url).header("authorization", format!("Bearer {TOKEN}")).call().expect("answer");
    let body = reply.body_mut().with_config().limit(u64::MAX).read_to_string().unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(reply.status(), 200, "{url}: {body}");
    (elapsed, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Time to the export's first byte of body (the header row); the rest is dropped.
fn first_byte(agent: &ureq::Agent, url: &str) -> f64 {
    let started = Instant::now();
    let mut reply = agent.get(url).header("authorization", format!("Bearer {TOKEN}")).call().expect("answer");
    let status = reply.status();
    let mut byte = [0u8; 1];
    let mut reader = reply.body_mut().as_reader();
    let _ = reader.read(&mut byte);
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    assert!(status == 200 || status == 413, "{url}: {status}");
    elapsed
}

fn sweep(label: &str, base: &str, total_bindings: i64) -> Vec<Outcome> {
    let samples: usize = std::env::var("REACHBACK_BENCH_SAMPLES").ok().and_then(|value| value.parse().ok()).unwrap_or(5);
    let part = std::env::var("REACHBACK_BENCH_PART").ok().and_then(|value| {
        let (k, n) = value.split_once('/')?;
        Some((k.parse::<usize>().ok()?, n.parse::<usize>().ok()?))
    });
    let only = std::env::var("REACHBACK_BENCH_ONLY").ok();
    let forms = forms();
    let sets = filter_sets();
    let agent = agent();
    let mut outcomes = Vec::new();
    let sorts = ["ip", "username", "platform", "client_hostname", "range_name", "last_updated"];
    for (set_index, set) in sets.iter().enumerate() {
        if let Some((k, n)) = part
            && set_index % n != k - 1
        {
            continue;
        }
        let set_label = if set.is_empty() { "no filter".to_string() } else { set.iter().map(|&index| forms[index].0).collect::<Vec<_>>().join(" + ") };
        if only.as_deref().is_some_and(|only| !set_label.contains(only)) {
            continue;
        }
        let set_started = Instant::now();
        for sort in sorts {
            for descending in [false, true] {
                let sort_text = if descending { format!("-{sort}") } else { sort.to_string() };
                // per page kind (first, middle, last, export first byte): times and the slowest query
                let mut times: [Vec<(f64, String)>; 4] = Default::default();
                for sample in 0..samples {
                    let mut draw = Draw((set_index as u64) << 32 ^ (sample as u64) << 8 ^ 0x5eed);
                    let filters: Vec<String> =
                        set.iter().map(|&index| format!("{}={}", forms[index].1, encode(&(forms[index].2)(&mut draw, total_bindings)))).collect();
                    let mut query = filters.join("&");
                    if !query.is_empty() {
                        query.push('&');
                    }
                    query.push_str(&format!("sort={sort_text}"));
                    let first = format!("{base}/api/v1/ip-bindings?{query}&page=1&page_size={PAGE_SIZE}");
                    let (elapsed, body) = timed_get(&agent, &first);
                    times[0].push((elapsed, first));
                    let total = body["total"].as_i64().unwrap_or(0);
                    let pages = ((total + PAGE_SIZE - 1) / PAGE_SIZE).max(1);
                    for (slot, page) in [(1usize, (pages + 1) / 2), (2, pages)] {
                        let url = format!("{base}/api/v1/ip-bindings?{query}&page={page}&page_size={PAGE_SIZE}");
                        let (elapsed, _) = timed_get(&agent, &url);
                        times[slot].push((elapsed, url));
                    }
                    let export = format!("{base}/api/v1/ip-bindings/export.csv?{query}");
                    times[3].push((first_byte(&agent, &export), export));
                }
                for (slot, kind) in ["first page", "middle page", "last page", "export 1st byte"].iter().enumerate() {
                    let mut sorted = times[slot].clone();
                    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let values: Vec<f64> = sorted.iter().map(|(time, _)| *time).collect();
                    let (p50, p99) = (percentile(&values, 0.5), percentile(&values, 0.99));
                    let slowest_query = sorted.last().map(|(_, url)| url.trim_start_matches(base).to_string()).unwrap_or_default();
                    let label = format!("{set_label} | sort={sort_text} | {kind}");
                    println!("{label:<92} p50 {p50:>8.2} ms  p99 {p99:>8.2} ms{}", if p99 > GOAL_MS { "  OVER" } else { "" });
                    outcomes.push(Outcome { label, p50, p99, slowest_query });
                }
            }
        }
        eprintln!("{label}: {set_label} swept in {:.1} s", set_started.elapsed().as_secs_f64());
    }
    outcomes
}

fn summary(label: &str, outcomes: &mut [Outcome]) {
    outcomes.sort_by(|a, b| b.p99.total_cmp(&a.p99));
    let over = outcomes.iter().filter(|outcome| outcome.p99 > GOAL_MS).count();
    println!("\n{label}: {} combinations, {over} with p99 over {GOAL_MS} ms; the worst ten:", outcomes.len());
    for outcome in outcomes.iter().take(10) {
        println!("  {:<92} p50 {:>8.2} ms  p99 {:>8.2} ms\n      slowest: {}", outcome.label, outcome.p50, outcome.p99, outcome.slowest_query);
    }
    let all: Vec<f64> = {
        let mut all: Vec<f64> = outcomes.iter().map(|outcome| outcome.p99).collect();
        all.sort_by(f64::total_cmp);
        all
    };
    if !all.is_empty() {
        println!("{label}: median combination p99 {:.2} ms, worst {:.2} ms", percentile(&all, 0.5), percentile(&all, 1.0));
    }
}

fn run(label: &str, data_dir: &std::path::Path, database: Option<&str>, fresh: bool) {
    let total: i64 = std::env::var("REACHBACK_BENCH_BINDINGS").ok().and_then(|value| value.parse().ok()).unwrap_or(1_000_000);
    if fresh {
        let server = start(data_dir, database);
        let agent = agent();
        let mut ids = Vec::new();
        for r in 0..RANGES {
            let (name, city_index, base, _) = range_spec(r, total);
            let (city_name, state, country) = city(city_index);
            let body = json!({"name": name, "range": format!("100.{}.{}.0/18", (base >> 16) & 255, (base >> 8) & 255),
                              "location": {"city": city_name, "state": state, "country": country}});
            let mut reply = agent
                .post(&format!("{}/api/v1/ip-ranges", server.base))
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .send(body.to_string())
                .expect("range");
            let created: Value = serde_json::from_str(&reply.body_mut().read_to_string().unwrap_or_default()).unwrap_or(Value::Null);
            ids.push(created["id"].as_str().unwrap_or_else(|| panic!("range {r} not created: {created}")).to_string());
        }
        drop(server);
        let url = match database {
            Some(url) => url.to_string(),
            None => format!("sqlite://{}?mode=rwc", data_dir.join("reachback.db").display()),
        };
        sqlx::any::install_default_drivers();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        println!("{label}: seeding {total} addresses in {RANGES} ranges");
        let started = Instant::now();
        runtime.block_on(seed(&url, database.is_some(), &ids, total));
        println!("{label}: seeded in {:.0} s", started.elapsed().as_secs_f64());
    }
    let started = Instant::now();
    let server = start(data_dir, database);
    println!("{label}: server ready in {:.1} s", started.elapsed().as_secs_f64());
    // the listing's in-memory index loads in the background: wait for it (the gauge is -1 until then)
    let agent = agent();
    loop {
        let metrics =
            agent.get(&format!("{}/metrics", server.base)).call().ok().and_then(|mut reply| reply.body_mut().read_to_string().ok()).unwrap_or_default();
        let rows = metrics.lines().find_map(|line| line.strip_prefix("reachback_listing_index_rows ")).and_then(|value| value.trim().parse::<i64>().ok());
        if rows.is_some_and(|rows| rows >= 0) {
            let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap_or_default();
            let rss = status.lines().find_map(|line| line.strip_prefix("VmRSS:")).unwrap_or("?").trim().to_string();
            println!("{label}: listing index of {} rows loaded {:.1} s after start; server RSS {rss}", rows.unwrap_or(0), started.elapsed().as_secs_f64());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the listing index did not load");
        std::thread::sleep(Duration::from_millis(200));
    }
    // warm the caches as a running server's would be
    for sort in ["ip", "username", "platform", "client_hostname", "range_name", "last_updated"] {
        let _ = timed_get(&agent, &format!("{}/api/v1/ip-bindings?sort={sort}&page=10000", server.base));
    }
    let started = Instant::now();
    let mut outcomes = sweep(label, &server.base, total);
    println!("{label}: swept in {:.0} s", started.elapsed().as_secs_f64());
    summary(label, &mut outcomes);
}

fn main() {
    let keep = std::env::var("REACHBACK_BENCH_DATA").ok();
    if std::env::var("REACHBACK_BENCH_SKIP_SQLITE").is_err() {
        let dir = match &keep {
            Some(name) => std::env::temp_dir().join(format!("reachback-listing-bench-{name}")),
            None => std::env::temp_dir().join(format!("reachback-listing-bench-{}", std::process::id())),
        };
        let fresh = !dir.join("reachback.db").exists();
        if fresh {
            let _ = std::fs::remove_dir_all(&dir);
        }
        run("sqlite", &dir, None, fresh);
        if keep.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    if let Ok(url) = std::env::var("REACHBACK_BENCH_POSTGRES") {
        let database = match &keep {
            Some(name) => format!("listing_bench_{name}"),
            None => format!("listing_bench_{}", std::process::id()),
        };
        let exists = Command::new("psql")
            .args([url.as_str(), "-tAc", &format!("SELECT 1 FROM pg_database WHERE datname = '{database}'")])
            .output()
            .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "1");
        if !exists {
            assert!(Command::new("psql").args([url.as_str(), "-qc", &format!("CREATE DATABASE {database}")]).status().expect("psql").success());
        }
        let (base, _) = url.rsplit_once('/').expect("url");
        let target = format!("{base}/{database}");
        let dir = std::env::temp_dir().join(format!("reachback-listing-bench-pg-{}", keep.clone().unwrap_or_else(|| std::process::id().to_string())));
        run("postgres", &dir, Some(&target), !exists);
        if keep.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if keep.is_none() {
            let _ = Command::new("psql").args([url.as_str(), "-qc", &format!("DROP DATABASE {database} WITH (FORCE)")]).status();
        }
    }
}
