//! The web console in headless Chromium (Debian's `chromium` and
//! `chromium-driver`), against a real `reachback server` process: sign-in, the
//! ranges page (add, overlap error beside the field, copy, disable with
//! confirmation), bindings sorted by address, the Trace box and a binding's
//! history in its details, the flow log opened from a device's link, a saved filter that survives a
//! sign-out, CSV download of the filtered rows, a viewer without write controls,
//! script injection through every free-text value, sign-out. Screenshots of each
//! page at 1280×800 go to `target/console-screenshots/` (not committed).
//!
//! Gated by `REACHBACK_TEST_BROWSER=1` (CI sets it; `scripts/test` installs the
//! packages when it is set).

use std::path::PathBuf;
use std::time::Duration;

use reachback_testkit::webdriver::{Browser, ENTER, ESCAPE};
use serde_json::{Value, json};

use crate::process::{Server, TOKEN, TempDir, agent, public_key, request};

fn gate() -> bool {
    match std::env::var("REACHBACK_TEST_BROWSER") {
        Ok(value) if value == "1" => true,
        _ => {
            eprintln!("skipped: set REACHBACK_TEST_BROWSER=1 (chromium and chromium-driver)");
            false
        }
    }
}

const XSS: &str = "<script>window.__xss=1</script>\"><img src=x onerror=\"window.__xss=2\">";

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots")
}

fn sign_in(browser: &Browser, base: &str, username: &str, password: &str) {
    browser.goto(&format!("{base}/"));
    let field = browser.find("#username");
    browser.type_text(&field, username);
    browser.type_text(&browser.find("#password"), password);
    browser.click(&browser.find("form.login button[type=submit]"));
    browser.find("[data-test=whoami]");
}

fn sign_out(browser: &Browser) {
    browser.click(&browser.find("[data-test=sign-out]"));
    browser.find("form.login");
}

/// Opens a page and waits until it is the one shown and its table is drawn with
/// its rows (elements found before that may be replaced by the redraw).
fn open_page(browser: &Browser, base: &str, page: &str) {
    browser.goto(&format!("{base}/#/{page}"));
    let shown = "return document.querySelector('nav.side a[aria-current=page]')?.getAttribute('href') === arguments[0] \
                 && !!document.querySelector('main h1') && !document.querySelector('main [aria-busy=true]')";
    browser.wait_until(&format!("the {page} page"), |browser| browser.execute(shown, vec![json!(format!("#/{page}"))]) == json!(true));
}

/// The dialog's input for a field name.
fn dialog_input(browser: &Browser, name: &str) -> reachback_testkit::webdriver::Element {
    browser.find(&format!("dialog[open] [name={name}]"))
}

fn submit_dialog(browser: &Browser) {
    browser.click(&browser.find("dialog[open] button.primary"));
}

