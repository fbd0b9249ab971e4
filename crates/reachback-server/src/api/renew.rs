//! `POST /api/v1/devices/{id}/renew` and `POST /api/v1/connectors/{id}/renew`: a
//! client whose certificate expired while it was offline (so it cannot open a
//! tunnel and renew there) proves it holds the key it enrolled with and gets a
//! fresh certificate for it. The binding is untouched: same device, same address.
//!
//! Authenticated by a signature over `reachback_proto::renewal::renewal_message`
//! with the enrolled key, within a few minutes of the server's clock; anything
//! wrong is one 401 that does not say what was wrong.
//!
//! `POST /api/v1/devices/{id}/leave` and `POST /api/v1/connectors/{id}/leave`, signed
//! the same way over `leave_message`: a client that enrolls as another identity tells
//! the server the old one is discarded. A device is then deleted (its address
//! released, its certificate revoked); a connector's enrolled key stops opening
//! tunnels until it is given a new provisioning key.

use axum::Json;
use axum::extract::{Path, State};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::crypto::{CertificateAuthority, DevicePublicKey};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject};
use crate::state::SharedState;

fn refused() -> ApiError {
    ApiError::unauthorized("the renewal is not authenticated: sign the renewal message with the enrolled key, with a current signed_at")
}

/// The last accepted signed request per identity (`kind:id` → its `signed_at` and
/// when it was taken): a request is taken only when it is newer than the last one
/// (no replay inside the clock window), and a renewal at most once per a third of
/// the certificates' lifetime (ten minutes at most) per identity.
static ACCEPTED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, (i64, std::time::Instant)>>> = std::sync::OnceLock::new();

/// Takes a signed request of `kind:id` at `signed_at`, or refuses it as a replay or too soon.
fn take(kind: &str, id: &str, signed_at: i64, min_interval: Option<std::time::Duration>) -> ApiResult<()> {
    let mut accepted = ACCEPTED.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = format!("{kind}:{id}");
    if let Some((last_signed_at, at)) = accepted.get(&key) {
        if signed_at <= *last_signed_at {
            return Err(refused());
        }
        if let Some(interval) = min_interval
            && at.elapsed() < interval
        {
            let wait = interval.saturating_sub(at.elapsed()).as_secs().max(1);
            return Err(ApiError::too_many_requests("this certificate was renewed moments ago; use the one issued then", wait));
        }
    }
    if accepted.len() > 200_000 {
        // entries past the clock window can no longer stop a replay: forget them
        let window = std::time::Duration::from_secs(2 * reachback_proto::renewal::RENEWAL_CLOCK_SKEW_SECONDS as u64);
        accepted.retain(|_, (_, at)| at.elapsed() < window.max(std::time::Duration::from_secs(600)));
    }
    accepted.insert(key, (signed_at, std::time::Instant::now()));
    Ok(())
}

fn renewal_interval(state: &SharedState) -> Option<std::time::Duration> {
    Some((state.config.certificate_lifetime / 3).min(std::time::Duration::from_secs(600)))
}

/// Checks the body: the key, the time, the signature over `message(kind, id, signed_at)`. Returns the key and `signed_at`.
fn authenticate(kind: &str, id: &str, body: JsonObject, message: fn(&str, &str, i64) -> String) -> ApiResult<(DevicePublicKey, i64)> {
    let mut fields = Fields::of::<crate::api::bodies::SignedBody>(body)?;
    let public_key = fields.public_key("public_key");
    let signed_at = fields.integer("signed_at", 0, i64::MAX);
    let signature = fields.string("signature", true);
    fields.finish()?;
    let (Some(public_key), Some(signed_at), Some(signature)) = (public_key, signed_at, signature) else { return Err(refused()) };
    let now = reachback_store::now_micros() / 1_000_000;
    if (now - signed_at).abs() > reachback_proto::renewal::RENEWAL_CLOCK_SKEW_SECONDS {
        return Err(refused());
    }
    let signature = base64::engine::general_purpose::STANDARD.decode(signature.trim()).map_err(|_| refused())?;
    let message = message(kind, id, signed_at);
    if !public_key.verify(message.as_bytes(), &signature) {
        return Err(refused());
    }
    Ok((public_key, signed_at))
}

async fn audit(state: &SharedState, kind: &str, id: &str, serial: [u8; 16]) -> ApiResult<()> {
    state
        .store
        .record_audit(reachback_store::AuditEntry {
            actor: format!("{kind}:{id}"),
            action: "renew_certificate".into(),
            resource_type: kind.into(),
            resource_id: id.to_string(),
            after: Some(json!({
                "serial": serial.iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
                "lifetime_seconds": state.config.certificate_lifetime.as_secs(),
                "over": "api",
            })),
            ..Default::default()
        })
        .await?;
    state.metrics.broker.certificates_renewed.inc();
    Ok(())
}

