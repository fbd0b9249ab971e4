//! `POST /api/v1/enroll`: an agent enrolls with a key, gets a virtual IP and a certificate.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use reachback_store::{EnrollFailure, EnrollJob, new_id, now_micros};
use serde_json::json;
use tokio::sync::oneshot;

use crate::auth::ClientIp;
use crate::crypto::{CertificateAuthority, hash_secret};
use crate::error::{ApiError, ApiResult};
use crate::request::{Fields, JsonObject};

use crate::state::SharedState;
use crate::validate;
use crate::writer::EnrollRequest;

pub async fn enroll(State(state): State<SharedState>, ClientIp(client_ip): ClientIp, headers: axum::http::HeaderMap, body: JsonObject) -> ApiResult<Response> {
    let result = enroll_inner(&state, &headers, body, client_ip).await;
    let label = match &result {
        Ok((StatusCode::CREATED, _)) => "created",
        Ok(_) => "reenrolled",
        Err(error) if error.status == StatusCode::UNAUTHORIZED => "unauthorized",
        Err(error) if error.status == StatusCode::CONFLICT => "conflict",
        Err(error) if error.status.is_client_error() => "invalid",
        Err(_) => "error",
    };
    state.metrics.count_enrollment(label);
    let (status, body) = result?;
    Ok((status, Json(body)).into_response())
}

async fn enroll_inner(
    state: &SharedState,
    headers: &axum::http::HeaderMap,
    body: JsonObject,
    source_ip: Option<String>,
) -> ApiResult<(StatusCode, serde_json::Value)> {
    let mut fields = Fields::of::<crate::api::bodies::EnrollBody>(body)?;
    // authentication comes first: a bad key is a 401 whatever else is wrong
    let secret = fields.string("enrollment_key", false).unwrap_or_default();
    if secret.is_empty() || secret.len() > 256 {
        return Err(ApiError::unauthorized("the enrollment key is missing or not valid"));
    }
    let settings = state.settings();
    let hostname = match fields.string("hostname", true).map(|name| validate::fqdn(name.trim())) {
        Some(Ok(name)) => {
            if !settings.client_domains.is_empty() && !settings.client_domains.iter().any(|domain| validate::in_domain(&name, domain)) {
                fields.error("hostname", format!("must lie inside one of the client domains: {}", settings.client_domains.join(", ")));
            }
            Some(name)
        }
        Some(Err(message)) => {
            fields.error("hostname", message);
            None
        }
        None => None,
    };
    let platform = fields.string("platform", true).map(|platform| platform.trim().to_ascii_lowercase());
    if let Some(platform) = &platform
        && !validate::PLATFORMS.contains(&platform.as_str())
    {
        fields.error("platform", format!("must be one of: {}", validate::PLATFORMS.join(", ")));
    }
    let public_key = fields.public_key("public_key");
    let location = fields.location("location").flatten();
    if !fields.errors.is_empty() {
        // authentication comes first: invalid values are reported only with a valid key
        let key = state.store.find_enrollment_key(&hash_secret(&secret)).await?;
        if key.is_none_or(|key| key.revoked || key.expires_at.is_some_and(|at| at <= now_micros())) {
            return Err(ApiError::unauthorized("the enrollment key is not valid"));
        }
        fields.finish()?;
    }
    let (Some(hostname), Some(platform), Some(public_key)) = (hostname, platform, public_key) else {
        return Err(ApiError::invalid_field("request", "is incomplete"));
    };
    let serial = CertificateAuthority::new_serial();
    let job = EnrollJob {
        key_hash: hash_secret(&secret),
        new_device_id: new_id(),
        hostname: hostname.clone(),
        platform,
        public_key_fingerprint: public_key.fingerprint.clone(),
        certificate_serial: serial.iter().map(|byte| format!("{byte:02x}")).collect(),
        location,
        source_ip,
    };
    let (reply, receiver) = oneshot::channel();
    state.enroll_tx.send(EnrollRequest { job, reply }).await.map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    let written = receiver.await.map_err(|_| ApiError::unavailable("the server is shutting down"))??;
    let outcome = match written {
        Ok(outcome) => outcome,
        Err(EnrollFailure::UnknownKey) => return Err(ApiError::unauthorized("the enrollment key is not valid")),
        Err(EnrollFailure::KeyRevokedOrExpired) => return Err(ApiError::unauthorized("the enrollment key is revoked or expired")),
        Err(EnrollFailure::KeySpent) => return Err(ApiError::unauthorized("the enrollment key has been used")),
        Err(EnrollFailure::HostnameTaken) => return Err(ApiError::conflict(format!("the hostname {hostname} is held by another device"))),
        Err(EnrollFailure::HostnameNotAllowed { pattern }) => {
            return Err(ApiError::invalid_field("hostname", format!("is not one the enrollment key allows ({pattern})")));
        }
        Err(EnrollFailure::Exhausted) => {
            state.metrics.allocation_failures.inc();
            tracing::warn!("enrollment refused: every enabled range is full");
            let _ = state
                .store
                .record_audit(reachback_store::AuditEntry {
                    actor: "system".into(),
                    action: "allocation_failed".into(),
                    resource_type: "ip_binding".into(),
                    resource_id: hostname.clone(),
                    after: Some(json!({"reason": "no free address in any enabled range"})),
                    ..Default::default()
                })
                .await;
            return Err(ApiError::conflict("no free address is left in any enabled range; add or enable a range"));
        }
    };
    let certificate =
        state.ca.sign_device(&public_key, &outcome.device_id, &hostname, serial, state.config.certificate_lifetime).map_err(ApiError::internal)?;
    tracing::debug!(device_id = %outcome.device_id, hostname = %hostname, virtual_ip = %outcome.virtual_ip, "device enrolled");
    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        status,
        crate::api::views::json_of(&crate::api::views::Enrollment {
            device_id: outcome.device_id,
            virtual_ip: outcome.virtual_ip,
            range_name: outcome.range_name,
            certificate,
            ca_certificate: state.ca.certificate_pem.clone(),
            broker_endpoints: state.broker_endpoints(headers),
        }),
    ))
}
