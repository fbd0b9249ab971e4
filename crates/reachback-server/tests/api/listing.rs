//! Issue 23: every bindings listing — any filter with any sort, any page — returns
//! exactly the rows, in exactly the order, of the plain reference query: one
//! `SELECT … ORDER BY <column>, ip_key` over the whole table, cut to the page.
//! Filters, sorts, directions and pages are drawn at random (a fixed seed per run,
//! printed with every failure), against a small table and a table of 50,000
//! bindings seeded in SQL, on both backends.

use axum::http::StatusCode;
use reachback_testkit::Draw;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::harness::TestServer;
use crate::on_both_backends;

on_both_backends!(
    listings_agree_with_the_reference_query_small,
    listings_agree_with_the_reference_query_50000,
    changes_behind_the_servers_back_show_in_the_next_listing,
    a_pruned_change_feed_reloads_the_index,
    a_transaction_committed_after_a_later_one_is_not_missed,
    a_flood_of_listings_runs_one_scan_per_core
);

/// 2026-01-01T00:00:00Z, in seconds.
const T0: i64 = 1_767_225_600;

struct RangeSpec {
    name: &'static str,
    cidr: &'static str,
    /// the key of the range's first address, as hex without the family byte's last digit
    v6: bool,
    /// first address value
    base: u32,
    location: Value,
}

fn ranges() -> Vec<RangeSpec> {
    vec![
        RangeSpec {
            name: "Paris laptops",
            cidr: "100.64.0.0/16",
            v6: false,
            base: 0x6440_0000,
            location: json!({"city": "Paris", "state": "Ile-de-France", "country": "FR"}),
        },
        RangeSpec {
            name: "berlin Servers",
            cidr: "100.65.0.0/16",
            v6: false,
            base: 0x6441_0000,
            location: json!({"city": "Berlin", "state": "Berlin", "country": "DE"}),
        },
        RangeSpec {
            name: "Zulu",
            cidr: "100.66.0.0/16",
            v6: false,
            base: 0x6442_0000,
            location: json!({"city": "Lyon", "state": "Auvergne-Rhone-Alpes", "country": "FR"}),
        },
        RangeSpec { name: "alpha", cidr: "10.1.0.0/16", v6: false, base: 0x0a01_0000, location: Value::Null },
        RangeSpec { name: "v6 lab", cidr: "fd00::/112", v6: true, base: 0, location: json!({"city": "Austin", "state": "Texas", "country": "US"}) },
        RangeSpec { name: "Lyon kiosks", cidr: "100.67.0.0/16", v6: false, base: 0x6443_0000, location: json!({"city": "Lyon", "country": "FR"}) },
    ]
}