pub async fn renew_device(State(state): State<SharedState>, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    let (public_key, signed_at) = authenticate("device", &id, body, reachback_proto::renewal::renewal_message)?;
    let device = match state.store.get_device(&id).await {
        Ok(device) if device.public_key_fingerprint == public_key.fingerprint => device,
        Ok(_) | Err(reachback_store::StoreError::NotFound) => return Err(refused()),
        Err(error) => return Err(error.into()),
    };
    take("renew-device", &id, signed_at, renewal_interval(&state))?;
    let serial = CertificateAuthority::new_serial();
    let certificate = state.ca.sign_device(&public_key, &device.id, &device.hostname, serial, state.config.certificate_lifetime).map_err(ApiError::internal)?;
    audit(&state, "device", &device.id, serial).await?;
    tracing::info!(device_id = %device.id, "device certificate renewed over the API");
    Ok(Json(crate::api::views::json_of(&crate::api::views::DeviceRenewal {
        certificate,
        ca_certificate: state.ca.certificate_pem.clone(),
        virtual_ip: device.virtual_ip,
    })))
}

pub async fn renew_connector(State(state): State<SharedState>, Path(id): Path<String>, body: JsonObject) -> ApiResult<Json<Value>> {
    let (public_key, signed_at) = authenticate("connector", &id, body, reachback_proto::renewal::renewal_message)?;
    let connector = match state.store.get_connector(&id).await {
        Ok(connector) if !connector.revoked && connector.key_fingerprint.as_deref() == Some(public_key.fingerprint.as_slice()) => connector,
        Ok(_) | Err(reachback_store::StoreError::NotFound) => return Err(refused()),
        Err(error) => return Err(error.into()),
    };
    take("renew-connector", &id, signed_at, renewal_interval(&state))?;
    let serial = CertificateAuthority::new_serial();
    let certificate = state.ca.sign_connector(&public_key, &connector.id, serial, state.config.certificate_lifetime).map_err(ApiError::internal)?;
    audit(&state, "connector", &connector.id, serial).await?;
    tracing::info!(connector_id = %connector.id, "connector certificate renewed over the API");
    Ok(Json(crate::api::views::json_of(&crate::api::views::ConnectorRenewal { certificate, ca_certificate: state.ca.certificate_pem.clone() })))
}

/// The device's own audit entry for leaving.
fn left(kind: &str, id: &str, before: Option<Value>) -> reachback_store::AuditEntry {
    reachback_store::AuditEntry {
        actor: format!("{kind}:{id}"),
        action: "leave".into(),
        resource_type: kind.into(),
        resource_id: id.to_string(),
        before,
        ..Default::default()
    }
}

pub async fn leave_device(State(state): State<SharedState>, Path(id): Path<String>, body: JsonObject) -> ApiResult<axum::response::Response> {
    let (public_key, signed_at) = authenticate("device", &id, body, reachback_proto::renewal::leave_message)?;
    take("leave-device", &id, signed_at, None)?;
    match state.store.get_device(&id).await {
        Ok(device) if device.public_key_fingerprint == public_key.fingerprint => {}
        Ok(_) | Err(reachback_store::StoreError::NotFound) => return Err(refused()),
        Err(error) => return Err(error.into()),
    }
    crate::api::devices::remove(&state, &id, reachback_store::ReleaseReason::DeviceLeft, |row| {
        left("device", &id, Some(json!({"hostname": row.hostname, "virtual_ip": row.virtual_ip})))
    })
    .await?;
    tracing::info!(device_id = %id, "a device left (it enrolled anew elsewhere)");
    Ok(crate::api::no_content())
}

pub async fn leave_connector(State(state): State<SharedState>, Path(id): Path<String>, body: JsonObject) -> ApiResult<axum::response::Response> {
    let (public_key, signed_at) = authenticate("connector", &id, body, reachback_proto::renewal::leave_message)?;
    take("leave-connector", &id, signed_at, None)?;
    match state.store.get_connector(&id).await {
        Ok(connector) if !connector.revoked && connector.key_fingerprint.as_deref() == Some(public_key.fingerprint.as_slice()) => {}
        Ok(_) | Err(reachback_store::StoreError::NotFound) => return Err(refused()),
        Err(error) => return Err(error.into()),
    }
    state.store.connector_left(&id, left("connector", &id, None)).await?;
    state.broker.kick_connector(&id);
    tracing::info!(connector_id = %id, "a connector's host left it (it enrolled as another connector)");
    Ok(crate::api::no_content())
}
