//! The one mapping from failures to HTTP status codes and RFC 9457 problem documents.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use reachback_store::StoreError;
use serde_json::{Value, json};

/// A field-level validation message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// An API failure, rendered as `application/problem+json`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub extra: Vec<(&'static str, Value)>,
    /// seconds for the `Retry-After` header
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, title, detail: detail.into(), errors: Vec::new(), extra: Vec::new(), retry_after: None }
    }

    /// 429 with a `Retry-After` header.
    pub fn too_many_requests(detail: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError { retry_after: Some(retry_after_seconds), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "Too many requests", detail) }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad request", detail)
    }

    /// 400 for a bad query parameter, named in `errors` as a form would need it.
    pub fn bad_parameter(name: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        ApiError { errors: vec![FieldError { field: name.to_string(), message: detail.clone() }], ..Self::bad_request(detail) }
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", detail)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found", format!("{what} not found"))
    }

    /// A store error, with "not found" naming what was looked for.
    pub fn not_found_or(error: StoreError, what: &str) -> Self {
        match error {
            StoreError::NotFound => ApiError::not_found(what),
            other => other.into(),
        }
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict", detail)
    }

    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = errors.iter().map(|error| format!("{}: {}", error.field, error.message)).collect::<Vec<_>>().join("; ");
        ApiError { errors, ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid values", detail) }
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::invalid(vec![FieldError { field: field.into(), message: message.into() }])
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", "the server failed to handle the request; see its log")
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", detail)
    }

    pub fn with(mut self, key: &'static str, value: Value) -> Self {
        self.extra.push((key, value));
        self
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::not_found("resource"),
            StoreError::Overlap { id, name, range } => ApiError::conflict(format!("the range overlaps range '{name}' ({range})"))
                .with("conflicts_with", json!({"id": id, "name": name, "range": range})),
            StoreError::Duplicate(what) => ApiError::conflict(format!("the {what} is already taken")),
            StoreError::Confusable(existing) => {
                ApiError::conflict(format!("the name looks like the existing {existing:?} (letters from another script, or the same in another form)"))
                    .with("existing", serde_json::Value::String(existing))
            }
            StoreError::RangeInUse(count) => {
                ApiError::conflict(format!("the range has {count} bindings; delete with ?force=true to release them")).with("bindings", json!(count))
            }
            StoreError::InUse(detail) => ApiError::conflict(format!("still in use: {detail}")),
            StoreError::LastWayIn => ApiError::conflict(
                "no superadmin could sign in after this change (none would have a password or an API key left); \
                 give a superadmin a password or another API key first",
            ),
            StoreError::BindingsOutside(count) => ApiError::conflict(format!("{count} bound addresses would fall outside the new range")),
            error @ (StoreError::Database(_) | StoreError::Sqlite(_)) if error.is_transient() => {
                ApiError::unavailable("the database is busy or unreachable; try again")
            }
            StoreError::Database(error) => ApiError::internal(error),
            StoreError::Sqlite(error) => ApiError::internal(error),
            StoreError::Corrupt(detail) => ApiError::internal(detail),
            StoreError::Unsupported(detail) => ApiError::internal(detail),
            StoreError::Internal(detail) => ApiError::internal(detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        for (key, value) in self.extra {
            body[key] = value;
        }
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
