//! Who is calling: API keys (`Authorization: Bearer …`) and console session
//! cookies, and the roles that gate each action.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{Method, header};
use reachback_store::{AuditEntry, Principal};

use crate::crypto::hash_secret;
use crate::error::ApiError;
use crate::state::SharedState;

/// Roles, least to most privileged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Admin,
    Superadmin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "admin" => Some(Role::Admin),
            "superadmin" => Some(Role::Superadmin),
            _ => None,
        }
    }
}

pub const SESSION_COOKIE: &str = "reachback_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub role: Role,
    pub client_ip: Option<String>,
}

impl Caller {
    /// 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {} role",
                match role {
                    Role::Viewer => "viewer",
                    Role::Admin => "admin",
                    Role::Superadmin => "superadmin",
                }
            )))
        }
    }

    /// An audit entry for a change this caller makes.
    pub fn audit(
        &self,
        action: &str,
        resource_type: &str,
        resource_id: &str,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) -> AuditEntry {
        AuditEntry {
            actor: self.principal.username.clone(),
            action: action.into(),
            resource_type: resource_type.into(),
            resource_id: resource_id.into(),
            before,
            after,
            source_ip: self.client_ip.clone(),
        }
    }
}

/// The caller's address, for handlers that authenticate by themselves (sign-in).
pub struct ClientIp(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(parts)))
    }
}

pub fn client_ip(parts: &Parts) -> Option<String> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(address)| address.ip().to_string())
}

fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get_all(header::COOKIE).iter().filter_map(|value| value.to_str().ok()).flat_map(|value| value.split(';')).find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Self::Rejection> {
        let client_ip = client_ip(parts);
        let bearer = parts.headers.get(header::AUTHORIZATION).map(|value| value.to_str().unwrap_or(""));
        let principal = if let Some(value) = bearer {
            let Some(token) = value.strip_prefix("Bearer ").map(str::trim).filter(|token| !token.is_empty() && token.len() <= 256) else {
                return Err(ApiError::unauthorized("use 'Authorization: Bearer <api key>'"));
            };
            let principal = state.store.principal_for_api_key(&hash_secret(token)).await?.ok_or_else(|| ApiError::unauthorized("the API key is not valid"))?;
            let stale = principal.last_used_at.is_none_or(|at| reachback_store::now_micros() - at > 60_000_000);
            if stale && let Some(key_id) = principal.session_id.strip_prefix("key:") {
                let (store, key_id, ip) = (state.store.clone(), key_id.to_string(), client_ip.clone());
                tokio::spawn(async move {
                    if let Err(error) = store.touch_api_key(&key_id, ip.as_deref()).await {
                        tracing::debug!(%error, "could not note API key use");
                    }
                });
            }
            principal
        } else if let Some(token) = cookie(parts, SESSION_COOKIE) {
            let principal =
                state.store.principal_for_session(&hash_secret(token)).await?.ok_or_else(|| ApiError::unauthorized("the session has ended; sign in again"))?;
            let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if !safe {
                let sent = parts.headers.get(CSRF_HEADER).and_then(|value| value.to_str().ok());
                if sent.is_none() || sent != principal.csrf_token.as_deref() {
                    return Err(ApiError::forbidden("missing or wrong CSRF token"));
                }
            }
            principal
        } else {
            return Err(ApiError::unauthorized("authentication required: 'Authorization: Bearer <api key>'"));
        };
        let role = Role::parse(&principal.role).ok_or_else(|| ApiError::internal("stored role is unknown"))?;
        Ok(Caller { principal, role, client_ip })
    }
}
