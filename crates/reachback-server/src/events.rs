//! Events out (issue 22): the deliverer that empties the sinks' outboxes. Each
//! round a replica takes the lease of every enabled sink nobody else holds, reads
//! its waiting events in order and sends them — to a webhook as a CloudEvents
//! batch signed per Standard Webhooks (HMAC-SHA256), to syslog as RFC 5424 lines
//! over TCP or TLS (RFC 6587 octet counting) — and drops them from the outbox only
//! once the sink took them. A failed delivery is retried with exponential backoff
//! (1 s doubling to 5 min), so delivery is at-least-once and in order per sink.
//!
//! The pure parts (CloudEvents, signatures, syslog lines, backoff, type filters)
//! come first and are tested on their own.

use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine as _;
use reachback_store::{OutboxEvent, SinkRow, now_micros};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::request::format_time;
use crate::state::{AppState, EventMetrics};

/// What a sink's signing secret is bound to when sealed in the database.
pub const SECRET_CONTEXT: &[u8] = b"reachback event_sink 1 secret";
/// Events sent per webhook request or syslog connection.
const BATCH: i64 = 500;
/// How long a lease lasts; renewed every round.
const LEASE: Duration = Duration::from_secs(30);
/// A round's pause when no sink had a full batch.
const IDLE: Duration = Duration::from_millis(250);
/// How long a webhook or syslog server has to take a batch.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event waits for a sink that does not take it before it is dropped.
pub const OUTBOX_KEEP_DAYS: i64 = 30;

/// The CloudEvents `source` of every event.
pub const SOURCE: &str = "urn:reachback";

/// An event's stable id: the same for every sink and every redelivery, so a
/// receiver can drop duplicates.
pub fn event_id(event: &OutboxEvent, data: &Value) -> String {
    if let Some(audit) = data.get("audit_id").and_then(Value::as_str) {
        return format!("audit-{audit}");
    }
    if let Some(interval) = data.get("interval_id").and_then(Value::as_i64) {
        let edge = event.kind.rsplit('.').next().unwrap_or("binding");
        return format!("binding-{interval}-{edge}");
    }
    if let Some(flow) = data.get("flow_id").and_then(Value::as_i64) {
        return format!("flow-{flow}");
    }
    format!("outbox-{}", event.id)
}

/// An outbox row as a CloudEvent (structured JSON, spec 1.0).
pub fn cloud_event(event: &OutboxEvent) -> Value {
    let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
    json!({
        "specversion": "1.0",
        "id": event_id(event, &data),
        "source": SOURCE,
        "type": event.kind,
        "subject": event.subject,
        "time": format_time(event.at),
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// Whether a sink with these type prefixes takes an event type (none: every type).
pub fn wants(types: &[String], kind: &str) -> bool {
    types.is_empty() || types.iter().any(|prefix| kind.starts_with(prefix.as_str()))
}

/// The wait before attempt `failures + 1`: 1 s, doubling, at most 5 min.
pub fn backoff(failures: i64) -> Duration {
    let exponent = u32::try_from(failures.clamp(0, 20)).unwrap_or(20);
    Duration::from_secs(2u64.saturating_pow(exponent)).min(Duration::from_secs(300))
}

/// A new signing secret: `whsec_` and 32 random bytes in base64 (Standard Webhooks).
pub fn new_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
}

/// The Standard Webhooks signature of a request: `v1,` and base64 of
/// HMAC-SHA256 over `{id}.{timestamp}.{body}`, keyed with the secret's bytes.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_")?).ok()?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    Some(format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(context.sign().as_ref())))
}

/// An RFC 5424 structured-data parameter value: `"`, `\` and `]` escaped.
fn sd_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '"' | '\\' | ']') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// RFC 5424 printable ASCII (33–126) for header fields, at most `max` characters; `-` when empty.
fn header_field(text: &str, max: usize) -> String {
    let field: String = text.chars().filter(|c| ('!'..='~').contains(c)).take(max).collect();
    if field.is_empty() { "-".into() } else { field }
}

