//! `reachback server`: the control plane's HTTP API, enrollment, the internal CA,
//! and the allocation service that keeps the allocation engine in step with the store.
//!
//! The only crate that speaks HTTP on the server side.

pub mod allocation;
pub mod api;
pub mod at_rest;
pub mod auth;
mod broker_context;
pub mod console;
pub mod edge;
mod error;
pub mod events;
pub mod limit;
pub mod ops;
pub mod replicas;
pub mod request;
pub mod serve;
pub mod state;
pub mod validate;
pub mod writer;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use reachback_store::Store;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::{
    admin, audit, bindings, bodies, console as console_api, dataplane, devices, enroll, flows, history, keys, ranges, renew, replicas as replicas_api, sinks,
    views,
};
use crate::ops::Reply::{Csv, List, Nothing, One};
pub use crate::ops::RouteDoc;
use crate::ops::schema;
use crate::state::{AppState, Metrics, Settings};
pub use crate::state::{SecretKeySource, SecurityConfig, ServerConfig, SharedState};
/// The tunnel broker, a crate of its own (`reachback-broker`).
pub use reachback_broker as broker;
pub use reachback_broker::flowlog;
/// Secrets, hashes and the internal CA, a crate of its own (`reachback-crypto`).
pub use reachback_crypto as crypto;

/// The largest request body the API reads.
pub const BODY_LIMIT: usize = 64 * 1024;

macro_rules! api_routes {
    (@body) => { None };
    (@body $body:ty) => { Some(ops::schema::<$body>) };
    (@sorts) => { &[] };
    (@sorts $sorts:path) => { $sorts };
    ($( $method:ident $path:literal => $handler:path, $role:literal, $status:literal $(| $also:literal)*, $summary:literal, [$($query:literal),*] $(sort $sorts:path)?, $reply:expr $(, body $body:ty)?; )*) => {
        /// Every API route: the router is built from this table and the OpenAPI document generated from it.
        pub const ROUTES: &[RouteDoc] = &[ $( RouteDoc {
            method: stringify!($method),
            path: $path,
            handler: stringify!($handler),
            summary: $summary,
            role: $role,
            query: &[$($query),*],
            sorts: api_routes!(@sorts $($sorts)?),
            success: $status,
            also: &[$($also),*],
            reply: $reply,
            body: api_routes!(@body $($body)?),
        } ),* ];

        fn api_router() -> Router<SharedState> {
            Router::new() $( .route($path, axum::routing::$method($handler)) )*
        }
    };
}