/// Ranges through the API, then `rows` addresses (every 50th in quarantine) and
/// their devices in SQL, and a restart so the engine starts from them.
async fn seed(server: &mut TestServer, rows: i64) -> Vec<(String, [u8; 17], [u8; 17])> {
    let specs = ranges();
    let mut ids = Vec::new();
    for spec in &specs {
        let mut body = json!({"name": spec.name, "range": spec.cidr});
        if !spec.location.is_null() {
            body["location"] = spec.location.clone();
        }
        let reply = server.post("/api/v1/ip-ranges", body).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        ids.push(reply.json()["id"].as_str().expect("id").to_string());
    }
    let postgres = server.is_postgres();
    let count = specs.len() as i64;
    // seen now: the idle release (binding_idle_ttl) leaves the devices alone
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_micros() as i64).unwrap_or(0);
    let mut bounds = Vec::new();
    for (index, (spec, id)) in specs.iter().zip(&ids).enumerate() {
        // rows n with n % count == index go to this range, at offset 1 + n / count
        let series = if postgres {
            format!("SELECT n, 1 + n / {count} AS i FROM generate_series(0::bigint, {}::bigint) AS n WHERE n % {count} = {index}", rows - 1)
        } else {
            format!(
                "WITH RECURSIVE s(n) AS (SELECT {index} UNION ALL SELECT n + {count} FROM s WHERE n + {count} < {rows}) SELECT n, 1 + n / {count} AS i FROM s"
            )
        };
        type Render = fn(&str) -> String;
        let (hex8, hex): (Render, Render) = if postgres {
            (|e: &str| format!("lpad(to_hex({e}), 8, '0')"), |e: &str| format!("to_hex({e})"))
        } else {
            (|e: &str| format!("printf('%08x', {e})"), |e: &str| format!("printf('%x', {e})"))
        };
        let (key_hex, ip) = if spec.v6 {
            (format!("'06fd00' || '00000000000000000000' || {}", hex8("i")), format!("'fd00::' || {}", hex("i")))
        } else {
            let value = format!("({} + i)", spec.base);
            (
                format!("'04000000000000000000000000' || {}", hex8(&value)),
                format!("({value} / 16777216) || '.' || ({value} / 65536 % 256) || '.' || ({value} / 256 % 256) || '.' || ({value} % 256)"),
            )
        };
        let key = if postgres { format!("decode({key_hex}, 'hex')") } else { format!("unhex({key_hex})") };
        let username = "CASE WHEN n % 5 = 0 THEN 'Kiosk@corp' WHEN n % 7 = 0 THEN 'User' || (n % 13) ELSE 'user' || ((n * 13) % 41) END";
        let platform = "CASE n % 5 WHEN 0 THEN 'windows' WHEN 1 THEN 'macos' WHEN 2 THEN 'linux' WHEN 3 THEN 'ios' ELSE 'android' END";
        let hostname = "'h' || n || CASE n % 3 WHEN 0 THEN '-lt' WHEN 1 THEN '-WS' ELSE '-vm' END || CASE n % 4 WHEN 0 THEN '.eng' WHEN 1 THEN '.ops' ELSE '' END || '.example'";
        // minutes, with ties
        let updated = format!("({T0} + (n * 7 % 997) * 60) * 1000000");
        let quarantined = "n % 50 = 49";
        let fingerprint = if postgres { "decode(md5(n::text), 'hex')" } else { "randomblob(16)" };
        let sql = format!(
            "INSERT INTO devices (id, hostname, hostname_key, username, platform, public_key_fingerprint, certificate_serial, created_at, last_seen) \
             SELECT 'dev' || n, {hostname}, lower({hostname}), {username}, {platform}, {fingerprint}, 'serial' || n, {now}, {now} FROM ({series}) AS numbers WHERE NOT ({quarantined});
             INSERT INTO bindings (ip_key, ip, range_id, device_id, username, platform, client_hostname, last_updated, released_at) \
             SELECT {key}, {ip}, '{id}', CASE WHEN {quarantined} THEN NULL ELSE 'dev' || n END, CASE WHEN {quarantined} THEN NULL ELSE {username} END, \
                    CASE WHEN {quarantined} THEN NULL ELSE {platform} END, CASE WHEN {quarantined} THEN NULL ELSE {hostname} END, {updated}, \
                    CASE WHEN {quarantined} THEN {updated} ELSE NULL END FROM ({series}) AS numbers;
             UPDATE ip_ranges SET used_ips = (SELECT COUNT(*) FROM bindings WHERE range_id = '{id}' AND device_id IS NOT NULL) WHERE id = '{id}';"
        );
        server.raw_sql(&sql).await;
        let family = if spec.v6 { 6u8 } else { 4u8 };
        let mut first = [0u8; 17];
        first[0] = family;
        let mut last = first;
        if spec.v6 {
            first[1] = 0xfd;
            last[1] = 0xfd;
            last[15] = 0xff;
            last[16] = 0xff;
        } else {
            first[13..].copy_from_slice(&spec.base.to_be_bytes());
            last[13..].copy_from_slice(&(spec.base | 0xffff).to_be_bytes());
        }
        bounds.push((spec.name.to_string(), first, last));
        let _ = index;
    }
    server.raw_sql("ANALYZE").await;
    // the engine reads the rows again: a restart, and an edit of each range (which
    // rebuilds its part of the engine from the store); the listing index loads
    server.restart().await;
    server.wait_for_listing_index().await;
    for id in &ids {
        let reply = server.patch(&format!("/api/v1/ip-ranges/{id}"), json!({"description": "seeded in SQL"})).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    bounds
}