/// One event as an RFC 5424 message, framed by octet counting (RFC 6587): facility
/// security/authorization (log audit, 13), severity notice for refusals and
/// releases, informational otherwise; the CloudEvent as the message (UTF-8, BOM).
pub fn syslog_frame(event: &Value, hostname: &str) -> Vec<u8> {
    let kind = event["type"].as_str().unwrap_or("");
    let severity = if kind.contains("denied") || kind.ends_with(".released") || kind.ends_with(".delete") { 5 } else { 6 };
    let priority = 13 * 8 + severity;
    let msgid = header_field(kind.strip_prefix("com.reachback.").unwrap_or(kind), 32);
    let message = format!(
        "<{priority}>1 {} {} reachback - {msgid} [reachback@32473 id=\"{}\" type=\"{}\" subject=\"{}\"] \u{feff}{}",
        header_field(event["time"].as_str().unwrap_or(""), 48),
        header_field(hostname, 255),
        sd_value(event["id"].as_str().unwrap_or("")),
        sd_value(kind),
        sd_value(event["subject"].as_str().unwrap_or("")),
        event
    );
    let mut frame = format!("{} ", message.len()).into_bytes();
    frame.extend_from_slice(message.as_bytes());
    frame
}

/// The syslog target's scheme, host and port: `tcp://host:port` or `tls://host:port`.
pub fn syslog_target(target: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(rest) = target.strip_prefix("tls://") {
        (true, rest)
    } else if let Some(rest) = target.strip_prefix("tcp://") {
        (false, rest)
    } else {
        return Err("must be tcp://host:port or tls://host:port".into());
    };
    let (host, port) = rest.rsplit_once(':').ok_or("must name a port: tcp://host:port")?;
    let port: u16 = port.parse().ok().filter(|port| *port > 0).ok_or("the port must be 1 to 65535")?;
    let host = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Err("must be tcp://host:port or tls://host:port".into());
    }
    Ok((tls, host.to_string(), port))
}

/// The deliverer: runs until the server is gone.
pub async fn deliver(state: Weak<AppState>) {
    let owner = match state.upgrade() {
        // a replica restarted under its name takes its own lease back at once
        Some(state) => state.config.node_name.clone(),
        None => return,
    };
    let mut failures: u32 = 0;
    loop {
        let Some(state) = state.upgrade() else { return };
        let busy = match round(&state, &owner).await {
            Ok(busy) => {
                if failures > 0 {
                    tracing::info!(failed_rounds = failures, "event delivery works again");
                    failures = 0;
                }
                busy
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                // the first failure, then at each doubling: a database away for a minute is a
                // handful of lines, not four a second
                if failures.is_power_of_two() {
                    tracing::warn!(%error, failed_rounds = failures, "event delivery round failed");
                }
                false
            }
        };
        drop(state);
        if !busy {
            tokio::time::sleep(round_delay(failures)).await;
        }
    }
}

/// The pause before the next round: [`IDLE`], doubled for each round in a row that
/// failed (the database unreachable), up to [`MAX_ROUND_DELAY`].
fn round_delay(failures: u32) -> Duration {
    IDLE.saturating_mul(1 << failures.min(16)).min(MAX_ROUND_DELAY)
}

/// The longest pause between rounds while they fail.
const MAX_ROUND_DELAY: Duration = Duration::from_secs(30);

/// One pass over the sinks; answers whether a sink still has a full batch waiting.
async fn round(state: &Arc<AppState>, owner: &str) -> anyhow::Result<bool> {
    let mut busy = false;
    let sinks = state.store.list_sinks_to_deliver().await?;
    for sink in sinks {
        let now = now_micros();
        if sink.next_attempt_at > now {
            continue;
        }
        let lease_until = now + i64::try_from(LEASE.as_micros()).unwrap_or(i64::MAX);
        if !state.store.lease_sink(&sink.id, owner, now, lease_until).await? {
            continue;
        }
        let events = state.store.outbox_batch(&sink.id, BATCH).await?;
        let Some(last) = events.last().map(|event| event.id) else { continue };
        let wanted: Vec<Value> = events.iter().filter(|event| wants(&sink.event_types, &event.kind)).map(cloud_event).collect();
        let labels = EventMetrics::labels(&sink.name);
        let outcome = if wanted.is_empty() { Ok(()) } else { send(state, &sink, &wanted).await };
        match outcome {
            Ok(()) => {
                let sent = i64::try_from(wanted.len()).unwrap_or(i64::MAX);
                state.store.outbox_delivered(&sink.id, last, sent, now_micros()).await?;
                state.metrics.events.delivered.get_or_create(&labels).inc_by(wanted.len() as u64);
                tracing::trace!(sink_id = %sink.id, events = wanted.len(), "events delivered");
                busy |= events.len() as i64 == BATCH;
            }
            Err(error) => {
                let wait = backoff(sink.failures);
                let now = now_micros();
                state.store.sink_failed(&sink.id, &error, now, now + i64::try_from(wait.as_micros()).unwrap_or(i64::MAX)).await?;
                state.metrics.events.failures.get_or_create(&labels).inc();
                tracing::warn!(sink_id = %sink.id, failures = sink.failures + 1, retry_in_s = wait.as_secs(), error = %error, "event delivery failed; will retry");
            }
        }
    }
    Ok(busy)
}

