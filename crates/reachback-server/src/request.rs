//! Reading requests: JSON bodies field by field (unknown fields refused, each bad
//! value reported against its field), query strings with allowed keys, paging,
//! timestamps.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};

/// A JSON object body, read with the router's size limit.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
            let content_type = content_type.to_str().unwrap_or("");
            if !content_type.starts_with("application/json") && !content_type.starts_with("application/merge-patch+json") {
                return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Unsupported media type", "send the body as application/json"));
            }
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "Payload too large", "the request body is larger than the server accepts (64 KiB)")
            } else {
                ApiError::bad_request(format!("the request body could not be read: {rejection}"))
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::bad_request("the request body must be a JSON object")),
            Err(error) => Err(ApiError::bad_request(format!("the request body is not valid JSON: {error}"))),
        }
    }
}

/// The fields a request-body type has, and whether each takes `null`, from the
/// type's schema (the same schema the OpenAPI document shows).
/// Worked out once per type (the schema does not change while the server runs).
pub fn body_fields<T: utoipa::PartialSchema + 'static>() -> std::sync::Arc<[(String, bool)]> {
    type Cache = std::sync::RwLock<std::collections::HashMap<std::any::TypeId, std::sync::Arc<[(String, bool)]>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = std::any::TypeId::of::<T>();
    if let Some(fields) = cache.read().ok().and_then(|cache| cache.get(&key).cloned()) {
        return fields;
    }
    let schema = serde_json::to_value(T::schema()).unwrap_or(Value::Null);
    let fields: std::sync::Arc<[(String, bool)]> = match schema.get("properties").and_then(Value::as_object) {
        Some(properties) => properties.iter().map(|(name, property)| (name.clone(), takes_null(property))).collect(),
        None => std::sync::Arc::from(Vec::new()),
    };
    if let Ok(mut cache) = cache.write() {
        cache.insert(key, fields.clone());
    }
    fields
}

/// Whether a JSON schema admits `null`: `type: [.., "null"]`, or a `null` branch of a `oneOf`/`anyOf`.
pub fn takes_null(schema: &Value) -> bool {
    let null_type = |schema: &Value| match schema.get("type") {
        Some(Value::String(kind)) => kind == "null",
        Some(Value::Array(kinds)) => kinds.iter().any(|kind| kind == "null"),
        _ => false,
    };
    null_type(schema) || ["oneOf", "anyOf"].iter().any(|key| schema.get(*key).and_then(Value::as_array).is_some_and(|branches| branches.iter().any(null_type)))
}

/// Reads typed fields out of a JSON object, collecting every problem.
pub struct Fields {
    map: Map<String, Value>,
    pub errors: Vec<FieldError>,
}