api_routes! {
    get "/api/v1/ca" => ops::ca, "none", 200, "The internal CA's certificate and pin, and the API's addresses", [], One(schema::<views::CaInfo>);
    get "/api/v1/ip-ranges" => ranges::list, "viewer", 200, "List IP ranges", ["page", "page_size", "sort", "name", "range", "city", "state", "country", "status"] sort ranges::SORTS, List(schema::<views::RangeView>);
    post "/api/v1/ip-ranges" => ranges::create, "admin", 201, "Create an IP range", [], One(schema::<views::RangeView>), body bodies::RangeBody;
    get "/api/v1/ip-ranges/{id}" => ranges::get, "viewer", 200, "Get an IP range", [], One(schema::<views::RangeView>);
    patch "/api/v1/ip-ranges/{id}" => ranges::patch, "admin", 200, "Change an IP range", [], One(schema::<views::RangeView>), body bodies::RangeBody;
    delete "/api/v1/ip-ranges/{id}" => ranges::delete, "admin", 204, "Delete an IP range (force=true releases its bindings)", ["force"], Nothing;
    post "/api/v1/ip-ranges/{id}/enable" => ranges::enable, "admin", 200, "Enable an IP range", [], One(schema::<views::RangeView>);
    post "/api/v1/ip-ranges/{id}/disable" => ranges::disable, "admin", 200, "Disable an IP range", [], One(schema::<views::RangeView>);
    get "/api/v1/ip-bindings" => bindings::list, "viewer", 200, "List IP bindings", ["page", "page_size", "sort", "ip", "range_name", "range_location", "username", "platform", "client_hostname", "updated_after", "updated_before"] sort bindings::SORTS, List(schema::<views::BindingView>);
    get "/api/v1/ip-bindings/history" => history::list, "viewer", 200, "Binding history: one row per interval an address was bound to a device (newest first)", ["page", "page_size", "sort", "ip", "at", "device_id", "username", "client_hostname", "from", "to"] sort history::SORTS, List(schema::<views::HistoryView>);
    get "/api/v1/ip-bindings/history/export.csv" => history::export, "viewer", 200, "Export the binding history as CSV", ["sort", "ip", "at", "device_id", "username", "client_hostname", "from", "to"] sort history::SORTS, Csv;
    get "/api/v1/ip-bindings/history/trace" => history::trace, "viewer", 200, "Who held an address at an instant (default now), with the holders before and after", ["ip", "at"], One(schema::<views::Trace>);
    get "/api/v1/ip-bindings/export.csv" => bindings::export, "viewer", 200, "Export IP bindings as CSV", ["sort", "ip", "range_name", "range_location", "username", "platform", "client_hostname", "updated_after", "updated_before"] sort bindings::SORTS, Csv;
    get "/api/v1/ip-bindings/{ip}" => bindings::get, "viewer", 200, "Get the binding of an address", [], One(schema::<views::BindingView>);
    delete "/api/v1/ip-bindings/{ip}" => bindings::release, "admin", 204, "Release a binding into quarantine", [], Nothing;
    post "/api/v1/enrollment-keys" => keys::create, "admin", 201, "Create an enrollment key (secret shown once)", [], One(schema::<views::NewEnrollmentKey>), body bodies::KeyBody;
    get "/api/v1/enrollment-keys" => keys::list, "viewer", 200, "List enrollment keys", ["page", "page_size", "sort", "username"] sort keys::SORTS, List(schema::<views::KeyView>);
    get "/api/v1/enrollment-keys/{id}" => keys::get, "viewer", 200, "Get an enrollment key", [], One(schema::<views::KeyView>);
    delete "/api/v1/enrollment-keys/{id}" => keys::revoke, "admin", 204, "Revoke an enrollment key", [], Nothing;
    post "/api/v1/enroll" => enroll::enroll, "none", 201 | 200, "Enroll a device (authenticated by its enrollment key)", [], One(schema::<views::Enrollment>), body bodies::EnrollBody;
    get "/api/v1/devices" => devices::list, "viewer", 200, "List devices", ["page", "page_size", "sort", "hostname", "username", "platform"] sort devices::SORTS, List(schema::<views::DeviceView>);
    get "/api/v1/devices/{id}" => devices::get, "viewer", 200, "Get a device", [], One(schema::<views::DeviceView>);
    post "/api/v1/devices/{id}/leave" => renew::leave_device, "none", 204, "A device discards its identity (it enrolled anew elsewhere): deleted, address released (signed by the enrolled key)", [], Nothing, body bodies::SignedBody;
    post "/api/v1/devices/{id}/renew" => renew::renew_device, "none", 200, "Renew an expired device certificate (authenticated by a signature of the enrolled key)", [], One(schema::<views::DeviceRenewal>), body bodies::SignedBody;
    delete "/api/v1/devices/{id}" => devices::delete, "admin", 204, "Delete a device: revoke, release, disconnect", [], Nothing;
    get "/api/v1/me" => admin::me, "viewer", 200, "The caller's identity and role", [], One(schema::<views::Me>);
    get "/api/v1/admins" => admin::list_admins, "superadmin", 200, "List administrators", ["page", "page_size"], List(schema::<views::AdminView>);
    post "/api/v1/admins" => admin::create_admin, "superadmin", 201, "Create an administrator", [], One(schema::<views::AdminView>), body bodies::AdminBody;
    get "/api/v1/admins/{id}" => admin::get_admin, "superadmin", 200, "Get an administrator", [], One(schema::<views::AdminView>);
    patch "/api/v1/admins/{id}" => admin::patch_admin, "superadmin", 200, "Set or clear an administrator's console password", [], One(schema::<views::AdminView>), body bodies::PasswordBody;
    delete "/api/v1/admins/{id}" => admin::delete_admin, "superadmin", 204, "Delete an administrator", [], Nothing;
    get "/api/v1/admins/{id}/api-keys" => admin::list_api_keys, "superadmin", 200, "List an administrator's API keys", [], One(schema::<views::ApiKeyList>);
    post "/api/v1/admins/{id}/api-keys" => admin::create_api_key, "superadmin", 201, "Create an API key (secret shown once)", [], One(schema::<views::NewApiKey>), body bodies::ApiKeyBody;
    delete "/api/v1/admins/{id}/api-keys/{key_id}" => admin::delete_api_key, "superadmin", 204, "Delete an API key", [], Nothing;
    get "/api/v1/admin-sessions" => admin::list_sessions, "superadmin", 200, "List admin sessions and API keys in use", ["page", "page_size", "admin_username"], List(schema::<views::AdminSession>);
    delete "/api/v1/admin-sessions/{id}" => admin::delete_session, "superadmin", 204, "End an admin session or revoke its API key", [], Nothing;
    get "/api/v1/settings" => admin::get_settings, "viewer", 200, "Get settings", [], One(schema::<state::Settings>);
    patch "/api/v1/settings" => admin::patch_settings, "admin", 200, "Change settings", [], One(schema::<state::Settings>), body bodies::SettingsBody;
    get "/api/v1/client-sessions" => dataplane::list_sessions, "viewer", 200, "List live client sessions (agent tunnels)", ["page", "page_size", "sort", "client_hostname", "username", "virtual_ip", "platform"] sort dataplane::SESSION_SORTS, List(schema::<views::ClientSession>);
    delete "/api/v1/client-sessions/{id}" => dataplane::delete_session, "admin", 204, "Disconnect a client session", [], Nothing;
    get "/api/v1/replicas" => replicas_api::list, "viewer", 200, "List the server replicas sharing the database, alive or dead, with their client sessions and connectors", ["page", "page_size"], List(schema::<views::ReplicaView>);
    get "/api/v1/flows" => flows::list, "viewer", 200, "The flow log: one row per flow through a connector, with its verdict and bytes (newest first)", ["page", "page_size", "sort", "device_id", "username", "client_hostname", "virtual_ip", "server_ip", "connector_id", "verdict", "protocol", "from", "to"] sort flows::SORTS, List(schema::<views::FlowView>);
    get "/api/v1/flows/export.csv" => flows::export, "viewer", 200, "Export the flow log as CSV", ["sort", "device_id", "username", "client_hostname", "virtual_ip", "server_ip", "connector_id", "verdict", "protocol", "from", "to"] sort flows::SORTS, Csv;
    get "/api/v1/app-segments" => dataplane::list_segments, "viewer", 200, "List application segments", ["page", "page_size", "sort", "name", "enabled"] sort dataplane::DOC_SORTS, List(schema::<views::SegmentView>);
    post "/api/v1/app-segments" => dataplane::create_segment, "admin", 201, "Create an application segment", [], One(schema::<views::SegmentView>), body bodies::SegmentBody;
    get "/api/v1/app-segments/{id}" => dataplane::get_segment, "viewer", 200, "Get an application segment", [], One(schema::<views::SegmentView>);
    patch "/api/v1/app-segments/{id}" => dataplane::patch_segment, "admin", 200, "Change an application segment", [], One(schema::<views::SegmentView>), body bodies::SegmentBody;
    delete "/api/v1/app-segments/{id}" => dataplane::delete_segment, "admin", 204, "Delete an application segment (409 while a policy names it)", [], Nothing;
    get "/api/v1/access-policies" => dataplane::list_policies, "viewer", 200, "List access policies in evaluation order", ["page", "page_size", "sort", "name", "enabled"] sort dataplane::DOC_SORTS, List(schema::<views::PolicyView>);
    post "/api/v1/access-policies" => dataplane::create_policy, "admin", 201, "Create an access policy", [], One(schema::<views::PolicyView>), body bodies::PolicyBody;
    get "/api/v1/access-policies/{id}" => dataplane::get_policy, "viewer", 200, "Get an access policy", [], One(schema::<views::PolicyView>);
    patch "/api/v1/access-policies/{id}" => dataplane::patch_policy, "admin", 200, "Change an access policy", [], One(schema::<views::PolicyView>), body bodies::PolicyBody;
    delete "/api/v1/access-policies/{id}" => dataplane::delete_policy, "admin", 204, "Delete an access policy", [], Nothing;
    get "/api/v1/connectors" => dataplane::list_connectors, "viewer", 200, "List connectors with their status", ["page", "page_size", "name", "status"], List(schema::<views::ConnectorView>);
    post "/api/v1/connectors" => dataplane::create_connector, "admin", 201, "Create a connector (provisioning key shown once)", [], One(schema::<views::ConnectorWithKey>), body bodies::ConnectorBody;
    post "/api/v1/connectors/enroll" => dataplane::enroll_connector, "none", 200, "Enroll a connector (authenticated by its provisioning key)", [], One(schema::<views::ConnectorEnrollment>), body bodies::ConnectorEnrollBody;
    post "/api/v1/connectors/{id}/leave" => renew::leave_connector, "none", 204, "A connector's host discards its identity (it enrolled as another connector): its key stops opening tunnels (signed by the enrolled key)", [], Nothing, body bodies::SignedBody;
    post "/api/v1/connectors/{id}/renew" => renew::renew_connector, "none", 200, "Renew an expired connector certificate (authenticated by a signature of the enrolled key)", [], One(schema::<views::ConnectorRenewal>), body bodies::SignedBody;
    post "/api/v1/connectors/{id}/provisioning-key" => dataplane::issue_provisioning_key, "admin", 200, "Issue a connector a new provisioning key (secret shown once; the earlier key stops working)", [], One(schema::<views::ConnectorWithKey>), body bodies::ProvisioningKeyBody;
    get "/api/v1/connectors/{id}" => dataplane::get_connector, "viewer", 200, "Get a connector", [], One(schema::<views::ConnectorView>);
    delete "/api/v1/connectors/{id}" => dataplane::delete_connector, "admin", 204, "Revoke a connector and disconnect it", [], Nothing;
    post "/api/v1/auth/login" => console_api::login, "none", 200, "Console sign-in with username and password (sets the session cookie, returns the CSRF token)", [], One(schema::<views::SignIn>), body bodies::LoginBody;
    post "/api/v1/auth/logout" => console_api::logout, "viewer", 204, "Console sign-out", [], Nothing;
    get "/api/v1/stats/ranges/{id}/top-users" => console_api::range_top_users, "viewer", 200, "The users with the most bindings in a range", [], One(schema::<views::TopUsers>);
    get "/api/v1/stats/bindings" => console_api::binding_stats, "viewer", 200, "Bound addresses per platform (for the dashboard)", [], One(schema::<views::BindingStats>);
    get "/api/v1/stats/enrollments" => console_api::enrollment_stats, "viewer", 200, "Enrollments per day (for the dashboard)", ["days"], One(schema::<views::EnrollmentStats>);
    get "/api/v1/saved-filters" => console_api::list_filters, "viewer", 200, "The caller's saved filters", ["page"], One(schema::<views::SavedFilterList>);
    post "/api/v1/saved-filters" => console_api::save_filter, "viewer", 201, "Save a filter under a name (replaces one of the same name)", [], One(schema::<views::SavedFilter>), body bodies::FilterBody;
    delete "/api/v1/saved-filters/{id}" => console_api::delete_filter, "viewer", 204, "Delete a saved filter", [], Nothing;
    get "/api/v1/event-sinks" => sinks::list, "superadmin", 200, "List event sinks (webhooks, syslog) and how their delivery stands", ["page", "page_size"], List(schema::<views::EventSinkView>);
    post "/api/v1/event-sinks" => sinks::create, "superadmin", 201, "Add an event sink (a webhook's signing secret shown once)", [], One(schema::<views::NewEventSink>), body bodies::SinkBody;
    get "/api/v1/event-sinks/{id}" => sinks::get, "superadmin", 200, "Get an event sink", [], One(schema::<views::EventSinkView>);
    patch "/api/v1/event-sinks/{id}" => sinks::patch, "superadmin", 200, "Change an event sink (disabling it drops what waited for it)", [], One(schema::<views::NewEventSink>), body bodies::SinkBody;
    delete "/api/v1/event-sinks/{id}" => sinks::delete, "superadmin", 204, "Remove an event sink and what waited for it", [], Nothing;
    get "/api/v1/audit-logs" => audit::list, "viewer", 200, "List audit-log entries, newest first", ["page", "page_size", "sort", "actor", "action", "resource_type", "after", "before"] sort audit::SORTS, List(schema::<views::AuditEntry>);
    get "/api/v1/audit-logs/export.csv" => audit::export, "viewer", 200, "Export the audit log as CSV", ["sort", "actor", "action", "resource_type", "after", "before"] sort audit::SORTS, Csv;
}