fn instant(seconds: i64) -> String {
    let offset = seconds - T0;
    format!("2026-01-01T{:02}:{:02}:{:02}Z", offset / 3600, offset % 3600 / 60, offset % 60)
}

/// A filter: its query parameter(s), and its reference condition in SQL.
struct Filter {
    parameter: String,
    condition: String,
}

fn like(needle: &str) -> String {
    format!("'%{}%'", needle.to_lowercase().replace('\'', "''"))
}

fn key_literal(postgres: bool, key: &[u8; 17]) -> String {
    let hex: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
    if postgres { format!("'\\x{hex}'::bytea") } else { format!("X'{hex}'") }
}

fn draw_filter(draw: &mut Draw, kind: u64, postgres: bool, rows: i64, bounds: &[(String, [u8; 17], [u8; 17])]) -> Filter {
    let encode = |text: &str| -> String { text.bytes().map(|byte| format!("%{byte:02X}")).collect() };
    let text = |parameter: &str, needle: &str, condition: String| Filter { parameter: format!("{parameter}={}", encode(needle)), condition };
    match kind {
        0 => {
            // an address (bound, quarantined or free) or a CIDR
            let n = draw.below(rows as u64 + 20) as i64;
            let count = bounds.len() as i64;
            let range = (n % count) as usize;
            let spec = &ranges()[range];
            let offset = (1 + n / count) as u32;
            let (text_value, first, last) = match (spec.v6, draw.below(4)) {
                (true, 0) => (format!("fd00::{offset:x}"), 128, 128),
                (true, _) => (format!("fd00::{:x}/{}", offset & !0xff, 120), 120, 120),
                (false, 0) => {
                    let value = spec.base + offset;
                    (format!("{}.{}.{}.{}", value >> 24, (value >> 16) & 255, (value >> 8) & 255, value & 255), 32, 32)
                }
                (false, shape) => {
                    let prefix = [0u32, 24, 20, 8][shape as usize];
                    let value = (spec.base + offset) & if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                    (format!("{}.{}.{}.{}/{prefix}", value >> 24, (value >> 16) & 255, (value >> 8) & 255, value & 255), prefix, prefix)
                }
            };
            let _ = last;
            // the key bounds, as the server computes them
            let (family, value, width) =
                if spec.v6 { (6u8, 0xfd00u128 << 112 | u128::from(offset), 128u32) } else { (4u8, u128::from(spec.base + offset), 32) };
            let host_bits = width - first;
            let mask = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            let value = if spec.v6 && first == 120 { 0xfd00u128 << 112 | u128::from(offset & !0xff) } else { value };
            let key = |value: u128| {
                let mut key = [0u8; 17];
                key[0] = family;
                key[1..].copy_from_slice(&value.to_be_bytes());
                key
            };
            Filter {
                parameter: format!("ip={}", encode(&text_value)),
                condition: format!("b.ip_key BETWEEN {} AND {}", key_literal(postgres, &key(value & !mask)), key_literal(postgres, &key(value | mask))),
            }
        }
        1 => {
            let needle = draw.pick(&["Paris laptops", "ALPHA", "a", "servers", "zu", "v6", "kiosks", "nothing"]);
            text("range_name", needle, format!("lower(r.name) LIKE {}", like(needle)))
        }
        2 => {
            let needle = draw.pick(&["paris", "FR", "de", "Lyon", "texas", "r", "nowhere"]);
            let pattern = like(needle);
            text("range_location", needle, format!("(lower(r.city) LIKE {pattern} OR lower(r.state) LIKE {pattern} OR lower(r.country) LIKE {pattern})"))
        }
        3 => {
            let needle = draw.pick(&["kiosk", "user1", "USER12", "u", "user7", "User3", "@corp", "zzz", "er2"]);
            text("username", needle, format!("lower(b.username) LIKE {}", like(needle)))
        }
        4 => {
            let needle = draw.pick(&["windows", "i", "MAC", "os", "android", "x"]);
            text("platform", needle, format!("lower(b.platform) LIKE {}", like(needle)))
        }
        5 => {
            let n = draw.below(rows as u64);
            let exact = format!("h{n}{}", ["-lt", "-ws", "-vm"][(n % 3) as usize]);
            let needle = draw.pick(&[exact.as_str(), "h12", ".eng.", "-lt", "WS.ops", "h9", "xyz", "7-vm"]);
            text("client_hostname", needle, format!("lower(b.client_hostname) LIKE {}", like(needle)))
        }
        _ => {
            let after = T0 + draw.below(997 * 60) as i64 / 60 * 60;
            let before = after + draw.pick(&[60i64, 3600, 10 * 3600, 30 * 3600]);
            match draw.below(3) {
                0 => Filter { parameter: format!("updated_after={}", instant(after)), condition: format!("b.last_updated > {}", after * 1_000_000) },
                1 => Filter {
                    parameter: format!("updated_before={}", instant(before.min(T0 + 86_399))),
                    condition: format!("b.last_updated < {}", before.min(T0 + 86_399) * 1_000_000),
                },
                _ => Filter {
                    parameter: format!("updated_after={}&updated_before={}", instant(after), instant(before.min(T0 + 86_399))),
                    condition: format!("b.last_updated > {} AND b.last_updated < {}", after * 1_000_000, before.min(T0 + 86_399) * 1_000_000),
                },
            }
        }
    }
}