impl Fields {
    /// Reads a body of type `T`: refuses (400) any field `T` does not have, and
    /// (422) `null` for a field whose schema does not take it (leaving a field out
    /// is how a client keeps a value; `null` clears only where the document says so).
    pub fn of<T: utoipa::PartialSchema + 'static>(JsonObject(map): JsonObject) -> Result<Self, ApiError> {
        let allowed = body_fields::<T>();
        let unknown: Vec<&str> = map.keys().map(String::as_str).filter(|key| !allowed.iter().any(|(name, _)| name == key)).collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = allowed.iter().map(|(name, _)| name.as_str()).collect();
            return Err(ApiError::bad_request(format!("unknown field(s): {}; allowed: {}", unknown.join(", "), names.join(", "))));
        }
        let mut fields = Fields { map, errors: Vec::new() };
        for (name, nullable) in allowed.iter() {
            if !nullable && fields.map.get(name).is_some_and(Value::is_null) {
                fields.error(name, "must not be null; leave the field out to keep its value");
            }
        }
        if !fields.errors.is_empty() {
            return Err(ApiError::invalid(fields.errors));
        }
        Ok(fields)
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.map.get(name)
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.into(), message: message.into() });
    }

    /// A string field; `None` when absent or null (a required one is reported).
    pub fn string(&mut self, name: &str, required: bool) -> Option<String> {
        match self.map.get(name) {
            None | Some(Value::Null) => {
                if required {
                    self.error(name, "is required");
                }
                None
            }
            Some(Value::String(text)) => Some(text.clone()),
            Some(_) => {
                self.error(name, "must be a string");
                None
            }
        }
    }

    pub fn boolean(&mut self, name: &str) -> Option<bool> {
        match self.map.get(name) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(value)) => Some(*value),
            Some(_) => {
                self.error(name, "must be true or false");
                None
            }
        }
    }

    pub fn integer(&mut self, name: &str, min: i64, max: i64) -> Option<i64> {
        match self.map.get(name) {
            None | Some(Value::Null) => None,
            // JSON has one number type: 60.0 is the whole number 60
            Some(Value::Number(number)) => match number
                .as_i64()
                .or_else(|| number.as_f64().filter(|value| value.fract() == 0.0 && value.abs() < 9.0e15).map(|value| value as i64))
                .filter(|value| (min..=max).contains(value))
            {
                Some(value) => Some(value),
                None => {
                    self.error(name, format!("must be a whole number from {min} to {max}"));
                    None
                }
            },
            Some(_) => {
                self.error(name, "must be a number");
                None
            }
        }
    }

    pub fn string_list(&mut self, name: &str) -> Option<Vec<String>> {
        match self.map.get(name) {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(text) => list.push(text.clone()),
                        _ => {
                            self.error(name, "must be a list of strings");
                            return None;
                        }
                    }
                }
                Some(list)
            }
            Some(_) => {
                self.error(name, "must be a list of strings");
                None
            }
        }
    }

    /// A required PEM public key (ECDSA P-256 or Ed25519); problems are collected.
    pub fn public_key(&mut self, name: &str) -> Option<crate::crypto::DevicePublicKey> {
        match crate::crypto::parse_public_key(&self.string(name, true)?) {
            Ok(key) => Some(key),
            Err(message) => {
                self.error(name, message);
                None
            }
        }
    }

    /// A location object: `None` when absent, `Some(None)` when null.
    pub fn location(&mut self, name: &str) -> Option<Option<reachback_ipam::Location>> {
        let value = self.map.get(name)?.clone();
        let mut errors = Vec::new();
        let location = crate::validate::location(&value, name, &mut errors);
        self.errors.extend(errors);
        Some(location)
    }

    /// 422 with every collected error, if any.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() { Ok(()) } else { Err(ApiError::invalid(self.errors)) }
    }
}

/// Query-string parameters, checked against the keys an endpoint knows.
pub struct QueryParams {
    values: BTreeMap<String, String>,
}

/// 1-based page, page size and the derived offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub page: i64,
    pub page_size: i64,
}

impl Paging {
    pub fn offset(&self) -> i64 {
        (self.page - 1) * self.page_size
    }
}

const MAX_OFFSET: i64 = 1_000_000_000;
/// The last page a listing serves (with 1,000 items a page: the billionth item).
pub const MAX_PAGE: i64 = 1_000_000;
/// The longest query value taken, in characters.
pub const MAX_QUERY_VALUE: usize = 1024;