fn row_texts(browser: &Browser, table: &str, column: &str) -> Vec<String> {
    let script = "return Array.from(document.querySelectorAll(arguments[0])).map(cell => cell.textContent)";
    let cells = browser.execute(script, vec![json!(format!("table[data-test={table}] tbody td[data-column={column}]"))]);
    cells.as_array().map(|items| items.iter().filter_map(|item| item.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[test]
fn console_in_a_real_browser() {
    if !gate() {
        return;
    }
    let temp = TempDir::new();
    let server = Server::start(&temp.0.join("data"), None, &["--bootstrap-token", TOKEN]);
    let base = server.base.clone();
    let http = agent();
    let api = |method: &str, path: &str, body: Option<Value>| request(&http, method, &format!("{base}/api/v1{path}"), Some(TOKEN), body.as_ref());
    let (_, me) = api("GET", "/me", None);
    let admin_id = me["id"].as_str().expect("admin id").to_string();
    assert_eq!(api("PATCH", &format!("/admins/{admin_id}"), Some(json!({"password": "correct horse battery"}))).0, 200);
    assert_eq!(api("POST", "/admins", Some(json!({"username": "vera", "role": "viewer", "password": "viewer password 1"}))).0, 201);

    let browser = Browser::start();
    let shots = screenshots();

    // sign in; a wrong password is refused on the page
    browser.goto(&format!("{base}/"));
    browser.type_text(&browser.find("#username"), "admin");
    browser.type_text(&browser.find("#password"), "wrong");
    browser.click(&browser.find("form.login button[type=submit]"));
    browser.wait_until("the refusal", |browser| browser.page_text().contains("wrong username or password"));
    browser.screenshot(&shots.join("sign-in.png"));
    sign_in(&browser, &base, "admin", "correct horse battery");
    assert!(browser.text(&browser.find("[data-test=whoami]")).contains("superadmin"));

    // the keyboard alone opens a dialog, lands in it, and Escape closes it
    open_page(&browser, &base, "ranges");
    browser.type_text(&browser.find("[data-test=add-range]"), ENTER);
    browser.wait_until("the dialog", |browser| !browser.find_all("dialog[open]").is_empty());
    assert_eq!(browser.execute("return !!document.activeElement.closest('dialog[open]')", vec![]), json!(true), "focus moves into the dialog");
    browser.type_text(&browser.active(), ESCAPE);
    browser.wait_until("the dialog to close", |browser| browser.find_all("dialog[open]").is_empty());

    // add a range
    browser.click(&browser.find("[data-test=add-range]"));
    browser.type_text(&dialog_input(&browser, "name"), "Paris laptops");
    browser.type_text(&dialog_input(&browser, "range"), "100.64.0.0/16");
    browser.type_text(&dialog_input(&browser, "city"), "Paris");
    browser.type_text(&dialog_input(&browser, "country"), "FR");
    submit_dialog(&browser);
    browser.wait_until("the new range", |browser| row_texts(browser, "ip-ranges", "name") == ["Paris laptops"]);

    // an overlapping range: the error sits beside the range field and names the other range
    browser.click(&browser.find("[data-test=add-range]"));
    browser.type_text(&dialog_input(&browser, "name"), "Overlap");
    browser.type_text(&dialog_input(&browser, "range"), "100.64.5.0/24");
    submit_dialog(&browser);
    browser.wait_until("the overlap error", |browser| browser.text(&browser.find("dialog[open] [data-error-for=range]")).contains("Paris laptops"));
    browser.screenshot(&shots.join("range-overlap.png"));
    browser.click(&browser.find("dialog[open] .actions button:not(.primary)"));

    // copy opens the add form prefilled
    browser.click(&browser.find("tr[data-row] [data-test=copy]"));
    assert_eq!(browser.property(&dialog_input(&browser, "name"), "value"), "Paris laptops copy");
    assert_eq!(browser.property(&dialog_input(&browser, "city"), "value"), "Paris");
    let range = dialog_input(&browser, "range");
    browser.clear(&range);
    browser.type_text(&range, "100.65.0.0/16");
    submit_dialog(&browser);
    browser.wait_until("the copy", |browser| row_texts(browser, "ip-ranges", "name").len() == 2);

    // disable with a confirmation
    let disable_buttons = browser.find_all("[data-test=disable]");
    browser.click(&disable_buttons[1]);
    assert!(browser.text(&browser.find("dialog[open] p")).contains("Paris laptops copy"));
    browser.click(&browser.find("dialog[open] [data-test=confirm]"));
    browser.wait_until("the disabled status", |browser| row_texts(browser, "ip-ranges", "status") == ["Enabled", "Disabled"]);
    browser.click(&browser.find("tr[data-row] button[aria-label=Details]"));
    browser.find("tr.details dl");
    browser.screenshot(&shots.join("ip-ranges.png"));

    // bindings, enrolled through the API: sorted by address numerically
    let key = api("POST", "/enrollment-keys", Some(json!({"username": "alice@corp.example", "reusable": true}))).1["key"].as_str().expect("key").to_string();
    let bob_key = api("POST", "/enrollment-keys", Some(json!({"username": "bob@corp.example", "reusable": true}))).1["key"].as_str().expect("key").to_string();
    for index in 1..=11 {
        let key = if index % 3 == 0 { &bob_key } else { &key };
        let body = json!({"enrollment_key": key, "hostname": format!("laptop-{index}.corp.example"), "platform": "windows", "public_key": public_key(), "location": {"city": "Paris", "country": "FR"}});
        assert_eq!(request(&http, "POST", &format!("{base}/api/v1/enroll"), None, Some(&body)).0, 201);
    }
    browser.click(&browser.find("[data-test=refresh]"));
    browser.wait_until("the used addresses", |browser| row_texts(browser, "ip-ranges", "used_ips").first().is_some_and(|used| used.starts_with("11")));
    if browser.find_all("tr[data-row] button[aria-label=Details][aria-expanded=true]").is_empty() {
        browser.click(&browser.find("tr[data-row] button[aria-label=Details]"));
    }
    browser.wait_until("the top users", |browser| {
        browser.find_all("[data-test=top-users]").first().is_some_and(|cell| browser.text(cell) == "alice@corp.example (8), bob@corp.example (3)")
    });
    open_page(&browser, &base, "bindings");
    browser.wait_until("the bindings", |browser| row_texts(browser, "ip-bindings", "ip").len() == 11);
    let ips = row_texts(&browser, "ip-bindings", "ip");
    assert_eq!(ips.first().map(String::as_str), Some("100.64.0.1"));
    assert_eq!(ips.last().map(String::as_str), Some("100.64.0.11"), "numeric order: .2 … .9 before .10 and .11: {ips:?}");
    browser.click(&browser.find("th[data-column=ip] button.sort"));
    browser.wait_until("descending order", |browser| row_texts(browser, "ip-bindings", "ip").first().map(String::as_str) == Some("100.64.0.11"));
    browser.screenshot(&shots.join("ip-bindings.png"));

    // the Trace box: who holds an address now, and nobody before anything was bound
    browser.type_text(&browser.find("[data-test=trace-ip]"), "100.64.0.3");
    browser.click(&browser.find("[data-test=trace-submit]"));
    browser.wait_until("the trace", |browser| {
        browser.find_all("[data-test=trace-holder]").first().is_some_and(|cell| browser.text(cell).contains("laptop-3.corp.example"))
    });
    assert!(browser.text(&browser.find("[data-test=trace-holder]")).starts_with("bob@corp.example on laptop-3.corp.example (windows"));
    assert_eq!(browser.text(&browser.find("[data-test=trace-previous]")), "nobody");
    browser.execute(
        "document.querySelector('[data-test=trace-at]').value = '2001-01-01T00:00:00'; document.querySelector('[data-test=trace-zone]').value = 'utc';",
        vec![],
    );
    browser.click(&browser.find("[data-test=trace-submit]"));
    browser.wait_until("nobody in 2001", |browser| browser.page_text().contains("Nobody held this address then."));
    assert!(browser.page_text().contains("(2001-01-01T00:00:00Z)"), "the instant as asked, in UTC");
    assert!(browser.text(&browser.find("[data-test=trace-next]")).contains("laptop-3.corp.example"));
    browser.screenshot(&shots.join("ip-bindings-trace.png"));
    // a binding's details show the history of its address and of its device
    browser.click(&browser.find("tr[data-row] button[aria-label=Details]"));
    browser.wait_until("the address history", |browser| {
        browser.find_all("[data-test=address-history] td[data-column=released_at]").first().is_some_and(|cell| browser.text(cell) == "still bound")
    });
    assert_eq!(row_texts(&browser, "ip-bindings", "ip").first().map(String::as_str), Some("100.64.0.11"));
    browser.wait_until("the device history", |browser| !browser.find_all("[data-test=device-history] td[data-column=ip]").is_empty());
    browser.screenshot(&shots.join("ip-bindings-history.png"));
    browser.click(&browser.find("tr[data-row] button[aria-label=Details][aria-expanded=true]"));

    // filter, save the filter, sign out and in, pick it again
    let filter = browser.find("input[data-filter=username]");
    browser.type_text(&filter, "bob");
    browser.type_text(&filter, ENTER);
    browser.wait_until("the filtered rows", |browser| {
        row_texts(browser, "ip-bindings", "username").iter().all(|name| name == "bob@corp.example") && row_texts(browser, "ip-bindings", "ip").len() == 3
    });
    browser.click(&browser.find("[data-test=save-filter]"));
    browser.type_text(&dialog_input(&browser, "name"), "bob's laptops");
    submit_dialog(&browser);
    browser.wait_until("the saved filter in the list", |browser| saved_filters(browser).contains(&"bob's laptops".to_string()));
    sign_out(&browser);
    sign_in(&browser, &base, "admin", "correct horse battery");
    open_page(&browser, &base, "bindings");
    browser.wait_until("all bindings", |browser| row_texts(browser, "ip-bindings", "ip").len() == 11);
    browser.wait_until("the saved filter after signing in again", |browser| saved_filters(browser).contains(&"bob's laptops".to_string()));
    browser.execute(
        "const select = document.querySelector('[data-test=saved-filters]'); select.value = select.options[1].value; select.dispatchEvent(new Event('change'));",
        vec![],
    );
    browser.wait_until("the saved filter applied", |browser| row_texts(browser, "ip-bindings", "ip").len() == 3);

    // Download CSV gives the filtered rows
    browser.click(&browser.find("[data-test=download-csv]"));
    let file = browser.downloads.join("ip-bindings.csv");
    browser.wait_until("the CSV file", |_| std::fs::read_to_string(&file).is_ok_and(|text| text.lines().count() == 4));
    let csv = std::fs::read_to_string(&file).expect("csv");
    assert!(csv.starts_with("ip,range_name,range_location,username,platform,client_hostname,last_updated"), "{csv}");
    assert_eq!(csv.lines().skip(1).filter(|line| line.contains("bob@corp.example")).count(), 3, "{csv}");
    // over the export limit: the page says so instead of downloading
    assert_eq!(api("PATCH", "/settings", Some(json!({"export_limit": 2}))).0, 200);
    browser.click(&browser.find("[data-test=download-csv]"));
    browser.wait_until("the export-limit notice", |browser| browser.page_text().contains("more than the export limit"));
    assert_eq!(api("PATCH", "/settings", Some(json!({"export_limit": 1_000_000}))).0, 200);

    // a segment and a policy made in the console, the segment picked by name
    open_page(&browser, &base, "segments");
    browser.click(&browser.find("[data-test=add-segment]"));
    browser.type_text(&dialog_input(&browser, "name"), "web");
    browser.type_text(&dialog_input(&browser, "destinations"), "100.64.0.0/10, *.corp.example");
    browser.type_text(&dialog_input(&browser, "tcp_ports"), "80, 8000-8080");
    submit_dialog(&browser);
    browser.wait_until("the segment", |browser| row_texts(browser, "app-segments", "destinations") == ["100.64.0.0/10, *.corp.example"]);
    open_page(&browser, &base, "policies");
    browser.click(&browser.find("[data-test=add-policy]"));
    browser.type_text(&dialog_input(&browser, "name"), "web for help desk");
    browser.click(&browser.find("dialog[open] select[name=segment_ids] option"));
    browser.type_text(&dialog_input(&browser, "source_cidrs"), "10.20.0.0/16");
    submit_dialog(&browser);
    browser.wait_until("the policy", |browser| row_texts(browser, "access-policies", "segment_ids") == ["web"]);
    let (_, policies) = api("GET", "/access-policies", None);
    assert_eq!(policies["items"][0]["source_cidrs"], json!(["10.20.0.0/16"]));
    assert_eq!(policies["items"][0]["action"], "allow");

    // every free-text value an outsider or admin can set renders as text
    assert_eq!(api("POST", "/ip-ranges", Some(json!({"name": XSS, "description": XSS, "range": "100.66.0.0/24"}))).0, 201);
    assert_eq!(api("POST", "/enrollment-keys", Some(json!({"username": XSS, "description": XSS}))).0, 201);
    let segment = api("POST", "/app-segments", Some(json!({"name": XSS, "destinations": ["100.64.0.0/10"], "tcp_ports": ["22"]}))).1;
    assert_eq!(api("POST", "/access-policies", Some(json!({"name": XSS, "action": "allow", "segment_ids": [segment["id"]]}))).0, 201);
    assert_eq!(api("POST", "/connectors", Some(json!({"name": XSS}))).0, 201);
    for page in ["ranges", "keys", "segments", "policies", "connectors", "audit", "dashboard"] {
        open_page(&browser, &base, page);
        std::thread::sleep(Duration::from_millis(400));
        if page == "ranges" {
            // each click redraws the table: find the next closed one every time
            for _ in 0..10 {
                let Some(toggle) = browser.find_all("tr[data-row] button[aria-label=Details][aria-expanded=false]").into_iter().next() else { break };
                browser.click(&toggle);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(
            browser.execute("return window.__xss === undefined && document.querySelectorAll('main img, main script').length === 0", vec![]),
            json!(true),
            "markup ran on {page}"
        );
        if page != "dashboard" && page != "audit" {
            assert!(browser.page_text().contains("<script>window.__xss=1</script>"), "the value shows as text on {page}");
        }
        browser.screenshot(&shots.join(format!("{page}.png")));
    }
    for page in ["sessions", "flows", "devices", "admins", "admin-sessions", "settings"] {
        open_page(&browser, &base, page);
        std::thread::sleep(Duration::from_millis(300));
        browser.screenshot(&shots.join(format!("{page}.png")));
    }
    // the replicas: on SQLite this server alone, alive
    open_page(&browser, &base, "replicas");
    browser.wait_until("this replica listed alive", |browser| row_texts(browser, "replicas", "status") == ["alive"]);
    browser.screenshot(&shots.join("replicas.png"));
    // a device's link to its recent flows opens the flow log filtered to that device
    open_page(&browser, &base, "devices");
    let link = browser.find("a[data-test=flows-link]");
    let href = browser.property(&link, "href").as_str().unwrap_or_default().to_string();
    let device = href.split("device_id=").nth(1).unwrap_or_default().to_string();
    assert!(!device.is_empty(), "{href}");
    browser.click(&link);
    let filtered = "return document.querySelector('[data-filter=device_id]')?.value === arguments[0] && !document.querySelector('main [aria-busy=true]') \
                    && document.querySelector('main h1')?.textContent === 'Flow Log'";
    browser.wait_until("the device's flows", |browser| browser.execute(filtered, vec![json!(device)]) == json!(true));
    browser.screenshot(&shots.join("device-flows.png"));

    // event sinks (superadmin): a webhook added from the console shows its signing
    // secret once, then its delivery state (nothing listens there: failures count up)
    open_page(&browser, &base, "event-sinks");
    browser.click(&browser.find("[data-test=add-sink]"));
    browser.type_text(&dialog_input(&browser, "name"), "SIEM webhook");
    browser.type_text(&dialog_input(&browser, "target"), "http://127.0.0.1:9/hook");
    submit_dialog(&browser);
    browser.wait_until("the signing secret", |browser| !browser.find_all("dialog[open] [data-test=sink-secret]").is_empty());
    assert!(browser.text(&browser.find("dialog[open] [data-test=sink-secret]")).starts_with("whsec_"));
    browser.type_text(&browser.active(), ESCAPE);
    browser.wait_until("the sink in the table", |browser| row_texts(browser, "event-sinks", "name") == ["SIEM webhook"]);
    api("POST", "/ip-ranges", Some(json!({"name": "Events range", "range": "100.69.0.0/24"})));
    browser.wait_until("a failed delivery shown", |browser| {
        browser.click(&browser.find("[data-test=refresh]"));
        std::thread::sleep(Duration::from_millis(200));
        row_texts(browser, "event-sinks", "failures").first().is_some_and(|failures| failures != "0")
    });
    assert!(row_texts(&browser, "event-sinks", "last_error").first().is_some_and(|error| error.contains("POST failed")), "the last error shows");
    browser.screenshot(&shots.join("event-sinks.png"));

    // a viewer sees no write controls, and the API refuses a write made with its session anyway
    sign_out(&browser);
    sign_in(&browser, &base, "vera", "viewer password 1");
    open_page(&browser, &base, "ranges");
    browser.wait_until("the ranges", |browser| !row_texts(browser, "ip-ranges", "name").is_empty());
    assert!(browser.find_all("[data-test=add-range]").is_empty(), "no add button for a viewer");
    assert!(browser.find_all("[data-test=disable]").is_empty() && browser.find_all("[data-test=copy]").is_empty());
    assert!(browser.find_all("nav a[href='#/admins']").is_empty(), "no superadmin pages in the menu");
    let forbidden = async_fetch_status(&browser, "POST", "/api/v1/ip-ranges", json!({"name": "sneaky", "range": "100.67.0.0/24"}));
    assert_eq!(forbidden, 403, "no CSRF token: refused");
    assert_eq!(api("GET", "/ip-ranges?name=sneaky", None).1["total"], 0);
    browser.screenshot(&shots.join("viewer-ranges.png"));

    // sign out: the session is gone
    sign_out(&browser);
    assert_eq!(async_fetch_status(&browser, "GET", "/api/v1/me", Value::Null), 401);
}

fn saved_filters(browser: &Browser) -> Vec<String> {
    let names = browser.execute("return Array.from(document.querySelector('[data-test=saved-filters]').options).map(option => option.text)", vec![]);
    names.as_array().map(|items| items.iter().filter_map(|item| item.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Runs `fetch` in the page with the page's cookies (and the console's CSRF token when it has one).
fn async_fetch_status(browser: &Browser, method: &str, path: &str, body: Value) -> i64 {
    let script = "const [method, path, body] = arguments; const xhr = new XMLHttpRequest(); xhr.open(method, path, false); \
                  xhr.setRequestHeader('content-type', 'application/json'); xhr.send(body === null ? null : JSON.stringify(body)); return xhr.status;";
    browser.execute(script, vec![json!(method), json!(path), body]).as_i64().unwrap_or(0)
}
