//! A small WebDriver client for browser tests: Debian's `chromedriver` driving
//! headless `chromium`. WebDriver is plain JSON over HTTP, so this speaks it with
//! the blocking HTTP client the project already has instead of pulling in a
//! second async HTTP stack.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The W3C key for Enter.
pub const ENTER: &str = "\u{E007}";
/// The W3C key for Escape.
pub const ESCAPE: &str = "\u{E00C}";
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: ureq::Agent,
    /// where downloads land
    pub downloads: PathBuf,
    _profile: crate::TempDir,
}

/// An element found on the page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile at 1280×800.
    pub fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).map(|address| address.port()).expect("a free port");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (Debian package chromium-driver)");
        let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while http.get(format!("{base}/status")).call().is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = crate::TempDir::new("reachback_chromium");
        let downloads = profile.0.join("downloads");
        std::fs::create_dir_all(&downloads).expect("downloads dir");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--no-first-run", "--window-size=1280,800", format!("--user-data-dir={}", profile.0.join("profile").display())],
                "prefs": {"download.default_directory": downloads.to_string_lossy(), "download.prompt_for_download": false},
            },
        }}});
        let mut browser = Browser { driver, base, session: String::new(), http, downloads, _profile: profile };
        let answer = browser.call("POST", "/session", Some(capabilities));
        browser.session = answer["sessionId"].as_str().expect("a WebDriver session").to_string();
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = if path == "/session" { format!("{}{path}", self.base) } else { format!("{}/session/{}{path}", self.base, self.session) };
        let request = ureq::http::Request::builder().method(method).uri(&url);
        let result = match body {
            Some(body) => self.http.run(request.header("Content-Type", "application/json").body(body.to_string()).expect("request")),
            None => self.http.run(request.body(()).expect("request")),
        };
        let mut response = result.unwrap_or_else(|error| panic!("WebDriver {method} {path}: {error}"));
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !response.status().is_success() {
            panic!("WebDriver {method} {path} failed: {}", value["value"]["message"].as_str().unwrap_or(&text));
        }
        value.get("value").cloned().unwrap_or(value)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    /// Runs a script in the page and returns its value.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self.call("POST", "/elements", Some(json!({"using": "css selector", "value": css})));
        found.as_array().map(|items| items.iter().filter_map(|item| item[ELEMENT_KEY].as_str().map(|id| Element(id.to_string()))).collect()).unwrap_or_default()
    }

    /// Waits up to 10 s for an element.
    pub fn find(&self, css: &str) -> Element {
        let started = Instant::now();
        loop {
            if let Some(element) = self.find_all(css).into_iter().next() {
                return element;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no element matches {css:?}; page text:\n{}", self.page_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to 10 s until `check` holds.
    pub fn wait_until(&self, what: &str, mut check: impl FnMut(&Browser) -> bool) {
        let started = Instant::now();
        while !check(self) {
            assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}; page text:\n{}", self.page_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The element that has the keyboard focus.
    pub fn active(&self) -> Element {
        let found = self.call("GET", "/element/active", None);
        Element(found[ELEMENT_KEY].as_str().unwrap_or_default().to_string())
    }

    pub fn click(&self, element: &Element) {
        self.call("POST", &format!("/element/{}/click", element.0), Some(json!({})));
    }

    pub fn type_text(&self, element: &Element, text: &str) {
        self.call("POST", &format!("/element/{}/value", element.0), Some(json!({"text": text})));
    }

    pub fn clear(&self, element: &Element) {
        self.call("POST", &format!("/element/{}/clear", element.0), Some(json!({})));
    }

    pub fn text(&self, element: &Element) -> String {
        self.call("GET", &format!("/element/{}/text", element.0), None).as_str().unwrap_or_default().to_string()
    }

    pub fn property(&self, element: &Element, name: &str) -> Value {
        self.call("GET", &format!("/element/{}/property/{name}", element.0), None)
    }

    pub fn page_text(&self) -> String {
        self.execute("return document.body ? document.body.innerText : ''", vec![]).as_str().unwrap_or_default().to_string()
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let data = self.call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap_or_default()).expect("PNG data");
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::write(path, bytes).expect("screenshot written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.http.delete(format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