impl QueryParams {
    /// Parses `raw`; unknown keys and repeated keys are a 400.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut values = BTreeMap::new();
        for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if !allowed.contains(&key.as_ref()) {
                return Err(ApiError::bad_parameter(&key, format!("unknown query parameter '{key}'; allowed: {}", allowed.join(", "))));
            }
            if value.chars().count() > MAX_QUERY_VALUE {
                return Err(ApiError::bad_parameter(&key, format!("query parameter '{key}' is longer than {MAX_QUERY_VALUE} characters")));
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ApiError::bad_parameter(&key, format!("query parameter '{key}' is given more than once")));
            }
        }
        Ok(QueryParams { values })
    }

    /// A non-empty text filter.
    pub fn text(&self, key: &str) -> Option<String> {
        self.values.get(key).map(|value| value.trim().to_string()).filter(|value| !value.is_empty())
    }

    pub fn paging(&self) -> Result<Paging, ApiError> {
        let number = |key: &str, default: i64| -> Result<i64, ApiError> {
            match self.values.get(key) {
                None => Ok(default),
                Some(text) => text.parse::<i64>().map_err(|_| ApiError::bad_parameter(key, format!("'{key}' must be a whole number, got '{text}'"))),
            }
        };
        let page = number("page", 1)?;
        let page_size = number("page_size", 50)?;
        if !(1..=MAX_PAGE).contains(&page) {
            return Err(ApiError::bad_parameter("page", format!("'page' must be from 1 to {MAX_PAGE}")));
        }
        if !(1..=1000).contains(&page_size) {
            return Err(ApiError::bad_parameter("page_size", "'page_size' must be from 1 to 1000"));
        }
        if (page - 1).checked_mul(page_size).is_none_or(|offset| offset > MAX_OFFSET) {
            return Err(ApiError::bad_parameter("page", "'page' is beyond any possible result"));
        }
        Ok(Paging { page, page_size })
    }

    /// The sort field (one of `allowed`) and whether it is descending.
    pub fn sort<'a>(&self, allowed: &[&'a str], default: &'a str) -> Result<(&'a str, bool), ApiError> {
        let Some(text) = self.values.get("sort") else { return Ok((default, false)) };
        let (descending, name) = match text.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, text.as_str()),
        };
        match allowed.iter().find(|field| **field == name) {
            Some(field) => Ok((field, descending)),
            None => Err(ApiError::bad_parameter("sort", format!("cannot sort by '{name}'; sort by one of: {}", allowed.join(", ")))),
        }
    }

    /// A typed value (a time, a number, one of a set): `None` when left out, and an
    /// empty value is refused (the document types it; only text filters may be empty).
    pub fn value(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.values.get(key).map(|value| value.trim()) {
            None => Ok(None),
            Some("") => Err(ApiError::bad_parameter(key, format!("'{key}' is empty; leave the parameter out instead"))),
            Some(value) => Ok(Some(value.to_string())),
        }
    }

    pub fn timestamp(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.value(key)? {
            None => Ok(None),
            Some(text) => parse_time(&text)
                .map(Some)
                .ok_or_else(|| ApiError::bad_parameter(key, format!("'{key}' must be an RFC 3339 timestamp such as 2026-01-31T12:00:00Z"))),
        }
    }

    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.values.get(key).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ApiError::bad_parameter(key, format!("'{key}' must be true or false, got '{other}'"))),
        }
    }
}

/// Microseconds since the epoch as an RFC 3339 UTC string.
pub fn format_time(micros: i64) -> String {
    let nanos = i128::from(micros) * 1000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|moment| moment.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub fn parse_time(text: &str) -> Option<i64> {
    let moment = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(moment.unix_timestamp_nanos() / 1000).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn paging_limits() {
        let ok = QueryParams::parse(Some("page=3&page_size=1000"), &["page", "page_size"]).unwrap().paging().unwrap();
        assert_eq!((ok.page, ok.page_size, ok.offset()), (3, 1000, 2000));
        for bad in ["page=0", "page_size=1001", "page=-1", "page=abc", "page=99999999999999999999", "page=9223372036854775807"] {
            assert!(QueryParams::parse(Some(bad), &["page", "page_size"]).unwrap().paging().is_err(), "{bad}");
        }
        assert!(QueryParams::parse(Some("bogus=1"), &["page"]).is_err());
        assert!(QueryParams::parse(Some("page=1&page=2"), &["page"]).is_err());
    }

    #[test]
    fn times_round_trip() {
        let micros = parse_time("2026-11-22T16:25:17.123456Z").unwrap();
        assert_eq!(format_time(micros), "2026-11-22T16:25:17.123456Z");
        assert_eq!(parse_time("yesterday"), None);
    }
}