fn ips(value: &Value) -> Vec<String> {
    value["items"].as_array().unwrap_or_else(|| panic!("no items: {value}")).iter().map(|item| item["ip"].as_str().expect("ip").to_string()).collect()
}

/// `queries` random listings (and, with `exports`, their CSV exports) against the reference.
async fn agree(server: &TestServer, rows: i64, bounds: &[(String, [u8; 17], [u8; 17])], queries: usize, exports: bool, seed: u64) {
    let postgres = server.is_postgres();
    let mut draw = Draw(seed);
    let sorts = [
        ("ip", "b.ip_key"),
        ("username", "b.username"),
        ("platform", "b.platform"),
        ("client_hostname", "b.client_hostname"),
        ("range_name", "r.name_key"),
        ("last_updated", "b.last_updated"),
    ];
    for round in 0..queries {
        let filter_count = draw.pick(&[0u64, 1, 1, 2, 2, 2, 3]);
        let mut kinds: Vec<u64> = Vec::new();
        while (kinds.len() as u64) < filter_count {
            let kind = draw.below(7);
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        let filters: Vec<Filter> = kinds.iter().map(|&kind| draw_filter(&mut draw, kind, postgres, rows, bounds)).collect();
        let (sort, column) = draw.pick(&sorts);
        let descending = draw.below(2) == 1;
        let direction = if descending { "DESC" } else { "ASC" };
        let order = if sort == "ip" { format!("b.ip_key {direction}") } else { format!("{column} {direction}, b.ip_key {direction}") };
        let conditions: Vec<String> =
            std::iter::once("b.device_id IS NOT NULL".to_string()).chain(filters.iter().map(|filter| filter.condition.clone())).collect();
        let reference = server
            .query_texts(&format!("SELECT b.ip FROM bindings b JOIN ip_ranges r ON r.id = b.range_id WHERE {} ORDER BY {order}", conditions.join(" AND ")))
            .await;
        let total = reference.len();
        let page_size = draw.pick(&[1usize, 3, 7, 50, 50, 200, 1000]);
        let pages = total.div_ceil(page_size).max(1);
        let page = match draw.below(6) {
            0 => 1,
            1 => pages.div_ceil(2),
            2 => pages,
            3 => pages + 1,
            _ => 1 + draw.below(pages as u64) as usize,
        };
        let mut query: Vec<String> = filters.iter().map(|filter| filter.parameter.clone()).collect();
        query.push(format!("sort={}{sort}", if descending { "-" } else { "" }));
        let query = query.join("&");
        let url = format!("/api/v1/ip-bindings?{query}&page={page}&page_size={page_size}");
        let reply = server.get(&url).await;
        assert_eq!(reply.status, StatusCode::OK, "seed {seed} round {round}: {url}: {}", reply.text());
        let listed = reply.json();
        let start = ((page - 1) * page_size).min(total);
        let expected = &reference[start..(start + page_size).min(total)];
        assert_eq!(listed["total"].as_u64(), Some(total as u64), "seed {seed} round {round}: total of {url}");
        assert_eq!(ips(&listed), expected, "seed {seed} round {round}: {url} (of {total})");
        if exports && round % 4 == 0 {
            let csv = server.get(&format!("/api/v1/ip-bindings/export.csv?{query}")).await;
            assert_eq!(csv.status, StatusCode::OK, "seed {seed} round {round}: export {query}");
            let exported: Vec<String> = csv.text().lines().skip(1).map(|line| line.split(',').next().expect("ip").to_string()).collect();
            assert_eq!(exported, reference, "seed {seed} round {round}: export {query}");
        }
    }
}

fn seed_of_run() -> u64 {
    std::env::var("REACHBACK_TEST_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_nanos() as u64).unwrap_or(23))
}

async fn listings_agree_with_the_reference_query_small(mut server: TestServer) {
    let bounds = seed(&mut server, 420).await;
    assert_eq!(server.get("/api/v1/ip-bindings?page_size=1").await.json()["total"].as_u64(), Some(412));
    assert_eq!(server.get("/api/v1/ip-bindings?page_size=1&sort=-last_updated&page=412").await.json()["total"].as_u64(), Some(412));
    agree(&server, 420, &bounds, 200, true, seed_of_run()).await;
    // the SQL path, which serves while the index loads after a start, answers the same
    server.state.as_ref().expect("state").store.use_listing_index(false);
    agree(&server, 420, &bounds, 60, true, seed_of_run() ^ 1).await;
}

async fn listings_agree_with_the_reference_query_50000(mut server: TestServer) {
    let bounds = seed(&mut server, 50_000).await;
    let total = server.get("/api/v1/ip-bindings?page_size=1").await.json()["total"].as_u64();
    assert_eq!(total, Some(49_000));
    agree(&server, 50_000, &bounds, 80, false, seed_of_run()).await;
}

fn hostnames(value: &Value) -> Vec<String> {
    value["items"].as_array().map(|items| items.iter().filter_map(|item| item["client_hostname"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Another replica, or anything writing the database, changes bindings: the next
/// listing shows it (each listing catches the index up with the change feed first,
/// not only the background task every second).
async fn changes_behind_the_servers_back_show_in_the_next_listing(mut server: TestServer) {
    seed(&mut server, 420).await;
    let before = server.get("/api/v1/ip-bindings?page_size=1").await.json()["total"].as_u64();
    assert_eq!(before, Some(412));
    for round in 0..5 {
        let renamed = format!("renamed-{round}.example");
        server.raw_sql(&format!("UPDATE bindings SET client_hostname = '{renamed}' WHERE ip = '100.64.0.{}'", 2 + round)).await;
        // a release, as the store writes it
        server
            .raw_sql(&format!(
                "UPDATE bindings SET device_id = NULL, username = NULL, platform = NULL, client_hostname = NULL, released_at = last_updated WHERE ip = '100.65.0.{}'",
                2 + round
            ))
            .await;
        let listed = server.get(&format!("/api/v1/ip-bindings?client_hostname={renamed}")).await.json();
        assert_eq!(hostnames(&listed), vec![renamed.clone()], "round {round}: {listed}");
        let total = server.get("/api/v1/ip-bindings?page_size=1").await.json()["total"].as_u64();
        assert_eq!(total, Some(411 - round), "round {round}");
        assert!(server.state.as_ref().expect("state").store.listing_index_ready());
    }
    // and deleted rows go (the delete trigger)
    server.raw_sql("DELETE FROM bindings WHERE ip LIKE '100.67.%'").await;
    let listed = server.get("/api/v1/ip-bindings?range_name=kiosks&page_size=1").await.json();
    assert_eq!(listed["total"].as_u64(), Some(0), "{listed}");
}

/// Changes pruned from the feed before the index read them: the index notices it is
/// behind the pruning and reloads, instead of missing them.
async fn a_pruned_change_feed_reloads_the_index(mut server: TestServer) {
    seed(&mut server, 420).await;
    let store = server.state.as_ref().expect("state").store.clone();
    server.raw_sql("UPDATE bindings SET client_hostname = 'pruned-change.example' WHERE ip = '100.64.0.3'").await;
    // a later change: the pruning keeps the newest row, and this one is it
    server.raw_sql("UPDATE bindings SET last_updated = last_updated + 1 WHERE ip = '100.64.0.6'").await;
    let future = reachback_store::now_micros() + 86_400_000_000;
    assert!(store.prune_binding_changes(future).await.expect("prune") >= 1);
    let listed = server.get("/api/v1/ip-bindings?client_hostname=pruned-change").await.json();
    assert_eq!(hostnames(&listed), vec!["pruned-change.example".to_string()], "{listed}");
}

/// PostgreSQL takes sequence values before commit: a transaction that wrote first and
/// commits last has the lower `seq`. An index that followed `seq` alone would have
/// passed it; it is read again because it was running at the last read.
async fn a_transaction_committed_after_a_later_one_is_not_missed(mut server: TestServer) {
    if !server.is_postgres() {
        // SQLite has one writer at a time: a later transaction cannot commit first
        return;
    }
    seed(&mut server, 420).await;
    let mut early = sqlx::PgConnection::connect(&server.database_url()).await.expect("connection");
    sqlx::raw_sql("BEGIN; UPDATE bindings SET client_hostname = 'committed-last.example' WHERE ip = '100.64.0.4'")
        .execute(&mut early)
        .await
        .expect("open transaction");
    server.raw_sql("UPDATE bindings SET client_hostname = 'committed-first.example' WHERE ip = '100.64.0.5'").await;
    let listed = server.get("/api/v1/ip-bindings?client_hostname=committed-").await.json();
    assert_eq!(hostnames(&listed), vec!["committed-first.example".to_string()], "{listed}");
    sqlx::raw_sql("COMMIT").execute(&mut early).await.expect("commit");
    let listed = server.get("/api/v1/ip-bindings?client_hostname=committed-&sort=client_hostname").await.json();
    assert_eq!(hostnames(&listed), vec!["committed-first.example".to_string(), "committed-last.example".to_string()], "{listed}");
}

/// Many listings at once: the scans queue, at most one per core runs (a flood would
/// otherwise start a blocking thread each), and every one is answered.
async fn a_flood_of_listings_runs_one_scan_per_core(mut server: TestServer) {
    seed(&mut server, 50_000).await;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let router = std::sync::Arc::new(server);
    let mut tasks = Vec::new();
    for n in 0..24 {
        let server = router.clone();
        tasks.push(tokio::spawn(async move {
            let sort = ["-client_hostname", "username", "-last_updated", "platform"][n % 4];
            server.get(&format!("/api/v1/ip-bindings?sort={sort}&page=400&page_size=50")).await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("listing task"), StatusCode::OK);
    }
    let peak = router.state.as_ref().expect("state").store.listing_scan_peak();
    assert!((1..=cores).contains(&peak), "{peak} scans ran at once on {cores} cores");
}