async fn send(state: &Arc<AppState>, sink: &SinkRow, events: &[Value]) -> Result<(), String> {
    match sink.kind.as_str() {
        "webhook" => {
            let secret = match &sink.secret_sealed {
                Some(sealed) => Some(
                    state
                        .secret_key
                        .open(sealed, SECRET_CONTEXT)
                        .map_err(|error| format!("the signing secret cannot be opened: {error}"))
                        .and_then(|bytes| String::from_utf8(bytes).map_err(|_| "the signing secret is not text".to_string()))?,
                ),
                None => None,
            };
            let body = Value::Array(events.to_vec()).to_string().into_bytes();
            let (target, ca) = (sink.target.clone(), sink.ca_certificate.clone());
            let first = events.first().and_then(|event| event["id"].as_str()).unwrap_or("").to_string();
            let last = events.last().and_then(|event| event["id"].as_str()).unwrap_or("").to_string();
            let id = format!("{first}..{last}");
            tokio::task::spawn_blocking(move || post_webhook(&target, ca.as_deref(), secret.as_deref(), &id, &body))
                .await
                .map_err(|error| format!("the delivery task failed: {error}"))?
        }
        "syslog" => send_syslog(sink, events, &state.config.node_name).await,
        other => Err(format!("unknown sink kind {other}")),
    }
}

/// POSTs one batch (`application/cloudevents-batch+json`) with the Standard
/// Webhooks headers; a 2xx answer is a delivery.
fn post_webhook(target: &str, ca: Option<&str>, secret: Option<&str>, id: &str, body: &[u8]) -> Result<(), String> {
    let roots = match ca {
        Some(pem) => {
            let certificates: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem.as_bytes())
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate.to_owned()),
                    _ => None,
                })
                .collect();
            ureq::tls::RootCerts::new_with_certs(&certificates)
        }
        None => ureq::tls::RootCerts::PlatformVerifier,
    };
    let config = ureq::config::Config::builder()
        .timeout_global(Some(SEND_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let timestamp = now_micros() / 1_000_000;
    let mut request = agent
        .post(target)
        .header("content-type", "application/cloudevents-batch+json")
        .header("user-agent", concat!("reachback/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(secret) = secret {
        let signature = signature(secret, id, timestamp, body).ok_or("the signing secret is malformed")?;
        request = request.header("webhook-signature", signature);
    }
    let response = request.send(body).map_err(|error| format!("POST failed: {error}"))?;
    let status = response.status();
    if status.is_success() { Ok(()) } else { Err(format!("the webhook answered {status}")) }
}

/// Writes one batch of RFC 5424 frames on a fresh TCP (or TLS) connection.
async fn send_syslog(sink: &SinkRow, events: &[Value], hostname: &str) -> Result<(), String> {
    let (tls, host, port) = syslog_target(&sink.target)?;
    let mut frames = Vec::with_capacity(events.len() * 512);
    for event in events {
        frames.extend_from_slice(&syslog_frame(event, hostname));
    }
    let write = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|error| format!("connect failed: {error}"))?;
        if tls {
            let config = syslog_tls(sink.ca_certificate.as_deref())?;
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|error| format!("bad server name: {error}"))?;
            let mut stream = tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|error| format!("TLS failed: {error}"))?;
            stream.write_all(&frames).await.map_err(|error| format!("write failed: {error}"))?;
            stream.shutdown().await.map_err(|error| format!("close failed: {error}"))
        } else {
            let mut stream = stream;
            stream.write_all(&frames).await.map_err(|error| format!("write failed: {error}"))?;
            stream.shutdown().await.map_err(|error| format!("close failed: {error}"))
        }
    };
    tokio::time::timeout(SEND_TIMEOUT, write).await.map_err(|_| "the syslog server did not take the batch in time".to_string())?
}