/// A built server: its router and state, ready to serve.
pub struct App {
    pub router: Router,
    pub state: SharedState,
    /// the bootstrap API key, when this start created the first superadmin
    pub bootstrap_token: Option<String>,
    /// the API's TLS, when it is served over HTTPS
    pub tls: Option<serve::ApiTls>,
    writer: tokio::sync::oneshot::Receiver<()>,
    /// the flow log's writer: it ends after `FlowLog::shutdown`, once the queue is written
    flow_writer: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

/// Writes a file readable by its owner only.
pub fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).with_context(|| format!("opening {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()?;
    Ok(())
}

/// Prepares everything: data directory, store and migrations, bootstrap admin, CA,
/// settings, the allocation engine loaded from the store, the enrollment writer.
pub async fn build(config: ServerConfig) -> anyhow::Result<App> {
    at_rest::prepare_data_dir(&config)?;
    let store = Store::connect(&config.database_url()).await.context("opening the database")?;
    at_rest::check_private_files(&config)?;
    let (ca, secret_key) = at_rest::load_ca(&store, &config).await?;

    let mut bootstrap_token = None;
    if store.count_admins().await? == 0 {
        let (token, generated) = match &config.bootstrap_token {
            Some(token) => (token.clone(), false),
            None => (crypto::new_secret("rbk_"), true),
        };
        if store.bootstrap("admin", "bootstrap", &crypto::hash_secret(&token)).await? {
            if generated {
                let path = config.data_dir.join("bootstrap-token");
                write_private_file(&path, &format!("{token}\n"))?;
                println!("Created superadmin 'admin'; its API key is in {}", path.display());
            } else {
                println!("Created superadmin 'admin' with the API key from --bootstrap-token");
            }
            tracing::info!("created the first superadmin");
            bootstrap_token = Some(token);
        }
    }

    // before anything acts under the node name (the broker clears the name's sessions at start)
    let registration = replicas::register(&store, &config.node_name, &config.tunnel_endpoint()).await?;

    let settings = Settings::from_stored(&store.load_settings().await?);

    let allocation = allocation::AllocationService::load(store.clone(), settings.quarantine_micros()).await?;

    let (enroll_tx, enroll_rx) = mpsc::channel(4096);
    let metrics = Metrics::new();
    let (flow_log, flow_log_writer) = flowlog::FlowLog::new(flowlog::QUEUE_CAPACITY, metrics.broker.flow_log.clone());
    flow_log.set_enabled(settings.flow_log_enabled);
    let settings = Arc::new(RwLock::new(settings));
    let ca = Arc::new(ca);
    let ranges_changed = tokio::sync::watch::channel(()).0;
    // the broker gets what it uses, never the state
    let broker = Arc::new(broker::Broker::new(broker::BrokerContext {
        store: store.clone(),
        config: broker_context::broker_config(&config),
        metrics: metrics.broker.clone(),
        flow_log,
        ca: ca.clone(),
        settings: Arc::new(broker_context::SharedSettings(settings.clone())),
        ranges_changed: ranges_changed.clone(),
        allocator: Arc::new(broker_context::EnrollQueue(enroll_tx.clone())),
    }));
    let state = Arc::new(AppState {
        store,
        allocation,
        settings,
        settings_sync: tokio::sync::Mutex::new(()),
        ca,
        secret_key,
        metrics,
        enroll_tx,
        config,
        broker,
        login_limiter: std::sync::Mutex::new(limit::LoginLimiter::default()),
        registration,
        changes: Arc::default(),
        ranges_changed,
    });
    let writer = writer::spawn(Arc::downgrade(&state), enroll_rx).context("starting the enrollment writer")?;
    let flow_writer = tokio::spawn(flow_log_writer.run(state.store.clone(), state.config.node_name.clone()));
    let mut background = replicas::spawn(&state);
    background.push(tokio::spawn(replicas::heartbeat(Arc::downgrade(&state))));
    background.push(tokio::spawn(release_idle_bindings(Arc::downgrade(&state))));
    background.push(tokio::spawn({
        let store = state.store.clone();
        async move { store.keep_listing_index().await }
    }));
    background.push(tokio::spawn(prune_history_hourly(Arc::downgrade(&state))));
    background.push(tokio::spawn(prune_flow_log_hourly(Arc::downgrade(&state))));
    background.push(tokio::spawn(events::deliver(Arc::downgrade(&state))));
    let tls = match serve::api_certificate(&state.config) {
        Some(source) => {
            let tls = serve::ApiTls::new(&state, source).context("preparing the API's TLS")?;
            background.push(tls.spawn_upkeep(Arc::downgrade(&state)));
            Some(tls)
        }
        None => None,
    };
    let router = router(state.clone());
    Ok(App { router, state, bootstrap_token, tls, writer, flow_writer, background })
}

/// The full HTTP router over a state.
pub fn router(state: SharedState) -> Router {
    let openapi_document = ops::openapi(ROUTES);
    Router::new()
        .merge(api_router())
        .route("/api/v1/openapi.json", axum::routing::get(move || async move { axum::Json(openapi_document) }))
        .route("/", axum::routing::get(console::index))
        .route("/assets/{name}", axum::routing::get(console::file))
        .route("/healthz", axum::routing::get(ops::healthz))
        .route("/readyz", axum::routing::get(ops::readyz))
        .route("/metrics", axum::routing::get(ops::metrics))
        .fallback(|| async { error::ApiError::not_found("path").into_response() })
        .layer(axum::middleware::from_fn(edge::guard))
        .layer(axum::middleware::from_fn_with_state(state.clone(), ops::track))
        .layer(axum::middleware::from_fn_with_state(state.clone(), ops::request_timeout))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

impl App {
    /// Binds the tunnel endpoint (`tunnel_listen`) and starts accepting agents and connectors.
    pub async fn start_broker(&mut self) -> anyhow::Result<std::net::SocketAddr> {
        let names = broker_context::advertised_names(&self.state.config);
        let (local, task) = broker::start(self.state.broker.clone(), names).await?;
        self.background.push(task);
        Ok(local)
    }

    /// `https` when the API is served over TLS, else `http`.
    pub fn api_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The pin of the internal CA (`sha256:…`), what clients pass as `--ca-pin`.
    pub fn ca_pin(&self) -> anyhow::Result<String> {
        self.state.ca.pin()
    }

    /// Serves until `shutdown` resolves, then drains requests and the enrollment queue.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let App { router, state, writer, flow_writer, background, tls, .. } = self;
        let acceptor = tls.map(|tls| tls.acceptor);
        // the tunnels start to drain when the signal comes, alongside the HTTP requests in flight
        let shutdown = {
            let state = state.clone();
            async move {
                shutdown.await;
                state.broker.begin_drain();
            }
        };
        serve::serve(listener, router, acceptor, state.config.http_limits.clone(), shutdown).await.context("serving HTTP")?;
        state.broker.begin_drain();
        let left = state.broker.drained(state.config.drain_timeout).await;
        if left > 0 {
            tracing::warn!(tunnels = left, deadline_seconds = state.config.drain_timeout.as_secs(), "drain deadline passed; closing the tunnels left");
        }
        state.broker.close_all();
        state.broker.peers().close_all();
        for task in background {
            task.abort();
        }
        replicas::stopped(&state).await;
        // the flows the closed tunnels ended reach the queue as their tasks see the close
        tokio::time::sleep(Duration::from_millis(100)).await;
        state.broker.flow_log().shutdown();
        let store = state.store.clone();
        drop(state);
        // the writer ends once every queued enrollment is written and all senders are gone
        if tokio::time::timeout(Duration::from_secs(10), writer).await.is_err() {
            tracing::warn!("enrollment writer did not finish in time");
        }
        if tokio::time::timeout(Duration::from_secs(10), flow_writer).await.is_err() {
            tracing::warn!("the flow log's writer did not finish in time");
        }
        store.close().await;
        Ok(())
    }
}

/// Releases bindings of devices not seen for `binding_idle_ttl_seconds` (0 disables).
async fn release_idle_bindings(state: std::sync::Weak<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(300));
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else { return };
        if let Err(error) = release_idle_now(&state, reachback_store::now_micros()).await {
            tracing::warn!(%error, "could not release idle bindings");
        }
    }
}

