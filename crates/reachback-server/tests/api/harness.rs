//! Test servers on temporary SQLite files or throwaway PostgreSQL databases.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use reachback_server::{ServerConfig, SharedState};
use serde_json::Value;
use sqlx::Connection;
use tower::ServiceExt;

pub const TOKEN: &str = "rbk_test_bootstrap_token_0123456789";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}_{}_{}_{}", std::process::id(), nanos % 1_000_000_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The PostgreSQL URL from the gate variable, if the PostgreSQL suite is on.
pub fn postgres_gate() -> Option<String> {
    std::env::var("REACHBACK_TEST_POSTGRES").ok().filter(|url| !url.is_empty())
}

pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestServer {
    pub router: Router,
    pub state: Option<SharedState>,
    pub data_dir: PathBuf,
    database_url: Option<String>,
    postgres: Option<(String, String)>,
    /// the TCP port the broker binds when a test starts it (picked free at start)
    pub tunnel_port: u16,
    app: Option<reachback_server::App>,
    /// the secret key and metrics token the next boot uses
    pub security: reachback_server::SecurityConfig,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl TestServer {
    pub async fn start(backend: Backend) -> Option<TestServer> {
        let mut server = Self::prepare(backend).await?;
        server.boot().await;
        Some(server)
    }

    /// A database and a data directory, without a server yet (tests may seed them, then [`TestServer::boot`]).
    pub async fn prepare(backend: Backend) -> Option<TestServer> {
        let data_dir = std::env::temp_dir().join(unique("reachback_test"));
        let (database_url, postgres) = match backend {
            Backend::Sqlite => (None, None),
            Backend::Postgres => {
                let Some(admin_url) = postgres_gate() else {
                    eprintln!("REACHBACK_TEST_POSTGRES not set: PostgreSQL suite off");
                    return None;
                };
                let name = unique("reachback_test");
                sqlx::any::install_default_drivers();
                let mut connection = sqlx::AnyConnection::connect(&admin_url).await.expect("REACHBACK_TEST_POSTGRES is set but PostgreSQL is unreachable");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut connection).await.expect("creating the test database");
                let base = admin_url.rsplit_once('/').map(|(base, _)| base.to_string()).unwrap_or(admin_url.clone());
                (Some(format!("{base}/{name}")), Some((admin_url, name)))
            }
        };
        let tunnel_port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|socket| socket.local_addr()).map(|address| address.port()).expect("a free TCP port");
        Some(TestServer {
            router: Router::new(),
            state: None,
            data_dir,
            database_url,
            postgres,
            tunnel_port,
            app: None,
            security: reachback_server::SecurityConfig::default(),
        })
    }

    /// The configuration the next boot uses.
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            tunnel_listen: format!("127.0.0.1:{}", self.tunnel_port).parse().expect("address"),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            bootstrap_token: Some(TOKEN.into()),
            broker_endpoints: vec![format!("127.0.0.1:{}", self.tunnel_port)],
            node_name: "test".into(),
            flow_idle_timeout: std::time::Duration::from_secs(3600),
            drain_timeout: std::time::Duration::from_secs(5),
            client_keepalive: std::time::Duration::from_secs(1),
            tcp_congestion: reachback_tunnel::Congestion::resolve(None).expect("the default congestion control"),
            tls_files: None,
            api_names: Vec::new(),
            insecure_http: false,
            certificate_lifetime: reachback_server::state::DEFAULT_CERTIFICATE_LIFETIME,
            http_limits: reachback_server::state::HttpLimits::default(),
            tunnel_max_flows: reachback_server::state::DEFAULT_TUNNEL_MAX_FLOWS,
            tunnel_memory: reachback_server::state::DEFAULT_TUNNEL_MEMORY,
            security: self.security.clone(),
            sync_backstop: reachback_server::replicas::DEFAULT_BACKSTOP,
        }
    }

    pub async fn boot(&mut self) {
        let app = reachback_server::build(self.config()).await.expect("server builds");
        self.router = app.router.clone();
        self.state = Some(app.state.clone());
        // the app's tasks live on for the test's lifetime (dropped handles do not stop them)
        self.app = Some(app);
    }

    /// Serves the API on a real TCP port and starts the broker; returns the API base URL.
    pub async fn serve_with_broker(&mut self) -> String {
        let app = self.app.as_mut().expect("app");
        app.start_broker().await.expect("broker starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let service = self.router.clone().into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, service).await });
        base
    }

    /// Runs SQL on the test's database over a connection of its own (to set up
    /// what an older version left behind).
    pub async fn raw_sql(&self, sql: &str) {
        let url = self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.data_dir.join("reachback.db").display()));
        let mut connection = sqlx::AnyConnection::connect(&url).await.expect("a connection of the test's own");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut connection).await.expect("the SQL runs");
    }

    /// The first column of every row a query returns, as text, over a connection of
    /// the test's own (reference queries).
    pub async fn query_texts(&self, sql: &str) -> Vec<String> {
        use sqlx::Row;
        let url = self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.data_dir.join("reachback.db").display()));
        let mut connection = sqlx::AnyConnection::connect(&url).await.expect("a connection of the test's own");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut connection).await.unwrap_or_else(|error| panic!("{sql}: {error}"));
        rows.iter().map(|row| row.try_get::<String, _>(0).expect("a text column")).collect()
    }

    /// The test database's URL.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.data_dir.join("reachback.db").display()))
    }

    /// Waits until the bindings listing is served from the in-memory index (it loads
    /// in the background after each boot).
    pub async fn wait_for_listing_index(&self) {
        let store = &self.state.as_ref().expect("a booted server").store;
        let started = std::time::Instant::now();
        while !store.listing_index_ready() {
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "the listing index did not load");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.is_some()
    }

    /// Builds a new server over the same database, as a restart would. The earlier
    /// one's state lives on in the test: it gives its node name up first, as a
    /// process's end would (a live process holding the name would be refused).
    pub async fn restart(&mut self) {
        if let Some(state) = &self.state {
            state.registration.release().await;
        }
        self.boot().await;
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>, token: Option<&str>) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).expect("request")).await
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.expect("router answers");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None, Some(TOKEN)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(body), Some(TOKEN)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(body), Some(TOKEN)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None, Some(TOKEN)).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if let Some((admin_url, name)) = self.postgres.take() {
            // a fresh runtime on a fresh thread: Drop may run inside the test's runtime
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async move {
                    if let Ok(mut connection) = sqlx::AnyConnection::connect(&admin_url).await {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&mut connection).await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs a scenario on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::harness::{Backend, TestServer};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let server = TestServer::start(Backend::Sqlite).await.expect("sqlite server");
                    super::$name(server).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(server) = TestServer::start(Backend::Postgres).await {
                        super::$name(server).await;
                    }
                }
            }
        )*
    };
}