fn syslog_tls(ca: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let certificate = certificate.map_err(|error| format!("the sink's CA certificate: {error}"))?;
                roots.add(certificate).map_err(|error| format!("the sink's CA certificate: {error}"))?;
            }
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(certificate);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS setup: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Refreshes the per-sink gauges (pending events, age of the oldest) for `/metrics`.
pub fn observe(metrics: &EventMetrics, sinks: &[SinkRow], now: i64) {
    metrics.pending.clear();
    metrics.lag_seconds.clear();
    for sink in sinks {
        let labels = EventMetrics::labels(&sink.name);
        metrics.pending.get_or_create(&labels).set(sink.pending);
        let lag = sink.oldest_pending_at.map(|at| (now - at).max(0) as f64 / 1e6).unwrap_or(0.0);
        metrics.lag_seconds.get_or_create(&labels).set(lag);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn failing_rounds_back_off_to_half_a_minute_and_start_over() {
        assert_eq!(round_delay(0), IDLE);
        assert_eq!(round_delay(1), IDLE * 2);
        assert_eq!(round_delay(3), IDLE * 8);
        assert_eq!(round_delay(10), MAX_ROUND_DELAY);
        assert_eq!(round_delay(u32::MAX), MAX_ROUND_DELAY);
    }

    fn event(kind: &str, data: Value) -> OutboxEvent {
        OutboxEvent { id: 7, kind: kind.into(), subject: "100.64.0.9".into(), at: 1_765_000_000_123_456, data: data.to_string() }
    }

    #[test]
    fn cloud_events_carry_a_stable_id_and_the_data() {
        let released = cloud_event(&event("com.reachback.binding.released", json!({"interval_id": 42, "ip": "100.64.0.9"})));
        assert_eq!(released["specversion"], "1.0");
        assert_eq!(released["id"], "binding-42-released");
        assert_eq!(released["source"], SOURCE);
        assert_eq!(released["subject"], "100.64.0.9");
        assert_eq!(released["time"], "2025-12-06T05:46:40.123456Z");
        assert_eq!(released["data"]["ip"], "100.64.0.9");
        let audit = cloud_event(&event("com.reachback.ip_range.create", json!({"audit_id": "abc"})));
        assert_eq!(audit["id"], "audit-abc");
        let denied = cloud_event(&event("com.reachback.flow.denied", json!({"flow_id": 9})));
        assert_eq!(denied["id"], "flow-9");
        assert!(String::from_utf8(syslog_frame(&denied, "h")).unwrap_or_default().contains("<109>1 "), "a denial is a notice");
    }

    #[test]
    fn type_prefixes_select_events() {
        assert!(wants(&[], "com.reachback.binding.bound"));
        let types = vec!["com.reachback.binding.".to_string()];
        assert!(wants(&types, "com.reachback.binding.released"));
        assert!(!wants(&types, "com.reachback.ip_range.create"));
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let waits: Vec<u64> = (0..12).map(|failures| backoff(failures).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(i64::MAX).as_secs(), 300);
        assert_eq!(backoff(-3).as_secs(), 1);
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // the example of the Standard Webhooks specification
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(signature("not-a-secret", "id", 1, body).is_none());
        assert!(new_secret().unwrap().starts_with("whsec_"));
    }

    #[test]
    fn syslog_lines_are_rfc5424_with_octet_counting() {
        let released = cloud_event(&event("com.reachback.binding.released", json!({"interval_id": 1, "username": "a\"b]"})));
        let frame = String::from_utf8(syslog_frame(&released, "server one")).unwrap();
        let (length, message) = frame.split_once(' ').unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), message.len());
        assert!(
            message.starts_with("<109>1 2025-12-06T05:46:40.123456Z serverone reachback - binding.released [reachback@32473 id=\"binding-1-released\""),
            "{message}"
        );
        assert!(message.contains("\u{feff}{"), "{message}");
        let audit = cloud_event(&event("com.reachback.ip_range.create", json!({"audit_id": "x\"]"})));
        let frame = String::from_utf8(syslog_frame(&audit, "h")).unwrap();
        assert!(frame.contains("<110>1 ") && frame.contains(r#"id="audit-x\"\]""#), "{frame}");
    }

    #[test]
    fn syslog_targets_are_parsed_strictly() {
        assert_eq!(syslog_target("tcp://logs.corp.example:514").unwrap(), (false, "logs.corp.example".into(), 514));
        assert_eq!(syslog_target("tls://[fd00::1]:6514").unwrap(), (true, "fd00::1".into(), 6514));
        for bad in ["udp://x:514", "tcp://x", "tcp://:514", "tcp://x:0", "tcp://x:99999", "tcp://a@b:514", "https://x:1"] {
            assert!(syslog_target(bad).is_err(), "{bad}");
        }
    }
}