/// One round of the idle-TTL release as seen from `now` (what the background task
/// does every five minutes; tests call it with a `now` in the future): the bindings
/// of devices not seen for `binding_idle_ttl_seconds` go to quarantine, their history
/// intervals close as `idle_ttl`. Returns how many were released.
pub async fn release_idle_now(state: &AppState, now: i64) -> anyhow::Result<usize> {
    let ttl = state.settings().binding_idle_ttl_seconds;
    if ttl == 0 {
        return Ok(0);
    }
    let cutoff = now - ttl.saturating_mul(1_000_000);
    let released = state.allocation.release_idle(cutoff).await?;
    if released > 0 {
        tracing::info!(count = released, "released idle bindings");
    }
    Ok(released)
}

/// Deletes binding-history intervals that ended more than
/// `binding_history_retention_days` ago, once an hour (the first round at start).
async fn prune_history_hourly(state: std::sync::Weak<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(3600));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else { return };
        if let Err(error) = prune_history_now(&state, reachback_store::now_micros()).await {
            tracing::warn!(%error, "could not delete old binding history");
        }
        let before = reachback_store::now_micros() - events::OUTBOX_KEEP_DAYS * 86_400_000_000;
        match state.store.prune_outbox(before).await {
            Ok(0) => {}
            Ok(dropped) => {
                state.metrics.events.dropped.inc_by(dropped);
                tracing::warn!(dropped, keep_days = events::OUTBOX_KEEP_DAYS, "dropped events no sink took in time");
            }
            Err(error) => tracing::warn!(%error, "could not drop expired events"),
        }
    }
}

