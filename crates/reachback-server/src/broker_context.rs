//! The server's side of the broker's interface: the context the broker gets (its
//! part of the configuration, the settings' read handle, the way into the
//! enrollment writer) and the names its tunnel endpoint is reached by.

use std::sync::{Arc, RwLock};

use reachback_broker::{Allocator, AllocatorFuture, BrokerConfig, SettingsView};
use reachback_store::EnrollJob;
use tokio::sync::mpsc;

use crate::state::{ServerConfig, Settings};
use crate::writer::EnrollRequest;

/// What the broker reads of the server's configuration.
pub fn broker_config(config: &ServerConfig) -> BrokerConfig {
    BrokerConfig {
        node_name: config.node_name.clone(),
        tunnel_listen: config.tunnel_listen,
        client_keepalive: config.client_keepalive,
        certificate_lifetime: config.certificate_lifetime,
        flow_idle_timeout: config.flow_idle_timeout,
        tunnel_memory: config.tunnel_memory,
        tunnel_max_flows: config.tunnel_max_flows,
        tcp_congestion: config.tcp_congestion.clone(),
    }
}

/// The names the tunnel endpoint is reached by: the hosts of `--broker-endpoints`, or
/// the addresses (and host name) it listens on.
pub fn advertised_names(config: &ServerConfig) -> Vec<String> {
    if !config.broker_endpoints.is_empty() {
        return config.broker_endpoints.iter().filter_map(|endpoint| crate::state::host_of(endpoint)).collect();
    }
    crate::serve::default_api_names(config.tunnel_listen.ip())
}

/// The broker's read handle on the settings.
pub struct SharedSettings(pub Arc<RwLock<Settings>>);

impl SettingsView for SharedSettings {
    fn client_domains(&self) -> Vec<String> {
        match self.0.read() {
            Ok(settings) => settings.client_domains.clone(),
            Err(poisoned) => poisoned.into_inner().client_domains.clone(),
        }
    }
}

/// The broker's way into allocation: the enrollment writer's queue.
pub struct EnrollQueue(pub mpsc::Sender<EnrollRequest>);

impl Allocator for EnrollQueue {
    /// Binds a device that has no address, through the enrollment writer (the same
    /// allocation, the same transaction shape as a re-enrollment of the device).
    fn rebind(&self, job: EnrollJob) -> AllocatorFuture<'_> {
        Box::pin(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.0.send(EnrollRequest { job, reply }).await.map_err(|_| anyhow::anyhow!("the server is shutting down"))?;
            let outcome = answer.await.map_err(|_| anyhow::anyhow!("the server is shutting down"))?.map_err(|error| anyhow::anyhow!("{}", error.detail))??;
            Ok((outcome.virtual_ip, outcome.range_id))
        })
    }
}