/// One retention round as seen from `now`: closed intervals that ended before
/// `now` − `binding_history_retention_days` are deleted in batches (open intervals
/// never are); the round is audited as `prune_history` by `system` when it deleted
/// any. Returns how many rows went.
pub async fn prune_history_now(state: &AppState, now: i64) -> anyhow::Result<u64> {
    let settings = state.settings();
    let cutoff = settings.history_cutoff(now);
    let deleted = state
        .store
        .prune_history(cutoff, reachback_store::PRUNE_BATCH_ROWS, |deleted| reachback_store::AuditEntry {
            actor: "system".into(),
            action: "prune_history".into(),
            resource_type: "ip_binding_history".into(),
            resource_id: "*".into(),
            after: Some(serde_json::json!({
                "deleted": deleted,
                "released_before": request::format_time(cutoff),
                "retention_days": settings.binding_history_retention_days,
            })),
            ..reachback_store::AuditEntry::default()
        })
        .await?;
    if deleted > 0 {
        tracing::info!(deleted, retention_days = settings.binding_history_retention_days, "deleted old binding history");
    }
    Ok(deleted)
}

/// Deletes flows that ended more than `flow_log_retention_days` ago, once an hour
/// (the first round at start).
async fn prune_flow_log_hourly(state: std::sync::Weak<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(3600));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else { return };
        if let Err(error) = prune_flow_log_now(&state, reachback_store::now_micros()).await {
            tracing::warn!(%error, "could not delete old flow log rows");
        }
    }
}

/// One flow-log retention round as seen from `now`: flows that ended before `now` −
/// `flow_log_retention_days` are deleted in batches; the round is audited as
/// `prune_flow_log` by `system` when it deleted any. Returns how many rows went.
pub async fn prune_flow_log_now(state: &AppState, now: i64) -> anyhow::Result<u64> {
    let settings = state.settings();
    let cutoff = settings.flow_log_cutoff(now);
    let deleted = state
        .store
        .prune_flows(cutoff, reachback_store::FLOW_PRUNE_BATCH_ROWS, |deleted| reachback_store::AuditEntry {
            actor: "system".into(),
            action: "prune_flow_log".into(),
            resource_type: "flow_log".into(),
            resource_id: "*".into(),
            after: Some(serde_json::json!({
                "deleted": deleted,
                "ended_before": request::format_time(cutoff),
                "retention_days": settings.flow_log_retention_days,
            })),
            ..reachback_store::AuditEntry::default()
        })
        .await?;
    if deleted > 0 {
        tracing::info!(deleted, retention_days = settings.flow_log_retention_days, "deleted old flow log rows");
    }
    Ok(deleted)
}
